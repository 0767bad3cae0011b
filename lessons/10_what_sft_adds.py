"""Lesson 10: what SFT adds -- a format, not facts; and what decides whether the facts survive it.

Lesson 7 split the facts in two: fact_seen (the SFT data asks about them) and fact_unseen (only the
pretraining corpus states them). The base model KNOWS both kinds: it completes "The capital of
Halmar is" with "Falton". SFT only shows it how to answer a question with such a fact. So an
unseen fact can come out of the chat model only if SFT (a) teaches a way of answering that reaches
stored knowledge and (b) does not overwrite that knowledge on the way.

Plain SFT fails both. Asked about an unseen country, the tuned model answers about a SEEN one
("The question is about the country Selora ..." when asked about Norland): the SFT data asks about
the same 96 subjects again and again, and every step moves the embedding rows of THOSE names (and,
tied to them, lm_head's rows) towards what the chat answers need. The names SFT never shows keep
their pretrained rows, so the blocks, which adapt to the moved rows, no longer treat an unseen name
like a seen one, and fall back on a seen one. Meanwhile nothing holds the unseen facts in place.

This lesson runs the same short SFT three times and changes one thing each time:
  - plain: every weight trains (what lesson 6 did before this lesson's finding);
  - 25% replay: a quarter of every batch is plain pretraining text (corpus.txt documents, loss on
    every token), as in the "mix pretraining data into fine-tuning" recipes for large models;
  - frozen text embeddings: minisft.train.freeze_text_embeddings (the trainer's
    --freeze-embeddings) keeps every text token's row as pretraining left it; only the rows of the
    chat markup (<|im_start|>, <|im_end|>, <think>, </think>), which the base model never saw, learn.
Each tuned model is asked the held-out facts twice: as a completion (does it still KNOW them?) and
as a chat question (does it SAY them?). A fact answer counts only if it names the right object and
no other subject of the world (minisft/evaluate.py's rule).

The loop is written out here (lesson 6's trainer has no replay option): the same pieces as
minisft/train.py -- data.build_examples, data.collate, loss.chunked_cross_entropy, schedule.lr_at,
train.freeze_text_embeddings.

Run:  python lessons/10_what_sft_adds.py [--model data/base-model]
Out:  runs/10_what_sft_adds/ablation.png (accuracy for each setting), results.json
About 75 s on 2 CPU cores. MINISFT_FAST=1 runs 10 steps per setting (CI).
"""
import argparse
import json
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = os.environ.get("MINISFT_RUNS", os.path.join(ROOT, "runs"))  # where run outputs go (tests redirect it)
sys.path.insert(0, ROOT)

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from minisft import conversations, data, fast, schedule
from minisft.chat_template import template_for
from minisft.default_model import CORPUS, DEFAULT_MODEL
from minisft.evaluate import evaluate_model, knowledge_probe, load_records, subjects_of
from minisft.loss import chunked_cross_entropy
from minisft.recipes import TEST_DATA, TRAIN_DATA
from minisft.train import freeze_text_embeddings
from minisft.weights import load_pretrained

# ---- knobs ---------------------------------------------------------------------------------
FAST = os.environ.get("MINISFT_FAST", "0") not in ("", "0")
OUT = os.path.join(RUNS, "10_what_sft_adds")
# New: the settings compared -- (name, share of each batch that is pretraining text, frozen text embeddings)
SETTINGS = [("plain", 0.0, False), ("25% replay", 0.25, False), ("frozen text embeddings", 0.0, True)]
STEPS = 10 if FAST else 85  # optimizer steps per setting (3 settings x 85 steps: within 90 s on 2 cores)
BATCH = 16  # examples per step (SFT conversations + replayed documents)
LR, MIN_LR, WARMUP = 1.5e-3, 1.5e-4, 5  # lesson 6's learning rate
MAX_LENGTH = 192
SEED = 0


def replay_examples(tokenizer, path=CORPUS, max_length=MAX_LENGTH):
    """corpus.txt documents -> examples with a label on EVERY token: plain next-token pretraining.

    input_ids / labels [T] with T <= max_length; each document ends in <|endoftext|>, as in pretraining."""
    eot = tokenizer.token_to_id("<|endoftext|>")
    with open(path, encoding="utf-8") as f:
        docs = [d.strip() for d in f.read().split("\n\n") if d.strip()]
    out = []
    for doc in docs:
        ids = (tokenizer.encode(doc) + [eot])[:max_length]
        out.append({"input_ids": ids, "labels": list(ids)})  # labels unshifted: the loss shifts them
    return out


def fine_tune(base, replay, frozen, sft_examples, corpus_examples, steps=STEPS):
    """One SFT run from the base model, `replay` of each batch from the corpus, the text tokens'
    embedding rows `frozen` or not -> the tuned model."""
    torch.manual_seed(SEED)
    model, tok = load_pretrained(base, dtype=torch.float32)
    fast.apply(model)  # the trainer's speed layer (lesson 11): the same numbers, sooner
    if frozen:  # New: only the chat markup's rows of the embedding (and of the tied lm_head) learn
        freeze_text_embeddings(model, tok.added_ids)
    params = [p for p in model.parameters()]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    rng = random.Random(SEED)  # the same SFT conversations in the same order for every setting
    rng_replay = random.Random(SEED + 1)
    n_replay = round(BATCH * replay)
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = schedule.lr_at(step, base_lr=LR, warmup_steps=WARMUP, total_steps=steps, min_lr=MIN_LR)
        # New: the batch = SFT conversations (loss on assistant turns) + corpus documents (loss on all).
        batch = [rng.choice(sft_examples) for _ in range(BATCH - n_replay)]
        batch += [rng_replay.choice(corpus_examples) for _ in range(n_replay)]
        b = data.collate(batch, tok.pad_id)
        hidden = model.hidden_states(b["input_ids"], b["position_ids"], b["attention_mask"])  # [B, T, D]
        loss_sum, n = chunked_cross_entropy(hidden, model.lm_head.weight, b["labels"])
        opt.zero_grad(set_to_none=True)
        (loss_sum / n).backward()  # every target token weighs the same, SFT or replay
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return model.eval(), tok


def measure(model, tok, records, subjects, template):
    """-> {"knows": rate on unseen facts as completions, "says": rate as chat answers, "seen": chat, "format"}."""
    _, knows = knowledge_probe(model, tok, records, subjects)
    _, summary = evaluate_model(model, tok, records, template, max_new_tokens=64, subjects=subjects)
    return {"knows": knows["  knows fact_unseen"][0], "says": summary["  accuracy fact_unseen"][0],
            "seen": summary["  accuracy fact_seen"][0], "format": summary["format compliance"][0]}


def plot(rows, path):
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.27
    for j, (key, label) in enumerate((("knows", "unseen facts: knows it (completion)"),
                                      ("says", "unseen facts: says it (chat)"),
                                      ("seen", "seen facts: says it (chat)"))):
        ax.bar([i + (j - 1) * width for i in range(len(rows))], [100 * r[key] for r in rows], width, label=label)
    ax.axhline(100 * rows[0]["base_knows"], color="grey", lw=0.8, ls="--", label="base model knows (completion)")
    ax.set_xticks(range(len(rows)), [r["setting"] for r in rows])
    ax.set_ylabel("% of held-out test questions")
    ax.set_ylim(0, 115)
    ax.set_title(f"what SFT keeps: {STEPS} steps, lr {LR:g}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="base model folder or Hub id")
    args = p.parse_args()
    os.makedirs(OUT, exist_ok=True)
    t0 = time.perf_counter()
    base, tok = load_pretrained(args.model, dtype=torch.float32)
    template = template_for(tok)
    records = [r for r in load_records(TEST_DATA) if r["meta"].get("relation")]  # the fact questions
    subjects = subjects_of(records)
    convs, _ = conversations.load_conversations(TRAIN_DATA)
    sft_examples, _ = data.build_examples(tok, convs, template=template, max_length=MAX_LENGTH)
    corpus_examples = replay_examples(tok)
    base_knows = knowledge_probe(base, tok, records, subjects)[1]["  knows fact_unseen"][0]
    print(f"{len(sft_examples)} SFT conversations, {len(corpus_examples)} corpus documents to replay; "
          f"{len(records)} test fact questions")
    print(f"the base model completes {100 * base_knows:.0f}% of the unseen facts right\n")

    rows = []
    print(f"{'setting':>22} {'knows unseen':>13} {'says unseen':>12} {'says seen':>10} {'format':>7}   (time)")
    for name, replay, frozen in SETTINGS:
        t1 = time.perf_counter()
        model, tok = fine_tune(args.model, replay, frozen, sft_examples, corpus_examples)
        r = dict(measure(model, tok, records, subjects, template), setting=name, replay=replay, frozen=frozen,
                 base_knows=base_knows)
        rows.append(r)
        print(f"{name:>22} {100 * r['knows']:12.1f}% {100 * r['says']:11.1f}% {100 * r['seen']:9.1f}% "
              f"{100 * r['format']:6.1f}%   ({time.perf_counter() - t1:.0f}s)", flush=True)

    plot(rows, os.path.join(OUT, "ablation.png"))
    with open(os.path.join(OUT, "results.json"), "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)
    print(f"\nplot: {os.path.join(OUT, 'ablation.png')}   ({time.perf_counter() - t0:.0f}s in all)")
    print("Read it: plain SFT teaches the format and the seen answers, and answers unseen questions with seen\n"
          "names while the completions it still knows fall. Replay keeps the facts stored, but the chat answers\n"
          "still reach for seen names. Frozen text embeddings keep every name where pretraining put it, so the\n"
          "way of answering SFT teaches reaches the unseen facts too: SFT reshapes how stored facts are reached;\n"
          "it does not add them. Lesson 6's recipe therefore trains with --freeze-embeddings.")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # a bad --model or data file: one line, not a traceback
        sys.exit(f"error: {' '.join(str(e).split())}")
