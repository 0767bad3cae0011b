"""Packed rows on a CPU: one causal attention per conversation instead of one masked call. Lesson 11.

A packed row holds several conversations (data.pack_to_budget). model.py's plain path gives every
layer a block-diagonal causal mask [B, 1, T, T]: SDPA then computes every query-key pair of the row and
throws the cross-conversation ones away, and its kernels cannot skip them. Here each conversation
gets its own causal call, which computes only the pairs that count and builds no mask, so a long
packed row costs no more attention than its conversations alone.

On a CPU only: a GPU pays per kernel launched rather than per pair, and this loop launches a few
kernels per conversation per layer. docs/speed.md has both measurements.
"""
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
