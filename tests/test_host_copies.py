"""data.to_device: pinned, non-blocking host -> device copies when the target is CUDA; the CPU path unchanged."""
import torch

from minisft import data


def batch(mask_value=1):
    ids = torch.arange(12).view(2, 6)
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(6).expand(2, 6),
            "attention_mask": torch.full((2, 6), mask_value)}


def test_cpu_path_copies_nothing_pins_nothing(monkeypatch):
    def no_pin(self):
        raise AssertionError("pin_memory on the CPU path")
    monkeypatch.setattr(torch.Tensor, "pin_memory", no_pin)
    b = batch()
    out = data.to_device(b, "cpu")
    assert out["attention_mask"] is None  # all ones: the plain causal mask
    for k in ("input_ids", "labels", "position_ids"):
        assert out[k] is b[k]  # .to("cpu") of a CPU tensor is the tensor itself: no copy
    packed = data.to_device(batch(mask_value=2), "cpu")
    assert torch.equal(packed["attention_mask"], torch.full((2, 6), 2))  # a real mask is kept


def test_cuda_path_pins_and_copies_without_blocking(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append("pin") or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: calls.append((a, k)) or self)
    out = data.to_device(batch(), "cuda:0")
    assert calls == ["pin", (("cuda:0",), {"non_blocking": True})] * 4
    assert out["attention_mask"] is None


def test_right_padding_drops_the_mask_and_the_targets_are_counted_on_the_host():
    """Decided before the copy (a GPU tensor would make the CPU wait): right padding alone needs no
    mask (the causal one keeps real tokens off the padding after them); left padding keeps its mask.
    n_targets is what the loss will select, counted from the host labels."""
    b = batch()
    b["attention_mask"][1, 4:] = 0
    b["labels"][1, 4:] = -100
    out = data.to_device(b, "cpu")
    assert out["attention_mask"] is None and out["n_targets"] == 5 + 3
    left = batch()
    left["attention_mask"][1, :2] = 0
    kept = data.to_device(left, "cpu")["attention_mask"]
    assert kept is not None and torch.equal(kept, left["attention_mask"])
