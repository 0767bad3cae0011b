"""The embedded default base model: a tiny SmolLM pretrained on data/corpus.txt.

    python -m minisft.default_model --out data/base-model --overwrite [--steps N] [--seed 0]

Every lesson fine-tunes this model by default, so the whole course runs offline on a laptop CPU.
`DEFAULT_MODEL` is the committed folder (Hugging Face layout: config.json, model.safetensors,
tokenizer.json, tokenizer_config.json, generation_config.json); `build()` remakes it from scratch:

  1. a byte-level BPE tokenizer trained on the corpus, digits split one by one as in SmolLM2, with
     the chat control tokens <|endoftext|> <|im_start|> <|im_end|> (special, ids 0 1 2 like SmolLM2)
     and <think> </think> as added but NOT special tokens (as in SmolLM3's tokenizer: they stay
     visible when decoding with skip_special_tokens=True, and conversations may contain them);
  2. a small Llama-style config (grouped-query attention, tied embeddings);
  3. plain next-token pretraining on raw text only: no chat markup ever appears, so this really is
     a *base* model. It knows the corpus facts and arithmetic, but not how to hold a conversation,
     and has never seen <|im_start|> / <|im_end|> / <think>: fine-tuning has to teach those.

This file is the builder, not a lesson: it uses F.cross_entropy where the lessons use loss.py.
"""
import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

from minisft.jinja_templates import JINJA
from minisft.model import ModelConfig, SmolLM
from minisft.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join(ROOT, "data", "base-model")
CORPUS = os.path.join(ROOT, "data", "corpus.txt")

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
THINK_TOKENS = ["<think>", "</think>"]
VOCAB_SIZE = 1024  # including the five tokens above

# SmolLM2-Instruct's chat template, so transformers' apply_chat_template renders exactly what
# minisft's "smollm2" template does (a default system prompt when the conversation has none).
SMOLLM2_CHAT_TEMPLATE = JINJA["smollm2"]

ARCH = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=48, rope_theta=10000.0, max_position_embeddings=512,
            rms_norm_eps=1e-5, tie_word_embeddings=True)
STEPS, BATCH, SEQ_LEN, LR, WARMUP = 600, 16, 256, 3e-3, 40


def train_tokenizer(corpus_path=CORPUS, vocab_size=VOCAB_SIZE):
    """Byte-level BPE on the corpus -> tokenizers.Tokenizer with the chat and think tokens."""
    tk = HFTokenizer(models.BPE())
    # Digits one by one (as SmolLM2 does): "127" is 1 2 7, so arithmetic works digit by digit.
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(THINK_TOKENS), special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train([corpus_path], trainer)
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return tk


def corpus_ids(tok, text):
    """Documents (separated by blank lines) -> one long id tensor [N], each ending in <|endoftext|>."""
    eot = tok.token_to_id("<|endoftext|>")
    ids = []
    for doc in text.split("\n\n"):
        if doc.strip():
            ids += tok.encode(doc.strip()) + [eot]
    return torch.tensor(ids, dtype=torch.long)


def lr_at(step, steps):
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    t = (step - WARMUP) / max(1, steps - WARMUP)
    return LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def pretrain(model, ids, steps, seed, log_every=50):
    """Next-token prediction on random windows of the token stream; returns the loss per step."""
    gen = torch.Generator().manual_seed(seed)  # fixes the data order
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.95))
    losses, t0 = [], time.time()
    for step in range(steps):
        starts = torch.randint(0, len(ids) - SEQ_LEN - 1, (BATCH,), generator=gen)
        window = torch.stack([ids[s:s + SEQ_LEN + 1] for s in starts])  # [B, T+1]
        logits = model(window[:, :-1])  # [B, T, V]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % log_every == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  lr {lr_at(step, steps):.2e}  {time.time() - t0:.0f}s", flush=True)
    return losses


@torch.no_grad()
def corpus_loss(model, ids, n_windows=64):
    """Mean next-token loss over evenly spaced windows of the corpus."""
    starts = torch.linspace(0, len(ids) - SEQ_LEN - 2, n_windows).long()
    window = torch.stack([ids[s:s + SEQ_LEN + 1] for s in starts])
    logits = model(window[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1)).item()


def write_model(model, tok, out_dir, dtype=torch.bfloat16):
    """Hugging Face layout. A tied lm_head is not stored (transformers re-ties it on load).

    The files go to a temporary sibling folder that then replaces out_dir, so a build stopped while
    writing never leaves a half-written model behind."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-base-model-", dir=parent)
    try:
        cfg = model.config.to_hf()
        cfg["dtype"] = str(dtype).removeprefix("torch.")
        state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()
                 if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"],
               "pad_token_id": cfg["pad_token_id"]}
        for name, obj in (("config.json", cfg), ("generation_config.json", gen)):
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                json.dump(obj, f, indent=2)
                f.write("\n")
        tok.save(tmp, chat_template=SMOLLM2_CHAT_TEMPLATE)
        # mkdtemp and safetensors create owner-only entries; the folder is committed and shared
        os.chmod(tmp, 0o755)
        os.chmod(os.path.join(tmp, "model.safetensors"), 0o644)
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build(out_dir=DEFAULT_MODEL, steps=STEPS, seed=0, corpus_path=CORPUS):
    """Tokenizer + config + pretraining + files. Returns the final corpus loss."""
    torch.manual_seed(seed)
    t0 = time.time()
    # bos/eos/pad as in SmolLM2-Instruct: a turn ends at <|im_end|>, which is also the padding id.
    tok = Tokenizer(train_tokenizer(corpus_path), {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                                                   "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>",
                                                   "model_max_length": ARCH["max_position_embeddings"]})
    with open(corpus_path, encoding="utf-8") as f:
        ids = corpus_ids(tok, f.read())
    print(f"corpus: {len(ids):,} tokens, vocab {tok.vocab_size}", flush=True)
    cfg = ModelConfig(vocab_size=tok.vocab_size, bos_token_id=tok.im_start_id, eos_token_id=tok.im_end_id,
                      pad_token_id=tok.pad_id, **ARCH)
    model = SmolLM(cfg)
    print(f"model: {model.num_parameters():,} parameters, {steps} steps of {BATCH}x{SEQ_LEN} tokens", flush=True)
    pretrain(model, ids, steps, seed)
    model.eval()
    write_model(model, tok, out_dir)
    # Report the loss of the weights as stored (bfloat16), not of the float32 training copy.
    model.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
    loss = corpus_loss(model, ids)
    print(f"wrote {out_dir}: corpus loss {loss:.4f} after {time.time() - t0:.0f}s", flush=True)
    return loss


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m minisft.default_model",
                                description="Rebuild the embedded default base model.")
    p.add_argument("--out", default=DEFAULT_MODEL)
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace what --out already holds")
    args = p.parse_args(argv)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        print(f"error: {args.out}: exists and is not a folder", file=sys.stderr)
        return 2
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        print(f"error: {args.out}: folder is not empty; pass --overwrite to replace it with the rebuilt model",
              file=sys.stderr)
        return 2
    build(args.out, args.steps, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
