"""The training loop: gradient accumulation, resume, NaN guard, checkpoints, CLI (tiny model, CPU)."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minisft import checkpoint as C, data, train as T
from minisft.default_model import train_tokenizer, write_model
from minisft.model import ModelConfig, SmolLM
from minisft.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
WORDS = "the river ladder was built by a clever person in the north of an old city near water".split()


def conversation(rng):
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    extra = " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 12)))  # uneven lengths
    return {"messages": [{"role": "user", "content": f"What is {a} + {b}? {extra}".strip()},
                         {"role": "assistant", "content": f"{a} + {b} = {a + b}."}]}


def write_jsonl(path, n, seed):
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            f.write(json.dumps(conversation(rng)) + "\n")
    return str(path)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def tiny_model(d):
    """A tiny random SmolLM (hidden 32, 2 layers, vocab 300) in Hugging Face layout under d/model
    -> (its folder, tokenizer, config)."""
    corpus = d / "corpus.txt"
    rng = random.Random(0)
    corpus.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(20)) + f" {i} + {i} = {2 * i}."
                                  for i in range(200)), encoding="utf-8")
    tok = Tokenizer(train_tokenizer(str(corpus), vocab_size=300),
                    {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>"})
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                      bos_token_id=tok.im_start_id, eos_token_id=tok.im_end_id, pad_token_id=tok.pad_id)
    torch.manual_seed(0)
    write_model(SmolLM(cfg), tok, str(d / "model"), dtype=torch.float32)
    return str(d / "model"), tok, cfg


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random SmolLM (tiny_model) + jsonl data."""
    d = tmp_path_factory.mktemp("tiny")
    model, tok, cfg = tiny_model(d)
    return {"model": model, "tok": tok, "cfg": cfg,
            "train": write_jsonl(d / "train.jsonl", 48, 1), "val": write_jsonl(d / "val.jsonl", 8, 2)}


def config(tiny, out, **kw):
    base = dict(model=tiny["model"], data=tiny["train"], val_data=tiny["val"], out=str(out), batch_size=4,
                grad_accum=2, lr=3e-3, max_steps=6, eval_every=2, save_every=2, sample_every=3, num_samples=2,
                sample_tokens=8, plot_every=0, device="cpu", seed=0)
    base.update(kw)
    return T.TrainConfig(**base)


def read_metrics(out, timing=False):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(ln) for ln in f]
    return rows if timing else [{k: v for k, v in r.items() if k not in T.TIMING_KEYS} for r in rows]


def final_weights(out):
    from safetensors.torch import load_file
    return load_file(os.path.join(out, "final", "model.safetensors"))


# ---- gradient accumulation ------------------------------------------------------------------
def micro(tiny, n=8, seed=3):
    rng = random.Random(seed)
    convs = [conversation(rng)["messages"] for _ in range(n)]
    examples, _ = data.build_examples(tiny["tok"], convs, "smollm2")
    assert len({len(e["input_ids"]) for e in examples}) > 3  # really uneven
    return examples


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_accumulation_equals_one_big_batch_float64(tiny):
    examples = micro(tiny)
    pad = tiny["tok"].pad_id
    torch.manual_seed(0)
    model = SmolLM(tiny["cfg"]).double()

    big = [T.to_device(data.collate(examples, pad), "cpu")]
    n = data.count_targets(big[0]["labels"])
    loss_big = T.accumulate_gradients(model, big, n)
    g_big = grads_of(model)

    model.zero_grad()
    pieces = [T.to_device(data.collate(examples[i:i + 2], pad), "cpu") for i in range(0, 8, 2)]
    assert sum(data.count_targets(p["labels"]) for p in pieces) == n
    loss_acc = T.accumulate_gradients(model, pieces, n)
    g_acc = grads_of(model)
    assert abs(float(loss_big) - float(loss_acc)) < 1e-10
    assert max((g_big[k] - g_acc[k]).abs().max().item() for k in g_big) <= 1e-10

    # The biased recipe (mean of the micro-batch means) gives measurably different gradients.
    model.zero_grad()
    for p in pieces:
        s, c = T.batch_loss(model, p)
        (s / c / len(pieces)).backward()
    g_mom = grads_of(model)
    assert max((g_big[k] - g_mom[k]).abs().max().item() for k in g_big) > 1e-4


def test_all_masked_micro_batch_gives_no_nan(tiny):
    examples = micro(tiny, n=4)
    pad = tiny["tok"].pad_id
    model = SmolLM(tiny["cfg"])
    masked = data.collate(examples[:2], pad)
    masked["labels"].fill_(-100)
    normal = data.collate(examples[2:], pad)
    n = data.count_targets(normal["labels"])
    loss = T.accumulate_gradients(model, [T.to_device(masked, "cpu"), T.to_device(normal, "cpu")], n)
    assert torch.isfinite(loss) and float(loss) > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    model.zero_grad()  # a global batch with no target at all: loss 0, zero gradients, still no NaN
    loss = T.accumulate_gradients(model, [T.to_device(masked, "cpu")], 0)
    assert float(loss) == 0.0 and all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_weight_decay_only_on_matrices(tiny):
    model = SmolLM(tiny["cfg"])
    decay, no_decay = T.param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(names[id(p)].endswith("proj.weight") for p in decay["params"])
    assert any(names[id(p)] == "model.embed_tokens.weight" for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


# ---- runs -------------------------------------------------------------------------------------
def test_batch_split_equivalence(tiny, tmp_path):
    a = T.train(config(tiny, tmp_path / "a", batch_size=4, grad_accum=1, max_steps=3, sample_every=0))
    b = T.train(config(tiny, tmp_path / "b", batch_size=1, grad_accum=4, max_steps=3, sample_every=0))
    ra, rb = read_metrics(a["out"]), read_metrics(b["out"])
    assert len(ra) == len(rb) == 3
    for x, y in zip(ra, rb):
        assert x["tokens"] == y["tokens"] and x["lr"] == y["lr"]
        assert abs(x["loss"] - y["loss"]) < 1e-6
        assert abs(x["grad_norm"] - y["grad_norm"]) < 1e-6 * max(1.0, x["grad_norm"])


def test_resume_is_exact(tiny, tmp_path):
    full = T.train(config(tiny, tmp_path / "full"))
    assert full["stop_reason"] == "finished"
    assert sorted(os.listdir(tmp_path / "full" / "checkpoints")) == ["step_000004", "step_000006"]  # keep 2
    part = T.train(config(tiny, tmp_path / "part", stop_after_step=3))  # like Ctrl-C after 3 steps
    assert part["interrupted"] and part["steps"] == 3
    assert os.path.isdir(tmp_path / "part" / "checkpoints" / "step_000003")
    assert not os.path.exists(tmp_path / "part" / "final")
    done = T.train(config(tiny, tmp_path / "part", resume=True))
    assert done["steps"] == 6 and not done["interrupted"]
    assert read_metrics(full["out"]) == read_metrics(done["out"])  # bitwise: == on the floats
    fw, dw = final_weights(full["out"]), final_weights(done["out"])
    assert fw.keys() == dw.keys() and all(torch.equal(fw[k], dw[k]) for k in fw)
    with open(tmp_path / "full" / "samples.jsonl") as f1, open(tmp_path / "part" / "samples.jsonl") as f2:
        assert f1.read() == f2.read()


def test_interrupt_inside_a_step_then_resume(tiny, tmp_path, monkeypatch):
    full = T.train(config(tiny, tmp_path / "full", sample_every=0))
    calls = {"n": 0}
    real = T.batch_loss

    def flaky(*a, **k):  # Ctrl-C in the middle of step 4's accumulation (2 micro-batches per step)
        calls["n"] += 1
        if calls["n"] == 4 * 2 + 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(T, "batch_loss", flaky)
    part = T.train(config(tiny, tmp_path / "part", sample_every=0, eval_every=0))
    assert part["interrupted"] and part["steps"] == 4
    monkeypatch.setattr(T, "batch_loss", real)
    T.train(config(tiny, tmp_path / "part", sample_every=0, eval_every=0, resume=True))
    # eval_every differs (it is not a trajectory setting): compare the training numbers only
    strip = lambda rows: [{k: r[k] for k in ("step", "loss", "lr", "grad_norm", "tokens")} for r in rows]
    assert strip(read_metrics(full["out"])) == strip(read_metrics(str(tmp_path / "part")))
    fw, pw = final_weights(full["out"]), final_weights(str(tmp_path / "part"))
    assert all(torch.equal(fw[k], pw[k]) for k in fw)


def test_nan_stops_and_keeps_last_good_checkpoint(tiny, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = T.batch_loss

    def poisoned(*a, **k):
        calls["n"] += 1
        s, n = real(*a, **k)
        return (s * float("inf") if calls["n"] == 5 * 2 + 1 else s), n  # step 5's first micro-batch

    monkeypatch.setattr(T, "batch_loss", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(FloatingPointError, match=r"step 5: loss is inf.*step_000004"):
        T.train(config(tiny, out, sample_every=0, eval_every=0))
    assert [r["step"] for r in read_metrics(str(out))] == [0, 1, 2, 3, 4]
    ckpts = C.list_checkpoints(str(out / "checkpoints"))
    assert [os.path.basename(c) for c in ckpts] == ["step_000002", "step_000004"]
    model = SmolLM(tiny["cfg"])
    opt = torch.optim.AdamW(T.param_groups(model, 0.01))
    assert C.load_checkpoint(ckpts[-1], model, opt)["step"] == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_checkpoint_is_atomic(tiny, tmp_path, monkeypatch):
    out = tmp_path / "atomic"
    calls = {"n": 0}
    real = C.rng_state

    def dies(*a, **k):  # the second checkpoint fails after model.safetensors and optimizer.pt are written
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(*a, **k)

    monkeypatch.setattr(C, "rng_state", dies)
    with pytest.raises(OSError, match="disk full"):
        T.train(config(tiny, out, sample_every=0))
    ckdir = out / "checkpoints"
    assert sorted(os.listdir(ckdir)) == ["step_000002"]  # no half-written step_000004, no temp left
    # A run killed while saving leaves a temporary folder: it is never taken for a checkpoint.
    junk = ckdir / ".tmp-step_000004-x"
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(b"half")
    assert [os.path.basename(c) for c in C.list_checkpoints(str(ckdir))] == ["step_000002"]
    monkeypatch.setattr(C, "rng_state", real)
    summary = T.train(config(tiny, out, sample_every=0, resume=True))
    assert summary["steps"] == 6 and not junk.exists()


def test_a_full_disk_is_a_one_line_error_and_leaves_no_half_checkpoint(tiny, tmp_path, monkeypatch, capsys):
    """torch.save reports a full disk as RuntimeError (its zip writer), not OSError: the CLI still says
    what could not be written in one line, exits 2, and the earlier checkpoint is all that is left."""
    out = tmp_path / "full"
    calls = {"n": 0}
    real = C.torch.save

    def full_disk(obj, path, *a, **k):  # the second checkpoint's optimizer.pt hits a full disk
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 49614848 vs 49614740")
        return real(obj, path, *a, **k)

    monkeypatch.setattr(C.torch, "save", full_disk)
    argv = ["--model", tiny["model"], "--data", tiny["train"], "--val-data", tiny["val"], "--out", str(out),
            "--batch-size", "4", "--grad-accum", "2", "--max-steps", "6", "--save-every", "2", "--eval-every", "0",
            "--sample-every", "0", "--plot-every", "0", "--device", "cpu"]
    assert T.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "step_000004: could not be written" in err, err
    assert "Is the disk full?" in err
    assert sorted(os.listdir(out / "checkpoints")) == ["step_000002"]  # no half-written step_000004, no temp


def test_cli_run_writes_everything_and_transformers_loads_it(tiny, tmp_path, capsys):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "minisft.train", "--model", tiny["model"], "--data", tiny["train"],
           "--val-data", tiny["val"], "--out", str(out), "--batch-size", "8", "--grad-accum", "1",
           "--lr", "1e-2", "--max-steps", "24", "--warmup-steps", "2", "--eval-every", "8", "--save-every", "8",
           "--sample-every", "12", "--plot-every", "12", "--sample-tokens", "8", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert "step    23/24" in r.stdout and "val loss" in r.stdout
    for name in ("metrics.jsonl", "samples.jsonl", "loss.png", "metrics.png", "final/config.json",
                 "final/model.safetensors", "final/tokenizer.json", "checkpoints/step_000024/optimizer.pt"):
        assert (out / name).is_file(), name
    rows = read_metrics(str(out), timing=True)
    assert [r["step"] for r in rows] == list(range(24))
    assert all(r["tokens_per_sec"] > 0 and r["peak_mem_mb"] > 0 for r in rows)
    assert sum(r["loss"] for r in rows[-4:]) < 0.8 * sum(r["loss"] for r in rows[:4])
    assert [r["step"] for r in rows if "val_loss" in r] == [7, 15, 23]
    samples = [json.loads(ln) for ln in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [11] * 3 + [23] * 3
    assert {"answer", "ends_with_im_end", "repetition"} <= samples[0].keys()

    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out / "final"), dtype=torch.float32).eval()
    from minisft.weights import load_pretrained
    ours, _ = load_pretrained(str(out / "final"), dtype=torch.float32, device="cpu")
    ids = torch.tensor([tiny["tok"].encode("<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n")])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)

    # The run folder is not overwritten without --resume / --overwrite.
    capsys.readouterr()
    assert T.main(cmd[3:]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out") and err.count("\n") == 1 and "--resume" in err


@pytest.mark.parametrize("args, message", [
    (["--grad-accum", "0"], "--grad-accum=0"),
    (["--lr", "-1"], "--lr=-1.0"),
    (["--batch-size", "0"], "--batch-size=0"),
    (["--max-steps", "3", "--epochs", "1"], "choose one"),
    (["--warmup-steps", "3", "--warmup-ratio", "0.1"], "choose one"),
    (["--data", "nope.jsonl"], "nope.jsonl: no such file"),
    (["--val-data", "nope.jsonl"], "nope.jsonl: no such file"),
    (["--model", "/nonexistent/model"], "/nonexistent/model"),
    (["--lr", "abc"], "invalid float value"),
    (["--template", "llama"], "--template='llama'"),
])
def test_bad_arguments_one_line_error(tiny, tmp_path, capsys, args, message):
    argv = ["--model", tiny["model"], "--data", tiny["train"], "--out", str(tmp_path / "o"), "--device", "cpu"] + args
    try:
        rc = T.main(argv)
    except SystemExit as e:  # argparse's own errors (wrong types)
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_sample_prompt_longer_than_the_context_is_left_out(tiny, tmp_path, capsys):
    """A validation conversation too long for the model must not stop the run at a sample step."""
    val = tmp_path / "val.jsonl"
    long_q = " ".join(["river"] * 400)  # well past max_position_embeddings=256
    rows = [{"messages": [{"role": "user", "content": long_q}, {"role": "assistant", "content": "ok"}]},
            {"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]}]
    val.write_text("".join(json.dumps(r) + "\n" for r in rows))
    T.train(config(tiny, tmp_path / "run", val_data=str(val), max_steps=2, sample_every=1, eval_every=0))
    assert "1 sample prompt(s) left out" in capsys.readouterr().out
    samples = [json.loads(ln) for ln in open(tmp_path / "run" / "samples.jsonl")]
    assert {r["question"] for r in samples} == {"What is 2 + 2?"}


def test_overfitting_warning_rule():
    # val loss still catching up with a lagging train loss: the gap grows towards 0, no memorising
    assert not T.overfitting([-1.58, -0.9, -0.3, -0.06], 3)
    assert T.overfitting([-0.01, 0.02, 0.05, 0.11], 3)  # above train loss and pulling away
    assert not T.overfitting([0.02, 0.05, 0.04, 0.11], 3)  # one evaluation did not grow
    assert not T.overfitting([0.05, 0.11], 3)  # too few evaluations yet
    assert not T.overfitting([0.01, 0.02, 0.05, 0.11], 0)  # 0 = off
    assert T.overfitting([9.0, -0.01, 0.02, 0.05, 0.11], 3)  # only the last n + 1 gaps count


def test_unknown_chat_template_needs_template_flag(tiny, tmp_path, capsys):
    """A tokenizer whose template is no format minisft renders: an error, not a silent guess."""
    import shutil
    model = tmp_path / "llama_style"
    shutil.copytree(tiny["model"], model)
    tc_path = model / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["chat_template"] = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    tc_path.write_text(json.dumps(tc))
    argv = ["--model", str(model), "--data", tiny["train"], "--out", str(tmp_path / "o"), "--device", "cpu",
            "--max-steps", "1", "--sample-every", "0"]
    assert T.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {model}: its chat template") and err.count("\n") == 1 and "--template" in err
    assert not (tmp_path / "o").exists()  # nothing written
    assert T.main(argv + ["--template", "chatml"]) == 0


def test_resume_without_checkpoint_is_an_error(tmp_path, capsys):
    assert T.main(["--out", str(tmp_path / "empty"), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_two_processes_match_one(tiny, tmp_path):
    """torchrun, 2 CPU processes (gloo), 2 x 2 x 2 examples per step == 1 process with 4 x 2."""
    single = T.train(config(tiny, tmp_path / "one", max_steps=3, sample_every=0))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "minisft.train", "--model", tiny["model"], "--data", tiny["train"], "--val-data", tiny["val"],
           "--out", str(tmp_path / "two"), "--batch-size", "2", "--grad-accum", "2", "--lr", "3e-3",
           "--max-steps", "3", "--eval-every", "2", "--sample-every", "0", "--plot-every", "0", "--device", "cpu"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = read_metrics(single["out"]), read_metrics(str(tmp_path / "two"))
    assert [x["tokens"] for x in one] == [x["tokens"] for x in two]
    for x, y in zip(one, two):
        assert abs(x["loss"] - y["loss"]) < 1e-5 and abs(x["grad_norm"] - y["grad_norm"]) < 1e-5
        assert abs(x.get("val_loss", 0) - y.get("val_loss", 0)) < 1e-5


def test_repetition_loop_detector():
    assert T.repetition_loop([5, 6, 7] + [1, 2, 3] * 4)
    assert T.repetition_loop([9] * 10) and T.repetition_loop([4, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2])  # cut mid-block
    assert not T.repetition_loop([1, 2, 3, 4, 1, 2, 3, 4, 5, 6, 7])  # recurs, but not a loop at the end
    assert not T.repetition_loop([7, 7, 7])  # too short to call a loop


def test_bfloat16_autocast_run_tracks_float32(tiny, tmp_path):
    """--dtype bfloat16 is the path CUDA takes by default: float32 weights, bf16 matmuls under autocast.
    On CPU the same autocast runs, so its losses must stay close to the float32 run's and the saved
    weights stay float32."""
    a = T.train(config(tiny, tmp_path / "fp32", max_steps=4, sample_every=0, dtype="float32"))
    b = T.train(config(tiny, tmp_path / "bf16", max_steps=4, sample_every=0, dtype="bfloat16"))
    ra, rb = read_metrics(a["out"]), read_metrics(b["out"])
    for x, y in zip(ra, rb):
        assert torch.isfinite(torch.tensor(y["loss"]))
        assert abs(x["loss"] - y["loss"]) < 0.05 * x["loss"]
        assert x["loss"] != y["loss"]  # autocast really ran in bf16
    assert all(t.dtype == torch.float32 for t in final_weights(b["out"]).values())


def test_final_carries_the_trained_chat_template(tiny, tmp_path):
    """The tiny tokenizer has no chat template (like a base model); a run with --template chatml must
    write it into final/, so transformers renders conversations as the model was trained."""
    from transformers import AutoTokenizer
    from minisft.chat_template import render
    assert tiny["tok"].chat_template is None
    out = T.train(config(tiny, tmp_path / "run", max_steps=1, sample_every=0, template="chatml"))
    hf = AutoTokenizer.from_pretrained(os.path.join(out["out"], "final"))
    msgs = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."}]
    assert hf.apply_chat_template(msgs, tokenize=False) == render(msgs, "chatml")
    gen = hf.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert gen == render(msgs[:1], "chatml", add_generation_prompt=True)
    log = []
    assert T.final_template(tiny["tok"], "smollm3", log.append) is None and "warning" in log[0]


# ---- --freeze-embeddings (lesson 10) -----------------------------------------------------------
def test_freeze_embeddings_trains_only_the_chat_token_rows(tiny, tmp_path):
    run = T.train(config(tiny, tmp_path / "frozen", freeze_embeddings=True, max_steps=3, sample_every=0,
                         save_every=0))
    from safetensors.torch import load_file
    before = load_file(os.path.join(tiny["model"], "model.safetensors"))["model.embed_tokens.weight"]
    after = final_weights(run["out"])["model.embed_tokens.weight"]
    changed = sorted(torch.nonzero((after != before).any(dim=1)).flatten().tolist())
    added = tiny["tok"].added_ids
    assert changed and set(changed) <= set(added)  # the rows that moved are chat markup only
    assert tiny["tok"].im_end_id in changed  # every assistant turn ends in <|im_end|>: its row learns
    # ... while the rest of the model did train
    w0 = load_file(os.path.join(tiny["model"], "model.safetensors"))["model.layers.0.mlp.up_proj.weight"]
    assert not torch.equal(w0, final_weights(run["out"])["model.layers.0.mlp.up_proj.weight"])


def test_freeze_embeddings_resume_is_exact(tiny, tmp_path):
    full = T.train(config(tiny, tmp_path / "full", freeze_embeddings=True, max_steps=4, sample_every=0))
    T.train(config(tiny, tmp_path / "part", freeze_embeddings=True, max_steps=4, sample_every=0, stop_after_step=2))
    done = T.train(config(tiny, tmp_path / "part", freeze_embeddings=True, max_steps=4, sample_every=0, resume=True))
    fw, dw = final_weights(full["out"]), final_weights(done["out"])
    assert all(torch.equal(fw[k], dw[k]) for k in fw)


def test_freeze_embeddings_with_lora_is_an_error(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"--freeze-embeddings=True: expected no value with --lora-r"):
        T.train(config(tiny, tmp_path / "x", freeze_embeddings=True, lora_r=4))


# ---- --freeze-top-mlps (lesson 10) -------------------------------------------------------------
def test_freeze_top_mlps_keeps_the_last_blocks_mlps_and_resumes_exactly(tiny, tmp_path):
    from safetensors.torch import load_file
    top = tiny["cfg"].num_hidden_layers - 1
    full = T.train(config(tiny, tmp_path / "full", freeze_top_mlps=1, max_steps=4, sample_every=0))
    before, after = load_file(os.path.join(tiny["model"], "model.safetensors")), final_weights(full["out"])
    frozen = [k for k in before if k.startswith(f"model.layers.{top}.mlp.")]
    assert len(frozen) == 3 and all(torch.equal(before[k], after[k]) for k in frozen)
    for k in (f"model.layers.{top}.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"):
        assert not torch.equal(before[k], after[k]), k  # the rest of the model trains
    T.train(config(tiny, tmp_path / "part", freeze_top_mlps=1, max_steps=4, sample_every=0, stop_after_step=2))
    done = T.train(config(tiny, tmp_path / "part", freeze_top_mlps=1, max_steps=4, sample_every=0, resume=True))
    dw = final_weights(done["out"])
    assert all(torch.equal(after[k], dw[k]) for k in after)


@pytest.mark.parametrize("kw, error", [
    (dict(freeze_top_mlps=-1), r"--freeze-top-mlps=-1: expected an integer >= 0"),
    (dict(freeze_top_mlps=1, lora_r=4), r"--freeze-top-mlps=1: expected 0 with --lora-r"),
    (dict(freeze_top_mlps=99), r"--freeze-top-mlps=99: expected at most \d+ \(the model has \d+ decoder blocks\)"),
])
def test_freeze_top_mlps_errors(tiny, tmp_path, kw, error):
    with pytest.raises(ValueError, match=error):
        T.train(config(tiny, tmp_path / "x", **kw))


def test_resume_a_checkpoint_older_than_a_setting(tiny, tmp_path):
    """A checkpoint written before --freeze-embeddings existed has no such key: it ran with the default."""
    def old_checkpoint(out):  # a run stopped after 2 steps, its state.json without the newer key
        T.train(config(tiny, out, max_steps=4, sample_every=0, stop_after_step=2))
        state = out / "checkpoints" / "step_000002" / "state.json"
        saved = json.loads(state.read_text())
        del saved["config"]["freeze_embeddings"]
        state.write_text(json.dumps(saved))

    old_checkpoint(tmp_path / "old")
    done = T.train(config(tiny, tmp_path / "old", max_steps=4, sample_every=0, resume=True))
    assert done["steps"] == 4 and not done["interrupted"]
    # ... and a different value than that default is still refused
    old_checkpoint(tmp_path / "old2")
    with pytest.raises(ValueError, match=r"--freeze-embeddings=True differs from the checkpoint's False"):
        T.train(config(tiny, tmp_path / "old2", max_steps=4, sample_every=0, freeze_embeddings=True, resume=True))


def test_cuda_gets_the_fused_adamw_with_the_same_maths(tiny):
    """make_optimizer picks PyTorch's fused AdamW for CUDA; it runs on the CPU too (PyTorch >= 2.4),
    so three steps of it are compared here with the default per-tensor AdamW of other devices."""
    from types import SimpleNamespace

    cfg = SimpleNamespace(weight_decay=0.1, beta1=0.9, beta2=0.95)
    torch.manual_seed(0)
    models = [SmolLM(tiny["cfg"]) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    start = [p.detach().clone() for p in models[0].parameters()]
    fused, plain = T.make_optimizer(models[0], cfg, 1e-2, "cuda"), T.make_optimizer(models[1], cfg, 1e-2, "cpu")
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    for step in range(3):
        for m in models:
            m.zero_grad()
            g = torch.Generator().manual_seed(step)
            for p in m.parameters():
                p.grad = torch.randn(p.shape, generator=g)
        fused.step()
        plain.step()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert (a - b).abs().max().item() < 1e-6, name
    moved = max((a - b).abs().max().item() for a, b in zip(models[0].parameters(), start))
    assert moved > 1e-3  # the steps did move the weights
