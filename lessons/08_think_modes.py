"""Lesson 8: dual-mode reasoning -- one model, /think and /no_think.

The SFT data mixes two kinds of assistant turns, chosen by a flag at the end of the system prompt:
  /think     -> "<think>\\n...reasoning...\\n</think>\\nanswer"
  /no_think  -> "answer"
so one fine-tuned model learns both and the user picks per conversation. This lesson:
  1. renders the same question in both modes: SmolLM2's plain ChatML (the flag is just text in the
     system prompt, as in our data) and SmolLM3's template (the flag moves into a metadata block,
     and /no_think pre-fills an empty <think></think> block in the generation prompt)
  2. asks lesson 6's fine-tuned model the same questions in both modes
  3. takes every test conversation, forces each mode in turn and measures how often a think trace
     appears, how long answers get and how accurate they are -> runs/08_think_modes/modes.png

Run:  python lessons/08_think_modes.py [--model data/base-model] [--tuned runs/06_sft_loop/final]
The tuned model is lesson 6's fine-tune of --model; when it is missing, this lesson trains it first
with the same recipe (a fine-tune of another base model is refused: rerun lesson 6 with this --model).
About 10 s on 2 CPU cores when lesson 6 has run. MINISFT_FAST=1 uses 40 test conversations (CI).
"""
import argparse
import datetime
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = os.environ.get("MINISFT_RUNS", os.path.join(ROOT, "runs"))  # where run outputs go (tests redirect it)
sys.path.insert(0, ROOT)

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from minisft.chat_template import render, template_for
from minisft.default_model import DEFAULT_MODEL
from minisft.evaluate import KINDS, evaluate_model, load_records
from minisft.generate import chat
from minisft.recipes import TEST_DATA, tuned_model
from minisft.weights import load_pretrained

# ---- knobs ---------------------------------------------------------------------------------
FAST = os.environ.get("MINISFT_FAST", "0") not in ("", "0")
TUNED = os.path.join(RUNS, "06_sft_loop", "final")
OUT = os.path.join(RUNS, "08_think_modes")
N_RECORDS = 40 if FAST else None  # None: all 200 test conversations
SYSTEM = "You are a helpful assistant."
QUESTIONS = ["What is 14 + 9?", "What is the capital of Varnia?"]
TODAY = datetime.date(2025, 3, 5)  # SmolLM3 prints the date: fixed for a reproducible output


def with_mode(messages, mode):
    """The conversation with its system prompt's mode flag set to `mode` ("/think" or "/no_think")."""
    out = [dict(m) for m in messages]
    if out and out[0]["role"] == "system":
        base = out[0]["content"].replace("/no_think", "").replace("/think", "").rstrip()
        out[0]["content"] = f"{base} {mode}"
    else:
        out.insert(0, {"role": "system", "content": f"{SYSTEM} {mode}"})
    return out


def show(title, text):
    print(f"--- {title} ---")
    print(text.replace("\n", "\\n\n"), end="\n\n")


def plot(stats, path):
    """stats: {mode: {metric: percent}} -> grouped bars, one group per metric."""
    metrics = list(next(iter(stats.values())))
    fig, ax = plt.subplots(figsize=(9, 4))
    for j, (mode, vals) in enumerate(stats.items()):
        bars = ax.bar([i + 0.4 * j for i in range(len(metrics))], [vals[m] for m in metrics], 0.4, label=mode)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks([i + 0.2 for i in range(len(metrics))])
    ax.set_xticklabels(metrics, fontsize=8)
    ax.set_ylabel("% of test prompts")
    ax.set_ylim(0, 110)
    ax.set_title("the same test questions, asked in each mode")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="the base model lesson 6 fine-tuned (folder or Hub id)")
    p.add_argument("--tuned", default=TUNED,
                   help=f"its fine-tuned model folder (default {TUNED}: trained first when missing)")
    p.add_argument("--data", default=TEST_DATA)
    args = p.parse_args()
    os.makedirs(OUT, exist_ok=True)

    # 1. New: with_mode -- forcing a mode only rewrites the flag in the system prompt.
    # Where the flag goes. SmolLM2 / our data: plain text at the end of the system prompt.
    q = [{"role": "user", "content": QUESTIONS[0]}]
    for mode in ("/think", "/no_think"):
        show(f"smollm2, {mode}", render(with_mode(q, mode), "smollm2", add_generation_prompt=True))
    # SmolLM3 reads the flag, removes it from the text and writes "Reasoning Mode: ..." in its metadata
    # block; in /no_think mode the prompt already holds an empty think block, so the model skips it.
    # (The real SmolLM3 template leaves its system turn without <|im_end|> when there are no tools.)
    for mode in ("/think", "/no_think"):
        show(f"smollm3, {mode} (render only: our model was trained with smollm2)",
             render(with_mode(q, mode), "smollm3", add_generation_prompt=True, today=TODAY))

    # 2. Ask the fine-tuned model.
    args.tuned = tuned_model(args.tuned, args.model, train_if_missing=args.tuned == TUNED,
                             **({"max_steps": 30} if FAST else {}))
    model, tok = load_pretrained(args.tuned)
    template = template_for(tok)  # the format it was fine-tuned on (final/ carries it)
    print(f"fine-tuned model {args.tuned} ({template!r} template), greedy answers:")
    for question in QUESTIONS:
        for mode in ("/think", "/no_think"):
            msgs = with_mode([{"role": "user", "content": question}], mode)
            print(f"  {mode:9} {question!r}\n     -> {chat(model, tok, msgs, template=template, max_new_tokens=96)!r}")

    # 3. New: lesson 7's evaluation, run once per forced mode over every test conversation.
    records = load_records(args.data)[:N_RECORDS]
    stats = {}
    print(f"\n{len(records)} test conversations, each asked in both modes:")
    print(f"{'mode':10} {'think trace':>12} {'complete trace':>15} {'format ok':>10} {'accuracy':>9} "
          + " ".join(f"{k:>12}" for k in KINDS) + f" {'tokens/answer':>14}")
    for mode in ("/think", "/no_think"):
        forced = [dict(r, prompt=with_mode(r["prompt"], mode), meta=dict(r["meta"], think=mode == "/think"))
                  for r in records]
        results, summary = evaluate_model(model, tok, forced, template, max_new_tokens=96)
        trace = 100 * sum(r["has_think"] for r in results) / len(results)  # any <think> at all
        complete = 100 * sum(r["has_trace"] for r in results) / len(results)  # opens with <think>, closes it
        fmt, acc = 100 * summary["format compliance"][0], 100 * summary["answer accuracy"][0]
        by_kind = [summary[f"  accuracy {k}"][0] for k in KINDS]
        n_tok = sum(r["n_tokens"] for r in results) / len(results)
        print(f"{mode:10} {trace:11.1f}% {complete:14.1f}% {fmt:9.1f}% {acc:8.1f}% "
              + " ".join("           -" if a is None else f"{100 * a:11.1f}%" for a in by_kind) + f" {n_tok:14.1f}")
        stats[mode] = {"think trace": trace, "format ok": fmt, "accuracy": acc,
                       **{f"acc. {k}": 100 * (a or 0) for k, a in zip(KINDS, by_kind)}}
    path = os.path.join(OUT, "modes.png")
    plot(stats, path)
    print(f"\nplot: {path}")
    print("Forcing a mode rewrites only the system prompt: a two-turn conversation keeps its first answer as "
          "written,\nand a first answer with a trace pulls the second one towards a trace too.")
    print("Thinking costs tokens (compare tokens/answer); whether it buys accuracy depends on whether the "
          "trace\nreally computes the answer: for a 1.8M-parameter model it mostly imitates the trace's shape.")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # a bad --model, --tuned or --data: one line, not a traceback
        sys.exit(f"error: {' '.join(str(e).split())}")
