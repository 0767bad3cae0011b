"""The training loss of supervised fine-tuning: next-token cross-entropy on the tokens we train on.

Lesson 4 reads this file. It teaches three things:

1. Shift. A causal model's output at position i predicts the token at position i+1, so the
   logits of positions 0..T-2 are scored against the labels of positions 1..T-1. Labels arrive
   UNSHIFTED (labels[i] belongs to input_ids[i]); every function here shifts them itself.
2. Mask. A label of -100 (IGNORE_INDEX) means "no loss here": the prompt, the padding, the first
   token of each packed conversation. Only target positions count.
3. Sum, not mean. Each function returns a SUM and the number of targets. The caller adds sums
   and counts over all micro-batches of one optimizer step and divides once, so every target
   token weighs the same however the batch was cut into micro-batches or padded.

The maths is written out by hand (log-softmax as x - logsumexp(x), then a gather) in float32,
so nothing is hidden in F.cross_entropy. `chunked_cross_entropy` computes the same numbers from
the hidden states without ever holding the full [tokens, V] float32 logits, which for a
49k-token vocabulary are the largest tensor of the whole step; its gradient is written by hand too
(the gradient of cross-entropy is softmax minus the one-hot target), and computed in forward while
each chunk's logits are at hand (docs/speed.md measures what that saves).

Shapes: B batch, T sequence length, V vocab size, D hidden size, N target tokens.
"""
import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift_labels(labels):
    """labels [B, T] (unshifted) -> targets [B, T-1]: targets[:, i] is what position i must predict."""
    return labels[:, 1:]


def _check(scores, labels, what):
    if scores.dim() != 3 or labels.dim() != 2 or scores.shape[:2] != labels.shape:
        raise ValueError(f"loss.py: expected {what} [B, T, ...] and labels [B, T], got {tuple(scores.shape)} and {tuple(labels.shape)}")


def _select_targets(per_position, labels, n=None):
    """Shift and keep target positions only.

    per_position [B, T, X] (logits or hidden states), labels [B, T]
    -> rows [N, X] (the positions that predict a trained token), targets [N] (those tokens)
    n: N when the caller counted it on the host (data.to_device). A boolean index must learn N from
    the device first, which on a GPU makes the CPU wait; nonzero_static, told N, does not.
    """
    rows = per_position[:, :-1]  # the last position predicts nothing we know
    targets = shift_labels(labels)
    keep = targets != IGNORE_INDEX
    if n is None:
        return rows[keep], targets[keep]
    where = torch.nonzero_static(keep.reshape(-1), size=n)[:, 0]  # [N] flat positions, in order
    return rows.reshape(-1, rows.shape[-1]).index_select(0, where), targets.reshape(-1).index_select(0, where)


def _check_ids(targets, vocab_size):
    # A label outside [0, V) would make gather fail with an unreadable index error; say what is wrong instead.
    # On the CPU only: on a GPU, reading min and max would make the CPU wait at every micro-batch. The
    # trainer checks once, at the start, that the tokenizer's ids fit the model (Tokenizer.check_fits).
    if targets.device.type == "cpu" and targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab_size):
        bad = targets[(targets < 0) | (targets >= vocab_size)][0].item()
        raise ValueError(f"loss.py: label {bad} is neither {IGNORE_INDEX} nor a token id in [0, {vocab_size})")


def _float32(x):
    """Upcast half precision to float32 for the softmax maths; float64 stays float64 (used by tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _logsumexp(x):
    """x [N, V] -> log(sum(exp(x))) [N]. Subtracting the row max first keeps exp() from overflowing;
    the max is added back, so the result is exact. (The max is treated as a constant: its
    gradient contributions cancel, so detaching it changes nothing but the graph size.)"""
    m = x.max(dim=-1, keepdim=True).values.detach()
    return (x - m).exp().sum(dim=-1).log() + m.squeeze(-1)


def _nll_sum(logits, targets):
    """logits [N, V] (any float dtype), targets [N] -> sum of -log p(target) as a 0-dim tensor.

    -log softmax(x)[t] = logsumexp(x) - x[t]
    """
    x = _float32(logits)
    target_logit = x.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [N]
    return (_logsumexp(x) - target_logit).sum()


def masked_cross_entropy(logits, labels):
    """Summed next-token cross-entropy over the trained positions.

    logits [B, T, V] (any float dtype), labels [B, T] long, unshifted, -100 = no loss
    -> (loss_sum: 0-dim float32 tensor (float64 for float64 logits), n_targets: int)

    Mean loss = loss_sum / n_targets, taken by the caller. With no target at all, loss_sum is
    0.0 (still connected to `logits`, so backward() works and gives zero gradients) and n_targets 0.
    """
    _check(logits, labels, "logits")
    x, targets = _select_targets(logits, labels)  # [N, V], [N]
    _check_ids(targets, logits.shape[-1])
    return _nll_sum(x, targets), targets.numel()


def chunked_cross_entropy(hidden, weight, labels, chunk_size=1024, stats=None, n_targets=None):
    """The same loss as masked_cross_entropy(hidden @ weight.T, labels), computed chunk by chunk.

    hidden [B, T, D] final hidden states (model.hidden_states), weight [V, D] (model.lm_head.weight),
    labels [B, T] unshifted -> (loss_sum: 0-dim float32 tensor, n_targets: int)

    Two savings. First, masked positions are dropped BEFORE the output projection: in SFT most
    tokens are prompt or padding, and their logits would only be thrown away. Second, the N
    remaining rows are projected `chunk_size` at a time, so at most [chunk_size, V] float32 logits
    exist at once: each chunk's logits become the gradients of h and weight right away, and only
    those [N, D] and [V, D] gradients wait for backward (_LinearCrossEntropy says how).

    stats: None, or a dict that gains (adds to) "correct" and "entropy" (0-dim tensors): the number of
    targets the model ranks first and the summed entropy of its predictions, read off each chunk's
    logits while they exist (the trainer logs them as TRL's mean_token_accuracy and entropy).
    n_targets: N, when counted on the host already (_select_targets says why).
    """
    _check(hidden, labels, "hidden")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"loss.py: expected weight [V, {hidden.shape[-1]}], got {tuple(weight.shape)}")
    if chunk_size < 1:
        raise ValueError(f"loss.py: chunk_size must be >= 1, got {chunk_size}")
    h, targets = _select_targets(hidden, labels, n_targets)  # [N, D], [N]
    _check_ids(targets, weight.shape[0])
    # Inside a Function's forward grad mode is always off and needs_input_grad ignores no_grad(), so
    # whether a backward can come (evaluation: no) is decided here, out of forward.
    grads = torch.is_grad_enabled()
    return _LinearCrossEntropy.apply(h, weight, targets, chunk_size, grads, stats), targets.numel()


def _mm_dtype(t):
    """The dtype lm_head's matmul runs in: autocast's (bfloat16 on CUDA) when it is on, else t's own."""
    on = torch.is_autocast_enabled(t.device.type)
    return torch.get_autocast_dtype(t.device.type) if on and t.is_floating_point() else t.dtype


def _slow_half_mm(w):
    """True for a half-precision weight on a CPU (where the layout of a product's right operand matters)."""
    return w.device.type == "cpu" and w.dtype in (torch.bfloat16, torch.float16)


def _chunk_buffer(hc, wc, chunk_size):
    """One [min(chunk_size, N), V] buffer that every chunk's logits are written into: a fresh tensor
    of this size per chunk would be fresh memory the OS hands out page by page, each time."""
    return torch.empty(min(chunk_size, max(hc.shape[0], 1)), wc.shape[0], dtype=hc.dtype, device=hc.device)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of logsumexp(h W^T) - (h W^T)[target], with its gradient computed in forward.

    h [N, D], weight [V, D], targets [N] -> 0-dim loss sum.

    The gradient of -log softmax(x)[t] with respect to the logits x is softmax(x) - onehot(t), and
    the loss is the last operation of the step: whatever the caller does with the sum (divide it by
    the step's target count), the gradient that comes back is one number, `grad`. So forward,
    while each chunk's logits are at hand, turns them into that gradient in place (exp, divide by
    the sum: softmax; subtract 1 at the target) and runs the two matmuls that give dh [N, D] and
    dW [V, D]. Backward only scales them by `grad`. The other way, keeping the rows and
    re-projecting each chunk in backward, runs the largest matmul of the step twice (docs/speed.md
    has its cost); this way keeps dh and dW from forward to backward
    instead, and dW is the size of the weight's own gradient, which backward makes anyway.
    Left to autograd, the same maths would save every chunk's [c, V] logits: no chunking at all.
    With no gradient needed (evaluation), forward computes the loss only.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_size, grads, stats=None):
        need_h, need_w = (grads and need for need in ctx.needs_input_grad[:2])
        dtype = _mm_dtype(h)
        hc, wc = h.to(dtype), weight.to(dtype)
        loss = torch.zeros((), dtype=torch.promote_types(dtype, torch.float32), device=h.device)
        dh = torch.empty_like(h) if need_h else None
        dw = torch.zeros_like(weight) if need_w else None
        buf = _chunk_buffer(hc, wc, chunk_size)
        # dh = d @ W with W [V, D] stored row by row: on a CPU without bfloat16 units PyTorch's half-precision
        # product of that layout is far slower than with W stored column by column ([D, V], read transposed),
        # so there W is copied that way once (docs/speed.md has the measurement).
        wd = wc.t().contiguous().t() if need_h and _slow_half_mm(wc) else wc  # [V, D], the same numbers
        for s in range(0, h.shape[0], chunk_size):
            rows = slice(s, s + chunk_size)
            x = _float32(torch.mm(hc[rows], wc.t(), out=buf[:hc[rows].shape[0]]))  # [c, V] logits
            target_logit = x.gather(-1, targets[rows, None]).squeeze(-1)  # [c], read before x is overwritten
            # _logsumexp's maths, in place: no second and third [c, V] tensor.
            m = x.max(dim=-1, keepdim=True).values
            x.sub_(m)
            if stats is None:
                x.exp_()  # x now holds exp(x - m)
            else:  # the same exp, and sum(exp(x - m) * (x - m)) per row for the entropy
                ey_y = _exp_rows_(x)
            total = x.sum(dim=-1, keepdim=True)
            loss += (total.log() + m - target_logit[:, None]).sum()
            if stats is not None:  # accuracy is a [c] compare; the entropy came with the exp (_exp_rows_)
                _add(stats, "correct", (target_logit >= m[:, 0]).sum())  # the target is the top logit
                _add(stats, "entropy", (total[:, 0].log() - ey_y / total[:, 0]).sum())
            if not (need_h or need_w):
                continue
            d = x.div_(total)  # softmax
            d[torch.arange(d.shape[0], device=d.device), targets[rows]] -= 1  # - onehot(target)
            d = d.to(dtype)  # dloss/dlogits, in the matmul's dtype (as autograd would)
            if need_h:
                dh[rows] = d @ wd  # [c, D]
            if need_w:  # [V, D]; in place when the dtypes agree (no second [V, D] tensor per chunk), else
                # (under autocast) the bf16 product is summed into the weight's float32 gradient
                if dw.dtype == d.dtype:
                    dw.addmm_(d.t(), hc[rows])
                else:
                    dw += d.t() @ hc[rows]
        ctx.save_for_backward(dh, dw)  # what backward needs; saved tensors, so memory counts see them
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # grad: 0-dim, d(what the caller computed)/d(loss sum)
        dh, dw = ctx.saved_tensors
        # Scaled in place: the graph is freed after this backward (a second one through it would be
        # refused by autograd's check of the saved tensors' versions, not given wrong numbers).
        return (None if dh is None else dh.mul_(grad.to(dh.dtype)),
                None if dw is None else dw.mul_(grad.to(dw.dtype)), None, None, None, None)


def _add(stats, key, value):
    """stats[key] += value, where the value stays a tensor on its device (no sync per chunk)."""
    value = value.detach().double()
    stats[key] = stats[key] + value if key in stats else value


def _exp_rows_(y, rows=None):
    """y [c, V] = logits - row max -> y holds exp(y), in place; returns sum(exp(y) * y) per row [c].

    That sum gives the entropy of each row's softmax without a log over [c, V]: with e = exp(y) and
    p = e / total, H = -sum p log p = log(total) - sum(e * y) / total. `rows` rows at a time, so the
    temporary e is [rows, V], not another [c, V]. On a CPU 8 rows of a 49k vocabulary (1.5 MB) stay in a
    core's cache from the exp to the dot product (docs/speed.md: what the block size costs); on a GPU each
    block is four kernel launches, so the blocks are larger there (64 rows)."""
    rows = rows or (8 if y.device.type == "cpu" else 64)
    out = y.new_empty(y.shape[0])
    for i in range(0, y.shape[0], rows):
        block = y[i:i + rows]
        e = block.exp()
        out[i:i + rows] = torch.linalg.vecdot(e, block)
        block.copy_(e)
    return out


@torch.no_grad()
def _stats(x, targets):
    """x [N, V] logits, targets [N] -> (n_correct, entropy_sum) as (int, float)."""
    x = _float32(x)
    n_correct = int((x.argmax(dim=-1) == targets).sum())
    # H(p) = -sum_v p_v log p_v, with the same hand-written log-softmax as the loss.
    log_p = x - _logsumexp(x).unsqueeze(-1)  # [N, V]
    entropy = -(log_p.exp() * log_p).sum(dim=-1)
    return n_correct, float(entropy.sum())


def token_accuracy(logits, labels):
    """How many target tokens the model ranks first (greedy argmax).

    logits [B, T, V], labels [B, T] unshifted -> (n_correct: int, n_targets: int)
    """
    _check(logits, labels, "logits")
    x, targets = _select_targets(logits, labels)
    return _stats(x, targets)[0], targets.numel()


def mean_entropy(logits, labels):
    """Entropy (nats) of the predicted next-token distribution, summed over target positions.

    Low entropy = confident predictions; watching it fall while val loss rises is a sign of
    overfitting. logits [B, T, V], labels [B, T] unshifted -> (entropy_sum: float, n_targets: int)
    """
    _check(logits, labels, "logits")
    x, targets = _select_targets(logits, labels)
    return _stats(x, targets)[1], targets.numel()


@torch.no_grad()
def chunked_token_stats(hidden, weight, labels, chunk_size=1024):
    """Accuracy and entropy from hidden states, chunk by chunk (for a loop that never builds full logits).

    hidden [B, T, D], weight [V, D], labels [B, T] unshifted
    -> (n_correct: int, entropy_sum: float, n_targets: int)
    """
    _check(hidden, labels, "hidden")
    if chunk_size < 1:
        raise ValueError(f"loss.py: chunk_size must be >= 1, got {chunk_size}")
    h, targets = _select_targets(hidden, labels)
    n_correct, entropy_sum = 0, 0.0
    for s in range(0, targets.numel(), chunk_size):
        c, e = _stats(F.linear(h[s:s + chunk_size], weight), targets[s:s + chunk_size])
        n_correct, entropy_sum = n_correct + c, entropy_sum + e
    return n_correct, entropy_sum, targets.numel()


def batch_loss(model, batch, chunked=True, stats=None):
    """The loss of one collated micro-batch, as the trainer and the evaluation compute it.

    batch: input_ids, labels, position_ids [B, T], attention_mask [B, T] or None and n_targets (an int,
    or absent) as data.to_device leaves them.
    Returns (loss_sum: 0-dim tensor, n_targets: int): summed token losses, not a mean.
    chunked=True scores the hidden states chunk by chunk (the full logits never exist).
    stats: None, or a dict gaining "correct" and "entropy" sums over the targets (chunked_cross_entropy)."""
    args = (batch["input_ids"], batch["position_ids"], batch["attention_mask"])
    if chunked:
        return chunked_cross_entropy(model.hidden_states(*args), model.lm_head.weight, batch["labels"], stats=stats,
                                     n_targets=batch.get("n_targets"))
    return logits_loss(model(*args), batch["labels"], stats)


def logits_loss(logits, labels, stats=None):
    """masked_cross_entropy(logits [B, T, V], labels [B, T]), and with `stats` a dict, the targets'
    "correct" and "entropy" sums added to it (as chunked_cross_entropy adds them)."""
    if stats is not None:
        n_correct, entropy_sum = _stats(*_select_targets(logits.detach(), labels))
        _add(stats, "correct", torch.tensor(n_correct))
        _add(stats, "entropy", torch.tensor(entropy_sum))
    return masked_cross_entropy(logits, labels)
