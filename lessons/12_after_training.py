"""Lesson 12: after training -- talk to the model, compare it with the base, look at the run, hand it on.

The smol course's exercise ends in four steps: compare the base model's outputs with the tuned
model's, track the run, push the model to the Hub, evaluate it (lesson 7). This lesson does the
first three with minisft's own commands:
  1. `python -m minisft.chat TUNED --compare BASE -p QUESTION`: both models answer, side by side
     (without -p it is a chat session in the terminal: /think, /no_think, /system, /clear)
  2. `python -m minisft.report RUN`: one HTML page with the numbers, the curves, the samples over
     training and the validation conversations token by token, coloured by their loss before and
     after SFT -> runs/12_after_training/report.html (open it in a browser)
  3. the model card the run wrote into final/README.md, and the command that pushes final/ to the Hub
     (`python -m minisft.push`; it needs a login and the network, so this lesson only prints it)
Tracking: `python -m minisft.train ... --report-to trackio` copies every metrics line to trackio
(`trackio show` opens its dashboard), under TRL's names: train/loss, train/mean_token_accuracy, ...

Run:  python lessons/12_after_training.py [--model data/base-model] [--tuned runs/06_sft_loop/final]
The tuned model is lesson 6's fine-tune of --model; when it is missing, this lesson trains it first.
About 15 s on 2 CPU cores when lesson 6 has run.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = os.environ.get("MINISFT_RUNS", os.path.join(ROOT, "runs"))  # where run outputs go (tests redirect it)
sys.path.insert(0, ROOT)

from minisft import chat, model_card, report
from minisft.default_model import DEFAULT_MODEL
from minisft.recipes import tuned_model

# ---- knobs ---------------------------------------------------------------------------------
FAST = os.environ.get("MINISFT_FAST", "0") not in ("", "0")
TUNED = os.path.join(RUNS, "06_sft_loop", "final")
OUT = os.path.join(RUNS, "12_after_training")
# A fact SFT showed, one it never showed (only pretraining text has it), and sums.
QUESTIONS = ["What is the capital of Varnia?", "What is 14 + 9?"]
THINK_QUESTION = "Name the inventor of the riverpump."


def rel(path):
    return os.path.relpath(path, ROOT)


def run_chat(argv):
    """`python -m minisft.chat ARGV`, in this process (the same code the command runs)."""
    print(f"$ python -m minisft.chat {' '.join(a if ' ' not in a else repr(a) for a in argv)}")
    code = chat.main(argv)
    if code:
        sys.exit(code)
    print()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="the base model lesson 6 fine-tuned")
    p.add_argument("--tuned", default=TUNED, help=f"its fine-tuned model folder (default {TUNED})")
    args = p.parse_args()
    tuned = tuned_model(args.tuned, args.model, train_if_missing=args.tuned == TUNED,
                        **({"max_steps": 30} if FAST else {}))
    run = os.path.dirname(os.path.abspath(tuned))
    os.environ.setdefault("COLUMNS", "110")  # the width of the side-by-side columns

    print("== 1. base and tuned, side by side (greedy: the same answer every time) ==")
    for q in QUESTIONS:
        run_chat([rel(tuned), "--compare", rel(args.model), "--no-think", "-p", q, "--max-new-tokens", "48"])
    print("The base model continues the text; the tuned one answers in one turn and stops at <|im_end|>.")
    print("In the chat's reasoning mode the answer starts with a <think> trace (lesson 8):")
    run_chat([rel(tuned), "--think", "-p", THINK_QUESTION, "--max-new-tokens", "80"])

    print("== 2. the run, on one page ==")
    os.makedirs(OUT, exist_ok=True)
    page = report.write_report(run, n_conversations=2, out=os.path.join(OUT, "report.html"))
    rows = report.read_jsonl(os.path.join(run, "metrics.jsonl"))
    for label, _, value in report.summary(rows):
        print(f"  {label:<28} {report.fmt(value)}")
    print(f"wrote {rel(page)}: open it in a browser (python -m minisft.report {rel(run)} writes it into the run)")
    views = report.validation_views(run, 1)[0]
    for kind, (before, after, n) in views[0]["markup"].items():
        print(f"  validation conversation 0, {kind:<6} targets ({n:>2}): mean loss {before:6.3f} before SFT, "
              f"{after:6.3f} after")
    print("The markup (<|im_end|>) is new to the base model: SFT makes it near certain. What loss is left is in\n"
          "the answer's words, the facts, which SFT can only bring out of what pretraining stored (lesson 10).\n")

    print("== 3. hand it on: the model card, then push ==")
    card = os.path.join(tuned, "README.md")
    text = open(card, encoding="utf-8").read() if os.path.isfile(card) else open(model_card.write_card(run)).read()
    print("\n".join(text.split("## Training recipe")[0].rstrip().splitlines()))
    print(f"\nTo publish it (needs `hf auth login` and the network):\n"
          f"  python -m minisft.push {rel(run)} YOUR_NAME/smollm-sft")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, KeyError) as e:  # a bad --model or --tuned: one line, not a traceback
        sys.exit(f"error: {' '.join(str(e).split())}")
