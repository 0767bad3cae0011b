"""fit.py: --batch-size auto picks the largest micro-batch that fits, and keeps the global batch."""
import json
import os

import pytest
import torch

from minisft import cli, fit, precision, train as T
from minisft.default_model import DEFAULT_MODEL
from minisft.weights import load_pretrained

DATA = os.path.join(os.path.dirname(DEFAULT_MODEL), "sft_train.jsonl")
MiB = 2 ** 20


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def config(tmp_path, **kw):
    base = dict(model=DEFAULT_MODEL, data=DATA, out=str(tmp_path / "run"), batch_size="auto", grad_accum=2,
                max_length=64, device="cpu", max_steps=1, max_examples=32, eval_every=0, sample_every=0,
                plot_every=0, lr=1e-3)
    return T.TrainConfig(**{**base, **kw})


def test_largest_fit_is_the_largest_divisor_under_the_headroom():
    def bytes_at(b):  # 100 MiB fixed + 10 MiB per example
        return (100 + 10 * b) * MiB
    assert fit.largest_fit(16, bytes_at, 1000 * MiB)[0] == 16
    assert fit.largest_fit(16, bytes_at, (100 + 80) * MiB / fit.HEADROOM)[0] == 8
    assert fit.largest_fit(16, bytes_at, (100 + 79) * MiB / fit.HEADROOM)[0] == 4
    assert fit.largest_fit(12, bytes_at, (100 + 60) * MiB / fit.HEADROOM)[0] == 6  # divisors of 12 only
    assert fit.largest_fit(16, bytes_at, 10 * MiB)[0] == 1  # nothing fits: the floor, 1


def test_free_memory_on_the_cpu_is_available_ram():
    with open("/proc/meminfo") as f:
        available = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable:"))
    assert abs(fit.free_memory("cpu") - available) < 0.2 * available + 256 * MiB  # the figure moves a little


def test_auto_shrinks_with_memory_and_keeps_the_global_batch(tmp_path, monkeypatch, capsys):
    model, _ = load_pretrained(DEFAULT_MODEL, dtype=torch.float32, device="cpu")
    prec = precision.choose("float32", "cpu")
    cfg = config(tmp_path, grad_accum=4)  # the global batch: 8 x 4 = 32
    chosen = []
    for free_mib in (64 * 1024, 60, 45, 1):
        monkeypatch.setattr(fit, "free_memory", lambda device, f=free_mib: f * MiB)
        got = fit.resolve(cfg, model, "cpu", prec, print)
        assert got.batch_size * got.grad_accum == 32, (free_mib, got.batch_size, got.grad_accum)
        line = capsys.readouterr().out
        assert f"micro-batch {got.batch_size} x {got.grad_accum} accumulation = the global batch of 32" in line
        assert f"of {free_mib:,} MiB free on cpu" in line
        chosen.append(got.batch_size)
    assert chosen[0] == 32 and chosen[-1] == 1  # all of it with plenty of memory, one example with none
    assert chosen == sorted(chosen, reverse=True) and len(set(chosen)) >= 3, chosen
    assert cfg.batch_size == "auto"  # the caller's config is left as it was
    assert fit.resolve(config(tmp_path, batch_size=3), model, "cpu", prec, print).batch_size == 3  # a number stays


def test_the_probe_step_steps_down_on_out_of_memory(tmp_path, monkeypatch, capsys):
    """Where the probe runs (CUDA), a size the count allowed but the probe could not run gives way to the next."""
    model, _ = load_pretrained(DEFAULT_MODEL, dtype=torch.float32, device="cpu")
    tried = []

    def probe(model, micro, length, device, autocast):
        tried.append(micro)
        if micro > 2:
            raise torch.OutOfMemoryError("probe")
    monkeypatch.setattr(fit, "can_probe", lambda device: True)
    monkeypatch.setattr(fit, "probe_step", probe)
    monkeypatch.setattr(fit, "free_memory", lambda device: 64 * 1024 * MiB)
    got = fit.resolve(config(tmp_path), model, "cpu", precision.choose("float32", "cpu"), print)
    assert tried == [16, 8, 4, 2] and (got.batch_size, got.grad_accum) == (2, 8)
    monkeypatch.setattr(fit, "probe_step", lambda *a: (_ for _ in ()).throw(torch.OutOfMemoryError("probe")))
    with pytest.raises(ValueError, match="not even 1 example of 64 tokens fits"):
        fit.resolve(config(tmp_path), model, "cpu", precision.choose("float32", "cpu"), print)


def test_the_real_probe_step_runs_and_leaves_zero_gradients():
    model, _ = load_pretrained(DEFAULT_MODEL, dtype=torch.float32, device="cpu")
    fit.probe_step(model, 2, 16, "cpu", precision.choose("float32", "cpu").autocast)
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_batch_size_auto_from_the_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fit, "free_memory", lambda device: 64 * 1024 * MiB)
    args = ["--model", DEFAULT_MODEL, "--data", DATA, "--out", str(tmp_path / "run"), "--batch-size", "auto",
            "--max-length", "64", "--device", "cpu", "--max-steps", "1", "--max-examples", "32",
            "--eval-every", "0", "--sample-every", "0", "--plot-every", "0"]
    assert T.main(args) == 0
    out = capsys.readouterr().out
    assert "--batch-size auto: micro-batch 8 x 1 accumulation = the global batch of 8" in out
    with open(os.path.join(tmp_path, "run", "checkpoints", "step_000001", "state.json")) as f:
        saved = json.load(f)["config"]
    assert (saved["batch_size"], saved["grad_accum"]) == (8, 1)  # resume splits the batches the same way
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--batch-size", "many"])
