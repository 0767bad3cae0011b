"""A minimal Llama-style transformer for the SmolLM family (SmolLM, SmolLM2, SmolLM3). Lesson 3.

This is the model that runs, written in plain PyTorch ops. One decoder block is

    x = x + attn(norm1(x))      grouped-query attention with rotary positions (RoPE)
    x = x + mlp(norm2(x))       SwiGLU: down(silu(gate(x)) * up(x))

and the model is: embed -> N blocks -> RMSNorm -> lm_head (tied to the embedding by default).

Parameter names equal the Hugging Face ones (`model.layers.0.self_attn.q_proj.weight`, ...), so
safetensors load with no key mapping (weights.py; hf_config.py reads config.json). Speed lives in
minisft/fast/ (lesson 11): the trainer swaps these modules for twins with hand-written backwards,
which tests prove compute the same numbers.

Shapes: B batch, T new tokens, S = cache length + T, D hidden_size, H query heads,
KV key/value heads, hd head_dim, I intermediate_size, V vocab_size.
"""
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from minisft import hf_config


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    model_type: str = "llama"  # "llama" (SmolLM, SmolLM2) or "smollm3"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 2048
    attention_bias: bool = False
    mlp_bias: bool = False
    initializer_range: float = 0.02
    # use_rope[i] is False for SmolLM3's "NoPE" layers, which see no position signal at all.
    use_rope: list = field(default_factory=list)
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        self.use_rope = self.use_rope or [True] * self.num_hidden_layers
        if len(self.use_rope) != self.num_hidden_layers:
            raise ValueError(f"no_rope_layers has {len(self.use_rope)} entries, expected num_hidden_layers={self.num_hidden_layers}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of num_key_value_heads={self.num_key_value_heads}")

    @classmethod
    def from_hf(cls, cfg, source="config.json"):
        """Build from a Hugging Face config.json dict (hf_config.py). `source` names the file in errors."""
        try:
            return cls(**hf_config.fields_from_hf(cfg, source))
        except ValueError as e:  # the checks of __post_init__ name the file too
            raise ValueError(e if str(e).startswith(f"{source}: ") else f"{source}: {e}") from None

    def to_hf(self):  # the config.json dict that transformers reads back into the same architecture
        return hf_config.to_hf(self)


class RMSNorm(nn.Module):
    """x [..., D] -> x / sqrt(mean(x^2) + eps) * weight [..., D].

    The statistics in float32 even for bfloat16 x (a mean of squares in bf16 loses digits), cast
    back to x's dtype before the gain, as transformers does.
    """

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # float64 stays float64
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(position_ids, head_dim, theta, dtype):
    """position_ids [B, T] -> cos, sin [B, 1, T, hd] (float32 maths, then cast)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim))
    freqs = position_ids[:, :, None].float() * inv_freq  # [B, T, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # the "rotate half" layout: pairs (i, i + hd/2)
    return emb.cos()[:, None].to(dtype), emb.sin()[:, None].to(dtype)


def apply_rope(x, cos, sin):
    """x [B, heads, T, hd] -> each pair of dims (i, i + hd/2) rotated by its position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache:
    """Keys and values of every layer seen so far, so generation feeds only the new token.

    k[i], v[i]: [B, KV, S, hd] views of buffers [B, KV, capacity, hd]; `mask` keeps the attention_mask
    of the whole sequence [B, S]. Each step writes one column in place: appending with torch.cat would
    copy the whole cache at every token. Without a `capacity` the buffers grow by doubling.
    """

    def __init__(self, n_layers, capacity=None):
        self.k, self.v = [None] * n_layers, [None] * n_layers  # the filled part of each layer's buffers
        self.bufs = [None] * n_layers  # (k, v) buffers [B, KV, size, hd] per layer
        self.capacity, self.mask = capacity, None

    @property
    def length(self):
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def update(self, layer, k, v):
        """Append k, v [B, KV, T, hd] to this layer's cache -> the whole cache [B, KV, S, hd]."""
        past = 0 if self.k[layer] is None else self.k[layer].shape[2]
        S = past + k.shape[2]
        if self.bufs[layer] is None or self.bufs[layer][0].shape[2] < S:
            size = max(S, self.capacity or 0, 2 * past)
            kb, vb = k.new_empty(*k.shape[:2], size, k.shape[3]), v.new_empty(*v.shape[:2], size, v.shape[3])
            if past:
                kb[:, :, :past], vb[:, :, :past] = self.k[layer], self.v[layer]
            self.bufs[layer] = kb, vb
        kb, vb = self.bufs[layer]
        kb[:, :, past:S], vb[:, :, past:S] = k, v
        self.k[layer], self.v[layer] = kb[:, :, :S], vb[:, :, :S]
        return self.k[layer], self.v[layer]


class Attention(nn.Module):
    """Grouped-query attention: H query heads share KV key/value heads (H // KV queries per pair)."""

    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.use_rope = cfg.use_rope[layer_idx]  # False in SmolLM3's NoPE layers
        D, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(D, self.n_heads * self.hd, bias=bias)
        self.k_proj = nn.Linear(D, self.n_kv * self.hd, bias=bias)
        self.v_proj = nn.Linear(D, self.n_kv * self.hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.hd, D, bias=bias)

    def forward(self, x, cos, sin, attn_mask=None, cache=None):
        """x [B, T, D] -> [B, T, D]. attn_mask: None (plain causal) or bool [B, 1, T, S]."""
        return self.attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), cos, sin, attn_mask, cache)

    def heads(self, q, k, v, cos, sin):
        """q [B, T, H*hd], k, v [B, T, KV*hd] -> q [B, H, T, hd], k, v [B, KV, T, hd], RoPE applied."""
        B, T, _ = q.shape
        q = q.view(B, T, self.n_heads, self.hd).transpose(1, 2)
        k = k.view(B, T, self.n_kv, self.hd).transpose(1, 2)
        v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)
        if self.use_rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def attend(self, q, k, v, cos, sin, attn_mask, cache):
        """The projections q [B, T, H*hd], k, v [B, T, KV*hd] -> the layer's output [B, T, D]."""
        B, T, _ = q.shape
        q, k, v = self.heads(q, k, v, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # [B, KV, S, hd]
        # No mask: SDPA's causal flag; a single new token on a cache without padding sees everything.
        is_causal = attn_mask is None and T > 1
        if is_causal and k.shape[2] != T:
            raise ValueError("a multi-token forward on top of a cache needs an explicit attention mask")
        # enable_gqa: query head h reads key/value head h // (H // KV), as transformers' repeat_kv does.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           enable_gqa=self.n_kv != self.n_heads)  # [B, H, T, hd]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


class MLP(nn.Module):
    """SwiGLU: x [..., D] -> down(silu(gate(x)) * up(x)) [..., D], through I hidden units."""

    def __init__(self, cfg):
        super().__init__()
        D, I, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(D, I, bias=bias)
        self.up_proj = nn.Linear(D, I, bias=bias)
        self.down_proj = nn.Linear(I, D, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One decoder block, pre-norm: each sublayer reads a normalised copy and adds to the residual x."""

    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # norm1
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # norm2
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attn_mask=None, cache=None):  # x [B, T, D] -> [B, T, D]
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cache)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x


def right_padded(attention_mask):
    """attention_mask [B, S] -> True when every row is one sequence (ids 1) followed only by padding (0)."""
    m = attention_mask
    return bool(((m == 0) | (m == 1)).all() and (m[:, 1:] <= m[:, :-1]).all())


def build_attn_mask(attention_mask, past, T, device):
    """attention_mask [B, S] -> bool [B, 1, T, S] (True = may attend), or None for plain causal.

    attention_mask holds a sequence id per position (0 = padding); a token attends to earlier-or-equal
    positions with its own id. A 1/0 padding mask is one sequence per row; a packed row numbers its
    conversations 1, 2, 3, ... so attention never crosses them. Padding attends to padding, never NaN.
    None for right-padded rows without a cache: the causal mask already keeps every real token off
    the padding after it (padding's own outputs carry no loss and are never read).
    """
    if attention_mask is None or (past == 0 and right_padded(attention_mask)):
        return None
    S = attention_mask.shape[1]
    q_pos = torch.arange(past, past + T, device=device)
    causal = torch.arange(S, device=device)[None, :] <= q_pos[:, None]  # [T, S]
    seg_q = attention_mask[:, past:past + T]  # [B, T]
    same = seg_q[:, :, None] == attention_mask[:, None, :]  # [B, T, S]
    return (causal[None] & same)[:, None]


class SmolLM(nn.Module):
    """The decoder-only language model: input_ids [B, T] -> logits [B, T, V]."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            layers=nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers)),
            norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight  # one Parameter, two uses
        self.grad_checkpointing = False  # activation checkpointing (hidden_states); the trainer sets it
        self.reset_parameters()

    def reset_parameters(self):
        """Random init as transformers does it: N(0, initializer_range) weights, zero biases, unit norms."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=self.config.initializer_range)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    def attn_mask(self, attention_mask, past, T, cache):
        """What every layer's attention is given: build_attn_mask's, built once per forward."""
        return build_attn_mask(attention_mask, past, T, self.model.embed_tokens.weight.device)

    def hidden_states(self, input_ids, position_ids=None, attention_mask=None, cache=None):
        """input_ids [B, T] -> final normalised hidden states [B, T, D] (before lm_head).

        position_ids [B, T]: defaults to cache.length + 0..T-1. Packed rows restart them per conversation.
        attention_mask [B, S]: sequence ids, 0 = padding (build_attn_mask). cache: a KVCache, extended in place.
        """
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if attention_mask is not None and attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask has shape {list(attention_mask.shape)}, expected [B, cache length + T]"
                             f" = {[B, past + T]}: with a cache it covers the whole sequence")
        if cache is not None and attention_mask is None and cache.mask is not None:
            raise ValueError("this cache was started with an attention_mask: pass the full [B, S] mask on every call")
        if cache is not None and attention_mask is not None:
            cache.mask = attention_mask
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids)  # [B, T, D]
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        attn_mask = self.attn_mask(attention_mask, past, T, cache)
        # Activation checkpointing keeps each block's input and reruns the block in backward: less memory,
        # one more forward. Never with a cache (a rerun would append keys twice). use_reentrant=False gives
        # the weights gradients when x needs none (LoRA), and reruns dropout with the same RNG state.
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for block in self.model.layers:
            if recompute:
                x = checkpoint(block, x, cos, sin, attn_mask, None, use_reentrant=False)
            else:
                x = block(x, cos, sin, attn_mask, cache)
        return self.model.norm(x)

    def forward(self, input_ids, position_ids=None, attention_mask=None, cache=None):
        """input_ids [B, T] -> logits [B, T, V] (same arguments as hidden_states)."""
        return self.lm_head(self.hidden_states(input_ids, position_ids, attention_mask, cache))

    def num_parameters(self):
        return sum(p.numel() for p in self.parameters())  # a tied matrix counts once
