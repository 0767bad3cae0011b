"""Hand-written backwards: the same gradients as autograd's, with less kept between forward and backward.

Lesson 11 reads this file next to model.py's plain RMSNorm and MLP. Autograd keeps, for backward,
every tensor an op needs to compute its gradient. Written as plain ops, a decoder layer keeps some
[tokens, D] and [tokens, I] tensors twice: once for the op that made them, once for the Linear that
reads them. Each torch.autograd.Function below saves only the inputs it cannot rebuild, and rebuilds
the rest in backward with the forward's own ops, so the gradients are the same bits. What each one
saves is measured in docs/speed.md.

    RMSNormFn     rms_norm(x) saving x and rstd only
    NormLinearsFn rms_norm(x) read by several Linears (q, k, v or gate, up), the normalised x not kept
    SwiGLUFn      silu(g) * u (and down_proj), keeping g and u, rebuilding silu(g) and the product

Shapes: [..., D] activations, D hidden_size, I intermediate_size, O a Linear's output size.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


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
