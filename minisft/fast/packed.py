"""Packed rows: attention that stays inside each conversation without a dense mask. Lesson 11.

A packed row holds several conversations (data.pack_to_budget). model.py's plain path gives every
layer a block-diagonal causal mask [B, 1, T, T]: SDPA then computes every query-key pair of the row and
throws the cross-conversation ones away, and its kernels cannot skip them. Here each conversation
gets its own causal call, which computes only the pairs that count and builds no mask, so a long
packed row costs no more attention than its conversations alone.

On a CPU only: a GPU pays per kernel launched rather than per pair, and this loop launches a few
kernels per conversation per layer. docs/speed.md has both measurements. On CUDA, FlexAttention does
the same in one kernel: a block mask, built once per forward from the sequence ids and shared by every
layer, lists which tiles of the T x T square hold pairs of one conversation, and the compiled kernel
visits only those. FlexAttention has no backward on a CPU, so the CPU keeps the loop above.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F


def attends_per_conversation(device):
    """Packed rows: one attention call per conversation on this device? On a CPU, yes (see above)."""
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


def per_conversation(q, k, v, spans):
    """q [B, H, T, hd], k, v [B, KV, T, hd], spans [(row, start, end)] -> [B, T, H * hd].

    The pieces are cut with unbind and split, not indexing: their backward is one stack and one cat,
    where each indexed slice would get a zero-filled gradient of the whole tensor. Positions outside
    every span (padding) get zeros: they carry no loss and are never read.
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
                                               enable_gqa=k.shape[1] != H)  # [1, H, n, hd]
            pieces.append(y[0].transpose(0, 1).reshape(qs.shape[1], H * hd))
    return torch.cat(pieces).view(B, T, H * hd)


class FlexMask(NamedTuple):
    """What each layer gets for packed rows on CUDA: FlexAttention's block mask."""
    block_mask: object


def attends_with_flex(device):
    """Packed rows through FlexAttention on this device? On CUDA, when this torch has it."""
    if torch.device(device).type != "cuda":
        return False
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def flex_mask(attention_mask):
    """attention_mask [B, T] of sequence ids -> FlexMask: query q sees key k when both hold the same
    id and k <= q, as model.build_attn_mask (padding, id 0, sees earlier padding: never an empty row)."""
    from torch.nn.attention.flex_attention import create_block_mask
    seq = attention_mask
    B, T = seq.shape

    def same_conversation(b, h, q, k):
        return (seq[b, q] == seq[b, k]) & (k <= q)
    return FlexMask(create_block_mask(same_conversation, B, None, T, T, device=seq.device))


_compiled = {}


def flex(q, k, v, mask):
    """q [B, H, T, hd], k, v [B, KV, T, hd], mask: a FlexMask -> [B, T, H * hd]. Compiled on CUDA:
    the eager FlexAttention is a slow reference (kept for a CPU forward, as the tests run it)."""
    from torch.nn.attention.flex_attention import flex_attention
    B, H, T, hd = q.shape
    if q.is_cuda and "flex" not in _compiled:
        _compiled["flex"] = torch.compile(flex_attention, dynamic=False)
    attend = _compiled["flex"] if q.is_cuda else flex_attention
    y = attend(q, k, v, block_mask=mask.block_mask, enable_gqa=k.shape[1] != H)  # [B, H, T, hd]
    return y.transpose(1, 2).reshape(B, T, H * hd)
