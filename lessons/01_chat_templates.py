"""Lesson 1: chat templates -- what a chat model really reads.

A chat model never sees a list of messages. It sees ONE string with role markers
(<|im_start|>role ... <|im_end|>), produced by a chat template. This lesson renders the same
conversation with minisft.chat_template.render and shows:

  1. the special tokens that mark turns, and their ids in the tokenizer
  2. the SmolLM2 rendering (a default system prompt appears when you give none)
  3. training render vs inference render (add_generation_prompt)
  4. SmolLM3: the metadata block, /think vs /no_think, the empty <think> block
  5. render_spans: the typed pieces the label mask is built from (lesson 2)
  6. a base model has no chat training: its own tokens for <|im_start|> are there, but it has
     never seen them used
  7. how many tokens each kind of span costs under each template -> runs/01_chat_templates/spans.png

Run:  python lessons/01_chat_templates.py [--model data/base-model | HuggingFaceTB/SmolLM2-135M-Instruct]
No training: it prints text and one bar chart (runs in about two seconds).
"""
import argparse
import datetime
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = os.environ.get("MINISFT_RUNS", os.path.join(ROOT, "runs"))  # where run outputs go (tests redirect it)

from minisft.chat_template import render, render_spans, template_for
from minisft.default_model import DEFAULT_MODEL
from minisft.tokenizer import Tokenizer
from minisft.weights import resolve_model_dir

# ---- knobs ---------------------------------------------------------------------------------
TODAY = datetime.date(2025, 3, 5)  # SmolLM3 prints today's date: fix it so the output is reproducible
CONVERSATION = [
    {"role": "user", "content": "What is the capital of Varnia?"},
    {"role": "assistant", "content": "The capital of Varnia is Oster."},
]
SYSTEM = {"role": "system", "content": "You are a concise assistant."}
OUT = os.path.join(RUNS, "01_chat_templates")


def show(title, text):
    # repr-like view: newlines made visible so you can count them
    print(f"--- {title} ---")
    print(text.replace("\n", "\\n\n"), end="" if text.endswith("\n") else "\n")
    print()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="model folder or Hub id (only its tokenizer is read)")
    args = p.parse_args()
    tok = Tokenizer.from_dir(resolve_model_dir(args.model))

    # 1. The special tokens. Each is ONE id: the model learns them like any other token.
    print("1. special tokens of", args.model)
    for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        print(f"   {t:15s} -> id {tok.token_to_id(t)}")
    print(f"   eos = {tok.eos_token!r} (id {tok.eos_id}), pad = {tok.pad_token!r} (id {tok.pad_id}); "
          f"generation stops at ids {tok.stop_ids()}")
    print(f"   template guessed from tokenizer_config.json: {template_for(tok)!r}\n")

    # 2. SmolLM2: ChatML. With no system message, the template adds its own default one.
    print("2. SmolLM2, roles user + assistant (no system message given):")
    show("render(messages, 'smollm2')", render(CONVERSATION, "smollm2"))
    show("render([system] + messages, 'smollm2')", render([SYSTEM] + CONVERSATION, "smollm2"))

    # 3. Training vs inference. For training we render the whole chat, answer included.
    # For generation we render only the question and end with the header of the NEXT assistant
    # turn, so the model's most likely continuation is the answer itself.
    question = CONVERSATION[:1]
    print("3. inference render: add_generation_prompt=True ends with an open assistant header")
    show("render(question, add_generation_prompt=True)", render(question, "smollm2", add_generation_prompt=True))

    # 4. SmolLM3: a metadata system block, a reasoning mode, and in no-think mode an empty
    # <think> block before every answer. /think and /no_think in the system prompt override the flag.
    print("4. SmolLM3, thinking vs no-thinking (today fixed to", TODAY, ")")
    # (The real SmolLM3 template never closes this system turn with <|im_end|> unless tools are
    # given; minisft keeps that quirk, because the model was trained on it.)
    show("smollm3, enable_thinking=False, generation prompt",
         render(question, "smollm3", add_generation_prompt=True, enable_thinking=False, today=TODAY))
    think_chat = [{"role": "system", "content": "You are a concise assistant. /think"}, CONVERSATION[0],
                  {"role": "assistant", "content": "<think>\nVarnia's capital is Oster.\n</think>\nOster."}]
    show("smollm3, '/think' in the system prompt (training render)", render(think_chat, "smollm3", today=TODAY))

    # 5. Spans: render is "".join of these typed pieces. Lesson 2 turns kinds into labels.
    print("5. render_spans(CONVERSATION, 'smollm2'): kind, message index, text")
    for s in render_spans(CONVERSATION, "smollm2"):
        print(f"   {s.kind:8s} index={str(s.index):4s} {s.text!r}")
    print()
    print("6. smollm3 spans in no-think mode (note the 'think' span):")
    for s in render_spans(CONVERSATION, "smollm3", enable_thinking=False, today=TODAY)[1:]:
        print(f"   {s.kind:8s} index={str(s.index):4s} {s.text!r}")
    print()

    # 7. Base vs instruct: the tokens exist in a base model's vocabulary, but a base model was
    # trained on raw text only. Lesson 3 shows it continuing a chat prompt without ever closing
    # its turn with <|im_end|>. SFT is what teaches it this format.
    ids = tok.encode(render(question, "smollm2", add_generation_prompt=True))
    print(f"7. the inference prompt is {len(ids)} tokens; the first five: {ids[:5]} = "
          f"{[tok.id_to_token(i) for i in ids[:5]]}")
    print("   A base model has never seen these markers in use: fine-tuning must teach it to answer "
          "after 'assistant\\n' and to stop with <|im_end|>.")

    # 8. New: what the template costs. Tokens per span kind, per template, for the same conversation:
    # only 'content' and 'end' carry loss by default (lesson 2); the rest is the template's frame.
    kinds = ["prompt", "header", "think", "content", "end"]
    setups = [("chatml", {}), ("smollm2", {}), ("smollm3", {"enable_thinking": True}),
              ("smollm3", {"enable_thinking": False})]
    counts = {}
    print("8. tokens per span kind:", ", ".join(kinds))
    for name, kw in setups:
        label = name + ("" if not kw else (" think" if kw["enable_thinking"] else " no_think"))
        per = dict.fromkeys(kinds, 0)
        for sp in render_spans(CONVERSATION, name, today=TODAY, **kw):
            per[sp.kind] += len(tok.encode(sp.text))  # each span alone: close to its share of the joint encoding
        counts[label] = per
        print(f"   {label:17s} " + "  ".join(f"{per[k]:4d}" for k in kinds))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(OUT, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 4))
    left = [0] * len(counts)
    for k in kinds:
        vals = [counts[lab][k] for lab in counts]
        ax.barh(list(counts), vals, left=left, label=k)
        left = [a + b for a, b in zip(left, vals)]
    ax.set_xlabel("tokens")
    ax.set_title("one question + one answer, rendered by each template")
    ax.legend(ncol=5, fontsize=8)
    fig.tight_layout()
    path = os.path.join(OUT, "spans.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"   wrote {os.path.relpath(path, ROOT)}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # a bad --model or data file: one line, not a traceback
        sys.exit(f"error: {' '.join(str(e).split())}")
