"""Evaluation of a chat model on held-out conversations: did fine-tuning teach the format?

    python -m minisft.evaluate --model runs/06_sft_loop/final [--model data/base-model] [--data data/sft_test.jsonl]

Lessons 7, 8, 9 and 10 use it; the recipes that train the models it compares are in recipes.py.

What it teaches: loss curves say little about whether a chat model *behaves*. Here every test
conversation loses its final assistant turn, the rest is rendered with add_generation_prompt=True,
the model answers greedily (all prompts in a few batched calls, left padded), and each answer is
checked against plain rules:

- format: the generation ended by producing <|im_end|> (a stop id; not by running out of tokens)
  AND the answer shows no role leakage: no control token (<|im_start|>, <|im_end|>, <|endoftext|>)
  inside it and no line that is a bare role header ("user", "assistant", "system") -- the signs of
  a model writing the next turn itself.
- think mode: when the system prompt asks for /think, the answer opens with <think> and closes the
  trace with </think>; with /no_think it contains no <think> at all.
- answer accuracy: the final answer is the text after the last </think> (the whole answer when there
  is none), special tokens removed. It is correct when it contains the record's `meta.answer` as a
  whole word, ignoring case (so "18" does not match "118"), AND, for a fact about `meta.subject`,
  names no OTHER subject of the world: "The colour of the ashnewt is red." is wrong for the ashlark,
  even when the ashlark is red too. Without that second rule a model that answers every question
  about an unknown animal with a known animal's sentence scores whenever the colours collide.
  Scored for every record with an answer, whatever the format; also split by `meta.kind`
  (arithmetic, fact_seen, fact_unseen).
- knows it vs says it: the same facts asked as plain text completions ("The capital of Varnia is",
  no chat markup, see `completion_prompt`) and checked by the same rule. A base model that completes
  the sentence right KNOWS the fact; a chat model that answers the question right SAYS it. Comparing
  the two separates "SFT did not teach the fact" from "SFT lost the way to a fact the model holds".
"""
import argparse
import functools
import importlib.util
import json
import os
import re
import sys

from minisft import chat_template, conversations
from minisft.default_model import DEFAULT_MODEL
from minisft.generate import generate
from minisft.recipes import DATA_DIR, TEST_DATA

ROLE_HEADER = re.compile(r"(^|\n)(user|assistant|system)[ \t]*(\n|$)")
KINDS = ("arithmetic", "fact_seen", "fact_unseen")


def load_records(path):
    """A .jsonl (or .json list) of {"messages": [...], "meta": {...}} -> list of {"prompt": messages, "meta": dict}.

    The prompt is the conversation up to (not including) its last assistant turn."""
    convs, stats = conversations.load_conversations(path)  # validated: every record is a JSON object with messages
    with open(path, encoding="utf-8") as f:
        raw = json.load(f) if str(path).lower().endswith(".json") else [json.loads(ln) for ln in f if ln.strip()]
    records = []
    for conv, rec, where in zip(convs, raw, stats["sources"]):
        meta = rec.get("meta") or {}
        if not isinstance(meta, dict):
            raise ValueError(f"{where}: 'meta' must be an object like {{\"kind\": ..., \"answer\": ...}}")
        last = [j for j, m in enumerate(conv) if m["role"] == "assistant"]
        records.append({"prompt": conv[:last[-1]], "meta": meta})  # load_conversations ensures an assistant turn
    return records


def wants_think(record):
    """True / False: is a think trace asked for? meta.think, else the system prompt's /think flag."""
    if "think" in record["meta"]:
        return bool(record["meta"]["think"])
    system = " ".join(m["content"] for m in record["prompt"] if m["role"] == "system")
    if "/no_think" in system:
        return False
    return True if "/think" in system else None


def final_answer(text):
    """The text after the last </think> (all of it when there is none), stripped."""
    return text.rsplit("</think>", 1)[-1].strip()


def contains_answer(text, answer):
    """Whole-word, case-insensitive match of `answer` in `text`."""
    return re.search(r"(?<!\w)" + re.escape(str(answer)) + r"(?!\w)", text, re.IGNORECASE) is not None


@functools.lru_cache(maxsize=None)
def world_subjects():
    """Every subject of data/make_data.py's world (countries, animals, inventions), as a tuple.

    Read from the generator itself, so the list can never drift from the data it wrote."""
    path = os.path.join(DATA_DIR, "make_data.py")
    spec = importlib.util.spec_from_file_location("minisft_make_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return tuple(module.subjects())


def subjects_of(records):
    """The subjects an answer must not name by mistake: the world's and every record's meta.subject."""
    return tuple(sorted(set(world_subjects()) | {r["meta"]["subject"] for r in records if r["meta"].get("subject")}))


def is_right(text, answer, subject=None, subjects=()):
    """Does `text` state `answer` (whole word, any case) about `subject`, naming no other of `subjects`?"""
    if not contains_answer(text, answer):
        return False
    others = [s for s in subjects if subject is not None and s.lower() != subject.lower()]
    return not any(contains_answer(text, s) for s in others)


COMPLETION_PROMPTS = {"capital": "The capital of {s} is", "colour": "The colour of the {s} is",
                      "inventor": "The {s} was invented by"}


def completion_prompt(meta):
    """A fact record's meta -> the plain-text sentence start that the corpus completes with the answer."""
    return COMPLETION_PROMPTS[meta["relation"]].format(s=meta["subject"])


def check_answer(tokenizer, new_ids, record, subjects=()):
    """One generation (new token ids, stop token included if hit) -> a result dict of checks.

    subjects: the world's subjects (see subjects_of); a fact answer naming another one is wrong."""
    ended = bool(new_ids) and new_ids[-1] in tokenizer.stop_ids()
    body_ids = new_ids[:-1] if ended else new_ids
    raw = tokenizer.decode(body_ids)  # special tokens kept: leakage shows as <|im_start|> here
    leak = any(t in raw for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")) or bool(ROLE_HEADER.search(raw))
    text = tokenizer.decode(body_ids, skip_special_tokens=True)
    think = wants_think(record)
    has_trace = text.lstrip().startswith("<think>") and "</think>" in text  # a trace opens AND closes
    think_ok = None if think is None else (has_trace if think else "<think>" not in text)
    answer = record["meta"].get("answer")
    return {"answer_text": text, "answer_ids": list(new_ids), "n_tokens": len(new_ids), "ends_with_im_end": ended,
            "role_leak": leak, "format_ok": ended and not leak, "think_requested": think, "has_think": "<think>" in text,
            "has_trace": has_trace, "think_ok": think_ok, "kind": record["meta"].get("kind"), "expected": answer,
            "correct": None if answer is None else is_right(final_answer(text), answer,
                                                            record["meta"].get("subject"), subjects)}


def generate_answers(model, tokenizer, prompts, template=None, max_new_tokens=96, batch_size=64):
    """Greedy answers (token id lists) to a list of message lists, batch_size prompts per call.

    template None: the one the tokenizer carries (a fine-tuned final/ carries the one it trained with)."""
    template = template or chat_template.template_for(tokenizer)
    ids = [tokenizer.encode(chat_template.render(p, template, add_generation_prompt=True)) for p in prompts]
    out = []
    for i in range(0, len(ids), batch_size):
        out += generate(model, ids[i:i + batch_size], max_new_tokens=max_new_tokens, temperature=0.0,
                        stop_ids=tokenizer.stop_ids(), use_cache=True)
    return out


def _rate(results, key, where=lambda r: True):
    vals = [r[key] for r in results if where(r) and r[key] is not None]
    return (sum(map(bool, vals)) / len(vals), len(vals)) if vals else (None, 0)


def summarize(results):
    """Per-record results -> {metric name: (rate in [0, 1] or None, number of records it is over)}."""
    s = {"format compliance": _rate(results, "format_ok"),
         "  ends with <|im_end|>": _rate(results, "ends_with_im_end"),
         "  no role leakage": (lambda r, n: (None if r is None else 1 - r, n))(*_rate(results, "role_leak")),
         "think trace when /think": _rate(results, "has_trace", lambda r: r["think_requested"] is True),
         "no think trace when /no_think": (lambda r, n: (None if r is None else 1 - r, n))(
             *_rate(results, "has_think", lambda r: r["think_requested"] is False)),
         "think mode followed": _rate(results, "think_ok"),
         "answer accuracy": _rate(results, "correct")}
    for k in KINDS:
        s[f"  accuracy {k}"] = _rate(results, "correct", lambda r, k=k: r["kind"] == k)
    return s


def evaluate_model(model, tokenizer, records, template=None, max_new_tokens=96, batch_size=64, subjects=None):
    """Answer every record's prompt and check it -> (per-record results, summary dict).

    subjects None: subjects_of(records)."""
    subjects = subjects_of(records) if subjects is None else subjects
    answers = generate_answers(model, tokenizer, [r["prompt"] for r in records], template, max_new_tokens, batch_size)
    results = [check_answer(tokenizer, new, rec, subjects) for new, rec in zip(answers, records)]
    return results, summarize(results)


def knowledge_probe(model, tokenizer, records, subjects=None, max_new_tokens=8, batch_size=64):
    """Does the model KNOW each fact record's answer? Greedy plain-text completion of completion_prompt.

    Only the first sentence of the completion counts (the corpus goes on with other facts), judged by
    is_right. -> (results: list of {kind, relation, subject, expected, completion, correct},
    summary {"  knows fact_seen": (rate, n), "  knows fact_unseen": (rate, n)})."""
    from minisft.generate import generate

    subjects = subjects_of(records) if subjects is None else subjects
    facts = [r["meta"] for r in records if r["meta"].get("relation") in COMPLETION_PROMPTS]
    ids = [tokenizer.encode(completion_prompt(m)) for m in facts]
    out = []
    for i in range(0, len(ids), batch_size):
        out += generate(model, ids[i:i + batch_size], max_new_tokens=max_new_tokens, temperature=0.0,
                        stop_ids=[], use_cache=True)
    results = []
    for m, new in zip(facts, out):
        text = tokenizer.decode(new, skip_special_tokens=True)
        first = re.split(r"[.?!\n]", text, maxsplit=1)[0]
        results.append({"kind": m.get("kind"), "relation": m["relation"], "subject": m["subject"],
                        "expected": m["answer"], "completion": text,
                        "correct": is_right(first, m["answer"], m["subject"], subjects)})
    summary = {f"  knows {k}": _rate(results, "correct", lambda r, k=k: r["kind"] == k) for k in KINDS[1:]}
    return results, summary


def format_table(rows):
    """rows: list of (model name, summary) -> a text table, one column per model."""
    names = [n for n, _ in rows]
    metrics = list(rows[0][1])
    w0 = max(len(m) for m in metrics) + 2
    ws = [max(len(n), 12) for n in names]
    lines = ["metric".ljust(w0) + "  ".join(n.rjust(w) for n, w in zip(names, ws))]
    lines.append("-" * len(lines[0]))
    for m in metrics:
        cells = []
        for (_, s), w in zip(rows, ws):
            rate, n = s.get(m, (None, 0))
            cells.append(("-" if rate is None else f"{100 * rate:5.1f}% /{n}").rjust(w))
        lines.append(m.ljust(w0) + "  ".join(cells))
    return "\n".join(lines)


def run_of(model):
    """The run folder whose final/ `model` is, else None (a model folder of any other kind)."""
    folder = os.path.normpath(str(model))
    run = os.path.dirname(folder) or os.curdir
    is_final = os.path.basename(folder) == "final" and os.path.isdir(os.path.join(run, "checkpoints"))
    return run if is_final else None


def save_to_card(run, data, summary):
    """Keep the results beside the run (RUN/evaluation.json) and rewrite RUN/final/README.md with them
    (model_card.py) -> the card's path. run: the run folder (run_of)."""
    from minisft.files import replace_file, write_json
    from minisft.model_card import weights_stamp, write_card

    path = os.path.join(run, "evaluation.json")
    write_json(path + ".tmp", {"data": str(data), "weights": weights_stamp(os.path.join(run, "final")),
                               "metrics": {k.strip(): list(v) for k, v in summary.items()}})
    replace_file(path + ".tmp", path)
    return write_card(run)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m minisft.evaluate",
                                description="Evaluate chat models on held-out conversations (format, think mode, answers).")
    p.add_argument("--model", action="append", help="model folder or Hub name; repeat to compare (default: the base model)")
    p.add_argument("--data", default=TEST_DATA, help="test conversations .jsonl with meta {kind, answer, think}")
    p.add_argument("--template", help="chat template: smollm2 | smollm3 | chatml (default: the model's own)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--show", type=int, default=3, help="print this many answers per model")
    p.add_argument("--card", action="store_true", help="for each --model that is a run's final/: keep its results "
                   "in RUN/evaluation.json and rewrite the model card RUN/final/README.md with them")
    args = p.parse_args(argv)
    from minisft.weights import load_pretrained

    try:
        if args.card and not any(run_of(name) for name in args.model or []):  # before any model loads
            raise ValueError("--card: no --model is the final/ folder of a minisft run (RUN/final)")
        records = load_records(args.data)
        rows = []
        for name in args.model or [DEFAULT_MODEL]:
            model, tok = load_pretrained(name)
            if tok is None:
                raise FileNotFoundError(f"{name}: no tokenizer.json next to the weights")
            results, summary = evaluate_model(model, tok, records, args.template, args.max_new_tokens, args.batch_size)
            print(f"{name}: {len(results)} test prompts")
            for r in results[:args.show]:
                print(f"  expected {r['expected']!r:12} format_ok={r['format_ok']!s:5} -> {r['answer_text'][:100]!r}")
            rows.append((name, summary))
            if args.card and run_of(name):  # a base model beside it (--model data/base-model) has no card
                print(f"  results added to the model card {save_to_card(run_of(name), args.data, summary)}")
    except (ValueError, OSError, KeyError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print()
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
