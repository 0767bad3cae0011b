"""--fsdp (minisft/fsdp.py): 2 CPU processes (gloo) with FSDP2 against 1 process and against DDP.

One module-scoped fixture runs the trainer a few times under torchrun on a tiny model; the tests
compare what those runs wrote: losses, gradient norms, final weights, a resumed run, final/ for
transformers, and the one-line errors of bad input.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minisft import train as T
from test_train import tiny_model as tiny_model_files, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def torchrun(args, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "minisft.train", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(ln) for ln in f]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """1 process, DDP on 2, --fsdp on 2, and --fsdp on 2 stopped after step 2 then resumed."""
    d = tmp_path_factory.mktemp("fsdp")
    model = tiny_model_files(d)[0]
    common = ["--model", model, "--data", write_jsonl(d / "train.jsonl", 32, 1),
              "--val-data", write_jsonl(d / "val.jsonl", 8, 2), "--batch-size", "2", "--grad-accum", "2",
              "--lr", "3e-3", "--max-steps", "4", "--eval-every", "2", "--sample-every", "2", "--num-samples", "1",
              "--sample-tokens", "4", "--plot-every", "0", "--save-every", "2", "--device", "cpu"]
    out = {k: str(d / k) for k in ("one", "ddp", "fsdp", "resumed")}
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = ["--batch-size", "4"]  # 1 process: 4 x 2 examples per step, as 2 processes with 2 x 2 each
        assert T.main(common + one + ["--out", out["one"]]) == 0
    finally:
        torch.set_num_threads(old)
    results = {"model": model, "common": common, "out": out, "dir": d}
    for name, extra in (("ddp", []), ("fsdp", ["--fsdp"]), ("resumed", ["--fsdp", "--stop-after-step", "2"])):
        r = torchrun(common + extra + ["--out", out[name]])
        if name == "resumed":  # a child's exit code 130 (interrupted) is torchrun's 1
            assert r.returncode != 0 and "interrupted after 2 steps" in r.stdout, r.stderr[-3000:]
        else:
            assert r.returncode == 0, r.stderr[-3000:]
    r = torchrun(["--out", out["resumed"], "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    return results


def weights(out):
    return load_file(os.path.join(out, "final", "model.safetensors"))


def test_fsdp_matches_one_process_and_ddp(runs):
    """Same target tokens, losses, gradient norms, validation losses and final weights, to float tolerance."""
    one, ddp, fs = (metrics(runs["out"][k]) for k in ("one", "ddp", "fsdp"))
    assert len(one) == len(fs) == 4
    assert [x["tokens"] for x in one] == [x["tokens"] for x in ddp] == [x["tokens"] for x in fs]
    for ref in (one, ddp):
        for x, y in zip(ref, fs):
            for key in ("loss", "grad_norm", "val_loss"):
                assert abs(x.get(key, 0) - y.get(key, 0)) < 1e-5, (key, x, y)
    w_one, w_ddp, w_fs = (weights(runs["out"][k]) for k in ("one", "ddp", "fsdp"))
    assert set(w_fs) == set(w_one)
    for k in w_one:
        assert w_fs[k].dtype == torch.float32 and w_fs[k].shape == w_one[k].shape
        assert torch.allclose(w_fs[k], w_one[k], atol=1e-5) and torch.allclose(w_fs[k], w_ddp[k], atol=1e-5)
    first = load_file(os.path.join(runs["model"], "model.safetensors"))
    assert any(not torch.equal(first[k], w_fs[k]) for k in w_fs)  # it trained


def test_fsdp_checkpoint_is_sharded_per_process(runs):
    ckpt = Path(runs["out"]["fsdp"]) / "checkpoints" / "step_000004"
    names = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file())
    assert names == ["rng_0.pt", "rng_1.pt", "sharded/.metadata", "sharded/__0_0.distcp", "sharded/__1_0.distcp",
                     "state.json"]
    assert json.loads((ckpt / "state.json").read_text())["world_size"] == 2


def test_fsdp_resume_is_exact(runs):
    """Stopped after step 2, resumed: the same metrics and bit-identical final weights as the run
    that never stopped."""
    full, resumed = metrics(runs["out"]["fsdp"]), metrics(runs["out"]["resumed"])
    drop = set(T.TIMING_KEYS)
    assert [{k: v for k, v in r.items() if k not in drop} for r in full] == \
           [{k: v for k, v in r.items() if k not in drop} for r in resumed]
    a, b = weights(runs["out"]["fsdp"]), weights(runs["out"]["resumed"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def as_after_step_2(src, dst):
    """A copy of run folder src as it stood after step 2: its later checkpoint and final/ removed."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints" / "step_000004")
    shutil.rmtree(dst / "final")
    return dst


def same_run(a, b, tol):
    """Run folders a and b: the same tokens per step, losses, gradient norms and validation losses
    (to tol), and final weights (to tol)."""
    ma, mb = metrics(a), metrics(b)
    assert [x["tokens"] for x in ma] == [x["tokens"] for x in mb] and len(ma) == 4
    for x, y in zip(ma, mb):
        for key in ("loss", "grad_norm", "val_loss"):
            assert abs(x.get(key, 0) - y.get(key, 0)) < tol, (key, x, y)
    wa, wb = weights(a), weights(b)
    assert set(wa) == set(wb) and all(torch.allclose(wa[k], wb[k], atol=tol) for k in wa)


def test_fsdp_resume_on_another_number_of_processes(runs, tmp_path):
    """2 processes stopped after step 2 carry on as 1 (torchrun, --fsdp): the shards are re-cut as
    they load, --grad-accum 2 becomes 4 so each step keeps its 4 micro-batches, and the run ends as
    the 2-process run did, to float rounding."""
    out = as_after_step_2(Path(runs["out"]["fsdp"]), tmp_path / "to1")
    r = torchrun(["--out", str(out), "--resume"], nproc=1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--resume: 2 -> 1 processes, so --grad-accum 2 -> 4" in r.stdout
    same_run(runs["out"]["fsdp"], out, 1e-5)
    state = json.loads((out / "checkpoints" / "step_000004" / "state.json").read_text())
    assert state["world_size"] == 1 and state["config"]["grad_accum"] == 4


def test_ddp_resume_in_one_process(runs, tmp_path):
    """The same without --fsdp: a 2-process DDP run carries on in one process (no torchrun)."""
    out = as_after_step_2(Path(runs["out"]["ddp"]), tmp_path / "ddp1")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert T.main(["--out", str(out), "--resume"]) == 0
    finally:
        torch.set_num_threads(old)
    same_run(runs["out"]["ddp"], out, 1e-5)


def test_resume_on_a_count_that_cannot_share_the_step_is_a_one_line_error(runs, tmp_path):
    """4 micro-batches per step (2 processes x 2) cannot be shared by 3 processes; a --grad-accum
    that changes the global batch is refused too. Both before anything is loaded or written."""
    from minisft.config import TrainConfig
    from minisft.rundir import match_world
    out = as_after_step_2(Path(runs["out"]["fsdp"]), tmp_path / "to3")
    cfg = TrainConfig(out=str(out), resume=True, grad_accum=2)
    with pytest.raises(ValueError, match=r"^--resume: the run made 4 micro-batches per step \(2 processes x "
                                         r"--grad-accum 2\); 3 processes cannot share them evenly"):
        match_world(cfg, 3)
    with pytest.raises(ValueError, match=r"^--resume: --grad-accum 3 x 1 processes makes 3 micro-batches per step; "
                                         r"the run made 4"):
        match_world(TrainConfig(out=str(out), resume=True, grad_accum=3), 1)
    assert match_world(cfg, 4).grad_accum == 1 and match_world(cfg, 2) is cfg
    assert match_world(TrainConfig(out=str(out), resume=True, grad_accum=4), 1).grad_accum == 4


def test_fsdp_final_loads_in_transformers(runs):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(runs["out"]["fsdp"], "final"))
    w = weights(runs["out"]["fsdp"])
    hf_sd = hf.state_dict()
    assert all(torch.equal(hf_sd[k], w[k]) for k in w)


def test_fsdp_without_torchrun_is_a_one_line_error(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "no"
    assert T.main(runs["common"] + ["--fsdp", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --fsdp shards the model over processes that torchrun starts") and err.count("\n") == 1
    assert not out.exists()


def test_fsdp_uneven_validation_batches_is_a_one_line_error(runs, tmp_path):
    """8 validation examples in batches of 3 make 3 batches: 2 processes cannot take as many each."""
    out = tmp_path / "uneven"
    r = torchrun(runs["common"] + ["--fsdp", "--batch-size", "3", "--out", str(out)])
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert lines and lines[0].startswith("error: --fsdp with 2 processes: the validation set makes 3 batches")
    assert "not a multiple of 2" in lines[0]
    assert not (out / "metrics.jsonl").exists()


def test_fsdp_resume_with_a_missing_shard_is_a_one_line_error(runs, tmp_path):
    out = tmp_path / "broken"
    shutil.copytree(runs["out"]["fsdp"], out)
    before = (out / "metrics.jsonl").read_text()
    (out / "checkpoints" / "step_000004" / "sharded" / "__1_0.distcp").unlink()
    r = torchrun(["--out", str(out), "--resume"])
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert lines and "__1_0.distcp is missing (process 1's part of a checkpoint written by 2 processes)" in lines[0]
    assert (out / "metrics.jsonl").read_text() == before  # nothing overwritten


def test_fsdp_with_lora_and_activation_checkpointing_matches_one_process(runs, tmp_path):
    """LoRA's adapters are sharded with their blocks; checkpointing reruns a block, gathered again.
    Both together give one process's losses and adapter weights; final/ is a peft adapter folder."""
    lora = ["--lora-r", "4", "--grad-checkpointing", "--max-steps", "2", "--save-every", "0", "--sample-every", "0"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert T.main(runs["common"] + lora + ["--batch-size", "4", "--out", one]) == 0
    finally:
        torch.set_num_threads(old)
    r = torchrun(runs["common"] + lora + ["--fsdp", "--out", two])
    assert r.returncode == 0, r.stderr[-3000:]
    for x, y in zip(metrics(one), metrics(two), strict=True):
        assert abs(x["loss"] - y["loss"]) < 1e-5 and abs(x["grad_norm"] - y["grad_norm"]) < 1e-5
    a, b = (load_file(os.path.join(o, "final", "adapter_model.safetensors")) for o in (one, two))
    assert set(a) == set(b) and a
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_two_nodes_on_localhost_match_one_node(runs, tmp_path):
    """torchrun --nnodes 2: two launchers (here both on 127.0.0.1), one process each, give the run
    that 2 processes on one node gave."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "nodes")
    launchers = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
               "-m", "minisft.train", *runs["common"], "--fsdp", "--out", out]
        launchers.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          env=dict(os.environ, OMP_NUM_THREADS="1")))
    results = [p.communicate(timeout=300) for p in launchers]
    assert [p.returncode for p in launchers] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    for x, y in zip(metrics(runs["out"]["fsdp"]), metrics(out), strict=True):
        for key in ("loss", "grad_norm", "val_loss"):
            assert abs(x.get(key, 0) - y.get(key, 0)) < 1e-6
    a, b = weights(runs["out"]["fsdp"]), weights(out)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_fsdp_memory_bench_measures_each_process_against_the_count(capsys):
    """python -m minisft.bench.fsdp_memory: 1 plain process and 2 under FSDP run the trainer's step;
    the table carries memory.estimate's count for each and the resident memory each step measured."""
    from minisft import memory
    from minisft.bench import fsdp_memory
    model = str(ROOT / "data" / "base-model")
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("the measurement reads Linux's /proc/self/status")
    assert fsdp_memory.main(["--model", model, "--world-sizes", "1,2", "--max-length", "32", "--steps", "2",
                             "--json"]) == 0
    out = capsys.readouterr().out
    rows = json.loads(out.strip().splitlines()[-1])
    assert [(r["processes"], r["sharding"]) for r in rows] == [(1, "none"), (2, "FSDP")]
    for r in rows:
        est = memory.estimate(model, 1, 32, dtype="float32", world_size=r["processes"], fsdp=r["processes"] > 1)
        assert r["counted_mb"] == est["total"] / 1e6
        assert 0 < r["step_mb"] <= r["whole_run_mb"] and r["base_mb"] > 0
    assert "step/count" in out and f"{rows[1]['counted_mb']:,.0f}" in out
