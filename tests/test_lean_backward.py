"""RMSNormFn, NormLinearsFn and SwiGLUFn (minisft/fast/): hand-written backwards that keep less for
backward. Their gradients pass gradcheck; a model built with them gives the same outputs (bitwise),
losses and gradients as the same model written with plain ops (full fine-tuning, checkpointing, LoRA,
bf16 autocast, biased MLPs, frozen MLPs), float32 and bf16 autocast gradients bit for bit; a decoder
layer keeps exactly two [D] per norm (its float32 normalised x, and the normalised x the Linears read)
and two [I] (silu output, down_proj input) less per token; and a forward with no backward to come
never goes through them."""
import contextlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from minisft import memory
from minisft.lora import add_lora
from minisft.loss import chunked_cross_entropy
from minisft import fast
from minisft.fast import modules as fast_modules
from minisft.fast.functions import NormLinearsFn, RMSNormFn, SwiGLUFn
from minisft.model import ModelConfig, RMSNorm, SmolLM

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5)


# ---- the reference: the same model written with plain ops (what autograd sees without the Functions)
def plain_norm(self, x):
    dtype = x.dtype
    x = x.to(torch.promote_types(dtype, torch.float32))
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
    return self.weight * x.to(dtype)


def plain_project(norm, linears, x):
    y = x if norm is None else norm(x)
    return tuple(m(y) for m in linears)


@contextlib.contextmanager
def plain_ops(model):
    """The same model, the same parameters, run as model.py's plain modules (fast.apply undone)."""
    back = {twin: plain for plain, twin in fast_modules.TWINS.items()}
    swapped = [(m, type(m)) for m in model.modules() if type(m) in back]
    for m, cls in swapped:
        m.__class__ = back[cls]
    try:
        yield
    finally:
        for m, cls in swapped:
            m.__class__ = cls


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = (1 + 0.3 * torch.randn(6, dtype=torch.float64, generator=g)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: RMSNormFn.apply(x, w, 1e-5), (x, w))
    gate = torch.randn(2, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    up = torch.randn(2, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(SwiGLUFn.apply, (gate, up))
    down = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)  # [D, I]
    assert torch.autograd.gradcheck(SwiGLUFn.apply, (gate, up, down))
    wq = torch.randn(5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    wk = torch.randn(3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, a, b: NormLinearsFn.apply(x, w, 1e-5, a, b), (x, w, wq, wk))


@pytest.mark.parametrize("autocast", [False, True])
def test_swiglu_with_down_proj_matches_linear(autocast):
    """SwiGLUFn(g, u, w) against nn.Linear on the plain product: the same output bits, the same gradients."""
    g = torch.Generator().manual_seed(7)
    gate0, up0 = torch.randn(3, 5, 24, generator=g), torch.randn(3, 5, 24, generator=g)
    w0 = 0.2 * torch.randn(16, 24, generator=g)
    dy = torch.randn(3, 5, 16, generator=g)

    def run(fused):
        gate, up, w = (t.clone().requires_grad_() for t in (gate0, up0, w0))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            a, b = gate.to(torch.bfloat16) if autocast else gate, up.to(torch.bfloat16) if autocast else up
            if fused:
                y = SwiGLUFn.apply(a, b, w.to(torch.bfloat16) if autocast else w)
            else:
                y = F.linear(F.silu(a) * b, w)
        (y.float() * dy).sum().backward()
        return y, gate.grad, up.grad, w.grad

    ours, ref = run(True), run(False)
    assert ours[0].dtype == ref[0].dtype and torch.equal(ours[0], ref[0])
    for a, b in zip(ours[1:], ref[1:]):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, **(dict(rtol=2 ** -7, atol=1e-4) if autocast else dict(rtol=1e-6, atol=1e-7)))


@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                              (torch.bfloat16, torch.bfloat16), (torch.float64, torch.float64)])
def test_same_outputs_and_gradients_as_plain_ops(x_dtype, w_dtype):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 5, 16, generator=g).to(x_dtype)
    w0 = (1 + 0.3 * torch.randn(16, generator=g)).to(w_dtype)
    gate0, up0 = torch.randn(3, 5, 24, generator=g).to(x_dtype), torch.randn(3, 5, 24, generator=g).to(x_dtype)
    # A bf16 gradient is rounded in a different order: 1 bf16 step apart at most.
    tol = dict(rtol=2 ** -7, atol=1e-5) if torch.bfloat16 in (x_dtype, w_dtype) else dict(rtol=1e-6, atol=1e-7)

    def run(norm, swiglu):
        x, w, gate, up = (t.clone().requires_grad_() for t in (x0, w0, gate0, up0))
        y, h = norm(x, w), swiglu(gate, up)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(y.dtype)
        dh = torch.randn(h.shape, generator=torch.Generator().manual_seed(3)).to(h.dtype)
        ((y * dy).sum() + (h * dh).sum()).backward()
        return y, h, x.grad, w.grad, gate.grad, up.grad

    ours = run(lambda x, w: RMSNormFn.apply(x, w, 1e-5), SwiGLUFn.apply)
    ref = run(lambda x, w: plain_norm(SimpleNamespace(eps=1e-5, weight=w), x), lambda a, b: F.silu(a) * b)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])  # forward: bitwise
    for a, b in zip(ours[2:], ref[2:]):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, **tol)
    # The module's no-grad path gives the same bits as its Function path.
    mod = fast.apply(RMSNorm(16, 1e-5).to(w_dtype))
    mod.weight.data.copy_(w0)
    with torch.no_grad():
        assert torch.equal(mod(x0), ours[0])


def loss_and_grads(model, ids, labels, autocast=False):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # LoRA dropout draws the same masks in both runs
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        hidden = model.hidden_states(ids)
        loss_sum, n = chunked_cross_entropy(hidden, model.lm_head.weight, labels)
    (loss_sum / n).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    return hidden.detach(), loss_sum.detach() / n, grads


@pytest.mark.parametrize("setting", ["float32", "float64", "checkpointing", "lora", "lora on the mlp", "bf16 autocast",
                                     "mlp bias", "frozen mlps"])
def test_model_same_loss_and_gradients_as_plain_ops(setting):
    torch.manual_seed(0)
    model = fast.apply(SmolLM(ModelConfig(**TINY, mlp_bias=setting == "mlp bias")).train())
    if setting == "frozen mlps":  # --freeze-top-mlps: no gradient for down_proj.weight, nor gate/up
        model.model.layers[-1].mlp.requires_grad_(False)
    with torch.no_grad():  # norm gains away from 1, so their gradient paths are exercised
        for m in model.modules():
            if isinstance(m, RMSNorm):
                m.weight.add_(0.2 * torch.randn_like(m.weight))
    if setting == "float64":
        model.double()
    model.grad_checkpointing = setting == "checkpointing"
    if setting.startswith("lora"):  # on the MLP only: q, k, v stay plain, frozen Linears in NormLinearsFn
        add_lora(model, r=4, alpha=8, dropout=0.1, targets="all-linear" if setting == "lora" else "gate_proj,up_proj")
        with torch.no_grad():  # B = 0 would give A no gradient
            for name, p in model.named_parameters():
                if name.endswith("lora_B"):
                    p.normal_(0, 0.02)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(4))
    labels = ids.clone()
    labels[:, :3] = -100
    autocast = setting == "bf16 autocast"
    hidden, loss, grads = loss_and_grads(model, ids, labels, autocast)
    with plain_ops(model):
        ref_hidden, ref_loss, ref_grads = loss_and_grads(model, ids, labels, autocast)
    assert torch.equal(hidden, ref_hidden) and torch.equal(loss, ref_loss)  # the forward is bitwise the same
    tol = {"float64": 1e-12, "bf16 autocast": 1e-2}.get(setting, 1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) > 1
    for name, ref in ref_grads.items():
        assert ref.abs().sum() > 0, f"{name} got no gradient"
        rel = (grads[name] - ref).norm() / ref.norm()
        assert rel <= tol, (name, float(rel))


@pytest.mark.parametrize("autocast", [False, True])
def test_norm_linears_gives_the_same_bits(autocast):
    """NormLinearsFn alone against the norm followed by its Linears: the same loss and every gradient
    bit for bit, float32 and bf16 autocast (the Linears' gradients are added in autograd's order)."""
    torch.manual_seed(0)
    model = fast.apply(SmolLM(ModelConfig(**TINY)).train())
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, RMSNorm):
                m.weight.add_(0.2 * torch.randn_like(m.weight))
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(4))
    labels = ids.clone()
    labels[:, :3] = -100
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(NormLinearsFn, "forward", lambda *a, f=NormLinearsFn.forward: calls.append(1) or f(*a))
        ours = loss_and_grads(model, ids, labels, autocast)
    assert len(calls) == 2 * TINY["num_hidden_layers"]  # both norms of every layer went through it
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fast_modules, "project", plain_project)
        ref = loss_and_grads(model, ids, labels, autocast)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
    assert ours[2].keys() == ref[2].keys()
    for name, g in ref[2].items():
        assert torch.equal(ours[2][name], g), name


@pytest.mark.parametrize("bf16", [False, True])
def test_a_layer_keeps_less_for_backward(bf16):
    cfg = ModelConfig(**dict(TINY, vocab_size=300, hidden_size=64, intermediate_size=160))
    batch, length = 2, 24
    ours = memory.activation_bytes(cfg, batch, length, bf16)["per_layer"]
    with pytest.MonkeyPatch.context() as mp:  # memory.build's model without fast.apply: the plain ops
        mp.setattr(fast, "apply", lambda model: model)
        plain = memory.activation_bytes(cfg, batch, length, bf16)["per_layer"]
    # Per token, each of the two norms no longer keeps its float32 normalised x [D], nor the normalised
    # x its Linears read (float32: one [D] shared by them; under autocast each Linear's own bf16 copy:
    # q, k, v and gate, up), and the MLP no longer keeps silu(gate) [I] nor down_proj's input [I] (in the
    # Linear outputs' dtype: bf16 under autocast).
    D, I = cfg.hidden_size, cfg.intermediate_size
    read = 5 * D * 2 if bf16 else 2 * D * 4
    assert plain - ours == batch * length * (2 * D * 4 + read + 2 * I * (2 if bf16 else 4))


def test_no_backward_to_come_skips_the_functions(monkeypatch):
    torch.manual_seed(0)
    model = fast.apply(SmolLM(ModelConfig(**TINY)).train())
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    with_grad = model(ids)

    def refuse(*args):
        raise AssertionError("a forward with no backward to come went through an autograd.Function")

    monkeypatch.setattr(RMSNormFn, "apply", refuse)
    monkeypatch.setattr(SwiGLUFn, "apply", refuse)
    monkeypatch.setattr(NormLinearsFn, "apply", refuse)
    with torch.no_grad():
        assert torch.equal(model(ids), with_grad.detach())
    model.requires_grad_(False)  # nothing requires grad: no graph either
    assert torch.equal(model(ids), with_grad.detach())
    model.requires_grad_(True)  # the refusal above is live: a training forward does call it
    with pytest.raises(AssertionError, match="no backward to come"):
        model(ids)


def test_double_backward_is_refused():
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    w = torch.ones(4, dtype=torch.float64, requires_grad=True)
    (dx,) = torch.autograd.grad(RMSNormFn.apply(x, w, 1e-6).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        dx.sum().backward()
