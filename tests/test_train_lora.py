"""The trainer with LoRA and with activation checkpointing: everything it does still holds."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from minisft import checkpoint as C, data, train as T
from minisft.lora import add_lora, lora_parameters
from minisft.model import SmolLM
from minisft.weights import load_pretrained
from test_train import ROOT, config, grads_of, micro, read_metrics, tiny  # noqa: F401  (fixtures)

LORA = dict(lora_r=4, lora_alpha=8, lora_dropout=0.1)


def lora_config(tiny, out, **kw):
    return config(tiny, out, **{**LORA, **kw})


def test_lora_accumulation_equals_one_big_batch_float64(tiny):
    examples = micro(tiny)
    pad = tiny["tok"].pad_id
    torch.manual_seed(0)
    model = SmolLM(tiny["cfg"]).double()
    add_lora(model, r=4, alpha=8, targets="all-linear")
    for _, p in lora_parameters(model):  # B = 0 at init: make the adapters matter
        torch.nn.init.normal_(p, std=0.1)
    model.double()
    big = [data.to_device(data.collate(examples, pad), "cpu")]
    n = data.count_targets(big[0]["labels"])
    T.accumulate_gradients(model, big, n)
    g_big = {k: v for k, v in grads_of_trainable(model).items()}
    model.zero_grad()
    pieces = [data.to_device(data.collate(examples[i:i + 2], pad), "cpu") for i in range(0, 8, 2)]
    T.accumulate_gradients(model, pieces, n)
    g_acc = grads_of_trainable(model)
    assert g_big.keys() == g_acc.keys() and all(k.endswith(("lora_A", "lora_B")) for k in g_big)
    assert max((g_big[k] - g_acc[k]).abs().max().item() for k in g_big) <= 1e-10
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)  # the base gets none


def grads_of_trainable(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_lora_chunked_loss_matches_full_logits(tiny, tmp_path):
    a = T.train(lora_config(tiny, tmp_path / "chunked", max_steps=3, sample_every=0, lora_dropout=0.0))
    b = T.train(lora_config(tiny, tmp_path / "full", max_steps=3, sample_every=0, lora_dropout=0.0,
                            chunked_loss=False))
    for x, y in zip(read_metrics(a["out"]), read_metrics(b["out"])):
        assert abs(x["loss"] - y["loss"]) < 1e-5 and abs(x["grad_norm"] - y["grad_norm"]) < 1e-4


def test_lora_run_resume_is_exact_and_checkpoints_hold_only_adapters(tiny, tmp_path):
    full = T.train(lora_config(tiny, tmp_path / "full", patience=5))
    part = T.train(lora_config(tiny, tmp_path / "part", patience=5, stop_after_step=3))  # Ctrl-C after 3 steps
    assert part["interrupted"]
    done = T.train(lora_config(tiny, tmp_path / "part", patience=5, resume=True))
    assert done["steps"] == 6
    assert read_metrics(full["out"]) == read_metrics(done["out"])  # bitwise, dropout included
    with open(tmp_path / "full" / "samples.jsonl") as f1, open(tmp_path / "part" / "samples.jsonl") as f2:
        assert f1.read() == f2.read()
    a = load_file(tmp_path / "full" / "final" / "adapter_model.safetensors")
    b = load_file(tmp_path / "part" / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # A checkpoint holds the adapters only (plus their AdamW moments), not the base model.
    ckpt = C.list_checkpoints(str(tmp_path / "full" / "checkpoints"))[-1]
    keys = load_file(os.path.join(ckpt, "model.safetensors")).keys()
    assert keys and all(k.endswith((".lora_A", ".lora_B")) for k in keys)
    assert set(load_file(tmp_path / "full" / "checkpoints" / "best.safetensors")) == set(keys)
    # final/ is a peft adapter folder; loading it gives the trained model.
    cfg = json.loads((tmp_path / "full" / "final" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["base_model_name_or_path"] == os.path.abspath(tiny["model"])


def test_lora_final_holds_the_best_evaluation_and_loads_back(tiny, tmp_path):
    out = T.train(lora_config(tiny, tmp_path / "run", lr=3e-2, patience=1, eval_every=1, max_steps=12,
                              sample_every=0))
    best = load_file(tmp_path / "run" / "checkpoints" / "best.safetensors")
    model, _ = load_pretrained(out["final"], device="cpu")
    mine = {n: p for n, p in model.named_parameters() if n in best}
    assert mine.keys() == best.keys() and all(torch.equal(mine[k].float(), best[k].float()) for k in best)


def test_lora_evaluation_and_samples_run(tiny, tmp_path):
    out = T.train(lora_config(tiny, tmp_path / "run", max_steps=3, sample_every=3, eval_every=3))
    rows = read_metrics(out["out"])
    assert "val_loss" in rows[-1] and rows[-1]["val_loss"] > 0
    samples = [json.loads(ln) for ln in open(tmp_path / "run" / "samples.jsonl")]
    assert len(samples) == 2 and all("answer" in s for s in samples)


@pytest.mark.parametrize("lora", [False, True])
def test_grad_checkpointing_gives_the_same_run(tiny, tmp_path, lora):
    kw = dict(LORA, lora_dropout=0.1) if lora else {}
    a = T.train(config(tiny, tmp_path / "plain", max_steps=3, sample_every=0, **kw))
    b = T.train(config(tiny, tmp_path / "ckpt", max_steps=3, sample_every=0, grad_checkpointing=True, **kw))
    for x, y in zip(read_metrics(a["out"]), read_metrics(b["out"])):
        assert abs(x["loss"] - y["loss"]) <= 1e-6 * abs(x["loss"])
        assert abs(x["grad_norm"] - y["grad_norm"]) <= 1e-6 * abs(x["grad_norm"])
        assert abs(x.get("val_loss", 0) - y.get("val_loss", 0)) <= 1e-6 * abs(x.get("val_loss", 1))


def test_lora_with_a_bfloat16_base(tiny, tmp_path):
    a = T.train(lora_config(tiny, tmp_path / "fp32", max_steps=3, sample_every=0, lora_dropout=0.0))
    b = T.train(lora_config(tiny, tmp_path / "bf16", max_steps=3, sample_every=0, lora_dropout=0.0,
                            base_dtype="bfloat16"))
    for x, y in zip(read_metrics(a["out"]), read_metrics(b["out"])):
        assert abs(x["loss"] - y["loss"]) < 0.05 * x["loss"] and x["loss"] != y["loss"]
    adapters = load_file(tmp_path / "bf16" / "final" / "adapter_model.safetensors")
    assert all(t.dtype == torch.float32 for t in adapters.values())


def test_bad_lora_settings_one_line_errors(tiny, tmp_path, capsys):
    base = ["--model", tiny["model"], "--data", tiny["train"], "--out", str(tmp_path / "o"), "--device", "cpu"]
    for args, message in ((["--lora-r", "-1"], "--lora-r=-1"), (["--lora-r", "4", "--lora-alpha", "0"], "--lora-alpha"),
                          (["--lora-r", "4", "--lora-dropout", "1"], "--lora-dropout"),
                          (["--base-dtype", "bfloat16"], "--base-dtype"),
                          (["--lora-r", "4", "--lora-targets", "qq_proj"], "qq_proj")):
        assert T.main(base + args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_lora_two_processes_match_one(tiny, tmp_path):
    single = T.train(lora_config(tiny, tmp_path / "one", max_steps=3, sample_every=0, lora_dropout=0.0))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "minisft.train", "--model", tiny["model"], "--data", tiny["train"], "--val-data", tiny["val"],
           "--out", str(tmp_path / "two"), "--batch-size", "2", "--grad-accum", "2", "--lr", "3e-3",
           "--max-steps", "3", "--eval-every", "2", "--sample-every", "0", "--plot-every", "0", "--device", "cpu",
           "--lora-r", "4", "--lora-alpha", "8"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = read_metrics(single["out"]), read_metrics(str(tmp_path / "two"))
    assert [x["tokens"] for x in one] == [x["tokens"] for x in two]
    for x, y in zip(one, two):
        assert abs(x["loss"] - y["loss"]) < 1e-5 and abs(x["grad_norm"] - y["grad_norm"]) < 1e-5
