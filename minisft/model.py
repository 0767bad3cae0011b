"""A minimal Llama-style transformer for the SmolLM family (SmolLM, SmolLM2, SmolLM3).

Lesson 3 reads this file. One decoder block is
    x = x + Attention(RMSNorm(x))      grouped-query attention with rotary positions
    x = x + SwiGLU(RMSNorm(x))
and the model is: embed -> N blocks -> RMSNorm -> lm_head (tied to the embedding by default).

Module and parameter names equal the Hugging Face ones (`model.layers.0.self_attn.q_proj.weight`,
...), so a checkpoint's safetensors load with no key mapping. This file knows nothing of files
or conversations: `weights.py` loads and saves, `chat_template.py` renders.

Shapes: B batch, T new tokens, S = cache length + T, D hidden_size, H query heads,
KV key/value heads, hd head_dim, V vocab_size.
"""
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

SUPPORTED_TYPES = ("llama", "smollm3")


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    model_type: str = "llama"
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
        if not self.use_rope:
            self.use_rope = [True] * self.num_hidden_layers
        if len(self.use_rope) != self.num_hidden_layers:
            raise ValueError(f"no_rope_layers has {len(self.use_rope)} entries, expected num_hidden_layers={self.num_hidden_layers}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of num_key_value_heads={self.num_key_value_heads}")

    @classmethod
    def from_hf(cls, cfg, source="config.json"):
        """Build from a Hugging Face config.json dict. `source` names the file in error messages."""
        if not isinstance(cfg, dict):
            raise ValueError(f"{source}: expected a JSON object of model settings, got {type(cfg).__name__}")
        mtype = cfg.get("model_type")
        if mtype not in SUPPORTED_TYPES:
            raise ValueError(f"{source}: model_type {mtype!r} is not supported (minisft knows {', '.join(SUPPORTED_TYPES)})")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in cfg:
                raise ValueError(f"{source}: missing required key {key!r}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act {cfg['hidden_act']!r} is not supported (expected 'silu')")
        # Newer transformers write rope settings under "rope_parameters", older ones under
        # "rope_scaling" with rope_theta at the top level. When both are present transformers
        # follows "rope_scaling" (a scaling added to a newer config), so we read it first too.
        rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
        if not isinstance(rope, dict) or any(isinstance(v, dict) for v in rope.values()):
            raise ValueError(f"{source}: rope settings {rope!r} are not supported (expected one plain RoPE for all layers)")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"{source}: rope type {rope_type!r} is not supported (expected plain RoPE)")
        is3 = mtype == "smollm3"
        n_layers, n_heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
        if is3:
            # SmolLM3: no_rope_layers[i] == 0 means layer i skips RoPE; without the list,
            # every `no_rope_layer_interval`-th layer (3, 7, 11, ... for 4) skips it.
            interval = cfg.get("no_rope_layer_interval", 4)
            flags = cfg.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n_layers)]
            use_rope = [bool(f) for f in flags[:n_layers]]  # transformers allows a longer list
            # With use_sliding_window, transformers gives the "sliding_attention" layers (by default
            # the NoPE ones) a sliding window; this model only has full attention.
            kinds = cfg.get("layer_types") or ["full_attention" if u or cfg.get("sliding_window") is None
                                               else "sliding_attention" for u in use_rope]
            if cfg.get("use_sliding_window") and "sliding_attention" in kinds[:n_layers]:
                raise ValueError(f"{source}: use_sliding_window is not supported (expected false: full attention in every layer)")
        else:
            use_rope = [True] * n_layers
        fields = dict(
            model_type=mtype,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 2_000_000.0 if is3 else 10000.0)),
            # transformers' defaults differ: LlamaConfig unties, SmolLM3Config ties.
            tie_word_embeddings=cfg.get("tie_word_embeddings", is3),
            max_position_embeddings=cfg.get("max_position_embeddings", 32768 if is3 else 2048),
            attention_bias=cfg.get("attention_bias", False),
            mlp_bias=cfg.get("mlp_bias", False),
            initializer_range=cfg.get("initializer_range", 0.02),
            use_rope=use_rope,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            pad_token_id=cfg.get("pad_token_id"),
        )
        try:
            return cls(**fields)
        except ValueError as e:  # the checks of __post_init__ name the file too
            raise ValueError(f"{source}: {e}") from None

    def to_hf(self):
        """The config.json dict that transformers reads back into the same architecture."""
        out = {
            "architectures": ["SmolLM3ForCausalLM" if self.model_type == "smollm3" else "LlamaForCausalLM"],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "mlp_bias": self.mlp_bias,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.model_type == "smollm3":
            out["no_rope_layers"] = [int(u) for u in self.use_rope]
            out["use_sliding_window"] = False
        return out


def rms_norm(x, weight, eps):
    """x [..., D], weight [D] -> (weight * normalised x [..., D], rstd = 1 / rms [..., 1]).

    float32 maths for bfloat16/float16/float32 x (float64 stays float64), cast back to x's dtype
    before the gain, as transformers does.
    """
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (xf * rstd).to(x.dtype), rstd


class RMSNormFn(torch.autograd.Function):
    """rms_norm with a hand-written backward that saves only x [..., D] and rstd [..., 1].

    Written as plain ops, autograd would also keep x * rstd [..., D] (float32) for the gain's
    product, while the next Linear keeps the output again: one more [..., D] per norm. Backward
    rebuilds n = x * rstd from the two, which costs one elementwise pass.
    """

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = rms_norm(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):  # dy [..., D]
        x, weight, rstd = ctx.saved_tensors
        return (*rms_norm_backward(dy, x, weight, rstd, ctx.needs_input_grad[:2]), None)


def rms_norm_backward(dy, x, weight, rstd, needs, n=None):
    """The gradients of rms_norm: dy [..., D] -> (dx [..., D] or None, dweight [D] or None), as
    needs = (x's, weight's) asks. x and rstd are what the forward saw and gave; n = x * rstd when the
    caller has rebuilt it already."""
    if n is None:
        n = x.to(rstd.dtype) * rstd  # [..., D] in the forward's maths dtype
    dx = dw = None
    if needs[1]:  # n.to(x.dtype) is what the forward multiplied by weight
        dw = (dy * n.to(x.dtype)).sum(tuple(range(dy.dim() - 1))).to(weight.dtype)  # over every leading dim
    if needs[0]:
        # The gradient reaches n through the cast, so it is rounded to x's dtype first, as
        # autograd would. Then d/dx of x * rsqrt(mean(x^2) + eps) applied to g:
        # rstd * (g - n * mean(g * n)), in place on g: a new tensor, and this backward is
        # mostly memory traffic over [..., D].
        g = (dy * weight).to(x.dtype).to(rstd.dtype)
        mean_gn = torch.linalg.vecdot(g, n).unsqueeze(-1) / n.shape[-1]  # [..., 1]
        dx = g.addcmul_(n, mean_gn, value=-1).mul_(rstd).to(x.dtype)
    return dx, dw


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 like transformers does.

    With a backward to come it runs as RMSNormFn (the same numbers, less kept for backward).
    """

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # [..., D] -> [..., D]
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return RMSNormFn.apply(x, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)[0]  # no backward to come: nothing to save


class NormLinearsFn(torch.autograd.Function):
    """rms_norm(x) read by several bias-free Linears (q, k, v; or gate, up), with a backward that saves
    only x [..., D] and rstd [..., 1] (and the weights).

    Done apart, the norm keeps x and every Linear keeps the normalised y [..., D] for its weight's
    gradient (under autocast each its own bf16 copy): one more [..., D] per norm, three under autocast
    before the attention. Backward rebuilds y from x and rstd with the forward's own ops (one
    elementwise pass, the same bits), then runs the matmuls autograd would run.

    x [..., D], weight [D] (the norm's gain), ws [O_i, D] (already in the autocast dtype)
    -> one [..., O_i] per weight.
    """

    @staticmethod
    def forward(ctx, x, weight, eps, *ws):
        y, rstd = rms_norm(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd, *ws)
        y = y.to(ws[0].dtype)  # the cast autocast makes before a Linear (none in float32)
        return tuple(F.linear(y, w) for w in ws)

    @staticmethod
    @once_differentiable
    def backward(ctx, *douts):  # one [..., O_i] per weight
        x, weight, rstd, *ws = ctx.saved_tensors
        n = x.to(rstd.dtype) * rstd  # [..., D], the norm's backward reads it too
        y = weight * n.to(x.dtype)  # the forward's y, rebuilt with its own ops: the same bits
        y_dtype, y = y.dtype, y.to(ws[0].dtype).flatten(0, -2)  # [N, D], as the Linears read it
        dws = [y.t().mm(d.flatten(0, -2)).t() if ctx.needs_input_grad[3 + i] else None  # [O_i, D]
               for i, d in enumerate(douts)]
        del y
        dy = None
        if any(ctx.needs_input_grad[:2]):
            # The gradient of y is the sum of what each Linear sends back, added last Linear first:
            # the order autograd's engine adds them in (the later a node was made, the sooner it runs),
            # so the sum is the same bits as without this Function.
            for d, w in reversed(list(zip(douts, ws))):
                part = d.matmul(w).to(y_dtype)  # [..., D]
                dy = part if dy is None else dy.add_(part)
        dx, dw = (None, None) if dy is None else rms_norm_backward(dy, x, weight, rstd, ctx.needs_input_grad[:2], n)
        return (dx, dw, None, *dws)


def project(norm, linears, x):
    """x [..., D] -> a tuple with linear(norm(x)) [..., O] for each Linear of `linears` (norm None: x as given).

    With a backward to come and plain bias-free Linears, as NormLinearsFn (the normalised x is not
    kept); otherwise the norm, then each Linear (a LoRA-wrapped Linear keeps its input itself).
    """
    plain = all(type(m) is nn.Linear and m.bias is None for m in linears)
    if norm is not None and plain and torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for m in (norm, *linears) for p in m.parameters())):
        return NormLinearsFn.apply(x, norm.weight, norm.eps, *(autocast_weight(m.weight, x) for m in linears))
    y = x if norm is None else norm(x)
    return tuple(m(y) for m in linears)


def autocast_weight(w, x):
    """w, cast as autocast would cast it for a Linear reading x (unchanged without autocast)."""
    if torch.is_autocast_enabled(x.device.type):
        return w.to(torch.get_autocast_dtype(x.device.type))
    return w


def rope_cos_sin(position_ids, head_dim, theta, dtype):
    """position_ids [B, T] -> cos, sin [B, 1, T, hd] (float32 maths, then cast)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim))
    freqs = position_ids[:, :, None].float() * inv_freq  # [B, T, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # the "rotate half" layout: pairs (i, i + hd/2)
    return emb.cos()[:, None].to(dtype), emb.sin()[:, None].to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x, cos, sin):  # x [B, heads, T, hd]
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Keys and values of every layer seen so far, so generation feeds only the new token.

    k[i], v[i]: [B, KV, S, hd] views of preallocated buffers [B, KV, capacity, hd]. `mask` keeps
    the attention_mask of the whole sequence [B, S].

    Why preallocate: appending with torch.cat copies the whole cache at every new token, so
    decoding n tokens moves O(n^2) bytes and allocates a fresh tensor per layer per step. With
    `capacity` (prompt + new tokens, known before decoding starts) each step writes one column
    in place. Without it, the buffers grow by doubling: still amortised O(1) per token.
    """

    def __init__(self, n_layers, capacity=None):
        self.k = [None] * n_layers
        self.v = [None] * n_layers
        self._kbuf = [None] * n_layers
        self._vbuf = [None] * n_layers
        self.capacity = capacity
        self.mask = None

    @property
    def length(self):
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def update(self, layer, k, v):
        """Append k, v [B, KV, T, hd] to this layer's cache -> the whole cache [B, KV, S, hd]."""
        past = 0 if self.k[layer] is None else self.k[layer].shape[2]
        S = past + k.shape[2]
        buf = self._kbuf[layer]
        if buf is None or buf.shape[2] < S:
            size = max(S, self.capacity or 0, 2 * (buf.shape[2] if buf is not None else 0))
            kb = k.new_empty(k.shape[0], k.shape[1], size, k.shape[3])
            vb = v.new_empty(v.shape[0], v.shape[1], size, v.shape[3])
            if past:
                kb[:, :, :past], vb[:, :, :past] = self.k[layer], self.v[layer]
            self._kbuf[layer], self._vbuf[layer] = kb, vb
        self._kbuf[layer][:, :, past:S] = k
        self._vbuf[layer][:, :, past:S] = v
        self.k[layer], self.v[layer] = self._kbuf[layer][:, :, :S], self._vbuf[layer][:, :, :S]
        return self.k[layer], self.v[layer]


class Attention(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.use_rope = cfg.use_rope[layer_idx]
        D, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(D, self.n_heads * self.hd, bias=bias)
        self.k_proj = nn.Linear(D, self.n_kv * self.hd, bias=bias)
        self.v_proj = nn.Linear(D, self.n_kv * self.hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.hd, D, bias=bias)

    def forward(self, x, cos, sin, attn_mask, cache, norm=None):
        """x [B, T, D] -> [B, T, D]. attn_mask: None (plain causal), bool [B, 1, T, S], or a
        list of (row, start, end) spans, one per conversation of packed rows (conversation_spans).
        norm: the block's RMSNorm, run on x first (see project); None when x is normalised already."""
        B, T, _ = x.shape
        q, k, v = project(norm, (self.q_proj, self.k_proj, self.v_proj), x)
        q = q.view(B, T, self.n_heads, self.hd).transpose(1, 2)  # [B, H, T, hd]
        k = k.view(B, T, self.n_kv, self.hd).transpose(1, 2)  # [B, KV, T, hd]
        v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)
        if self.use_rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if isinstance(attn_mask, list):
            return self.o_proj(self.per_conversation(q, k, v, attn_mask))
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # [B, KV, S, hd]
        # Without a mask and without a cache, SDPA's own causal flag is fastest. A single new
        # token with a cache and no padding may look at everything: no mask at all.
        is_causal = attn_mask is None and T > 1
        if is_causal and k.shape[2] != T:
            raise ValueError("a multi-token forward on top of a cache needs an explicit attention mask")
        # enable_gqa: query head h reads key/value head h // (H // KV), as transformers' repeat_kv does.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))

    def per_conversation(self, q, k, v, spans):
        """q [B, H, T, hd], k, v [B, KV, T, hd], spans [(row, start, end)] -> [B, T, H * hd].

        A packed row holds several conversations. One masked call would compute every query-key
        pair of the row and throw the cross-conversation ones away; SDPA's kernels cannot skip
        them. One causal call per conversation computes only the pairs that count: with SmolLM2-135M's
        heads, 2 rows of 1024 tokens in 4 conversations each, a layer's attention forward + backward
        takes ~0.65x the time of the masked call on a CPU, and no [B, 1, T, T] mask is built. So a
        row's length costs nothing in attention, and data.pack_to_budget packs a micro-batch into one row.
        On a CPU only (see SmolLM.hidden_states): a GPU pays per kernel launched, not per pair.
        The pieces are cut with unbind and split, not indexing: their backward is one stack and one
        cat, where each indexed slice would get a zero-filled gradient of the whole tensor.
        Positions outside every span (padding) get zeros: they carry no loss and are never read.
        """
        B, H, T, hd = q.shape
        pieces = []  # [n, H * hd] each, covering the flattened [B * T] positions in order
        for b, (qb, kb, vb) in enumerate(zip(q.unbind(0), k.unbind(0), v.unbind(0))):  # [heads, T, hd]
            cuts, pos = [], 0  # (length, is it a conversation?) of each segment of row b, in order
            for r, s, e in spans:
                if r == b:
                    cuts += [(s - pos, False)] * (s > pos) + [(e - s, True)]
                    pos = e
            cuts += [(T - pos, False)] * (T > pos)
            sizes = [n for n, _ in cuts]
            for qs, ks, vs, (_, conv) in zip(qb.split(sizes, 1), kb.split(sizes, 1), vb.split(sizes, 1), cuts):
                if not conv:
                    pieces.append(q.new_zeros(qs.shape[1], H * hd))
                    continue
                y = F.scaled_dot_product_attention(qs[None], ks[None], vs[None], is_causal=True,
                                                   enable_gqa=self.n_kv != self.n_heads)  # [1, H, n, hd]
                pieces.append(y[0].transpose(0, 1).reshape(qs.shape[1], H * hd))
        return torch.cat(pieces).view(B, T, H * hd)


class SwiGLUFn(torch.autograd.Function):
    """h = silu(g) * u, and with w given y = h @ w.T (down_proj) too, with a backward that saves only
    g and u [..., I] (and w), and recomputes silu(g) and h.

    Written as plain ops, autograd would keep silu(g) [..., I] for the product, and down_proj would
    keep h [..., I] for its weight's gradient: two more [..., I] per token, the widest tensors of a
    layer. Rebuilding them in backward costs two elementwise passes over [..., I]; the matmuls are
    the ones autograd would run (dh = dy @ w, dw = (h^T @ dy)^T). silu's derivative is
    silu'(g) = s * (1 + g * (1 - s)) with s = sigmoid(g).

    g, u [..., I]; w [D, I] (down_proj.weight, already in the autocast dtype) or None -> [..., D] or h [..., I].
    """

    @staticmethod
    def forward(ctx, g, u, w=None):
        ctx.save_for_backward(g, u, w)
        h = F.silu(g) * u
        return h if w is None else F.linear(h, w)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):  # dy [..., D] (or [..., I] without w)
        g, u, w = ctx.saved_tensors
        dg = du = dw = None
        sg = F.silu(g)
        if w is not None and ctx.needs_input_grad[2]:
            h = (sg * u).flatten(0, -2)  # [N, I]: the down_proj input the forward did not keep
            dw = h.t().mm(dy.flatten(0, -2)).t()  # [D, I], the same product autograd's mm backward runs
            del h
        dh = dy if w is None else dy.matmul(w)  # [..., I]
        if ctx.needs_input_grad[0]:
            # silu' in at least float32, as PyTorch's own silu backward does for bfloat16; the
            # gradient reaching silu(g) is rounded to g's dtype first, as autograd would.
            gf = g.to(torch.promote_types(g.dtype, torch.float32))
            # In place on new tensors: this backward over [..., I] is mostly memory traffic.
            s = torch.sigmoid(gf)
            dsilu = torch.sub(1, s).mul_(gf).add_(1).mul_(s)  # s * (1 + g * (1 - s))
            dg = (dh * u).to(g.dtype).to(gf.dtype).mul_(dsilu).to(g.dtype)
        if ctx.needs_input_grad[1]:
            du = sg.mul_(dh).to(u.dtype)
        return dg, du, dw


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); with a backward to come, the product and down_proj run as
    SwiGLUFn (a LoRA-wrapped or biased down_proj as itself, after SwiGLUFn's product)."""

    def __init__(self, cfg):
        super().__init__()
        D, I, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(D, I, bias=bias)
        self.up_proj = nn.Linear(D, I, bias=bias)
        self.down_proj = nn.Linear(I, D, bias=bias)

    def forward(self, x, norm=None):  # [..., D] -> [..., D]; norm as in Attention.forward
        g, u = project(norm, (self.gate_proj, self.up_proj), x)  # [..., I]
        if not (torch.is_grad_enabled() and (g.requires_grad or u.requires_grad)):
            return self.down_proj(F.silu(g) * u)  # no backward to come: nothing to save
        down = self.down_proj
        if type(down) is not nn.Linear or down.bias is not None:
            return down(SwiGLUFn.apply(g, u))  # keeps h for its own backward
        return SwiGLUFn.apply(g, u, autocast_weight(down.weight, g))


class Block(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attn_mask, cache):
        # Each norm goes in with the layer that reads it, so the two can run as one Function (project).
        x = x + self.self_attn(x, cos, sin, attn_mask, cache, norm=self.input_layernorm)
        return x + self.mlp(x, norm=self.post_attention_layernorm)


def right_padded(attention_mask):
    """attention_mask [B, S] -> True when every row is one sequence (ids 1) followed only by padding (0)."""
    m = attention_mask
    return bool(((m == 0) | (m == 1)).all() and (m[:, 1:] <= m[:, :-1]).all())


def build_attn_mask(attention_mask, past, T, device):
    """attention_mask [B, S] -> bool [B, 1, T, S] (True = may attend), or None for plain causal.

    attention_mask holds a sequence id per position: 0 marks padding, and tokens attend only to
    earlier-or-equal positions with the same id. A Hugging Face 1/0 padding mask is the case of
    one sequence per row; a packed row numbers its conversations 1, 2, 3, ... so attention never
    crosses them (a block-diagonal causal mask). Padding rows attend to padding, never to NaN.

    No mask at all (None) for one sequence per row with right padding and no cache: under the plain
    causal mask a real token only sees earlier positions, and the padding comes after every real
    token, so the result at real positions is the same, and SDPA's is_causal path builds no
    [B, 1, T, S] tensor (its forward is ~2x faster than with a mask on CPU). Padding positions then
    see real tokens; their outputs carry no loss and are never read.
    """
    if attention_mask is None or (past == 0 and right_padded(attention_mask)):
        return None
    S = attention_mask.shape[1]
    q_pos = torch.arange(past, past + T, device=device)
    causal = torch.arange(S, device=device)[None, :] <= q_pos[:, None]  # [T, S]
    seg_q = attention_mask[:, past:past + T]  # [B, T]
    same = seg_q[:, :, None] == attention_mask[:, None, :]  # [B, T, S]
    return (causal[None] & same)[:, None]


def attends_per_conversation(device):
    """Packed rows: one attention call per conversation (Attention.per_conversation) on this device?

    On a CPU, yes: it skips the cross-conversation pairs a masked call computes. On a GPU, no: there
    a small kernel costs its launch, not its arithmetic, and the loop launches 2-3 kernels per
    conversation per layer. Measured on an H200 with SmolLM2-135M and packed rows of ~2,300 tokens:
    the loop ran 3.1k tokens/s, one masked call per layer 6.1k, with the same losses to the last
    digit (README, "On a GPU"). Other GPUs (MPS) are taken to behave like CUDA here, unmeasured.
    """
    return torch.device(device).type == "cpu"


def conversation_spans(attention_mask):
    """attention_mask [B, T] of sequence ids -> [(row, start, end), ...] in row-major order, one per
    conversation (a run of equal nonzero ids), or None when some id of a row is not one contiguous
    run: then only a mask can say who sees whom."""
    B, T = attention_mask.shape
    change = torch.ones(B, T, dtype=torch.bool, device=attention_mask.device)
    change[:, 1:] = attention_mask[:, 1:] != attention_mask[:, :-1]
    rows, starts = change.nonzero(as_tuple=True)  # every run's first position
    ids = attention_mask[rows, starts].tolist()
    rows, starts = rows.tolist(), starts.tolist()
    ends = [s2 if b2 == b else T for b, b2, s2 in zip(rows, rows[1:] + [None], starts[1:] + [T])]
    spans = [(b, s, e) for b, s, e, i in zip(rows, starts, ends, ids) if i != 0]
    if len({(b, i) for b, i in zip(rows, ids) if i != 0}) != len(spans):
        return None  # an id that comes back later in its row
    return spans


class SmolLM(nn.Module):
    """The decoder-only language model. forward: input_ids [B, T] -> logits [B, T, V]."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            layers=nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers)),
            norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight  # one Parameter, two uses
        # Activation checkpointing per decoder block (see hidden_states): less memory, one more
        # forward pass of every block during backward. A plain switch the trainer sets.
        self.grad_checkpointing = False
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

    def hidden_states(self, input_ids, position_ids=None, attention_mask=None, cache=None):
        """input_ids [B, T] -> final normalised hidden states [B, T, D] (before lm_head).

        position_ids [B, T]: defaults to cache.length + 0..T-1. Packed rows restart them per conversation.
        attention_mask [B, S]: sequence ids, 0 = padding (see build_attn_mask); S = cache length + T.
        cache: a KVCache, extended in place.
        """
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if attention_mask is not None and attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask has shape {list(attention_mask.shape)}, expected [B, cache length + T]"
                             f" = {[B, past + T]}: with a cache it covers the whole sequence")
        if cache is not None and attention_mask is not None:
            cache.mask = attention_mask
        elif cache is not None and cache.mask is not None:
            raise ValueError("this cache was started with an attention_mask: pass the full [B, S] mask on every call")
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        attn_mask = None  # plain causal (see build_attn_mask): checked once here, not in every layer
        if attention_mask is not None and not (past == 0 and right_padded(attention_mask)):
            # Packed rows (no cache) on a CPU: one causal attention per conversation; otherwise a dense mask.
            per_conv = cache is None and attends_per_conversation(input_ids.device)
            spans = conversation_spans(attention_mask) if per_conv else None
            attn_mask = spans or build_attn_mask(attention_mask, past, T, input_ids.device)
        # Checkpointing keeps only each block's input [B, T, D] for backward and runs the block
        # again to get the rest. Only when a backward will follow, and never with a cache: a
        # recomputed block would append its keys and values to the cache a second time.
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for block in self.model.layers:
            if recompute:
                # use_reentrant=False: the reentrant variant gives no gradient to the block's weights
                # when its input does not require grad (LoRA on a frozen embedding), and this one
                # also works with autograd's saved-tensor hooks. The RNG state is saved and restored
                # for the recompute, so a dropout inside (LoRA dropout) draws the same mask twice.
                x = checkpoint(block, x, cos, sin, attn_mask, None, use_reentrant=False)
            else:
                x = block(x, cos, sin, attn_mask, cache)
        return self.model.norm(x)

    def forward(self, input_ids, position_ids=None, attention_mask=None, cache=None):
        """input_ids [B, T] -> logits [B, T, V] (same arguments as hidden_states)."""
        return self.lm_head(self.hidden_states(input_ids, position_ids, attention_mask, cache))

    def num_parameters(self):
        return sum(p.numel() for p in self.parameters())  # a tied matrix counts once
