"""Lesson 7: evaluation -- what did fine-tuning change? Base model vs fine-tuned model.

A falling loss does not prove the model chats. Here both models answer the 200 held-out test
conversations of data/sft_test.jsonl (greedy, batched; minisft/evaluate.py) and every answer is
checked:
  - format: stops with <|im_end|> by itself, never writes the next "user"/"assistant" turn
  - think mode: a <think> trace when the system prompt says /think, none with /no_think
  - answer accuracy (final answer after </think> contains the expected answer and names no other
    subject of the world), split by kind: arithmetic, fact_seen (the fact is in the SFT data),
    fact_unseen (only in pretraining text)
  - knows it vs says it: each fact also asked as a plain-text completion ("The capital of Varnia is"):
    does the model hold the fact (completion), and does the chat answer bring it out (chat)?

Run:  python lessons/07_evaluate.py [--model data/base-model] [--tuned runs/06_sft_loop/final]
The tuned model is lesson 6's fine-tune of --model; when it is missing, this lesson trains it first
with the same recipe (a fine-tune of another base model is refused: rerun lesson 6 with this --model).
Out:  runs/07_evaluate/eval.png (bar chart), runs/07_evaluate/results.jsonl (every answer).
About 10 s on 2 CPU cores when lesson 6 has run. MINISFT_FAST=1 evaluates 40 records (CI).
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = os.environ.get("MINISFT_RUNS", os.path.join(ROOT, "runs"))  # where run outputs go (tests redirect it)
sys.path.insert(0, ROOT)

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from minisft.chat_template import template_for
from minisft.default_model import DEFAULT_MODEL
from minisft.evaluate import evaluate_model, format_table, knowledge_probe, load_records, subjects_of
from minisft.recipes import TEST_DATA, tuned_model
from minisft.tokenizer import Tokenizer
from minisft.weights import load_pretrained

# ---- knobs ---------------------------------------------------------------------------------
FAST = os.environ.get("MINISFT_FAST", "0") not in ("", "0")
TUNED = os.path.join(RUNS, "06_sft_loop", "final")
OUT = os.path.join(RUNS, "07_evaluate")
N_RECORDS = 40 if FAST else None  # None: all 200 test conversations
MAX_NEW_TOKENS = 96  # the longest reference answer is 73 tokens
PLOTTED = ["format compliance", "think mode followed", "answer accuracy",
           "  accuracy arithmetic", "  accuracy fact_seen", "  accuracy fact_unseen"]


def trained_steps(final_dir):
    """Steps of the run that wrote final_dir (from the run's metrics.jsonl), or None."""
    path = os.path.join(os.path.dirname(final_dir), "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return sum(1 for ln in f if ln.strip())


def knows_says_table(rows, knows):
    """Per fact kind: does each model KNOW the fact (plain-text completion) and SAY it (chat answer)?"""
    head = "facts".ljust(14) + "".join(f"{label + ' ' + what:>25}" for label, _ in rows
                                           for what in ("knows it (compl.)", "says it (chat)"))
    lines = [head, "-" * len(head)]
    for kind in ("fact_seen", "fact_unseen"):
        cells = []
        for label, summary in rows:
            for rate, n in (knows[label][f"  knows {kind}"], summary[f"  accuracy {kind}"]):
                cells.append(("-" if rate is None else f"{100 * rate:5.1f}% /{n}").rjust(25))
        lines.append(kind.ljust(14) + "".join(cells))
    return "\n".join(lines)


def bar_chart(rows, path):
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(rows)
    for j, (name, summary) in enumerate(rows):
        vals = [100 * (summary[m][0] or 0) for m in PLOTTED]
        bars = ax.bar([i + j * width for i in range(len(PLOTTED))], vals, width, label=name)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks([i + width * (len(rows) - 1) / 2 for i in range(len(PLOTTED))])
    ax.set_xticklabels([m.strip().replace("accuracy ", "acc. ") for m in PLOTTED], fontsize=8)
    ax.set_ylabel("% of test prompts")
    ax.set_ylim(0, 110)
    ax.set_title("held-out test conversations: base vs fine-tuned")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", "--base", dest="base", default=DEFAULT_MODEL,
                   help="the base model lesson 6 fine-tuned (folder or Hub id)")
    p.add_argument("--tuned", default=TUNED,
                   help=f"its fine-tuned model folder (default {TUNED}: trained first when missing)")
    p.add_argument("--data", default=TEST_DATA)
    args = p.parse_args()
    os.makedirs(OUT, exist_ok=True)

    # New: the tuned model must be a fine-tune of THIS base model (lesson 6's run records which).
    args.tuned = tuned_model(args.tuned, args.base, train_if_missing=args.tuned == TUNED,
                             **({"max_steps": 30} if FAST else {}))
    steps = trained_steps(args.tuned)
    print(f"fine-tuned model: {args.tuned}" + (f" ({steps} optimizer steps)" if steps else ""))

    records = load_records(args.data)[:N_RECORDS]
    template = template_for(Tokenizer.from_dir(args.tuned))  # the format the tuned model trained on: ask both in it
    print(f"test set: {len(records)} conversations from {args.data}, rendered with the {template!r} template\n")
    subjects = subjects_of(records)  # New: an answer naming another subject of the world is wrong
    rows, all_results, knows = [], [], {}
    for label, path in (("base", args.base), ("tuned", args.tuned)):
        t0 = time.perf_counter()
        model, tok = load_pretrained(path)
        # New: evaluate_model = batched greedy answers + the checks of minisft/evaluate.py, per record.
        results, summary = evaluate_model(model, tok, records, template, MAX_NEW_TOKENS, subjects=subjects)
        # New: the same facts as plain-text completions: what the weights hold, chat format or not.
        knows[label] = knowledge_probe(model, tok, records, subjects)[1]
        print(f"{label}: answered {len(results)} prompts in {time.perf_counter() - t0:.1f}s; for example:")
        for rec, r in list(zip(records, results))[:3]:
            print(f"  Q {rec['prompt'][-1]['content']!r} (expects {r['expected']!r})")
            print(f"    -> {r['answer_text'][:110]!r}  [format {'ok' if r['format_ok'] else 'BAD'}, "
                  f"{'correct' if r['correct'] else 'wrong'}]")
        rows.append((label, summary))
        all_results += [dict(r, model=label) for r in results]

    print("\n" + format_table(rows))
    print("(rate / number of prompts it is measured on)")
    print("\n" + knows_says_table(rows, knows))
    with open(os.path.join(OUT, "results.jsonl"), "w", encoding="utf-8") as f:
        for r in all_results:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    bar_chart(rows, os.path.join(OUT, "eval.png"))
    print(f"\nplot: {os.path.join(OUT, 'eval.png')}   every answer: {os.path.join(OUT, 'results.jsonl')}")
    print("Read it: SFT taught the FORMAT (stop at <|im_end|>, follow /think and /no_think). A fact the SFT data "
          "never\nmentions (fact_unseen) can only come from pretraining: 'knows it' says the weights hold it, "
          "'says it' whether\nthe chat answer brings it out. A right answer that names another subject counts "
          "as wrong.")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # a bad --model, --tuned or --data: one line, not a traceback
        sys.exit(f"error: {' '.join(str(e).split())}")
