"""Lesson 5: the learning-rate schedule, and what a wrong learning rate looks like.

  1. schedule.lr_at: linear warmup, then a half cosine down to 0 (or to a min_lr floor)
  2. the schedule plotted -> runs/05_lr_schedule/schedule.png
  3. three short real fine-tuning runs of the model on data/sft_train.jsonl with train.train:
     too high, about right, too low (each in runs/05_lr_schedule/<name>/)
  4. plot.plot_runs compares them in one dashboard -> runs/05_lr_schedule/compare.png

Run:  python lessons/05_lr_schedule.py [--model data/base-model]
      MINISFT_FAST=1 python lessons/05_lr_schedule.py     # fewer steps (CI)
About half a minute on 2 CPU cores with the default model (MINISFT_FAST=1: 15 steps per run, not 50).
The learning rates are for the tiny default model; with --model a real SmolLM the "good" one is 5e-5.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from minisft.default_model import DEFAULT_MODEL
from minisft.recipes import REAL_MODEL_RECIPE, same_model
from minisft.plot import plot_runs, read_metrics
from minisft.schedule import lr_at
from minisft.train import TrainConfig, train

# ---- knobs ---------------------------------------------------------------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = os.environ.get("MINISFT_RUNS", os.path.join(ROOT, "runs"))  # where run outputs go (tests redirect it)
OUT = os.path.join(RUNS, "05_lr_schedule")
FAST = os.environ.get("MINISFT_FAST", "0") not in ("", "0")
MAX_STEPS = 15 if FAST else 50  # optimizer steps per run
WARMUP_STEPS = 5
BATCH_SIZE = 8
MAX_LENGTH = 256  # tokens per conversation: every one in data/ fits
LRS = {"lr_too_high": 3e-2, "lr_good": 2e-3, "lr_too_low": 3e-5}  # run name -> peak lr, for the tiny default
# With --model a real SmolLM: 3e-5 is no longer too low, and even 1e-3 overwrites what it knows
# (see REAL_MODEL_RECIPE in minisft/recipes.py).
REAL_MODEL_LRS = {"lr_too_high": 3e-2, "lr_good": REAL_MODEL_RECIPE["lr"], "lr_too_low": 1e-6}
MIN_LR_FRACTION = 0.1  # for the schedule plot: a floor at 10% of the peak
PLOT_STEPS, PLOT_WARMUP, PLOT_LR = 200, 20, 1e-3  # the schedule of step 1-2 (no training)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="model folder or Hub id")
    args = p.parse_args()
    os.makedirs(OUT, exist_ok=True)

    # 1. New: schedule.lr_at. The schedule is a pure function of the step. Step 0 runs at lr 0 (warmup starts from 0).
    print(f"1. lr_at(step, base_lr={PLOT_LR}, warmup_steps={PLOT_WARMUP}, total_steps={PLOT_STEPS}):")
    for step in (0, 1, PLOT_WARMUP // 2, PLOT_WARMUP, PLOT_STEPS // 2, PLOT_STEPS - 1):
        a = lr_at(step, base_lr=PLOT_LR, warmup_steps=PLOT_WARMUP, total_steps=PLOT_STEPS)
        b = lr_at(step, base_lr=PLOT_LR, warmup_steps=PLOT_WARMUP, total_steps=PLOT_STEPS,
                  min_lr=MIN_LR_FRACTION * PLOT_LR)
        print(f"   step {step:3d}: {a:.2e}   with min_lr floor: {b:.2e}")

    # 2. Plot both curves.
    steps = list(range(PLOT_STEPS))
    fig, ax = plt.subplots(figsize=(7, 4))
    for floor, label in ((0.0, "cosine to 0"), (MIN_LR_FRACTION * PLOT_LR, f"cosine to min_lr = {MIN_LR_FRACTION:g} x peak")):
        ax.plot(steps, [lr_at(s, base_lr=PLOT_LR, warmup_steps=PLOT_WARMUP, total_steps=PLOT_STEPS, min_lr=floor)
                        for s in steps], label=label)
    ax.axvline(PLOT_WARMUP, color="grey", ls=":", label=f"end of warmup ({PLOT_WARMUP} steps)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title("linear warmup + cosine decay (schedule.lr_at)")
    ax.legend()
    fig.tight_layout()
    path = os.path.join(OUT, "schedule.png")
    fig.savefig(path, dpi=100)
    print(f"2. wrote {os.path.relpath(path, ROOT)}\n")

    # 3. New: real training runs. TrainConfig holds every setting of minisft.train; we switch off
    # what a 50-step demo does not need (sample generations, periodic checkpoints and plots).
    run_dirs, results = [], {}
    lrs = LRS if same_model(args.model, DEFAULT_MODEL) else REAL_MODEL_LRS
    for name, lr in lrs.items():
        print(f"3. run {name}: peak lr {lr:g}, {MAX_STEPS} steps, warmup {WARMUP_STEPS}")
        cfg = TrainConfig(model=args.model, data=os.path.join(ROOT, "data", "sft_train.jsonl"),
                          val_data=os.path.join(ROOT, "data", "sft_val.jsonl"), out=os.path.join(OUT, name),
                          overwrite=True, lr=lr, warmup_steps=WARMUP_STEPS, max_steps=MAX_STEPS,
                          batch_size=BATCH_SIZE, max_length=MAX_LENGTH, eval_every=0, sample_every=0, save_every=0,
                          plot_every=0, log_every=10, seed=0)
        results[name] = train(cfg)
        run_dirs.append(cfg.out)
        print()

    # 4. New: plot.plot_runs. One picture: loss, lr, gradient norm, ... of the three runs side by side.
    path = plot_runs(run_dirs, out=os.path.join(OUT, "compare.png"))
    print("4. summary (same data, same steps, only the peak lr differs):")
    for name, r in results.items():
        first = read_metrics(os.path.join(OUT, name))[0]["loss"]
        print(f"   {name:12s} lr {lrs[name]:<7g} train loss {first:.3f} -> {r['loss']:.3f}   "
              f"val loss {r['best_val_loss'] if r['best_val_loss'] is not None else float('nan'):.3f}")
    print(f"   wrote {os.path.relpath(path, ROOT)}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # a bad --model or data file: one line, not a traceback
        sys.exit(f"error: {' '.join(str(e).split())}")
