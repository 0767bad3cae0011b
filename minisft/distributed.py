"""Several processes, one run: data parallelism with torch.distributed (torchrun).

    torchrun --nproc_per_node 2 -m minisft.train ...   # 2 processes, each a copy of the model

Each process takes its share of every global batch (data row i goes to process i % world), computes
its gradients, and DistributedDataParallel sums them across processes during backward(). With one
process none of this runs: `all_reduce_sum` returns its input and the model is not wrapped.
train.py uses it; tests/test_train.py checks that 2 processes give the numbers of 1.
"""
import os

import torch
import torch.distributed as dist
import torch.nn as nn

from minisft.loss import batch_loss


def setup(device, sharded=False):
    """-> (rank, world_size, device). torchrun sets WORLD_SIZE, RANK and LOCAL_RANK.
    sharded (--fsdp): a process group even for 1 process, which FSDP shards over (a run may resume
    on 1 process what 2 began)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and not sharded:
        return 0, 1, device
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def all_reduce_sum(values, device):
    """Sum a list of numbers over all processes (float64, so counts and loss sums stay exact)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(world):
    if world > 1:
        dist.barrier()


def close():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class WithLoss(nn.Module):
    """Model + loss as ONE forward(), the unit DistributedDataParallel wraps and synchronises."""

    def __init__(self, model, chunked):
        super().__init__()
        self.model, self.chunked = model, chunked

    def forward(self, batch):
        return batch_loss(self.model, batch, self.chunked)


def wrap(model, chunked, world, fsdp=False, prec=None):
    """The module the step calls: the model itself with one process, DDP around WithLoss with more;
    with fsdp the model itself, sharded in place (fsdp.py; make the optimizer after this), computing
    in prec's dtype (precision.py).
    DDP and FSDP average gradients over processes; accumulate_gradients scales that back to a sum."""
    if fsdp:
        from minisft import fsdp as fsdp_
        if prec is not None and prec.scaled:  # GradScaler would have to unscale sharded gradients
            raise ValueError("--fsdp with --dtype float16 (loss scaling) is not supported: use bfloat16 or float32")
        return fsdp_.shard(model, prec is not None and prec.dtype == torch.bfloat16)
    return nn.parallel.DistributedDataParallel(WithLoss(model, chunked)) if world > 1 else model
