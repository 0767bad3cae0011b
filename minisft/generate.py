"""Text generation: greedy decoding and sampling (temperature, top-k, top-p) with a KV cache.

Lesson 3 uses it to make the model write, and train.py to print sample answers while training.

What it teaches:
- A language model only scores the next token; generation is a loop that picks one token,
  appends it, and asks again.
- The KV cache: the keys and values of earlier tokens never change, so after the first step only
  the new token goes through the model. `use_cache=False` recomputes everything each step and
  must give the same tokens: a test checks it.
- Batching prompts of different lengths: left padding, so every row's next token sits in the last
  column. The attention mask hides the padding and the position ids start at 0 at each row's
  first real token, so a padded row gives the same answer as the row alone.
"""
import torch

from minisft.model import KVCache


def _filter_logits(logits, top_k, top_p):
    """logits [B, V] -> logits with the excluded tokens set to -inf."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1] the k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # Nucleus: keep the smallest set of most likely tokens whose probability reaches top_p.
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability mass of the tokens ranked above
        drop_sorted = before >= top_p  # the most likely token is always kept (before == 0)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _next_tokens(logits, temperature, top_k, top_p, generator):
    """logits [B, V] of the last position -> next token ids [B]."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = _filter_logits(logits.float() / temperature, top_k, top_p)
    # Sample on the CPU with a CPU generator: the same seed gives the same draw on every device.
    probs = torch.softmax(logits, dim=-1).cpu()
    return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(logits.device)


def _check_args(config, rows, max_new_tokens, temperature, top_k, top_p):
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("generate: every prompt needs at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    bad = [t for r in rows for t in r if not 0 <= t < config.vocab_size]
    if bad:  # caught here: on a GPU an out-of-range embedding index is an opaque device assert
        raise ValueError(f"generate: token id {bad[0]} is outside the vocabulary [0, {config.vocab_size})")
    longest = max(len(r) for r in rows)
    if longest >= config.max_position_embeddings and max_new_tokens > 0:
        raise ValueError(f"generate: a prompt of {longest} tokens leaves no room in the model's context of "
                         f"max_position_embeddings={config.max_position_embeddings} tokens")
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"generate: top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}")


def generate(model, prompt_ids, max_new_tokens=64, temperature=0.0, top_k=None, top_p=None,
             stop_ids=(), seed=None, use_cache=True, on_token=None):
    """Continue one prompt (list[int]) or a batch (list[list[int]]); return the new tokens only.

    temperature 0 = greedy (top_k/top_p unused); > 0 samples from softmax(logits / temperature),
    restricted to the top_k tokens and/or the top_p nucleus. seed makes sampling repeatable.
    A row stops after a token in stop_ids (that token is included) or after max_new_tokens.
    All rows stop when the longest one fills the model's context (max_position_embeddings).
    on_token(row, token_id), if given, is called as each new token is chosen (chat.py streams with it);
    an exception it raises (or a Ctrl-C) ends generation there, and propagates.
    """
    if isinstance(prompt_ids, str):
        raise ValueError("generate: prompt_ids must be token ids, not text (encode it with the tokenizer first)")
    if isinstance(prompt_ids, torch.Tensor):
        prompt_ids = prompt_ids.tolist()  # [T] or [B, T] (unpadded)
    single = len(prompt_ids) > 0 and not isinstance(prompt_ids[0], (list, tuple))
    rows = [[int(t) for t in prompt_ids]] if single else [[int(t) for t in r] for r in prompt_ids]
    _check_args(model.config, rows, max_new_tokens, temperature, top_k, top_p)
    # RoPE could compute positions past the context, but the model never saw them in training:
    # what it says there is not to be trusted, so generation ends at the context's edge.
    max_new_tokens = min(max_new_tokens, model.config.max_position_embeddings - max(len(r) for r in rows))
    stop_ids = () if stop_ids is None else [stop_ids] if isinstance(stop_ids, int) else stop_ids
    stop = {int(s) for s in stop_ids}
    generator = torch.Generator().manual_seed(seed) if seed is not None else None

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            out = _decode(model, rows, max_new_tokens, temperature, top_k, top_p, stop, generator, use_cache,
                          on_token)
    finally:
        model.train(was_training)
    return out[0] if single else out


def _decode(model, rows, max_new_tokens, temperature, top_k, top_p, stop, generator, use_cache, on_token=None):
    device = next(model.parameters()).device
    B, L = len(rows), max(len(r) for r in rows)
    ids = torch.zeros(B, L, dtype=torch.long, device=device)  # pad id 0: masked out, never seen
    mask = torch.zeros(B, L, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        ids[i, L - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, L - len(r):] = 1
    padded = bool((mask == 0).any())
    # Each row's positions count its real tokens only: 0 at its first one, like the row alone.
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    # Room for every token this call can produce, allocated once: the ids, the mask and the cache
    # are written in place column by column instead of being copied (torch.cat) at every step.
    total = L + max_new_tokens
    ids = torch.cat([ids, ids.new_zeros(B, max_new_tokens)], dim=1)
    mask = torch.cat([mask, mask.new_ones(B, max_new_tokens)], dim=1)
    pos = torch.cat([pos, pos[:, -1:] + torch.arange(1, max_new_tokens + 1, device=device)], dim=1)

    cache = KVCache(model.config.num_hidden_layers, capacity=total) if use_cache else None
    new = [[] for _ in range(B)]
    done = [False] * B
    S = L  # tokens so far
    step_ids, step_pos = ids[:, :S], pos[:, :S]
    for _ in range(max_new_tokens):
        # With a cache, only the tokens not seen yet go in; the mask always covers the whole sequence.
        h = model.hidden_states(step_ids, position_ids=step_pos, attention_mask=mask[:, :S] if padded else None,
                                cache=cache)
        # Only the last position picks a token: project it alone, not the [B, T, V] logits of the prompt.
        logits = model.lm_head(h[:, -1, :])  # [B, V]
        nxt = _next_tokens(logits, temperature, top_k, top_p, generator)  # [B]
        for i, t in enumerate(nxt.tolist()):
            if not done[i]:
                new[i].append(t)
                done[i] = t in stop
                if on_token is not None:
                    on_token(i, t)
        if all(done):
            break
        # Finished rows keep being fed tokens (simpler than shrinking the batch); they are ignored.
        ids[:, S] = nxt
        S += 1
        step_ids, step_pos = (ids[:, S - 1:S], pos[:, S - 1:S]) if use_cache else (ids[:, :S], pos[:, :S])
    return new


def chat(model, tokenizer, messages, template=None, **kwargs):
    """Answer a conversation: render it with the chat template, generate, decode -> str.

    template: a name for chat_template.render ("smollm2", "smollm3", "chatml"); None guesses it
    from the tokenizer. kwargs go to generate (stop_ids defaults to the tokenizer's turn ends).
    """
    from minisft import chat_template  # imported here: generate() itself needs no templates

    if template is None:
        template = chat_template.template_for(tokenizer)
    prompt = tokenizer.encode(chat_template.render(messages, template, add_generation_prompt=True))
    kwargs.setdefault("stop_ids", tokenizer.stop_ids())
    return tokenizer.decode(generate(model, prompt, **kwargs), skip_special_tokens=True)
