"""loss.py against PyTorch's own cross-entropy, and the chunked path against the plain one."""
import pytest
import torch
import torch.nn.functional as F

from minisft.loss import (
    IGNORE_INDEX,
    chunked_cross_entropy,
    chunked_token_stats,
    masked_cross_entropy,
    mean_entropy,
    shift_labels,
    token_accuracy,
)
from minisft.model import ModelConfig, SmolLM


def make_batch(B=3, T=17, V=50, D=8, p_mask=0.4, dtype=torch.float64, seed=0):
    """Random logits/hidden/weight and labels with a random -100 mask (plus some fully masked rows' prefixes)."""
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(B, T, V, generator=g)).to(dtype)
    hidden = torch.randn(B, T, D, generator=g).to(dtype)
    weight = torch.randn(V, D, generator=g).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < p_mask] = IGNORE_INDEX
    labels[0, : T // 2] = IGNORE_INDEX  # a masked prompt
    return logits, hidden, weight, labels


def reference_ce(logits, labels):
    """PyTorch's cross-entropy on shifted, flattened inputs: the number ours must reproduce."""
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


def test_shift_labels():
    labels = torch.tensor([[5, 6, 7, 8]])
    assert shift_labels(labels).tolist() == [[6, 7, 8]]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-6)])
@pytest.mark.parametrize("seed,p_mask", [(0, 0.0), (1, 0.3), (2, 0.8)])
def test_masked_ce_matches_pytorch(dtype, tol, seed, p_mask):
    logits, _, _, labels = make_batch(dtype=dtype, seed=seed, p_mask=p_mask)
    ours_in = logits.clone().requires_grad_()
    ref_in = logits.clone().requires_grad_()
    loss, n = masked_cross_entropy(ours_in, labels)
    ref = reference_ce(ref_in, labels)
    assert n == int((labels[:, 1:] != IGNORE_INDEX).sum()) and n > 0
    assert loss.dim() == 0 and loss.dtype == dtype
    torch.testing.assert_close(loss, ref, rtol=tol, atol=tol)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("seed,p_mask", [(0, 0.0), (3, 0.5)])
def test_masked_ce_matches_transformers_causal_lm_loss(seed, p_mask):
    # transformers' own shift-and-mask (the loss of LlamaForCausalLM(labels=...)): an independent check of the shift.
    loss_utils = pytest.importorskip("transformers.loss.loss_utils")
    logits, _, _, labels = make_batch(dtype=torch.float32, seed=seed, p_mask=p_mask)
    ours_in, ref_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss_sum, n = masked_cross_entropy(ours_in, labels)
    ref = loss_utils.ForCausalLMLoss(ref_in, labels, vocab_size=logits.shape[-1])  # mean over targets
    torch.testing.assert_close(loss_sum / n, ref, rtol=1e-6, atol=1e-6)
    (loss_sum / n).backward()
    ref.backward()
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=1e-5, atol=1e-7)
    # Unshifted scoring (position t against labels[t]) is a different number: the check can fail.
    wrong = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    assert not torch.isclose(wrong, ref, rtol=1e-3)


def test_masked_ce_large_logits_are_stable():
    # Without the max subtraction exp(1000) overflows to inf.
    logits, _, _, labels = make_batch(dtype=torch.float32)
    logits = logits + 1000.0
    loss, _ = masked_cross_entropy(logits, labels)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, reference_ce(logits, labels), rtol=1e-5, atol=1e-4)


def test_masked_ce_half_precision_computes_in_float32():
    logits, _, _, labels = make_batch(dtype=torch.bfloat16)
    loss, _ = masked_cross_entropy(logits, labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference_ce(logits.float(), labels), rtol=1e-6, atol=1e-5)


def test_first_label_is_never_a_target():
    logits, _, _, labels = make_batch(dtype=torch.float64, p_mask=0.0)
    other = labels.clone()
    other[:, 0] = IGNORE_INDEX
    a, na = masked_cross_entropy(logits, labels)
    b, nb = masked_cross_entropy(logits, other)
    assert na == nb == int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert a.item() == b.item()


@pytest.mark.parametrize("fn", ["plain", "chunked"])
def test_all_masked_gives_zero_without_nan(fn):
    logits, hidden, weight, labels = make_batch(dtype=torch.float32)
    labels[:] = IGNORE_INDEX
    labels[:, 0] = 3  # position 0 is never a target, so still nothing to train on
    leaves = [t.clone().requires_grad_() for t in ((logits,) if fn == "plain" else (hidden, weight))]
    loss, n = masked_cross_entropy(*leaves, labels) if fn == "plain" else chunked_cross_entropy(*leaves, labels)
    assert n == 0 and loss.item() == 0.0
    loss.backward()  # a graph exists, and it yields zeros, not NaN
    for leaf in leaves:
        assert leaf.grad is not None and torch.all(leaf.grad == 0)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 16, 29, 10_000])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_chunked_matches_plain(chunk_size, dtype, tol):
    _, hidden, weight, labels = make_batch(B=3, T=21, V=64, D=16, p_mask=0.3, dtype=dtype, seed=4)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    plain, n1 = masked_cross_entropy(h1 @ w1.T, labels)
    chunked, n2 = chunked_cross_entropy(h2, w2, labels, chunk_size=chunk_size)
    assert n1 == n2 > 0
    torch.testing.assert_close(chunked, plain, rtol=tol, atol=tol)
    plain.backward()
    chunked.backward()
    torch.testing.assert_close(h2.grad, h1.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_in_half_precision_on_the_cpu_matches_autograd(dtype):
    """A half-precision weight on the CPU is read through a transposed copy for dh (_slow_half_mm): the same
    loss and gradients as autograd through the full logits in that dtype, to its rounding."""
    _, hidden, weight, labels = make_batch(B=3, T=21, V=64, D=16, p_mask=0.3, dtype=torch.float32, seed=6)
    h1, w1 = hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
    h2, w2 = hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
    plain, n1 = masked_cross_entropy(h1 @ w1.T, labels)
    chunked, n2 = chunked_cross_entropy(h2, w2, labels, chunk_size=7)
    assert n1 == n2 > 0
    torch.testing.assert_close(chunked, plain, rtol=1e-3, atol=1e-3)
    plain.backward()
    chunked.backward()
    assert h2.grad.dtype == w2.grad.dtype == dtype
    torch.testing.assert_close(h2.grad, h1.grad)  # the dtype's own tolerance
    # dW is summed chunk by chunk in the dtype, each sum rounded: a few roundings of the largest entry.
    scale = 4 * torch.finfo(dtype).eps * w1.grad.abs().max().item()
    torch.testing.assert_close(w2.grad, w1.grad, rtol=0, atol=scale)


@pytest.mark.parametrize("rows", [1, 3, 8, 64, None])
def test_entropy_pass_gives_the_same_numbers_for_any_block_size(rows):
    """_exp_rows_ (8-row blocks on a CPU, 64 on a GPU): exp in place and sum(exp(y) * y) per row, whatever the block."""
    from minisft.loss import _exp_rows_

    y = torch.randn(29, 50, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    out = _exp_rows_(yc := y.clone(), rows)
    torch.testing.assert_close(yc, y.exp(), rtol=0, atol=0)
    torch.testing.assert_close(out, (y.exp() * y).sum(-1))


def test_chunked_told_the_target_count_gives_the_same_loss_and_gradients():
    """n_targets counted on the host (data.to_device) finds the rows with nonzero_static instead of a
    boolean index (no host sync on a GPU): the same loss and gradients, bit for bit."""
    _, hidden, weight, labels = make_batch(B=3, T=21, V=64, D=16, p_mask=0.3, dtype=torch.float32, seed=5)
    results = []
    for n in (None, int((shift_labels(labels) != IGNORE_INDEX).sum())):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, count = chunked_cross_entropy(h, w, labels, chunk_size=7, n_targets=n)
        loss.backward()
        results.append((loss, count, h.grad, w.grad))
    (l1, n1, h1, w1), (l2, n2, h2, w2) = results
    assert n1 == n2 > 0 and torch.equal(l1, l2) and torch.equal(h1, h2) and torch.equal(w1, w2)


def test_chunked_gradient_computed_in_forward_takes_the_callers_scale():
    """The gradients are made in forward; backward scales them by what comes back (the trainer divides
    the sum by the step's target count), and a second backward through the same graph is refused."""
    _, hidden, weight, labels = make_batch(B=2, T=15, V=40, D=8, p_mask=0.3, dtype=torch.float64, seed=7)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    plain, n = masked_cross_entropy(h1 @ w1.T, labels)
    chunked, _ = chunked_cross_entropy(h2, w2, labels, chunk_size=4)
    (plain / n * -2.5).backward()
    (chunked / n * -2.5).backward(retain_graph=True)
    torch.testing.assert_close(h2.grad, h1.grad)
    torch.testing.assert_close(w2.grad, w1.grad)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        chunked.backward()


def test_chunked_under_no_grad_projects_once():
    """Evaluation runs under no_grad: the loss alone, one matmul per chunk, no gradients made."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMatmuls(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm_, torch.ops.aten.addmm):
                CountMatmuls.n += 1
            return func(*args, **(kwargs or {}))

    _, hidden, weight, labels = make_batch(B=2, T=9, V=30, D=8, p_mask=0.0, dtype=torch.float32, seed=1)
    hidden.requires_grad_()
    weight.requires_grad_()
    with torch.no_grad(), CountMatmuls():
        chunked_cross_entropy(hidden, weight, labels, chunk_size=100)
    assert CountMatmuls.n == 1
    with CountMatmuls():  # with a backward to come: the logits, then dh and dW
        chunked_cross_entropy(hidden, weight, labels, chunk_size=100)
    assert CountMatmuls.n == 1 + 3


def saved_bytes(fn):
    """Run fn() and return the bytes of distinct storages autograd keeps alive for backward."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def test_chunked_keeps_no_full_logits_for_backward():
    B, T, V, D, chunk = 2, 64, 512, 8, 16
    _, hidden, weight, labels = make_batch(B=B, T=T, V=V, D=D, p_mask=0.0, dtype=torch.float32)
    hidden.requires_grad_()
    weight.requires_grad_()
    logits_bytes = int((labels[:, 1:] != IGNORE_INDEX).sum()) * V * 4  # float32 [N, V]
    # The plain path keeps at least the full logits: this check can fail.
    _, plain = saved_bytes(lambda: masked_cross_entropy(hidden @ weight.T, labels))
    assert plain >= logits_bytes
    # The chunked path keeps its inputs (weight, the selected hidden rows) and no logits of any chunk.
    (loss, _), chunked = saved_bytes(lambda: chunked_cross_entropy(hidden, weight, labels, chunk_size=chunk))
    assert chunked < logits_bytes // 4, f"{chunked} bytes saved for backward vs {logits_bytes} for full logits"
    loss.backward()  # the gradients kept for backward reach both inputs
    assert hidden.grad is not None and weight.grad is not None


def test_chunked_without_grad_and_mixed_requires_grad():
    _, hidden, weight, labels = make_batch(dtype=torch.float64)
    ref, n = masked_cross_entropy(hidden @ weight.T, labels)
    with torch.no_grad():
        out, m = chunked_cross_entropy(hidden, weight, labels, chunk_size=5)
    assert m == n
    torch.testing.assert_close(out, ref)
    w = weight.clone().requires_grad_()  # frozen hidden, trainable weight
    out, _ = chunked_cross_entropy(hidden, w, labels, chunk_size=5)
    out.backward()
    w_ref = weight.clone().requires_grad_()
    masked_cross_entropy(hidden @ w_ref.T, labels)[0].backward()
    torch.testing.assert_close(w.grad, w_ref.grad)


def test_chunked_on_a_tiny_smollm_matches_full_logits():
    cfg = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    torch.manual_seed(0)
    model = SmolLM(cfg).double()
    ids = torch.randint(0, 96, (2, 12))
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX
    full, n = masked_cross_entropy(model(ids), labels)
    full.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    chunked, m = chunked_cross_entropy(model.hidden_states(ids), model.lm_head.weight, labels, chunk_size=4)
    chunked.backward()
    assert n == m == 2 * 7  # positions 5..11 of each row are targets
    torch.testing.assert_close(chunked, full, rtol=1e-10, atol=1e-10)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[k], rtol=1e-9, atol=1e-10, msg=k)


def direct_stats(logits, labels):
    """Accuracy and entropy computed the obvious way, with PyTorch's log_softmax in float64."""
    x = logits[:, :-1].double()
    t = labels[:, 1:]
    keep = t != IGNORE_INDEX
    logp = F.log_softmax(x, dim=-1)
    correct = ((x.argmax(-1) == t) & keep).sum().item()
    entropy = (-(logp.exp() * logp).sum(-1))[keep].sum().item()
    return correct, entropy, keep.sum().item()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_accuracy_and_entropy(seed):
    logits, _, _, labels = make_batch(dtype=torch.float32, seed=seed)
    # Make some predictions right so accuracy is not trivially ~1/V.
    t = labels[:, 1:]
    hit = (t != IGNORE_INDEX) & (torch.rand(t.shape, generator=torch.Generator().manual_seed(seed)) < 0.5)
    logits[:, :-1][hit] = logits[:, :-1][hit].scatter(-1, t[hit].unsqueeze(-1), 100.0)
    correct, entropy, n = direct_stats(logits, labels)
    assert correct >= hit.sum().item() > 0
    assert token_accuracy(logits, labels) == (correct, n)
    e, m = mean_entropy(logits, labels)
    assert m == n and e == pytest.approx(entropy, rel=1e-5)


def test_chunked_token_stats_match_full_logits():
    _, hidden, weight, labels = make_batch(B=3, T=21, V=64, D=16, dtype=torch.float64, seed=7)
    logits = hidden @ weight.T
    c, e, n = chunked_token_stats(hidden, weight, labels, chunk_size=6)
    assert (c, n) == token_accuracy(logits, labels)
    assert e == pytest.approx(mean_entropy(logits, labels)[0], rel=1e-12)


def test_entropy_bounds():
    labels = torch.tensor([[0, 1, 2]])
    uniform = torch.zeros(1, 3, 10)
    e, n = mean_entropy(uniform, labels)
    assert n == 2 and e == pytest.approx(2 * torch.log(torch.tensor(10.0)).item(), rel=1e-6)
    peaked = torch.full((1, 3, 10), -50.0)
    peaked[..., 4] = 50.0
    assert mean_entropy(peaked, labels)[0] == pytest.approx(0.0, abs=1e-6)


def test_bad_input_is_named():
    logits, hidden, weight, labels = make_batch(V=50)
    with pytest.raises(ValueError, match="neither -100 nor a token id"):
        masked_cross_entropy(logits, torch.where(labels == IGNORE_INDEX, labels, 50))
    with pytest.raises(ValueError, match="neither -100 nor a token id"):
        chunked_cross_entropy(hidden, weight, torch.where(labels == IGNORE_INDEX, labels, -1))
    with pytest.raises(ValueError, match=r"labels \[B, T\]"):
        masked_cross_entropy(logits, labels[:, 1:])
    with pytest.raises(ValueError, match="weight"):
        chunked_cross_entropy(hidden, weight.T, labels)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_cross_entropy(hidden, weight, labels, chunk_size=0)
