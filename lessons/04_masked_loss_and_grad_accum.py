"""Lesson 4: the masked cross-entropy, and why gradient accumulation must count tokens.

  1. minisft.loss.masked_cross_entropy (hand-written log-softmax + gather, returns a SUM and a
     count) gives the same number as torch's F.cross_entropy(..., ignore_index=-100)
  2. chunked_cross_entropy: the same value and gradients from the hidden states, without the
     full [tokens, vocab] logits
  3. gradient accumulation: one global batch cut into micro-batches with uneven target counts.
     The naive "mean of micro-batch means" gives short micro-batches' tokens more weight: the
     loss and the gradient differ from the full batch. train.accumulate_gradients divides every
     micro-batch's SUM by the global target count: it matches the full batch exactly.
  4. the bias of the mean of means over many random splits -> runs/04_masked_loss_and_grad_accum/bias.png

Run:  python lessons/04_masked_loss_and_grad_accum.py [--model data/base-model]
About 5-10 s on CPU with the default model; no optimizer step is taken.
"""
import argparse
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from minisft import conversations, data
from minisft.chat_template import template_for
from minisft.default_model import DEFAULT_MODEL
from minisft.loss import batch_loss, chunked_cross_entropy, masked_cross_entropy
from minisft.train import accumulate_gradients  # the accumulation loop of train.sft_step
from minisft.weights import load_pretrained

# ---- knobs ---------------------------------------------------------------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = os.environ.get("MINISFT_RUNS", os.path.join(ROOT, "runs"))  # where run outputs go (tests redirect it)
DATA = os.path.join(ROOT, "data", "sft_train.jsonl")
OUT = os.path.join(RUNS, "04_masked_loss_and_grad_accum")
GLOBAL_BATCH = 16  # examples per optimizer step
MICRO_BATCH = 4  # examples per micro-batch in step 3 -> GLOBAL_BATCH / MICRO_BATCH micro-batches
CHUNK_SIZE = 64  # rows of logits alive at once in the chunked loss
N_SPLITS = 2000  # random ways to cut the global batch, for the plot
SEED = 0


def grads(model):
    """All parameter gradients as one flat float64 vector (then cleared)."""
    g = torch.cat([p.grad.detach().double().flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return g


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="model folder or Hub id")
    args = p.parse_args()
    torch.manual_seed(SEED)
    model, tok = load_pretrained(args.model, dtype="float32", device="cpu")
    convs, _ = conversations.load_conversations(DATA)
    convs = random.Random(SEED).sample(convs, GLOBAL_BATCH)
    examples, _ = data.build_examples(tok, convs, template_for(tok))
    batch = data.collate(examples, tok.pad_id)  # [B, T], right-padded
    print(f"global batch: {GLOBAL_BATCH} examples, {batch['input_ids'].shape[1]} columns, "
          f"{data.count_targets(batch['labels'])} target tokens\n")

    # 1. New: the loss. Masked CE: shift, drop -100 positions, -log softmax at the target. Returns SUM and count.
    logits = model(batch["input_ids"], batch["position_ids"], batch["attention_mask"])  # [B, T, V]
    loss_sum, n = masked_cross_entropy(logits, batch["labels"])
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                          ignore_index=-100, reduction="sum")
    print("1. masked_cross_entropy vs F.cross_entropy(ignore_index=-100, reduction='sum')")
    print(f"   ours {loss_sum.item():.6f} over {n} targets (mean {loss_sum.item() / n:.6f})")
    print(f"   torch {ref.item():.6f}   |difference| {abs(loss_sum.item() - ref.item()):.2e}")
    # (The mean is high because a base model has never seen <|im_end|>, <think> or the chat layout.)
    print(f"   (uniform guessing would be ln({logits.shape[-1]}) = {torch.log(torch.tensor(float(logits.shape[-1]))).item():.2f}; "
          f"the default base model has never seen <|im_end|> or <think>)\n")

    # 2. New: the chunked loss. Masked positions are dropped BEFORE the output projection, and
    # only CHUNK_SIZE rows of logits exist at a time. Same value, same gradients.
    (loss_sum / n).backward()
    g_full = grads(model)
    hidden = model.hidden_states(batch["input_ids"], batch["position_ids"], batch["attention_mask"])  # [B, T, D]
    c_sum, c_n = chunked_cross_entropy(hidden, model.lm_head.weight, batch["labels"], chunk_size=CHUNK_SIZE)
    (c_sum / c_n).backward()
    g_chunk = grads(model)
    print(f"2. chunked_cross_entropy(chunk_size={CHUNK_SIZE}): {c_sum.item():.6f} over {c_n} targets")
    print(f"   full logits would be {tuple(logits.shape)} = {logits.numel():,} floats; "
          f"the chunks hold at most {CHUNK_SIZE} x {logits.shape[-1]} = {CHUNK_SIZE * logits.shape[-1]:,}")
    print(f"   max |grad difference| vs the full loss: {(g_full - g_chunk).abs().max().item():.2e}\n")

    # 3. New: gradient accumulation. Sort by target count so the micro-batches are very uneven
    # (short answers together, long ones together): the worst case for the mean of means.
    order = sorted(range(len(examples)), key=lambda i: data.count_targets(examples[i]["labels"]))
    mbs = [data.collate([examples[i] for i in idx], tok.pad_id) for idx in data.micro_batches(order, MICRO_BATCH)]
    counts = [data.count_targets(mb["labels"]) for mb in mbs]
    print(f"3. {len(mbs)} micro-batches of {MICRO_BATCH}, target counts {counts} (total {sum(counts)})")

    # (a) the naive way: each micro-batch takes its own mean, then we average the means.
    means = []
    for mb in mbs:
        s, k = batch_loss(model, mb)
        (s / k / len(mbs)).backward()
        means.append(s.item() / k)
    g_naive = grads(model)
    naive = sum(means) / len(means)
    # (b) the library: every micro-batch backwards sum / (targets of the WHOLE global batch).
    total = accumulate_gradients(model, mbs, sum(counts))
    g_tok = grads(model)
    right = total.item() / sum(counts)
    print(f"   micro-batch means       {[round(m, 4) for m in means]}")
    print(f"   full batch (one pass)   loss {loss_sum.item() / n:.6f}")
    print(f"   accumulate_gradients    loss {right:.6f}   rel. grad error {((g_tok - g_full).norm() / g_full.norm()).item():.1e}")
    print(f"   mean of means (naive)   loss {naive:.6f}   rel. grad error {((g_naive - g_full).norm() / g_full.norm()).item():.1e}")
    print(f"   -> the naive loss is off by {naive - right:+.4f}; its gradient points somewhere else.\n")

    # 4. Many random splits. Per-example sums and counts are all we need: compute them once.
    sums, cnts = [], []
    with torch.no_grad():
        for ex in examples:
            s, k = batch_loss(model, data.collate([ex], tok.pad_id))
            sums.append(s.item())
            cnts.append(k)
    true = sum(sums) / sum(cnts)
    rng = random.Random(SEED)
    print(f"4. mean of means minus the token-weighted loss ({true:.4f}), {N_SPLITS} random shuffles:")
    fig, ax = plt.subplots(figsize=(7, 4))
    for mbs_size in (1, 2, 4, 8, 16):
        bias = []
        for _ in range(N_SPLITS):
            idx = list(range(len(examples)))
            rng.shuffle(idx)
            parts = data.micro_batches(idx, mbs_size)
            m = [sum(sums[i] for i in part) / sum(cnts[i] for i in part) for part in parts]
            bias.append(sum(m) / len(m) - true)
        mean_b = sum(bias) / len(bias)
        spread = max(abs(b) for b in bias)
        print(f"   micro-batch size {mbs_size:2d}: mean bias {mean_b:+.4f}, worst {spread:.4f}")
        if mbs_size == 1:  # one example per micro-batch: every shuffle gives the same mean of means
            ax.axvline(mean_b, color="tab:purple", lw=2, label="micro-batch 1 (16 means, same for every split)")
        elif mbs_size < GLOBAL_BATCH:
            ax.hist(bias, bins=50, alpha=0.5, label=f"micro-batch {mbs_size} ({GLOBAL_BATCH // mbs_size} means)")
    ax.axvline(0.0, color="k", lw=1, label=f"micro-batch {GLOBAL_BATCH}: exact")
    ax.set_xlabel("mean of micro-batch means  -  token-weighted loss")
    ax.set_ylabel("random splits")
    ax.set_title(f"gradient accumulation bias, global batch {GLOBAL_BATCH}")
    ax.legend()
    fig.tight_layout()
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "bias.png")
    fig.savefig(path, dpi=100)
    print(f"   wrote {os.path.relpath(path, ROOT)}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # a bad --model or data file: one line, not a traceback
        sys.exit(f"error: {' '.join(str(e).split())}")
