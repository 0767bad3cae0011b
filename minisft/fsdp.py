"""Past one GPU's memory: the model sharded over the processes with FSDP2 (`--fsdp`, under torchrun).

    torchrun --nproc-per-node 4 -m minisft.train ... --fsdp
    torchrun --nnodes 2 --node-rank 0|1 --nproc-per-node 8 --rdzv-backend c10d \
             --rdzv-endpoint HOST0:29500 -m minisft.train ... --fsdp        # the same, on 2 machines

DDP (distributed.py) keeps a whole copy of the weights, the gradients and AdamW's two moments in
every process. FSDP2 (`torch.distributed.fsdp.fully_shard`) keeps 1/N of each in each of N processes:
every parameter is a DTensor whose rows are split over the processes. A decoder block all-gathers
its full weights just before its forward (and again before its backward), and frees them after;
its gradients are reduce-scattered: each process keeps the summed gradient of its own rows, and
AdamW steps only those. So weights, gradients and optimizer state cost 1/N per process; the
activations do not shrink (each process still runs whole micro-batches). `python -m minisft.memory
--world-size N --fsdp` counts it; docs/memory.md has the table.

How minisft's step stays the same (tests/test_fsdp.py checks 2 processes with --fsdp against 1
process and against DDP, losses and final weights):
- Sharding units: each decoder block, then the root (the embedding, tied lm_head and final norm).
  The chunked loss calls model.hidden_states, not forward, and reads lm_head.weight itself:
  register_fsdp_forward_method makes hidden_states gather the root's weights as forward would.
- Gradients: FSDP2's reduce-scatter AVERAGES over processes, as DDP's all-reduce does, so the
  trainer's grad_scale = world size (train.accumulate_gradients) turns it back into the sum and
  every target token of the global batch still weighs 1 / n_targets.
- Gradient accumulation: every micro-batch's backward reduce-scatters (FSDP2's default). Skipping
  the sync until the last micro-batch (set_requires_gradient_sync(False)) would keep a full,
  unsharded gradient in each process between micro-batches: the memory FSDP is here to save.
- Mixed precision as minisft's: float32 master weights and AdamW state; on a GPU the weights are
  gathered and computed in bfloat16 (MixedPrecisionPolicy(param_dtype=bf16)) and gradients are
  reduced in float32 (reduce_dtype). On the CPU nothing is cast (float32 throughout).
- Activation checkpointing composes: checkpoint() reruns the block, and its hooks gather it again.
- LoRA: the adapters live inside the blocks, so they are SHARDED with them (and so is the frozen
  base). A checkpoint then keeps only the adapters, as without FSDP.
- Clipping: torch.nn.utils.clip_grad_norm_ takes DTensor gradients and returns the global norm.

Checkpoints: checkpoints/step_N/ holds sharded/ (torch.distributed.checkpoint: one __R_0.distcp file
per process and a .metadata), rng_R.pt per process and state.json. --resume reads them back: at the
same number of processes bit for bit on the CPU; at another, the shards are re-cut as they load and
--grad-accum keeps each step's data (rundir.match_world). final/ is an ordinary Hugging Face folder: the full
state dict is gathered (in CPU memory, on rank 0) and written by weights.save_pretrained.
"""
import json
import os
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from minisft.checkpoint import list_checkpoints, rng_state, set_rng_state
from minisft.files import commit_dir, write_error


def check(cfg, world_env=None):
    """Raise ValueError (one line) for --fsdp settings it cannot run with. world_env: $WORLD_SIZE."""
    world_env = os.environ.get("WORLD_SIZE") if world_env is None else world_env
    if not world_env:
        raise ValueError("--fsdp shards the model over processes that torchrun starts: run "
                         "`torchrun --nproc-per-node N -m minisft.train ... --fsdp`")
    if cfg.patience:
        raise ValueError("--patience: expected 0 with --fsdp (the best weights are not kept sharded)")


def check_divides(n_val_batches, world):
    """Every FSDP forward is a collective: each process must run as many as the others. Evaluation
    gives process r the batches r, r + world, ...: their number must divide by the world size."""
    if n_val_batches % world:
        raise ValueError(f"--fsdp with {world} processes: the validation set makes {n_val_batches} batches of "
                         f"--batch-size, not a multiple of {world}; change --batch-size or the validation data")


def shard(model, bf16):
    """Shard `model` (a SmolLM, on its device) in place: each block, then the root -> model.

    bf16: compute in bfloat16 (on a GPU): gather the weights in bf16, reduce gradients in float32."""
    dtypes = {p.dtype for p in model.parameters()}
    if bf16 or len(dtypes) > 1:  # LoRA on a bf16 base: one dtype per gathered group, bf16
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    for block in model.model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    register_fsdp_forward_method(model, "hidden_states")
    return model


def is_sharded(model):
    return isinstance(model, FSDPModule)


def _options(model, **kw):
    frozen = not all(p.requires_grad for p in model.parameters())  # LoRA: keep the adapters only
    return StateDictOptions(ignore_frozen_params=frozen, **kw)


def _state_dicts(model, optimizer):
    opts = _options(model)
    return {"model": get_model_state_dict(model, options=opts),
            "optim": get_optimizer_state_dict(model, optimizer, options=opts)}


def save_checkpoint(ckpt_dir, model, optimizer, state, keep):
    """Every process: write ckpt_dir/step_N (N = state["step"]) -> its path. Built in a temporary
    folder that rank 0 renames into place once every process has written its shard."""
    rank = dist.get_rank()
    final = os.path.join(ckpt_dir, f"step_{state['step']:06d}")
    tmp = os.path.join(ckpt_dir, f".tmp-step_{state['step']:06d}-fsdp")
    if os.path.isdir(final):
        return final
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        dist.barrier()
        dcp.save(_state_dicts(model, optimizer), checkpoint_id=os.path.join(tmp, "sharded"))
        torch.save(rng_state(), os.path.join(tmp, f"rng_{rank}.pt"))
        if rank == 0:
            with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as f:
                json.dump(state, f, indent=1)
                f.write("\n")
        dist.barrier()
        if rank == 0:
            commit_dir(tmp, final)
            for old in list_checkpoints(ckpt_dir)[:-keep]:
                shutil.rmtree(old)
    except Exception as e:
        raise write_error(final, e) from e
    dist.barrier()
    return final


def load_checkpoint(path, model, optimizer, saved):
    """Every process: restore weights, AdamW state and RNG states from `path`. saved: its state.json.

    The number of processes may differ from the run that wrote it: torch.distributed.checkpoint reads
    each process's rows from whichever files hold them (the .metadata maps them). Process r takes
    the RNG states of process r % (old count). Every file must be there (checked before any is read)."""
    rank, was = dist.get_rank(), saved["world_size"]
    for r in range(was):
        for name in (f"sharded/__{r}_0.distcp", f"rng_{r}.pt", "sharded/.metadata"):
            if not os.path.isfile(os.path.join(path, name)):
                raise ValueError(f"--resume: {os.path.join(path, name)} is missing (process {r}'s part of a "
                                 f"checkpoint written by {was} processes); the checkpoint is incomplete")
    sd = _state_dicts(model, optimizer)
    dcp.load(sd, checkpoint_id=os.path.join(path, "sharded"))
    opts = _options(model)
    set_model_state_dict(model, sd["model"], options=opts)
    set_optimizer_state_dict(model, optimizer, sd["optim"], options=opts)
    set_rng_state(torch.load(os.path.join(path, f"rng_{rank % was}.pt"), weights_only=True))


def full_model(model, cfg):
    """Every process: gather the full weights -> on rank 0 an ordinary (unsharded) CPU SmolLM with
    them, for weights.save_pretrained / save_adapter; None on the other ranks."""
    from minisft.lora import add_lora
    from minisft.model import SmolLM
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    plain = SmolLM(model.config)
    if cfg.lora_r:
        add_lora(plain, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    plain.load_state_dict(full, strict=False)
    missing = set(plain.state_dict()) - set(full) - {"lm_head.weight"}
    if missing:
        raise ValueError(f"--fsdp: the gathered state dict lacks {sorted(missing)[:3]}")
    return plain
