"""Host syncs in the training step, counted.

On a GPU, reading a number out of a device tensor (.item(), .tolist(), bool(), int(), a boolean
index, nonzero) makes the CPU wait until the GPU has run everything queued before it: the CPU then
cannot queue the next kernels while the GPU works. A step should read once, for what the log needs
(train.sft_step's one .tolist()), however many micro-batches it has.

These tests run on the CPU, where every tensor is a host tensor. So they follow where a GPU's
tensors would be: a batch is on the host until data.to_device copies it; the model's parameters,
the copied batch and everything computed from either are "on the device". A read of one of those
is counted, wherever it happens (minisft's code or torch's).
"""
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from minisft import data, fast, precision, train as T
from minisft.config import TrainConfig
from test_data import PAD, random_examples, tiny_model

READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__,
         torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero, torch.masked_select, torch.Tensor.masked_select,
         torch.Tensor.cpu, torch.Tensor.numpy, torch.equal, torch.allclose, torch.Tensor.unique, torch.unique}


class DeviceReads(TorchFunctionMode):
    """Counts reads of device tensors, by minisft's innermost frame (file, function)."""

    def __init__(self):
        super().__init__()
        self.host = {}  # id -> tensor, for the tensors a GPU run would hold on the host (kept alive: ids stay unique)
        self.reads = {}

    def on_host(self, *tensors):
        for t in tensors:
            self.host[id(t)] = t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_device = [t for t in inputs if id(t) not in self.host]
        index = func is torch.Tensor.__getitem__ and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in tree_flatten(args[1:])[0])
        if (func in READS or index) and on_device:
            f = sys._getframe(1)
            while f is not None and "/minisft/" not in f.f_code.co_filename:
                f = f.f_back
            site = (f.f_code.co_filename.split("/minisft/")[-1], f.f_code.co_name) if f else ("torch", func.__name__)
            self.reads[site] = self.reads.get(site, 0) + 1
        out = func(*args, **kwargs)
        if inputs and not on_device:  # computed from host tensors alone: still on the host
            self.on_host(*[t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)])
        return out


def step_reads(model, micro_batches, monkeypatch, n_micro):
    """Run one sft_step -> {site: reads}. data.to_device's output goes "to the device"."""
    counter = DeviceReads()
    for mb in micro_batches:
        counter.on_host(*mb.values())

    def to_device(batch, device):
        moved = data.to_device(batch, device)  # its host-side decisions run on host tensors
        copies = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in moved.items()}
        for v in copies.values():  # a clone of a host tensor would count as one: these are the device's
            counter.host.pop(id(v), None)
        return copies
    monkeypatch.setattr(T, "to_device", to_device)
    cfg = TrainConfig(grad_accum=n_micro, device="cpu")
    opt = T.make_optimizer(model, cfg, 1e-3, "cpu")
    state, autocast = T.new_state(), precision.choose("float32", "cpu").autocast
    T.sft_step(0, lambda s: micro_batches, model, model, opt, lambda s: 1e-3, cfg, state, "cpu", autocast)
    # AdamW's step counters: on the host but for the fused CUDA kernel (optim.make_optimizer uses it there).
    counter.on_host(*[st["step"] for st in opt.state.values()])
    with counter:  # the second step: AdamW's state exists, as in every step after the first
        T.sft_step(1, lambda s: micro_batches, model, model, opt, lambda s: 1e-3, cfg, state, "cpu", autocast)
    return counter.reads


@pytest.mark.parametrize("n_micro", [1, 3])
def test_a_step_reads_the_device_once_however_many_micro_batches(monkeypatch, n_micro):
    """Padded micro-batches: the one read is train.sft_step's, for the log (loss, gradient norm)."""
    model = fast.apply(tiny_model(seed=1).float())
    examples = random_examples([9, 14, 5, 7, 3, 12], seed=3)
    micro_batches = [data.collate(examples[2 * i:2 * i + 2], PAD) for i in range(n_micro)]
    assert all((mb["attention_mask"] == 0).any() for mb in micro_batches)  # padding: a mask to decide about
    reads = step_reads(model, micro_batches, monkeypatch, n_micro)
    # loss._check_ids reads the labels' min and max on the CPU only, where that costs no wait (below).
    assert reads == {("train.py", "sft_step"): 1, ("loss.py", "_check_ids"): 2 * n_micro}


def test_the_label_check_reads_only_cpu_tensors():
    """A tensor on the "meta" device has no values: reading one would raise. The check skips it, as it
    skips a GPU's; on the CPU it still names a bad label."""
    from minisft.loss import _check_ids
    _check_ids(torch.tensor([1, 2, 70]).to("meta"), 64)
    with pytest.raises(ValueError, match="label 70 is neither -100 nor a token id in \\[0, 64\\)"):
        _check_ids(torch.tensor([1, 2, 70]), 64)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_packed_rows_on_cuda_read_nothing_in_the_forward(monkeypatch):
    """Packed rows as CUDA runs them (FlexAttention: its block mask built from the device's sequence
    ids); FlexAttention's forward runs on a CPU, its backward does not, so a forward is counted."""
    from minisft.fast import modules
    monkeypatch.setattr(modules, "attends_with_flex", lambda device: True)
    model = fast.apply(tiny_model(seed=2).float())
    examples = random_examples([9, 14, 5, 7, 3, 12, 6], seed=2)
    batch = data.collate([r for mb in data.pack_to_budget(examples, 24, 24) for r in mb], PAD)
    assert batch["attention_mask"].max() > 1
    batch = {k: v.clone() for k, v in batch.items()}  # "on the device"
    counter = DeviceReads()
    with torch.no_grad(), counter:
        model(batch["input_ids"], position_ids=batch["position_ids"], attention_mask=batch["attention_mask"])
    assert counter.reads == {}
