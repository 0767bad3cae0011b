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
49k-token vocabulary are the largest tensor of the whole step.

Shapes: B batch, T sequence length, V vocab size, D hidden size, N target tokens.
"""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def shift_labels(labels):
    """labels [B, T] (unshifted) -> targets [B, T-1]: targets[:, i] is what position i must predict."""
    return labels[:, 1:]


def _check(scores, labels, what):
    if scores.dim() != 3 or labels.dim() != 2 or scores.shape[:2] != labels.shape:
        raise ValueError(f"loss.py: expected {what} [B, T, ...] and labels [B, T], got {tuple(scores.shape)} and {tuple(labels.shape)}")


def _select_targets(per_position, labels):
    """Shift and keep target positions only.

    per_position [B, T, X] (logits or hidden states), labels [B, T]
    -> rows [N, X] (the positions that predict a trained token), targets [N] (those tokens)
    """
    rows = per_position[:, :-1]  # the last position predicts nothing we know
    targets = shift_labels(labels)
    keep = targets != IGNORE_INDEX
    return rows[keep], targets[keep]


def _check_ids(targets, vocab_size):
    # A label outside [0, V) would make gather fail with an unreadable index error; say what is wrong instead.
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab_size):
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


def chunked_cross_entropy(hidden, weight, labels, chunk_size=1024):
    """The same loss as masked_cross_entropy(hidden @ weight.T, labels), computed chunk by chunk.

    hidden [B, T, D] final hidden states (model.hidden_states), weight [V, D] (model.lm_head.weight),
    labels [B, T] unshifted -> (loss_sum: 0-dim float32 tensor, n_targets: int)

    Two savings. First, masked positions are dropped BEFORE the output projection: in SFT most
    tokens are prompt or padding, and their logits would only be thrown away. Second, the N
    remaining rows are projected `chunk_size` at a time, so at most [chunk_size, V] float32 logits
    exist at once. Each chunk runs under activation checkpointing: autograd keeps only the chunk's
    inputs and recomputes its logits during backward, instead of keeping every chunk's logits.
    """
    _check(hidden, labels, "hidden")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"loss.py: expected weight [V, {hidden.shape[-1]}], got {tuple(weight.shape)}")
    if chunk_size < 1:
        raise ValueError(f"loss.py: chunk_size must be >= 1, got {chunk_size}")
    h, targets = _select_targets(hidden, labels)  # [N, D], [N]
    _check_ids(targets, weight.shape[0])

    def chunk_loss(h_chunk, weight, t_chunk):
        # F.linear in the model's dtype, exactly what lm_head does, then float32 maths.
        return _nll_sum(F.linear(h_chunk, weight), t_chunk)

    # Recomputing is only worth it when a backward pass will follow.
    saving = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    n = targets.numel()
    # With no target, one empty chunk still gives a 0.0 connected to hidden and weight.
    starts = range(0, n, chunk_size) if n else [0]
    loss_sum = None
    for s in starts:
        args = (h[s:s + chunk_size], weight, targets[s:s + chunk_size])
        part = checkpoint(chunk_loss, *args, use_reentrant=False) if saving else chunk_loss(*args)
        loss_sum = part if loss_sum is None else loss_sum + part
    return loss_sum, n


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


def batch_loss(model, batch, chunked=True):
    """The loss of one collated micro-batch, as the trainer and the evaluation compute it.

    batch: input_ids, labels, position_ids [B, T] and attention_mask [B, T] or None (data.to_device).
    Returns (loss_sum: 0-dim tensor, n_targets: int): summed token losses, not a mean.
    chunked=True scores the hidden states chunk by chunk (the full logits never exist)."""
    args = (batch["input_ids"], batch["position_ids"], batch["attention_mask"])
    if chunked:
        return chunked_cross_entropy(model.hidden_states(*args), model.lm_head.weight, batch["labels"])
    return masked_cross_entropy(model(*args), batch["labels"])
