"""LoRA: fine-tune a small low-rank correction instead of the whole weight matrix.

Lesson 9 reads this file. A linear layer computes y = W x with W: [out, in]. LoRA freezes W and
learns two thin matrices A: [r, in] and B: [out, r] (r is 8 or 16, while in and out are hundreds):

    W' = W + (alpha / r) * B @ A        y = W x + (alpha / r) * B (A x)

Why it saves memory: full fine-tuning keeps, for every weight, a gradient and AdamW's two moments
(three more copies of the model, in float32). With LoRA only A and B have gradients and optimizer
state; W is only read, so it may even be held in bfloat16 while A and B stay in float32.
B starts at zero, so the wrapped model starts exactly equal to the base model; A starts random
(as peft does: kaiming_uniform_ with a=sqrt(5)), because with both zero no gradient would ever
reach either of them. After training, B @ A can be folded into W (`merge_lora`): the merged model
is a plain model again, with no extra cost at inference.

The files are peft's: `save_adapter` writes adapter_config.json + adapter_model.safetensors that
`peft.PeftModel.from_pretrained` loads, and `load_adapter` reads adapters made by peft.

Shapes: in / out the layer's input / output features, r the rank, ... any leading dimensions.
"""
import math

import torch
import torch.nn as nn

ALL_LINEAR = "all-linear"


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank path: y = base(x) + scaling * B (A dropout(x)).

    base: the wrapped nn.Linear (weight [out, in], bias [out] or None), frozen, any dtype.
    lora_A: [r, in], kaiming-uniform like peft; lora_B: [out, r], zeros; both float32 by default.
    B = 0 makes the wrapped layer compute exactly what the base layer computes, so training starts
    from the base model; A is random so that the gradient of B (which is (dy)ᵀ (A x)) is non-zero.
    """

    def __init__(self, base, r=8, alpha=16, dropout=0.0, dtype=torch.float32):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=dev, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=dev, dtype=dtype))
        # For A: [r, in], fan_in = in, so the bound is gain * sqrt(3 / in) = 1 / sqrt(in).
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):
        """x [..., in] -> [..., out], in the base output's dtype."""
        y = self.base(x)
        # The adapter runs in A's dtype (float32 beside a bfloat16 base), as peft does; the sum is
        # cast back so the next layer sees the dtype it would without LoRA.
        h = self.dropout(x.to(self.lora_A.dtype))
        return (y + (h @ self.lora_A.T @ self.lora_B.T) * self.scaling).to(y.dtype)

    def delta_weight(self):
        """scaling * B @ A: [out, in] in float32, the change LoRA makes to base.weight."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}"


def _linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _lora_modules(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def parse_targets(model, targets):
    """targets: "all-linear", "q_proj,v_proj" or a list of names -> the nn.Linear names to wrap.

    A name matches a module whose full name equals it or ends in "." + name (peft's rule), so
    "q_proj" means every layer's q_proj. "all-linear" is every linear layer except lm_head: peft
    leaves out the output layer, tied to the embedding or not, because the model's final
    prediction layer is better left alone (and a tied one is the embedding too).
    """
    linears = _linear_names(model)
    if isinstance(targets, str) and targets.strip().lower() == ALL_LINEAR:
        return [n for n in linears if n != "lm_head"]
    wanted = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip()]
    valid = sorted({n.rsplit(".", 1)[-1] for n in linears})
    unknown = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in linears)]
    if not wanted or unknown:
        what = f"no linear layer matches {', '.join(map(repr, unknown))}" if unknown else "none given"
        raise ValueError(f"LoRA targets: {what} (valid: {ALL_LINEAR} or a comma-separated list of {', '.join(valid)})")
    return [n for n in linears if any(n == t or n.endswith("." + t) for t in wanted)]


def _check_settings(r, alpha, dropout):
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA r={r!r}: expected an integer >= 1")
    if not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"LoRA alpha={alpha!r}: expected a number > 0")
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout={dropout!r}: expected a number in [0, 1)")


def add_lora(model, r=8, alpha=16, dropout=0.0, targets=ALL_LINEAR):
    """Wrap the target linear layers of `model` in LoRALinear, in place; freeze everything else.

    Returns the names of the wrapped modules (e.g. "model.layers.0.self_attn.q_proj").
    """
    _check_settings(r, alpha, dropout)
    if _lora_modules(model):
        raise ValueError("add_lora: the model already has LoRA layers (merge_lora them first)")
    names = parse_targets(model, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, LoRALinear(getattr(owner, child), r, alpha, dropout))
    return names


def lora_parameters(model):
    """-> [(name, param)] of every LoRA matrix (…lora_A [r, in], …lora_B [out, r]): what the optimizer gets."""
    return [(n, p) for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))]


def count_parameters(model):
    """-> (trainable, total) numbers of parameters; a tied weight counts once."""
    params = list(model.parameters())  # unique Parameters
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def merge_lora(model):
    """Fold every LoRALinear into its base weight (W += scaling * B @ A, in W's dtype) and put the
    plain nn.Linear back. Returns the merged module names.

    Only merge is offered, no unmerge: after a merge A and B are gone, and subtracting B @ A from
    a bfloat16 W would not give back the original W exactly. The exact inverse is to keep the
    adapter (save_adapter) and load the base model again.
    A LoRA on an lm_head tied to the embedding would change the embedding too, so the merge
    gives lm_head its own weight and marks the config untied.
    """
    merged = []
    for name, mod in _lora_modules(model):
        base, W = mod.base, mod.base.weight
        new = (W.detach().float() + mod.delta_weight().detach()).to(W.dtype)
        if name == "lm_head" and getattr(model.config, "tie_word_embeddings", False):
            base.weight = nn.Parameter(new, requires_grad=W.requires_grad)
            model.config.tie_word_embeddings = False
        else:
            with torch.no_grad():
                W.copy_(new)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, base)
        merged.append(name)
    return merged
