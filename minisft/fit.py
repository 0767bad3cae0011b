"""--batch-size auto: the largest micro-batch that fits the device's free memory, the global batch kept.

A micro-batch only decides how much of the step's global batch goes through forward and backward
at once: train.accumulate_gradients adds the micro-batches' gradients up to those of the whole
global batch. So the micro-batch can be as big as memory allows, and gradient accumulation makes
up the rest -- the run learns the same thing (the data order depends on the global batch only,
data.global_batches), just faster when fewer, bigger micro-batches keep the device busy.

    the global batch   REFERENCE_BATCH x --grad-accum examples per process: the batch the same command
                       trains on with the default --batch-size, so the recipe's lr and steps still fit
    the micro-batch    the largest divisor of the global batch whose memory (minisft.memory's count,
                       memory.estimate: weights, gradients, AdamW, activations) fits in the free memory
                       with HEADROOM to spare; on CUDA a probe step (one forward + backward at that size
                       and --max-length) confirms it, and an out-of-memory there tries the next size down
    --grad-accum       global batch / micro-batch

Free memory: on CUDA what the driver reports free (torch.cuda.mem_get_info); on the CPU the
kernel's MemAvailable (/proc/meminfo); on MPS the recommended working set less what is allocated.
On the CPU there is no probe: memory that runs out there is not an exception to catch, the kernel
ends the process; the count alone decides. docs/memory.md has the counts of each model.
"""
import dataclasses
import functools
import os

import torch

from minisft import data, memory
from minisft.loss import batch_loss
from minisft.rundir import saved_config

REFERENCE_BATCH = 8  # TrainConfig's default --batch-size
HEADROOM = 0.85  # of the free memory: the count is of the tensors, not the allocator's slack or the heap's


def free_memory(device):
    """Bytes the run may still take on `device` ("cuda:0", "cpu", "mps")."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0]
    if kind == "mps":
        return torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the kernel counts in kB
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")  # free pages (no page cache): lower


def probe_step(model, micro, length, device, autocast):
    """One forward + backward of a [micro, length] batch of random tokens: raises torch.OutOfMemoryError
    if it does not fit. The gradients it leaves are zeroed by the first real step (optimizer.zero_grad)."""
    ids = torch.randint(0, model.config.vocab_size, (micro, length))
    batch = data.to_device({"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids),
                            "position_ids": torch.arange(length).expand(micro, length)}, device)
    with autocast():
        loss, _ = batch_loss(model, batch, True)
    loss.backward()
    model.zero_grad(set_to_none=False)


def can_probe(device):
    """Whether running out of memory on `device` is an exception a probe step can catch (CUDA's allocator)."""
    return torch.device(device).type == "cuda"


def largest_fit(global_batch, bytes_at, free):
    """The largest divisor b of global_batch with bytes_at(b) <= HEADROOM * free (at least 1).
    bytes_at grows with b, so a binary search over the divisors asks it O(log) times."""
    sizes = [b for b in range(1, global_batch + 1) if global_batch % b == 0]
    lo, hi = 0, len(sizes) - 1  # sizes[lo] is the best known to fit (size 1 is the floor)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if bytes_at(sizes[mid]) <= HEADROOM * free:
            lo = mid
        else:
            hi = mid - 1
    return sizes[lo], sizes


def resolve(cfg, model, device, prec, log):
    """A TrainConfig -> the same with --batch-size auto replaced by the micro-batch that fits, and
    --grad-accum by what keeps the global batch. Other configs come back unchanged. With --resume the
    checkpoint's sizes are kept (the saved config holds the numbers auto chose), so the resumed half
    splits its batches as the first did."""
    if cfg.batch_size != "auto":
        return cfg
    if cfg.resume:
        saved = saved_config(cfg.out)
        return dataclasses.replace(cfg, batch_size=saved["batch_size"], grad_accum=saved["grad_accum"])
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        # Each process would pick from its own free memory, and DDP needs the same number of micro-batches on all.
        raise ValueError("--batch-size auto: one process only (with torchrun, give --batch-size a number)")
    global_batch = REFERENCE_BATCH * cfg.grad_accum
    length = min(cfg.max_length, model.config.max_position_embeddings)
    free = free_memory(device)
    dtype = "float32" if prec.dtype is None else "bfloat16"  # float16 takes the bytes bfloat16 does

    @functools.lru_cache(maxsize=None)
    def bytes_at(b):
        return memory.estimate(cfg.model, b, length, cfg.lora_r, cfg.lora_targets, cfg.grad_checkpointing, dtype,
                               cfg.lora_dropout)["total"]

    micro, sizes = largest_fit(global_batch, bytes_at, free)
    if can_probe(device):  # the count is checked by running it; out of memory: the next size down
        while True:
            try:
                probe_step(model, micro, length, device, prec.autocast)
                break
            except torch.OutOfMemoryError:
                model.zero_grad(set_to_none=False)
                torch.cuda.empty_cache()
                if micro == 1:
                    raise ValueError(f"--batch-size auto: not even 1 example of {length} tokens fits on {device}; "
                                     f"try a smaller --max-length, --grad-checkpointing or --lora-r") from None
                micro = sizes[sizes.index(micro) - 1]
    log(f"--batch-size auto: micro-batch {micro} x {global_batch // micro} accumulation = the global batch of "
        f"{global_batch} ({REFERENCE_BATCH} x --grad-accum {cfg.grad_accum}); counted "
        f"{bytes_at(micro) / 2**20:,.0f} MiB of {free / 2**20:,.0f} MiB free on {device}")
    return dataclasses.replace(cfg, batch_size=micro, grad_accum=global_batch // micro)
