"""Lesson 11: where a training step's time and memory go.

Lesson 6's micro-batch (8 conversations x up to 192 tokens) taken apart, with the library's own tools:
  1. the memory of one step, part by part: weights, gradients, AdamW state, activations kept for
     backward, the loss -- minisft.memory.estimate (exact counts + autograd's saved tensors), for the
     default model and, for scale, for SmolLM2-135M's real config
  2. what the chunked loss buys: bytes kept for backward with the full [B, T, V] logits vs
     chunked_cross_entropy, on a real batch
  3. what packing buys: real tokens / slots of random batches, of --group-by-length, and of token-budget
     packing; then useful tokens/s of real forward+backward steps, padded vs packed
  4. what activation checkpointing buys and costs: bytes kept and step time, off vs on
  5. the speed layer (minisft/fast/): model.py's plain RMSNorm next to its hand-written backward, the
     same numbers out both ways, and what the hand-written backwards save per decoder block; what a CPU
     process holds beyond its tensors is minisft/fast/heap.py's story (docs/heap.md measures it)
  6. plots -> runs/11_speed_and_memory/memory.png and runs/11_speed_and_memory/speed.png

Read along:
  minisft/memory.py      estimate(): the parts of a step's memory, and how activations are counted
  minisft/loss.py        chunked_cross_entropy: the logits one chunk at a time, recomputed in backward
  minisft/data.py        pack_to_budget / token_budget (packing), epoch_padding_efficiency (padding)
  minisft/memory.py      saved_for_backward_bytes: the saved-tensor count used below
  minisft/model.py       the plain model: RMSNorm, Block, ... as a student reads them
  minisft/fast/          the speed layer the trainer applies (fast.apply): functions.py's RMSNormFn,
                         NormLinearsFn, SwiGLUFn keep less for backward; packed.py attends per conversation
  minisft/fast/heap.py   why a CPU run's resident memory exceeds its tensors, and the setting minisft changes

Run:  python lessons/11_speed_and_memory.py [--model data/base-model]
About 10 s on 2 CPU cores. MINISFT_FAST=1 times fewer steps (for CI). Times are wall-clock medians:
on a busy machine they move; the byte counts do not.
"""
import argparse
import copy
import inspect
import os
import random
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = os.environ.get("MINISFT_RUNS", os.path.join(ROOT, "runs"))  # where run outputs go (tests redirect it)
sys.path.insert(0, ROOT)

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from minisft import conversations, data, fast
from minisft.chat_template import template_for
from minisft.default_model import DEFAULT_MODEL
from minisft.fast.functions import rms_norm_backward
from minisft.loss import batch_loss
from minisft.memory import PARTS, estimate, read_config, saved_for_backward_bytes
from minisft.model import Block, RMSNorm, rope_cos_sin
from minisft.weights import load_pretrained

# ---- knobs ---------------------------------------------------------------------------------
DATA = os.path.join(ROOT, "data", "sft_train.jsonl")
BATCH_SIZE = 8       # lesson 6's micro-batch: 8 conversations ...
GRAD_ACCUM = 2       # ... x 2 micro-batches per optimizer step
MAX_LENGTH = 192     # ... of up to 192 tokens
BIG_CONFIG = os.path.join(ROOT, "..", "shared", "configs", "SmolLM2-135M", "config.json")  # for scale, if present
TIMED_STEPS = 7      # forward+backward steps timed per setting (the median is printed)
FAST_TIMED_STEPS = 3  # MINISFT_FAST=1
SEED = 0
OUT = os.path.join(RUNS, "11_speed_and_memory")
MB, GB = 1e6, 1e9


def step_seconds(model, settings, n_steps):
    """-> {name: median wall seconds of forward + chunked loss + backward} for settings
    {name: (batches, grad_checkpointing)}. The settings take turns step by step, so a machine that gets
    busier or quieter slows them all alike; one untimed warm-up step each comes first."""
    times = {name: [] for name in settings}
    for i in range(n_steps + 1):
        for name, (batches, checkpointing) in settings.items():
            model.grad_checkpointing = checkpointing
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            loss_sum, n = batch_loss(model, batches[max(i - 1, 0)])
            (loss_sum / n).backward()
            if i:  # step 0 warms up the allocator and the kernels for these shapes
                times[name].append(time.perf_counter() - t0)
    model.grad_checkpointing = False
    model.zero_grad(set_to_none=True)
    return {name: statistics.median(t) for name, t in times.items()}


def kept_bytes(model, batch, chunked=True):
    """Bytes autograd keeps for backward while one micro-batch's loss is built (parameters left out)."""
    return saved_for_backward_bytes(lambda: batch_loss(model, batch, chunked=chunked)[0], list(model.parameters()))


def block_kept_per_token(block, cfg, T):
    """Bytes one block keeps for backward per token, float32, a [1, T] input that requires grad (as in the
    middle of a model). cos and sin are left out with the parameters: every layer shares them."""
    x = torch.randn(1, T, cfg.hidden_size, requires_grad=True)
    cos, sin = rope_cos_sin(torch.arange(T)[None], cfg.head_dim, cfg.rope_theta, x.dtype)
    return saved_for_backward_bytes(lambda: block(x, cos, sin), list(block.parameters()) + [cos, sin]) / T


def code_lines(fn):
    """A function's source without its docstring and comments: the statements only."""
    lines, in_doc = [], False
    for line in inspect.getsource(fn).splitlines():
        quotes = line.count('"""')
        if in_doc or quotes:
            in_doc = in_doc != (quotes == 1)  # a one-line docstring opens and closes
            continue
        code = line.split("  # ")[0].rstrip()
        if code.strip() and not code.strip().startswith("#"):
            lines.append(code)
    return lines


def side_by_side(left, right):
    """Two listings (lists of lines) printed as two columns."""
    width = max(map(len, left))
    for i in range(max(len(left), len(right))):
        a, b = (left[i] if i < len(left) else ""), (right[i] if i < len(right) else "")
        print(f"   {a:<{width}} | {b}")


# New: model.py's plain RMSNorm and the fast layer's RMSNormFn, run on the same input: the same output bits,
# the same gradients, and less kept for backward (the float32 normalised x is rebuilt in backward instead).
def compare_norm(dim, tokens):
    g = torch.Generator().manual_seed(SEED)
    plain = RMSNorm(dim, 1e-5)
    with torch.no_grad():
        plain.weight.add_(0.2 * torch.randn(dim, generator=g))
    x0, dy = torch.randn(tokens, dim, generator=g), torch.randn(tokens, dim, generator=g)
    out = {}
    for name, norm in (("plain", plain), ("fast", fast.apply(copy.deepcopy(plain)))):
        x = x0.clone().requires_grad_()
        kept = saved_for_backward_bytes(lambda: norm(x), list(norm.parameters()))
        y = norm(x)
        y.backward(dy)
        out[name] = dict(y=y.detach(), dx=x.grad, dw=norm.weight.grad, kept=kept)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="model folder or Hub id")
    args = p.parse_args()
    n_timed = FAST_TIMED_STEPS if os.environ.get("MINISFT_FAST", "0") not in ("", "0") else TIMED_STEPS
    torch.manual_seed(SEED)
    t_start = time.perf_counter()
    model, tok = load_pretrained(args.model, dtype="float32", device="cpu")
    fast.apply(model)  # as the trainer runs it: the speed layer of step 5 (model.py's modules, fast twins)
    model.train()  # checkpointing only recomputes in training mode

    # 1. New: the memory of one step, counted before it runs. float32 as lesson 6 trains on the CPU.
    print(f"1. memory of one full fine-tuning step, micro-batch {BATCH_SIZE} x {MAX_LENGTH} tokens "
          f"(minisft.memory.estimate)")
    small = estimate(args.model, BATCH_SIZE, MAX_LENGTH, dtype="float32")
    model_name = os.path.relpath(args.model) if os.path.isdir(args.model) else args.model
    print(f"   {model_name}: {small['n_params']:,} parameters, float32 (as lesson 6 trains on the CPU)")
    for part in PARTS:
        print(f"     {part:<12} {small[part] / MB:8.2f} MB")
    print(f"     {'total':<12} {small['total'] / MB:8.2f} MB")
    big = None
    if os.path.isfile(BIG_CONFIG):
        # bfloat16 autocast, as a GPU run trains: float32 weights/gradients/moments, bf16 activations.
        big = estimate(BIG_CONFIG, BATCH_SIZE, MAX_LENGTH, dtype="bfloat16")
        print(f"   SmolLM2-135M (its real config, random weights): {big['n_params']:,} parameters, bfloat16 autocast")
        for part in PARTS:
            print(f"     {part:<12} {big[part] / GB:8.2f} GB")
        print(f"     {'total':<12} {big['total'] / GB:8.2f} GB")
        print("   weights + gradients + AdamW = 16 bytes per parameter, whatever the batch; activations grow "
              "with batch x length")
    else:
        print(f"   (no {os.path.relpath(BIG_CONFIG)}: the SmolLM2-135M comparison is skipped)")

    # A real micro-batch of lesson 6: 8 random conversations, right-padded to the longest.
    convs, _ = conversations.load_conversations(DATA)
    examples, _ = data.build_examples(tok, convs, template_for(tok), max_length=MAX_LENGTH)
    rng = random.Random(SEED)
    padded = [data.to_device(data.collate(rng.sample(examples, BATCH_SIZE), tok.pad_id), "cpu")
              for _ in range(n_timed)]
    batch = padded[0]
    B, T = batch["input_ids"].shape
    V = model.config.vocab_size

    # 2. New: the chunked loss never holds the [B, T, V] logits (nor their float32 exp) for backward.
    full, chunked = kept_bytes(model, batch, chunked=False), kept_bytes(model, batch, chunked=True)
    print(f"\n2. kept for backward, one micro-batch [{B}, {T}] (saved-tensor count, parameters left out)")
    print(f"   full logits + masked_cross_entropy  {full / MB:8.2f} MB")
    print(f"   chunked_cross_entropy               {chunked / MB:8.2f} MB   (saves {(full - chunked) / MB:.2f} MB, "
          f"{1 - chunked / full:.0%})")
    if big is not None:  # the logits scale with the vocabulary: 1024 here, 49152 in SmolLM2
        big_v = read_config(BIG_CONFIG).vocab_size
        print(f"   with SmolLM2's vocabulary of {big_v:,} the float32 logits alone of this batch would be "
              f"{B * T * big_v * 4 / GB:.2f} GB (here: {B * T * V * 4 / MB:.1f} MB)")

    # 3. New: padding vs packing. Efficiency = real tokens / slots of the [rows, longest] tensors.
    lengths = [len(ex["input_ids"]) for ex in examples]
    eff_random = data.epoch_padding_efficiency(lengths, BATCH_SIZE * GRAD_ACCUM, BATCH_SIZE, seed=SEED)
    eff_grouped = data.epoch_padding_efficiency(lengths, BATCH_SIZE * GRAD_ACCUM, BATCH_SIZE, seed=SEED,
                                                group_by_length=True)
    budget = max(data.token_budget(lengths, BATCH_SIZE), max(lengths))  # as train.py budgets --packing
    # Each packed micro-batch is ONE row of all its conversations: on a CPU attention runs per conversation,
    # so the row may be longer than MAX_LENGTH at no cost, and one row has nothing to pad.
    packs = [data.collate(rows, tok.pad_id) for rows in data.pack_to_budget(examples, budget, MAX_LENGTH)]
    real = sum(int((b["attention_mask"] != 0).sum()) for b in packs)
    eff_packed = real / sum(b["attention_mask"].numel() for b in packs)
    print(f"\n3. padding efficiency (real tokens / slots) over one epoch of {len(examples)} conversations")
    print(f"   random micro-batches of {BATCH_SIZE}     {eff_random:6.1%}")
    print(f"   --group-by-length              {eff_grouped:6.1%}")
    print(f"   --packing (budget {budget} tokens)  {eff_packed:6.1%}   ({len(packs)} micro-batches)")
    # Grouping by length also nearly removes padding, but its micro-batches then hold very different
    # numbers of tokens (all long or all short); packing fills every micro-batch to the same budget.
    packed = [data.to_device(b, "cpu") for b in rng.sample(packs, n_timed)]
    # New: real steps. Both micro-batch kinds hold about BATCH_SIZE conversations' worth of tokens.
    seconds = step_seconds(model, {"padded": (padded, False), "packed": (packed, False),
                                   "checkpointing": (padded, True)}, n_timed)
    speed = {}
    for name, batches in (("padded", padded), ("packed", packed)):
        toks = statistics.median(int((b["attention_mask"] != 0).sum()) if b["attention_mask"] is not None
                                 else b["input_ids"].numel() for b in batches)
        slots = statistics.median(b["input_ids"].numel() for b in batches)
        speed[name] = dict(seconds=seconds[name], tokens=toks, slots=slots, tok_s=toks / seconds[name])
    print(f"   forward+backward, median of {n_timed} steps (wall clock: noisy on a busy machine):")
    for name, s in speed.items():
        print(f"   {name:<7} {s['seconds'] * 1000:6.0f} ms/step  {s['tokens']:5.0f} real tokens in {s['slots']:5.0f} "
              f"slots  -> {s['tok_s']:7.0f} useful tokens/s")

    # 4. New: activation checkpointing keeps only each block's input and runs the block again in backward.
    # Its steps were timed in step 3, taking turns with the others.
    model.grad_checkpointing = True
    ckpt = {False: dict(bytes=chunked, seconds=seconds["padded"]),
            True: dict(bytes=kept_bytes(model, batch), seconds=seconds["checkpointing"])}
    model.grad_checkpointing = False
    print(f"\n4. activation checkpointing, the same micro-batch [{B}, {T}]")
    for on, c in ckpt.items():
        print(f"   {'on ' if on else 'off'}  kept for backward {c['bytes'] / MB:7.2f} MB   {c['seconds'] * 1000:6.0f} ms/step")
    print(f"   keeps {ckpt[True]['bytes'] / ckpt[False]['bytes']:.0%} of the bytes, takes "
          f"{ckpt[True]['seconds'] / ckpt[False]['seconds']:.2f}x the time")
    # Each block's forward runs twice (once more in backward): about 1/3 more compute. A busy machine's
    # wall clock can hide that on a model this small; the bytes above are exact.

    # 5. New: the speed layer. model.py's RMSNorm is plain ops: autograd keeps what they need. The fast
    # twin runs the same forward as RMSNormFn, whose backward is written by hand from what it kept.
    print("\n5. the speed layer: model.py's plain RMSNorm | its backward written by hand (minisft/fast/functions.py)")
    side_by_side(code_lines(RMSNorm.forward), code_lines(rms_norm_backward))
    norm = compare_norm(model.config.hidden_size, MAX_LENGTH)
    p, f = norm["plain"], norm["fast"]
    print(f"   the same input through both: output bitwise equal: {torch.equal(p['y'], f['y'])}; "
          f"max |dx| difference {(p['dx'] - f['dx']).abs().max():.1e}, max |dweight| {(p['dw'] - f['dw']).abs().max():.1e}")
    print(f"   kept for backward, [{MAX_LENGTH}, {model.config.hidden_size}] float32: plain {p['kept']:,} bytes, "
          f"RMSNormFn {f['kept']:,} bytes ({p['kept'] - f['kept']:,} saved: the float32 normalised x)")
    # The same idea across a whole block: NormLinearsFn runs a norm and the Linears that read it (q, k, v;
    # gate, up) without keeping the normalised x; SwiGLUFn keeps gate and up and recomputes the rest.
    print(f"   one decoder block, float32, bytes kept for backward per token: plain ops (model.py) vs minisft (fast.apply)")
    blocks = [(model_name, model.config)]
    if big is not None:
        blocks.append(("SmolLM2-135M", read_config(BIG_CONFIG)))  # random weights: shapes are what count
    for name, cfg in blocks:
        plain_block = Block(cfg, 0).train()
        ours = block_kept_per_token(fast.apply(copy.deepcopy(plain_block)), cfg, MAX_LENGTH)
        plain = block_kept_per_token(plain_block, cfg, MAX_LENGTH)
        D, I = cfg.hidden_size, cfg.intermediate_size
        print(f"   {name:<16} plain ops {plain:8,.0f}   minisft {ours:8,.0f}   "
              f"(keeps {ours / plain:.0%}: 2 norms x 2 x D={D} + 2 x I={I} floats fewer)")

    # 6. The plots.
    os.makedirs(OUT, exist_ok=True)
    panels = [(f"{model_name}, float32 (MB)", small, MB)]
    if big is not None:
        panels.append(("SmolLM2-135M, bf16 autocast (GB)", big, GB))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (title, est, unit) in zip(axes[0], panels):
        values = [est[part] / unit for part in PARTS]
        ax.bar(PARTS, values, color=["C0", "C0", "C0", "C1", "C2", "C3"])
        for x, v in enumerate(values):
            ax.text(x, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{title}\nbatch {BATCH_SIZE} x {MAX_LENGTH}: total {est['total'] / unit:.2f}")
        ax.tick_params(axis="x", labelrotation=30)
    fig.suptitle("memory of one training step, part by part (minisft.memory.estimate)")
    fig.tight_layout()
    memory_png = os.path.join(OUT, "memory.png")
    fig.savefig(memory_png, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 2.6))
    ax.axis("off")
    rows = [["padded micro-batch", f"{speed['padded']['seconds'] * 1000:.0f}", f"{speed['padded']['tok_s']:.0f}",
             f"{full / MB:.2f} (full logits) / {chunked / MB:.2f} (chunked)"],
            ["packed micro-batch", f"{speed['packed']['seconds'] * 1000:.0f}", f"{speed['packed']['tok_s']:.0f}", ""],
            ["padded, checkpointing on", f"{ckpt[True]['seconds'] * 1000:.0f}",
             f"{speed['padded']['tokens'] / ckpt[True]['seconds']:.0f}", f"{ckpt[True]['bytes'] / MB:.2f}"]]
    table = ax.table(cellText=rows, colLabels=["setting", "ms / step", "useful tokens/s", "kept for backward (MB)"],
                     loc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(10)
    table.auto_set_column_width(range(4))
    table.scale(1, 1.6)
    ax.set_title(f"speed on the CPU: median of {n_timed} forward+backward steps (wall clock, noisy)")
    speed_png = os.path.join(OUT, "speed.png")
    fig.savefig(speed_png, dpi=100, bbox_inches="tight")
    plt.close(fig)
    print(f"\n6. plots: {os.path.relpath(memory_png)}  {os.path.relpath(speed_png)}")
    print(f"wall time {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # a bad --model or data file: one line, not a traceback
        sys.exit(f"error: {' '.join(str(e).split())}")
