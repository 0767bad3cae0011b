"""Lesson 3: load SmolLM weights into the hand-written model, and make it write.

  1. load_pretrained: config.json + model.safetensors -> minisft.model.SmolLM (strict name and
     shape check; nothing is renamed, the parameter names ARE the Hugging Face names)
  2. the config, the parameter count, and the tied embedding (lm_head IS embed_tokens)
  3. complete a corpus-style prompt: greedy, then sampled (temperature, top_k, top_p, seed)
  4. the KV cache: same tokens, less time
  5. a base model given a chat prompt: it does not answer properly and never emits <|im_end|>
  6. what greedy and sampling choose from: the next-token probabilities -> runs/03_load_and_generate/next_token.png

Run:  python lessons/03_load_and_generate.py [--model data/base-model | HuggingFaceTB/SmolLM2-135M]
Prints generated text and plots one next-token distribution; a few seconds on CPU with the default model.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = os.environ.get("MINISFT_RUNS", os.path.join(ROOT, "runs"))  # where run outputs go (tests redirect it)

import torch

from minisft.chat_template import render, template_for
from minisft.default_model import DEFAULT_MODEL
from minisft.generate import generate
from minisft.weights import load_pretrained

# ---- knobs ---------------------------------------------------------------------------------
PROMPTS = ["The capital of Varnia is", "What colour is the frostyak? The frostyak is", "12 + 6 ="]
MAX_NEW_TOKENS = 24
TEMPERATURE, TOP_K, TOP_P, SEED = 0.8, 50, 0.95, 0
CACHE_TOKENS = 200  # a longer generation, where the cache matters
CHAT_QUESTION = "What is the capital of Varnia?"
TOP_SHOWN = 12  # bars in the next-token plot
OUT = os.path.join(RUNS, "03_load_and_generate")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="model folder or Hub id")
    args = p.parse_args()
    torch.manual_seed(0)

    # 1. New: load_pretrained (lessons 1-2 read only the tokenizer). float32 weights on the CPU.
    t0 = time.time()
    model, tok = load_pretrained(args.model, dtype="float32", device="cpu")
    print(f"1. loaded {args.model} in {time.time() - t0:.2f}s")

    # 2. What we loaded.
    c = model.config
    print(f"2. config: vocab {c.vocab_size}, hidden {c.hidden_size}, layers {c.num_hidden_layers}, "
          f"heads {c.num_attention_heads} (kv heads {c.num_key_value_heads}), head_dim {c.head_dim}, "
          f"max positions {c.max_position_embeddings}")
    print(f"   parameters: {model.num_parameters():,}")
    # A tied model stores the embedding once: the output projection is the SAME Parameter.
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    print(f"   tie_word_embeddings={c.tie_word_embeddings}; "
          f"model.lm_head.weight is model.model.embed_tokens.weight -> {tied}")
    names = [n for n, _ in model.named_parameters()]
    print(f"   first parameter names: {names[:3]}\n")

    # 3. New: generate. Generation is a loop: score the next token, pick one, append, repeat.
    print("3. completions of corpus-style prompts (the default model was pretrained on data/corpus.txt):")
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        greedy = generate(model, ids, max_new_tokens=MAX_NEW_TOKENS, temperature=0.0)
        # New: sampling. temperature < 1 sharpens the distribution; top_k/top_p cut its tail.
        sampled = generate(model, ids, max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE,
                           top_k=TOP_K, top_p=TOP_P, seed=SEED)
        print(f"   {prompt!r}")
        print(f"      greedy : {tok.decode(greedy)!r}")
        print(f"      sampled: {tok.decode(sampled)!r}")
    print()

    # 4. New: the KV cache (use_cache). Keys/values of earlier tokens never change, so after the first step only
    # the new token is run through the model. Same tokens (greedy), much less work.
    ids = tok.encode(PROMPTS[0])
    timings = {}
    outs = {}
    for use_cache in (True, False):
        t0 = time.time()
        outs[use_cache] = generate(model, ids, max_new_tokens=CACHE_TOKENS, temperature=0.0, use_cache=use_cache)
        timings[use_cache] = time.time() - t0
    print(f"4. {CACHE_TOKENS} greedy tokens: with cache {timings[True]:.2f}s, without {timings[False]:.2f}s "
          f"({timings[False] / timings[True]:.1f}x); identical tokens: {outs[True] == outs[False]}\n")

    # 5. A chat prompt to a BASE model. It has never seen <|im_start|>...: it rambles on in
    # corpus style (or repeats markup) and never closes its turn with <|im_end|>.
    template = template_for(tok)
    prompt = render([{"role": "user", "content": CHAT_QUESTION}], template, add_generation_prompt=True)
    new = generate(model, tok.encode(prompt), max_new_tokens=40, temperature=0.0, stop_ids=tok.stop_ids())
    ended = bool(new) and new[-1] in tok.stop_ids()
    print(f"5. chat prompt ({template}) to the base model, greedy, stop at {tok.stop_ids()}:")
    print(f"   answer: {tok.decode(new)!r}")
    print(f"   ended with <|im_end|>: {ended} ({len(new)} tokens). SFT (lessons 6+) teaches both the "
          f"answer and the stop.")

    # 6. New: the distribution behind every choice above. One forward pass gives logits [1, T, V];
    # the last position scores every possible next token. Greedy takes the tallest bar; sampling
    # draws from softmax(logits / temperature), after top-k / top-p cut the tail.
    ids = torch.tensor([tok.encode(PROMPTS[0])], device=next(model.parameters()).device)
    with torch.no_grad():
        logits = model(ids)[0, -1].float().cpu()  # [V]
    probs = torch.softmax(logits, dim=-1)
    hot = torch.softmax(logits / TEMPERATURE, dim=-1)
    top = torch.topk(probs, TOP_SHOWN)
    labels = [repr(tok.decode([i])) for i in top.indices.tolist()]
    print(f"6. next token after {PROMPTS[0]!r}:")
    for lab, pr, i in list(zip(labels, top.values.tolist(), top.indices.tolist()))[:5]:
        print(f"   {lab:<12} p={pr:.3f}   (at temperature {TEMPERATURE}: {hot[i].item():.3f})")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(OUT, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 4))
    x = range(TOP_SHOWN)
    ax.bar([i - 0.2 for i in x], top.values.tolist(), width=0.4, label="temperature 1")
    ax.bar([i + 0.2 for i in x], hot[top.indices].tolist(), width=0.4, label=f"temperature {TEMPERATURE}")
    ax.set_xticks(list(x), labels, rotation=45, ha="right")
    ax.set_ylabel("probability")
    ax.set_title(f"next token after {PROMPTS[0]!r}")
    ax.legend()
    fig.tight_layout()
    path = os.path.join(OUT, "next_token.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"   wrote {os.path.relpath(path, ROOT)}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # a bad --model or data file: one line, not a traceback
        sys.exit(f"error: {' '.join(str(e).split())}")
