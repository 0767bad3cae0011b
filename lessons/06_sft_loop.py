"""Lesson 6: the SFT loop -- fine-tune the base model into a chat model.

Everything from lessons 1-5 in one loop: chat template + label mask (lesson 2), masked loss with
gradient accumulation (lesson 4), warmup + cosine schedule (lesson 5). First the loop written out
(sft_loop_by_hand, ~30 lines, a few steps):

    data -> batches       data.build_examples (token ids + label mask), data.step_batches (each step's micro-batches)
    accumulate            count the step's target tokens first, then backward every micro-batch's
                          summed loss / that count (train.accumulate_gradients)
    clip                  the global gradient norm (torch's clip_grad_norm_)
    AdamW                 at this step's learning rate, schedule.lr_at(step)

Then minisft.train.train runs that same loop (train.sft_step) for the whole recipe, and adds what a
real run needs: validation loss every EVAL_EVERY steps, early stopping (PATIENCE evaluations
without a better val loss), sample generations (does it stop at <|im_end|> yet?), checkpoints and
--resume, live plots, a final model folder in Hugging Face layout.

Read along:
  minisft/train.py    sft_step: one optimizer step as the algorithm (global batch, count targets,
                      accumulate, clip, AdamW at lr_at(step)); train(): the stage and the loop
  minisft/watch.py    evaluation, sample answers, early stopping, the over-fitting warning
  minisft/rundir.py   the run folder: metrics, plots, checkpoints, resume, Ctrl-C
  minisft/config.py   TrainConfig: every knob below, with its default

Run:  python lessons/06_sft_loop.py [--model data/base-model] [--steps 300] [--lr 1.5e-3]
Out:  runs/06_sft_loop/  (runs/ is the lessons' scratch space: a previous run there is replaced)
      final/ (the fine-tuned model), metrics.jsonl, samples.jsonl and the plots
      runs/06_sft_loop/loss.png, runs/06_sft_loop/metrics.png
      runs/06_sft_loop_overfit/loss.png  (a short run that over-fits on purpose: the warning)
About 70-80 s on 2 CPU cores (the loop by hand: ~5 s). MINISFT_FAST=1 runs 30 steps (for CI).
Lesson 7 measures what this run changed; lesson 8 looks at its /think and /no_think modes.
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = os.environ.get("MINISFT_RUNS", os.path.join(ROOT, "runs"))  # where run outputs go (tests redirect it)
sys.path.insert(0, ROOT)

import torch

from minisft import data, schedule
from minisft.default_model import DEFAULT_MODEL
from minisft.generate import chat
from minisft.recipes import REAL_MODEL_RECIPE, TRAIN_DATA, VAL_DATA, same_model, sft_config
from minisft.train import accumulate_gradients, param_groups, pick_template, to_device, train
from minisft.weights import load_pretrained

# ---- knobs ---------------------------------------------------------------------------------
# The default recipe for the tiny default model (the same values as minisft.recipes.SFT_RECIPE,
# which lesson 7 and the tests use; a test checks they agree).
KNOBS = dict(
    max_steps=300,          # optimizer steps (~1.6 epochs of 3000 conversations)
    batch_size=8,           # conversations per micro-batch ...
    grad_accum=2,           # New: ... x 2 micro-batches = 16 per optimizer step (lesson 4's accumulation)
    lr=1.5e-3,              # peak learning rate
    min_lr=1.5e-4,          # the cosine ends here, not at 0
    freeze_embeddings=True, # New (lesson 10): text tokens keep their pretrained embedding rows
    freeze_top_mlps=2,      # New (lesson 10): and the MLPs of the last 2 of 4 blocks their pretrained weights
    warmup_ratio=0.05,      # 5% linear warmup
    weight_decay=0.0,       # little data, few steps: no need to pull weights to 0
    max_length=192,         # tokens per conversation (longer ones lose trailing turns)
    packing=True,           # several conversations per row, ~8 conversations of tokens per micro-batch: no padding
    eval_every=25,          # New: validation loss every 25 steps
    patience=4,             # New: stop after 4 evaluations without a better val loss (keep the best)
    sample_every=100,       # New: greedy answers to 3 validation prompts every 100 steps
    plot_every=50,          # New: refresh loss.png / metrics.png while training (open them!)
    save_every=0,           # checkpoint only at the end (the run is short)
    log_every=10,           # a progress line every 10 steps
    seed=0,
)
# With --model a real SmolLM (135M+), lr and min_lr come from REAL_MODEL_RECIPE (lr 5e-5, 30x smaller:
# a big pretrained model needs small steps, or SFT overwrites what it knows), and every MLP trains.
FAST_STEPS = 30  # MINISFT_FAST=1: CI only checks that the lesson runs
HAND_STEPS = 12  # the loop written out runs this many steps (a few seconds), on 16 x HAND_STEPS conversations
OUT = os.path.join(RUNS, "06_sft_loop")
# New: a second, short run that over-fits on purpose, to see the trainer's over-fitting warning.
OVERFIT = dict(n_conversations=32, max_steps=60, eval_every=5, overfit_evals=3,  # 60 steps = 12 epochs (5 packed micro-batches)
               n_val=64)  # the first 64 validation conversations: enough to see the gap, a third of the time
QUESTIONS = [  # asked to the fine-tuned model at the end
    [{"role": "system", "content": "You are a concise assistant. /no_think"},
     {"role": "user", "content": "What is 7 + 5?"}],
    [{"role": "system", "content": "You are a helpful assistant. /think"},
     {"role": "user", "content": "What is the capital of Varnia?"}],
]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="base model folder or Hub id")
    p.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default {KNOBS['max_steps']})")
    p.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate (default {KNOBS['lr']:g}; {REAL_MODEL_RECIPE['lr']:g} with another --model)")
    p.add_argument("--out", default=OUT, help="run folder (replaced if it holds a run)")
    args = p.parse_args()

    knobs = dict(KNOBS)
    if not same_model(args.model, DEFAULT_MODEL):
        knobs.update(REAL_MODEL_RECIPE)
    if os.environ.get("MINISFT_FAST", "0") not in ("", "0"):
        knobs.update(max_steps=FAST_STEPS, eval_every=10, sample_every=FAST_STEPS, plot_every=10)
    if args.steps is not None:
        knobs["max_steps"] = args.steps
    if args.lr is not None:
        knobs["lr"] = args.lr
    cfg = sft_config(args.out, model=args.model, **knobs)  # overwrite=True: runs/ is scratch space

    sft_loop_by_hand(cfg)

    # New: the same loop, run by the trainer, with everything around it that a real run needs.
    print(f"\ntrain(): the same step (train.sft_step) for the whole recipe, and around it what a real run needs:\n"
          f"  eval        validation loss every {cfg.eval_every} steps; early stopping after {cfg.patience} without "
          f"a better one\n"
          f"  samples     greedy answers to {cfg.num_samples} validation prompts every {cfg.sample_every} steps\n"
          f"  checkpoints weights + AdamW moments + RNG states + data position; resume (--resume) carries on exactly\n"
          f"  plots       loss.png and metrics.png, refreshed every {cfg.plot_every} steps\n"
          f"  and         packed micro-batches (lesson 11), frozen text embeddings and top MLPs (lesson 10), "
          f"a final/ model folder\n")
    print(f"SFT of {args.model} on {cfg.data} (val {cfg.val_data}) -> {args.out}\n")
    t0 = time.perf_counter()
    summary = train(cfg)
    print(f"\nwall time {time.perf_counter() - t0:.0f}s; stop reason: {summary['stop_reason']}")
    print(f"fine-tuned model: {summary['final']}")
    print(f"plots:            {os.path.join(args.out, 'loss.png')}  {os.path.join(args.out, 'metrics.png')}")
    print(f"logs:             {os.path.join(args.out, 'metrics.jsonl')}  {os.path.join(args.out, 'samples.jsonl')}")

    # New: chat() = render with the template + generate + decode. The fine-tuned model answers like a
    # chat model now: it stops at <|im_end|> by itself. template=None: the one final/ carries, which
    # is the one this run trained with.
    model, tok = load_pretrained(summary["final"])
    print("\nthe fine-tuned model answers (greedy):")
    for messages in QUESTIONS:
        answer = chat(model, tok, messages, template=cfg.template, max_new_tokens=64)
        print(f"  [{messages[0]['content'].split()[-1]}] {messages[-1]['content']}\n    -> {answer!r}")

    overfit_demo(args.model)


def sft_loop_by_hand(cfg):
    """New: the SFT loop written out from the library's pieces, for HAND_STEPS steps of cfg's recipe
    (plain padded micro-batches, every weight training). Prints the loss of every step."""
    print(f"the SFT loop by hand: {HAND_STEPS} steps of {cfg.batch_size} x {cfg.grad_accum} conversations")
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model, tok = load_pretrained(cfg.model, device="cpu")  # float32 weights: small updates must not round away
    # data -> batches: conversations -> token ids + label mask (lesson 2) -> the micro-batches of each step
    with open(cfg.data, encoding="utf-8") as f:
        convs = [json.loads(line)["messages"] for _, line in zip(range(16 * HAND_STEPS), f)]
    examples, _ = data.build_examples(tok, convs, template=pick_template(cfg, tok), max_length=cfg.max_length)
    batches = data.step_batches(examples, cfg.batch_size * cfg.grad_accum, cfg.batch_size, cfg.seed, tok.pad_id)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), betas=(cfg.beta1, cfg.beta2))
    model.train()
    for step in range(HAND_STEPS):
        micro_batches = [to_device(mb, "cpu") for mb in batches(step)]  # the step's global batch, in pieces
        # New: count the target tokens of the WHOLE step first: every token then weighs 1 / n_targets
        n_targets = sum(data.count_targets(mb["labels"]) for mb in micro_batches)
        optimizer.zero_grad()
        # New: accumulate -- backward each micro-batch's summed loss / n_targets; the gradients add up
        loss_sum = accumulate_gradients(model, micro_batches, n_targets)
        # New: clip the global gradient norm (the norm before clipping is what a run logs)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        # New: AdamW at this step's learning rate: warmup, then cosine down to min_lr (lesson 5)
        lr = schedule.lr_at(step, base_lr=cfg.lr, warmup_steps=2, total_steps=HAND_STEPS, min_lr=cfg.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        print(f"  step {step:>2} | loss {float(loss_sum) / n_targets:.4f} | lr {lr:.2e} | grad {float(grad_norm):.3f} "
              f"| {len(micro_batches)} micro-batches, {n_targets} target tokens")
    print(f"  ({time.perf_counter() - t0:.1f}s, the model loaded from disk included)")


def overfit_demo(model):
    """32 conversations, seen 15 times: the train loss falls towards 0 while the val loss stalls."""
    if not same_model(model, DEFAULT_MODEL):
        print("\n(the over-fitting demo runs on the embedded default only: run the lesson without --model to see it)")
        return
    out = OUT + "_overfit"
    os.makedirs(out, exist_ok=True)
    small = first_records(TRAIN_DATA, os.path.join(out, "train_32.jsonl"), OVERFIT["n_conversations"])
    small_val = first_records(VAL_DATA, os.path.join(out, "val_64.jsonl"), OVERFIT["n_val"])
    print(f"\nover-fitting on purpose: {OVERFIT['n_conversations']} conversations, {OVERFIT['max_steps']} steps -> "
          f"{os.path.relpath(out)}")
    knobs = dict(KNOBS, max_steps=OVERFIT["max_steps"], eval_every=OVERFIT["eval_every"],
                 overfit_evals=OVERFIT["overfit_evals"], batch_size=8, grad_accum=1, patience=0,
                 sample_every=0, plot_every=0, log_every=OVERFIT["max_steps"])
    summary = train(sft_config(out, model=model, data=small, val_data=small_val, **knobs))
    # The warning above fires once the val loss sits ABOVE the train loss and the gap keeps growing:
    # the train loss falls towards 0 while the val loss hardly moves -- these 32 answers are being
    # learnt by heart, not the task. More data, fewer epochs or --patience are the usual answers.
    print(f"last train loss {summary['loss']:.4f}, best val loss {summary['best_val_loss']:.4f}: the gap is "
          f"memorised answers. Plot: {os.path.relpath(os.path.join(out, 'loss.png'))}")


def first_records(src_path, dst_path, n):
    """Copy the first n records (lines) of a .jsonl file to dst_path; return dst_path."""
    with open(src_path, encoding="utf-8") as src, open(dst_path, "w", encoding="utf-8") as dst:
        dst.writelines(line for _, line in zip(range(n), src))
    return dst_path


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # a bad --model or data file: one line, not a traceback
        sys.exit(f"error: {' '.join(str(e).split())}")
