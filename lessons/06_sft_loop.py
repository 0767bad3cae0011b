"""Lesson 6: the SFT loop -- fine-tune the base model into a chat model.

Everything from lessons 1-5 in one run of minisft.train.train:
  chat template + label mask (lesson 2), masked loss with gradient accumulation (lesson 4),
  warmup + cosine schedule (lesson 5), plus what a real run needs: validation loss every
  EVAL_EVERY steps, early stopping (PATIENCE evaluations without a better val loss), sample
  generations every SAMPLE_EVERY steps (does it stop at <|im_end|> yet?), live plots, a final
  model folder in Hugging Face layout.

Run:  python lessons/06_sft_loop.py [--model data/base-model] [--steps 300] [--lr 1e-3]
Out:  runs/06_sft_loop/  (runs/ is the lessons' scratch space: a previous run there is replaced)
      final/ (the fine-tuned model), metrics.jsonl, samples.jsonl and the plots
      runs/06_sft_loop/loss.png, runs/06_sft_loop/metrics.png
About a minute on 2 CPU cores. MINISFT_FAST=1 runs 30 steps (for CI).
Lesson 7 measures what this run changed; lesson 8 looks at its /think and /no_think modes.
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = os.environ.get("MINISFT_RUNS", os.path.join(ROOT, "runs"))  # where run outputs go (tests redirect it)
sys.path.insert(0, ROOT)

from minisft.default_model import DEFAULT_MODEL
from minisft.evaluate import sft_config
from minisft.generate import chat
from minisft.weights import load_pretrained

# ---- knobs ---------------------------------------------------------------------------------
# The default recipe for the tiny default model (the same values as minisft.evaluate.SFT_RECIPE,
# which lesson 7 and the tests use; a test checks they agree). For a real SmolLM2-135M use
# lr ~5e-5 (a big pretrained model needs small steps) and a longer max_length.
KNOBS = dict(
    max_steps=300,          # optimizer steps (~1.6 epochs of 3000 conversations)
    batch_size=8,           # conversations per micro-batch ...
    grad_accum=2,           # ... x 2 micro-batches = 16 per optimizer step
    lr=1e-3,                # peak learning rate
    min_lr=1e-4,            # the cosine ends here, not at 0
    warmup_ratio=0.05,      # 5% linear warmup
    weight_decay=0.0,       # little data, few steps: no need to pull weights to 0
    max_length=192,         # tokens per conversation (longer ones lose trailing turns)
    eval_every=25,          # validation loss every 25 steps
    patience=4,             # stop after 4 evaluations without a better val loss (keep the best)
    sample_every=100,       # greedy answers to 3 validation prompts every 100 steps
    plot_every=25,          # refresh loss.png / metrics.png while training (open them!)
    save_every=0,           # checkpoint only at the end (the run is short)
    log_every=10,           # a progress line every 10 steps
    seed=0,
)
FAST_STEPS = 30  # MINISFT_FAST=1: CI only checks that the lesson runs
OUT = os.path.join(RUNS, "06_sft_loop")
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
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {KNOBS['lr']:g})")
    p.add_argument("--out", default=OUT, help="run folder (replaced if it holds a run)")
    args = p.parse_args()

    knobs = dict(KNOBS)
    if os.environ.get("MINISFT_FAST", "0") not in ("", "0"):
        knobs.update(max_steps=FAST_STEPS, eval_every=10, sample_every=FAST_STEPS, plot_every=10)
    if args.steps is not None:
        knobs["max_steps"] = args.steps
    if args.lr is not None:
        knobs["lr"] = args.lr
    cfg = sft_config(args.out, model=args.model, **knobs)  # overwrite=True: runs/ is scratch space
    print(f"SFT of {args.model} on {cfg.data} (val {cfg.val_data}) -> {args.out}\n")

    t0 = time.perf_counter()
    summary = train(cfg)
    print(f"\nwall time {time.perf_counter() - t0:.0f}s; stop reason: {summary['stop_reason']}")
    print(f"fine-tuned model: {summary['final']}")
    print(f"plots:            {os.path.join(args.out, 'loss.png')}  {os.path.join(args.out, 'metrics.png')}")
    print(f"logs:             {os.path.join(args.out, 'metrics.jsonl')}  {os.path.join(args.out, 'samples.jsonl')}")

    # The fine-tuned model answers like a chat model now: it stops at <|im_end|> by itself.
    model, tok = load_pretrained(summary["final"])
    print("\nthe fine-tuned model answers (greedy):")
    for messages in QUESTIONS:
        answer = chat(model, tok, messages, template=cfg.template or "smollm2", max_new_tokens=64)
        print(f"  [{messages[0]['content'].split()[-1]}] {messages[-1]['content']}\n    -> {answer!r}")


def train(cfg):
    from minisft.train import train as _train  # the whole loop lives in minisft/train.py: read it!
    return _train(cfg)


if __name__ == "__main__":
    main()
