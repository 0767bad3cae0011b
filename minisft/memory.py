"""Will it fit? The memory of a training step, counted before you rent a GPU.

    python -m minisft.memory --model M --batch-size 2 --max-length 2048 [--lora-r 8] [--lora-targets all-linear]
                             [--lora-dropout 0.05] [--grad-checkpointing] [--dtype bfloat16|float32] [--json]
                             [--world-size N --fsdp]      # per process, the model sharded over N (fsdp.py)

Read with lesson 11 (speed and memory). A training step holds six things at once:

  weights      Full fine-tuning: float32 master weights (train.py keeps float32 weights and runs the
               maths in bf16 under autocast; --dtype bfloat16 means that autocast). LoRA: the frozen base
               in bf16 with --dtype bfloat16 (2 bytes per parameter), float32 otherwise; the adapters
               in float32.
  gradients    4 bytes per trainable parameter (float32, like the weights they belong to).
  optimizer    AdamW: two float32 moments per trainable parameter, plus a 4-byte step counter per tensor.
  activations  what autograd keeps from the forward pass for the backward pass (with LoRA dropout, also
               each adapter's dropout mask: one byte per input number, per adapted layer).
  loss         what the chunked loss keeps for backward: the gradients it computes in forward, of the
               target positions' hidden rows [N, D] and of lm_head [V, D] (when lm_head trains).
  transient    the largest short-lived peak: the float32 logits of one loss chunk [chunk, V], turned
               into their gradient in place, plus under bf16 their bf16 copies, a bf16 copy of a float32
               lm_head weight and a chunk's bf16 [V, D] weight gradient; under checkpointing, one
               decoder block's recompute instead when that is larger.

The first three are exact counts. Activations are COUNTED, not guessed (saved_for_backward_bytes, which
lessons 9 and 11 use too): autograd's saved tensors (torch.autograd.graph.saved_tensors_hooks, each storage once, parameters
left out) while a real forward pass and chunked loss run. The real config runs on the CPU, with random
weights, but with only 1 and then 2 decoder layers: the difference is the cost of one layer, the rest
is the fixed cost (embedding, final norm). Long sequences are counted at two shorter lengths and fitted
as a + b*T (a: bf16 copies of weights that autocast keeps, independent of T; b: per token), which is
exact when nothing grows faster than T: true here, as SDPA's fused attention keeps O(T) per head, and
every position is made a target (the most the loss can keep). The parts are simply added. A GPU
run's peak sits a little above this count (a short-lived buffer not counted here; docs/memory.md has
the measurement), so leave a GB of room. CUDA's own context (a few hundred MB) is in neither.

With --fsdp over --world-size N processes (fsdp.py) each process keeps 1/N of every parameter (its
rows, dim 0, padded to a multiple of N), so weights, gradients and optimizer are divided by N; the
activations, loss and transient are not (each process runs whole micro-batches). A seventh part comes in:
  gathered     what FSDP all-gathers for a moment: the root's full weights (embedding, lm_head, final
               norm, held from the forward to the end of the backward), two blocks' full weights (the
               one running and the next, prefetched), in bf16 with --dtype bfloat16, and one block's full
               float32 gradient before it is reduce-scattered.
Without --fsdp, N processes (DDP) each hold all of it: --world-size changes nothing.

Sizes are printed in GB = 10^9 bytes.

Shapes: B batch, T sequence length, D hidden size, V vocab size, N = B*(T-1) target tokens.
"""
import argparse
import contextlib
import dataclasses
import json
import os
import sys

import torch

from minisft import fast
from minisft.files import read_json
from minisft.loss import chunked_cross_entropy
from minisft.model import ModelConfig, SmolLM
from minisft.weights import resolve_model_dir

GB = 1e9
COUNT_LENGTH = 128  # longer sequences are counted at this length and half of it, then extrapolated
LOSS_COUNT_LENGTH = 16  # the same for the loss part
LOSS_CHUNK = 1024  # chunked_cross_entropy's default chunk_size
PARTS = ("weights", "gradients", "optimizer", "activations", "loss", "transient", "gathered")


def read_config(model):
    """A model folder, a Hub id or a config.json file -> ModelConfig (one-line errors)."""
    if os.path.isfile(model) and model.endswith(".json"):
        path = model
    else:
        path = os.path.join(resolve_model_dir(model), "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no config.json in this model folder")
    cfg = read_json(path)
    return ModelConfig.from_hf(cfg, source=path)


def build(cfg, lora_r=0, lora_targets="all-linear", bf16=True, device="cpu"):
    """The model as the trainer runs it (fast.apply'd): all float32, or (LoRA) a frozen base + float32 adapters.

    Built on "meta" (shapes only) and, unless device is "meta", given random weights once: uniform,
    which is quicker to draw than the normal init, and values do not change what autograd saves.
    """
    with torch.device("meta"):
        model = SmolLM(cfg)
    if device != "meta":
        model.to_empty(device=device)
        if cfg.tie_word_embeddings:  # to_empty gave the two uses of the tied matrix two tensors
            model.lm_head.weight = model.model.embed_tokens.weight
        for p in model.parameters():
            torch.nn.init.uniform_(p, -0.05, 0.05)
    if lora_r:
        from minisft.lora import add_lora  # freezes the base; the adapters are float32
        if bf16:
            model.to(torch.bfloat16)  # a frozen base needs no float32 master copy
        add_lora(model, r=lora_r, alpha=2 * lora_r, dropout=0.0, targets=lora_targets)
    return fast.apply(model).train()


def state_bytes(model):
    """-> weights, gradients and AdamW state in bytes, from the parameters' real shapes and dtypes."""
    params = list(model.parameters())  # a tied matrix once
    trainable = [p for p in params if p.requires_grad]
    return {"weights": sum(p.numel() * p.element_size() for p in params),
            "gradients": sum(p.numel() * p.element_size() for p in trainable),
            # exp_avg and exp_avg_sq, shaped like the parameter, and a float32 step counter each.
            "optimizer": sum(2 * p.numel() * p.element_size() + 4 for p in trainable),
            "n_params": sum(p.numel() for p in params),
            "n_trainable": sum(p.numel() for p in trainable)}


def sharded_bytes(model, world, bf16):
    """FSDP over `world` processes -> weights, gradients, optimizer and gathered bytes of ONE process.
    `model`: as build() gives it (shapes only is enough)."""
    def rows(p):  # this process's share of p: ceil(rows / world) rows (fully_shard pads dim 0)
        return -(-p.shape[0] // world) * (p.numel() // max(p.shape[0], 1)) if p.dim() else p.numel()
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    block = list(model.model.layers[0].parameters())
    in_blocks = {id(p) for b in model.model.layers for p in b.parameters()}
    root = sum(p.numel() for p in params if id(p) not in in_blocks)
    compute = 2 if bf16 else 4
    return {"weights": sum(rows(p) * p.element_size() for p in params),
            "gradients": sum(rows(p) * p.element_size() for p in trainable),
            "optimizer": sum(2 * rows(p) * p.element_size() + 4 for p in trainable),
            "gathered": (root + 2 * sum(p.numel() for p in block)) * compute
            + 4 * sum(p.numel() for p in block if p.requires_grad)}


@contextlib.contextmanager
def counting_saved(params):
    """Inside the block, every tensor autograd saves for backward is counted once per storage ->
    {storage: bytes}, filled as the block runs. params: tensors that exist anyway, left out."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen


def saved_for_backward_bytes(fn, params):
    """Bytes autograd keeps for backward while fn() builds its graph (each storage once, parameters excluded).

    fn: a function that runs a forward pass (and loss) and returns what it computed; params: the
    tensors that exist anyway (the model's parameters), left out of the count. The graph is freed
    without a backward pass."""
    with counting_saved(params) as seen:
        loss = fn()
    del loss  # frees the graph without running backward
    return sum(seen.values())


def saved_bytes(model, batch, length, bf16, with_loss=True, seed=0):
    """One forward (+ chunked loss) on random tokens -> (model part, loss part) in bytes saved for backward.

    Every position is a target (labels = input_ids). Counted as saved_for_backward_bytes counts: unique
    storages packed by saved_tensors_hooks, the model's parameters left out (they exist anyway).
    """
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=gen)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with counting_saved(model.parameters()) as seen, autocast:
        hidden = model.hidden_states(ids)
        model_part = sum(seen.values())
        loss = chunked_cross_entropy(hidden, model.lm_head.weight, ids)[0] if with_loss else None
    del loss, hidden  # frees the graph without a backward pass
    return model_part, sum(seen.values()) - model_part


def fit_length(count, length, at):
    """count(T) -> tuple of bytes; its value at `length`, counted there when length <= at, else counted
    at at/2 and at, and extrapolated as a + b*T."""
    if length <= at:
        return count(length)
    t1, t2 = at // 2, at
    c1, c2 = count(t1), count(t2)
    return tuple(y1 + (y2 - y1) * (length - t1) / (t2 - t1) for y1, y2 in zip(c1, c2))


@contextlib.contextmanager
def first_layers(model, n):
    """Run `model` with only its first n decoder blocks (the 1-layer count reuses the 2-layer model)."""
    layers = model.model.layers
    model.model.layers = layers[:n]
    try:
        yield model
    finally:
        model.model.layers = layers


def activation_bytes(cfg, batch, length, bf16, lora_r=0, lora_targets="all-linear", checkpointing=False):
    """Count on 1 and 2 real layers of cfg, scale to all its layers
    -> dict of bytes: activations (all layers), loss, block (one block's recompute), per_layer."""
    torch.manual_seed(0)  # random weights: the counts depend on shapes only, but runs stay repeatable
    n = min(2, cfg.num_hidden_layers)
    model = build(dataclasses.replace(cfg, num_hidden_layers=n, use_rope=cfg.use_rope[:n]), lora_r, lora_targets, bf16)

    def count(n_layers, ckpt, with_loss, at):
        model.grad_checkpointing = ckpt
        with first_layers(model, n_layers):
            return fit_length(lambda t: saved_bytes(model, batch, t, bf16, with_loss), length, at)

    def model_part(ckpt):  # -> (1-layer model part, cost of one more layer)
        one, two = count(1, ckpt, False, COUNT_LENGTH)[0], count(n, ckpt, False, COUNT_LENGTH)[0]
        return one, two - one if n == 2 else one  # a 1-layer model: its only layer stands for one layer

    one, layer = model_part(checkpointing)
    # The loss keeps O(N) and computes [chunk, V] logits: counted on a short sequence, it is quick.
    loss = count(1, checkpointing, True, LOSS_COUNT_LENGTH)[1]
    # Under checkpointing each block runs again in backward and keeps, for a moment, what it keeps without.
    block = model_part(False)[1] if checkpointing else 0
    return {"activations": one + (cfg.num_hidden_layers - 1) * layer, "loss": loss, "block": block,
            "per_layer": layer}


def dropout_mask_bytes(model, tokens):
    """LoRA dropout's masks, kept for backward -> {"all": every adapter's, "block": one decoder block's}.

    Added, not counted: CUDA's fused dropout keeps a bool mask of each adapter's input [tokens, in],
    one byte per number, while a CPU's dropout keeps a float mask of four, so counting on the CPU
    would report four times what the GPU holds. `model`: the LoRA model (shapes only is enough).
    """
    from minisft.lora import LoRALinear

    def inputs(module):
        return sum(m.base.in_features for m in module.modules() if isinstance(m, LoRALinear))
    return {"all": tokens * inputs(model), "block": tokens * inputs(model.model.layers[0])}


def loss_transient_bytes(cfg, batch, length, bf16, weight_dtype, weight_trains=True):
    """The loss's largest moment, in its forward (loss.py's _LinearCrossEntropy): one chunk's [chunk, V]
    logits, turned into their gradient in place (float32; under bf16 also the bf16 logits and the bf16
    gradient), the bf16 copy of a float32 lm_head weight under bf16, and under bf16 one chunk's bf16
    [V, D] weight gradient before it is added to the float32 one (when the weight trains). The float32
    [V, D] gradient itself waits for backward: the loss part counts it."""
    chunk = min(LOSS_CHUNK, batch * (length - 1))
    per_logit = 2 + 4 + 2 if bf16 else 4
    weight_copy = 2 * cfg.vocab_size * cfg.hidden_size if bf16 and weight_dtype == torch.float32 else 0
    chunk_grad = 2 * cfg.vocab_size * cfg.hidden_size if bf16 and weight_trains else 0
    return chunk * cfg.vocab_size * per_logit + weight_copy + chunk_grad


def estimate(model, batch_size, max_length, lora_r=0, lora_targets="all-linear", grad_checkpointing=False,
             dtype="bfloat16", lora_dropout=0.0, world_size=1, fsdp=False):
    """-> dict: each part of PARTS in bytes, total, counts and settings. `model`: folder, Hub id or config.json."""
    for flag, value, least in (("batch-size", batch_size, 1), ("max-length", max_length, 2), ("lora-r", lora_r, 0)):
        if value < least:
            raise ValueError(f"--{flag} {value}: expected an integer >= {least}")
    if world_size < 1:
        raise ValueError(f"--world-size {world_size}: expected an integer >= 1")
    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"--dtype {dtype!r}: expected bfloat16 or float32")
    if not 0 <= lora_dropout < 1:
        raise ValueError(f"--lora-dropout {lora_dropout}: expected a number in [0, 1)")
    cfg = read_config(model)
    length = min(max_length, cfg.max_position_embeddings)  # train.py cuts --max-length the same way
    bf16 = dtype == "bfloat16"
    full = build(cfg, lora_r, lora_targets, bf16, device="meta")  # shapes only, no memory
    parts = dict(state_bytes(full), gathered=0)
    if fsdp:
        parts.update(sharded_bytes(full, world_size, bf16))
    acts = activation_bytes(cfg, batch_size, length, bf16, lora_r, lora_targets, grad_checkpointing)
    masks = dropout_mask_bytes(full, batch_size * length) if lora_r and lora_dropout else {"all": 0, "block": 0}
    # Checkpointing: a block's masks live only while that block runs again, like the rest of it.
    parts["activations"] = acts["activations"] + (0 if grad_checkpointing else masks["all"])
    parts["loss"] = acts["loss"]
    parts["transient"] = max(loss_transient_bytes(cfg, batch_size, length, bf16, full.lm_head.weight.dtype,
                                                  weight_trains=not lora_r),
                             acts["block"] + (masks["block"] if grad_checkpointing else 0))
    total = sum(parts[p] for p in PARTS)
    counted = (f"at length {length}" if length <= COUNT_LENGTH else f"at lengths {COUNT_LENGTH // 2} and "
               f"{COUNT_LENGTH} (the loss at {LOSS_COUNT_LENGTH // 2} and {LOSS_COUNT_LENGTH}), fitted as a + b*T "
               f"to {length}")
    note = (f"activations counted with autograd's saved-tensor hooks on 1 and 2 real layers {counted}, "
            f"scaled to {cfg.num_hidden_layers} layers; weights, gradients and optimizer are exact counts; "
            f"counted on the CPU, not measured on a GPU")
    return dict(parts, total=total, layers=cfg.num_hidden_layers, batch_size=batch_size, max_length=length,
                lora_r=lora_r, lora_targets=lora_targets if lora_r else None, grad_checkpointing=grad_checkpointing,
                dtype=dtype, lora_dropout=lora_dropout if lora_r else 0.0, world_size=world_size, fsdp=fsdp, note=note)


def format_report(est):
    what = (f"LoRA r {est['lora_r']} ({est['lora_targets']}{', dropout ' + str(est['lora_dropout']) if est['lora_dropout'] else ''})"
            if est["lora_r"] else "full fine-tuning")
    lines = [f"{what}, batch {est['batch_size']} x {est['max_length']} tokens, {est['dtype']}"
             f"{', activation checkpointing' if est['grad_checkpointing'] else ''}"
             f"{', FSDP over ' + str(est['world_size']) + ' processes, per process' if est['fsdp'] else ''}",
             f"parameters {est['n_params']:,}, trainable {est['n_trainable']:,}"]
    for part in PARTS if est["fsdp"] else PARTS[:-1]:
        lines.append(f"  {part:<12} {est[part] / GB:8.2f} GB")
    lines += [f"  {'total':<12} {est['total'] / GB:8.2f} GB", f"note: {est['note']}"]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m minisft.memory", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model folder, Hub id or config.json")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--lora-r", type=int, default=0, help="LoRA rank; 0 = full fine-tuning")
    p.add_argument("--lora-targets", default="all-linear")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout: its masks are kept for backward")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 (autocast, as on a GPU) | float32")
    p.add_argument("--world-size", type=int, default=1, help="processes (GPUs); with --fsdp the count is per process")
    p.add_argument("--fsdp", action="store_true", help="weights, gradients and AdamW state sharded over --world-size")
    p.add_argument("--json", action="store_true", help="end with one JSON line (sizes in GB)")
    args = p.parse_args(argv)
    try:
        est = estimate(args.model, args.batch_size, args.max_length, args.lora_r, args.lora_targets,
                       args.grad_checkpointing, args.dtype, args.lora_dropout, args.world_size, args.fsdp)
    except (ValueError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(format_report(est))
    if args.json:
        out = {f"{k}_gb": round(est[k] / GB, 4) for k in (*PARTS, "total")}
        out.update({k: est[k] for k in ("n_params", "n_trainable", "layers", "batch_size", "max_length", "lora_r",
                                        "lora_targets", "lora_dropout", "grad_checkpointing", "dtype",
                                        "world_size", "fsdp")})
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
