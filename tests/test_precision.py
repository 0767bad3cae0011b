"""precision.py: the number format per device, and the float16 path (autocast + GradScaler) on the CPU."""
import json
import os

import pytest
import torch

from minisft import precision, train as T
from minisft.default_model import DEFAULT_MODEL


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.mark.parametrize("capability, dtype, scaled", [
    ((9, 0), torch.bfloat16, False),  # H100 / H200
    ((8, 9), torch.bfloat16, False),  # L4
    ((8, 0), torch.bfloat16, False),  # A100
    ((7, 5), torch.float16, True),  # T4: is_bf16_supported() says True there (emulated); auto must not trust it
    ((7, 0), torch.float16, True),  # V100
    ((6, 0), torch.float16, True),  # P100
])
def test_auto_on_each_cuda_capability(monkeypatch, capability, dtype, scaled):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what a T4 answers
    p = precision.choose("auto", "cuda:0")
    assert (p.dtype, p.scaled, p.device_type) == (dtype, scaled, "cuda")
    assert f"{capability[0]}.{capability[1]}" in p.line()
    assert precision.bf16_base("auto", p) == (dtype == torch.bfloat16)  # LoRA's frozen base follows


def test_auto_on_cpu_and_mps_is_float32():
    for device in ("cpu", "mps"):
        p = precision.choose("auto", device)
        assert p.dtype is None and not p.scaled and p.device_type == device
        assert p.line().startswith("precision: float32")
        assert not precision.bf16_base("auto", p)


def test_explicit_flags_keep_their_meaning():
    assert precision.choose("float32", "cuda").dtype is None  # no capability asked: nothing to monkeypatch
    bf = precision.choose("bfloat16", "cpu")
    assert bf.dtype == torch.bfloat16 and not bf.scaled and bf.scaler() is None
    fp = precision.choose("float16", "cpu")
    assert fp.dtype == torch.float16 and fp.scaled and isinstance(fp.scaler(), torch.amp.GradScaler)
    with fp.autocast():
        assert torch.get_autocast_dtype("cpu") == torch.float16 and torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="--dtype='half'"):
        precision.choose("half", "cpu")


def run_default(tmp_path, name, dtype, **kw):
    data = os.path.join(os.path.dirname(DEFAULT_MODEL), "sft_train.jsonl")
    cfg = T.TrainConfig(model=DEFAULT_MODEL, data=data, out=str(tmp_path / name), dtype=dtype, device="cpu",
                        max_steps=4, batch_size=4, grad_accum=2, lr=1e-3, max_length=256, max_examples=64,
                        eval_every=0, sample_every=0, save_every=2, plot_every=0, seed=0, **kw)
    summary = T.train(cfg)
    with open(os.path.join(summary["out"], "metrics.jsonl")) as f:
        return summary, [json.loads(line) for line in f]


def test_float16_trains_the_default_model_like_float32(tmp_path, capsys):
    """--dtype float16 on the CPU: float16 autocast and loss scaling, the loss within 2% of float32's."""
    _, ref = run_default(tmp_path, "fp32", "float32")
    summary, fp16 = run_default(tmp_path, "fp16", "float16")
    assert "precision: float16 autocast + loss scaling" in capsys.readouterr().out
    assert summary["steps"] == 4
    for a, b in zip(ref, fp16):
        assert abs(a["loss"] - b["loss"]) < 0.02 * a["loss"], (a["loss"], b["loss"])
        assert b["skipped_steps"] == 0 and b["loss_scale"] == 65536.0  # no overflow at this scale
    assert any(a["loss"] != b["loss"] for a, b in zip(ref, fp16))  # autocast really ran in float16
    ckpt = os.path.join(summary["out"], "checkpoints", "step_000004", "state.json")
    with open(ckpt) as f:
        assert json.load(f)["scaler"]["scale"] == 65536.0  # the scale is in the checkpoint


def test_overflow_skips_the_step_and_resume_restores_the_scale(tmp_path, monkeypatch):
    """A loss scale so big that float16 gradients overflow: the step is skipped (no update, no
    FloatingPointError), counted, and the scale halves; a resumed run starts from the saved scale."""
    real = torch.amp.GradScaler.__init__

    def huge(self, *a, **k):
        real(self, *a, **{**k, "init_scale": 2.0 ** 100})
    monkeypatch.setattr(torch.amp.GradScaler, "__init__", huge)
    summary, rows = run_default(tmp_path, "skip", "float16", stop_after_step=2)
    assert [r["skipped_steps"] for r in rows] == [1, 2]
    assert [r["loss_scale"] for r in rows] == [2.0 ** 99, 2.0 ** 98]
    summary, rows = run_default(tmp_path, "skip", "float16", resume=True)
    assert rows[2]["loss_scale"] == 2.0 ** 97  # from the saved 2**98, not a fresh 2**100: the scale was restored
    assert rows[-1]["skipped_steps"] >= 2 and summary["steps"] == 4


def test_the_non_finite_guard_still_stops_float16_at_scale_one(tmp_path, monkeypatch):
    """At a loss scale of 1 an inf gradient is not the scale's doing: FloatingPointError as in float32."""
    real = torch.amp.GradScaler.__init__

    def one(self, *a, **k):
        real(self, *a, **{**k, "init_scale": 1.0})
    monkeypatch.setattr(torch.amp.GradScaler, "__init__", one)
    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: real_clip(*a, **k) * float("inf"))
    with pytest.raises(FloatingPointError, match="gradient norm is inf"):
        run_default(tmp_path, "inf", "float16")
