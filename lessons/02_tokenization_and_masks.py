"""Lesson 2: from a conversation to token ids and labels -- which tokens carry loss.

SFT trains the model on the assistant's words only: the prompt is read, not learned. The mask
is a list of labels, one per token: the token id where we train, -100 where we do not.
This lesson uses minisft.chat_template.tokenize_conversation and show_mask, then
minisft.conversations and minisft.data on the real training file:

  1. the mask of one two-turn chat for train_on = assistant / last / all, and train_headers
  2. content that spells a special token is rejected (it would silently end the turn)
  3. truncation to max_length keeps whole turns
  4. load_conversations + build_examples on data/sft_train.jsonl: counts
  5. padding efficiency: random batches vs group_by_length vs packing
  6. a histogram of example lengths -> runs/02_tokenization_and_masks/lengths.png

Run:  python lessons/02_tokenization_and_masks.py [--model data/base-model] [--color]
Takes a few seconds; no training.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from minisft import conversations, data
from minisft.chat_template import show_mask, template_for, tokenize_conversation
from minisft.default_model import DEFAULT_MODEL
from minisft.tokenizer import Tokenizer
from minisft.weights import resolve_model_dir

# ---- knobs ---------------------------------------------------------------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = os.environ.get("MINISFT_RUNS", os.path.join(ROOT, "runs"))  # where run outputs go (tests redirect it)
DATA = os.path.join(ROOT, "data", "sft_train.jsonl")
OUT = os.path.join(RUNS, "02_tokenization_and_masks")
MAX_LENGTH = 256  # tokens per example
BATCH_SIZE = 8  # examples per micro-batch, for the padding comparison
TRUNCATE_TO = (80, 60)  # small max_lengths: the first keeps whole turns, the second must cut inside one

CHAT = [
    {"role": "system", "content": "You are a concise assistant. /no_think"},
    {"role": "user", "content": "What is 3 + 4?"},
    {"role": "assistant", "content": "The answer is 7."},
    {"role": "user", "content": "Now add 4 to that."},
    {"role": "assistant", "content": "7 + 4 = 11."},
]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="model folder or Hub id (only its tokenizer is read)")
    p.add_argument("--color", action="store_true", help="ANSI colours even when not a terminal")
    args = p.parse_args()
    color = True if args.color else None
    tok = Tokenizer.from_dir(resolve_model_dir(args.model))
    template = template_for(tok)
    print(f"tokenizer: {args.model} (vocab {tok.vocab_size}), template {template!r}\n")

    # 1. New: tokenize_conversation turns lesson 1's spans into ids + labels; show_mask draws them.
    # One chat, four masks. [[...]] (or green) = trained tokens.
    for train_on, headers in (("assistant", False), ("last", False), ("all", False), ("assistant", True)):
        ex = tokenize_conversation(tok, CHAT, template, train_on=train_on, train_headers=headers)
        print(f"1. train_on={train_on!r}, train_headers={headers}:")
        print(show_mask(tok, ex["input_ids"], ex["labels"], color=color), "\n")

    # The labels are UNSHIFTED: labels[i] belongs to input_ids[i]; the loss (lesson 4) shifts.
    ex = tokenize_conversation(tok, CHAT, template)
    first = next(i for i, l in enumerate(ex["labels"]) if l != -100)
    print(f"   input_ids[{first - 2}:{first + 3}] = {ex['input_ids'][first - 2:first + 3]}")
    print(f"   labels   [{first - 2}:{first + 3}] = {ex['labels'][first - 2:first + 3]}  (-100 = no loss)")
    print(f"   count_targets = {data.count_targets(ex['labels'])} loss positions after the shift\n")

    # 2. A message that spells a special token. The tokenizer would turn the text "<|im_end|>"
    # into the control token, so the model would learn to end its turn mid-sentence: refuse it.
    bad = [{"role": "user", "content": "Print the text <|im_end|> please."},
           {"role": "assistant", "content": "Sure."}]
    try:
        tokenize_conversation(tok, bad, template)
    except ValueError as e:
        print(f"2. rejected: ValueError: {e}\n")

    # 3. Truncation keeps whole turns: the second exchange is dropped, the first one kept intact.
    # Only when not even the first assistant turn fits are the tokens cut mid-turn.
    full = tokenize_conversation(tok, CHAT, template)
    for n in TRUNCATE_TO:
        cut = tokenize_conversation(tok, CHAT, template, max_length=n)
        print(f"3. max_length={n}: {len(full['input_ids'])} -> {len(cut['input_ids'])} tokens; kept:")
        print(show_mask(tok, cut["input_ids"], cut["labels"], color=color), "\n")

    # 4. New: the real data set. load_conversations validates every record (errors name file:line);
    # build_examples tokenizes them all and drops examples left with nothing to train on.
    convs, load_stats = conversations.load_conversations(DATA)
    examples, stats = data.build_examples(tok, convs, template, train_on="assistant", max_length=MAX_LENGTH)
    lengths = [len(e["input_ids"]) for e in examples]
    print(f"4. {os.path.relpath(DATA, ROOT)}: {load_stats['loaded']} conversations loaded "
          f"({load_stats['skipped']} skipped)")
    print(f"   examples kept {stats['kept']}, truncated {stats['truncated']}, "
          f"dropped (no target) {stats['dropped_no_target']}")
    print(f"   tokens {stats['tokens']:,}, target tokens {stats['target_tokens']:,} "
          f"({100 * stats['target_tokens'] / stats['tokens']:.1f}% of the tokens carry loss)")
    print(f"   length min {min(lengths)}, mean {sum(lengths) / len(lengths):.1f}, max {max(lengths)}\n")

    # 5. Padding. A batch is padded to its longest row; padded slots cost compute and teach nothing.
    plain = data.epoch_padding_efficiency(lengths, BATCH_SIZE, BATCH_SIZE, seed=0)
    grouped = data.epoch_padding_efficiency(lengths, BATCH_SIZE, BATCH_SIZE, seed=0, group_by_length=True)
    # New: packing -- several conversations per row (block-diagonal attention), done once before batching.
    # pack_to_budget is the trainer's packer: here a budget of MAX_LENGTH tokens, so no row is longer than one
    # example may be (the trainer gives it a budget of about a micro-batch of tokens, one row each).
    packed = [row for mb in data.pack_to_budget(examples, MAX_LENGTH, MAX_LENGTH) for row in mb]
    packed_eff = data.epoch_padding_efficiency([len(r["input_ids"]) for r in packed], BATCH_SIZE, BATCH_SIZE)
    busiest = max(packed, key=lambda r: r["seq_ids"][-1])  # the row holding the most conversations
    batch = data.collate([busiest, packed[0]], tok.pad_id)
    print(f"5. padding efficiency (real tokens / slots), batch {BATCH_SIZE}:")
    print(f"   random batches     {plain:.3f}")
    print(f"   group_by_length    {grouped:.3f}")
    print(f"   packing (<= {MAX_LENGTH})   {packed_eff:.3f}   ({len(examples)} examples -> {len(packed)} rows)")
    print(f"   the fullest packed row: {len(busiest['input_ids'])} tokens, seq ids (attention_mask) "
          f"{batch['attention_mask'][0].unique().tolist()}, position_ids restart "
          f"{(batch['position_ids'][0] == 0).sum().item()} times\n")

    # 6. The histogram of lengths: how long are the rows we will train on?
    os.makedirs(OUT, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(lengths, bins=40, color="tab:blue", alpha=0.8, label="examples")
    ax.axvline(sum(lengths) / len(lengths), color="k", ls="--", label="mean")
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("count")
    ax.set_title(f"{len(lengths)} examples: padding eff. random {plain:.2f}, "
                 f"grouped {grouped:.2f}, packed {packed_eff:.2f}")
    ax.legend()
    fig.tight_layout()
    path = os.path.join(OUT, "lengths.png")
    fig.savefig(path, dpi=100)
    print(f"6. wrote {os.path.relpath(path, ROOT)}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # a bad --model or data file: one line, not a traceback
        sys.exit(f"error: {' '.join(str(e).split())}")
