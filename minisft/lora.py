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
import json
import math
import os
import re
import sys

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from minisft.files import read_json, write_dir, write_json, write_texts

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
    """Names of the linear layers; a LoRALinear counts as one (its inner .base does not)."""
    mods = dict(model.named_modules())
    return [n for n, m in mods.items() if isinstance(m, (nn.Linear, LoRALinear))
            and not isinstance(mods.get(n.rpartition(".")[0]), LoRALinear)]


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
    A and B are float32 whatever the base dtype: cast the base (e.g. to bfloat16) before calling
    this, since model.to(dtype) afterwards would cast A and B as well.
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


# ---- adapter folders: the files peft writes and reads ------------------------------------------
CONFIG, WEIGHTS, PREFIX = "adapter_config.json", "adapter_model.safetensors", "base_model.model."
# Settings of peft's LoRA variants that minisft does not implement, with their plain-LoRA value.
PLAIN = {"use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "bias": "none", "lora_bias": False,
         "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None, "layers_to_transform": None,
         "layers_pattern": None, "exclude_modules": None, "target_parameters": None, "trainable_token_indices": None,
         "layer_replication": None, "use_qalora": False, "use_bdlora": None, "alora_invocation_tokens": None,
         "arrow_config": None, "velora_config": None, "monteclora_config": None, "kasa_config": None}


def save_adapter(model, tokenizer, out_dir, base_model_name_or_path, chat_template=None, overwrite=False,
                 extra_files=None):
    """Write a peft adapter folder: adapter_config.json, adapter_model.safetensors (keys like
    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight [r, in]) and the tokenizer files.

    Durable: written into a temp folder, every file and the folder fsynced, renamed into place.
    An existing adapter folder is replaced only with overwrite=True. extra_files: {name: text} written
    with the rest (the model card, README.md). Returns out_dir.
    """
    mods = _lora_modules(model)
    if not mods:
        raise ValueError("save_adapter: the model has no LoRA layers (call add_lora or load_adapter first)")
    settings = {(m.r, m.alpha, getattr(m.dropout, "p", 0.0)) for _, m in mods}
    if len(settings) > 1:
        raise ValueError(f"save_adapter: LoRA layers differ in (r, alpha, dropout) {sorted(settings)}; expected one setting")
    (r, alpha, dropout), = settings
    names = [n for n, _ in mods]
    # Short names ("q_proj") when they select exactly the wrapped layers, else the full names.
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    targets = short if sorted(parse_targets(model, short)) == sorted(names) else sorted(names)
    tensors = {f"{PREFIX}{name}.lora_{ab}.weight": getattr(m, f"lora_{ab}").detach().to("cpu").contiguous()
               for name, m in mods for ab in "AB"}
    config = {**PLAIN, "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
              "lora_dropout": dropout, "target_modules": targets, "base_model_name_or_path": str(base_model_name_or_path),
              "revision": None, "inference_mode": True, "init_lora_weights": True, "auto_mapping": None}

    out_dir = os.path.abspath(os.path.expanduser(str(out_dir)))
    _check_replaceable(out_dir, overwrite)

    def write(tmp):
        write_json(os.path.join(tmp, CONFIG), dict(sorted(config.items())))
        save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp, chat_template=chat_template)
        write_texts(tmp, extra_files)
    return write_dir(out_dir, write)  # atomic and durable, as save_pretrained's model folders (files.py)


def _check_replaceable(out_dir, overwrite):
    """Never replace anything but an adapter folder (a run folder has sub-folders: never that)."""
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"{out_dir}: exists and is not a folder")
    if names and (CONFIG not in names or any(os.path.isdir(os.path.join(out_dir, n)) for n in names)):
        raise FileExistsError(f"{out_dir}: folder exists, is not empty and is not an adapter folder; choose another")
    if names and not overwrite:
        raise FileExistsError(f"{out_dir}: an adapter folder already exists here; pass overwrite=True to replace it")


def read_adapter_config(adapter_dir):
    """adapter_config.json -> dict, checked to be a plain LoRA minisft can apply (one-line errors)."""
    path = os.path.join(adapter_dir, CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no {CONFIG}: {adapter_dir} is not an adapter folder")
    cfg = read_json(path)
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        got = cfg.get("peft_type") if isinstance(cfg, dict) else type(cfg).__name__
        raise ValueError(f"{path}: peft_type is {got!r}, expected 'LORA'")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in cfg:
            raise ValueError(f"{path}: missing required key {key!r}")
    for key, plain in PLAIN.items():
        if cfg.get(key) not in (plain, None, [], {}):
            raise ValueError(f"{path}: {key}={json.dumps(cfg[key])} is not supported (minisft applies plain LoRA: {json.dumps(plain)})")
    try:
        _check_settings(cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout") or 0.0)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return cfg


def _configured_targets(model, targets, path):
    """target_modules as peft reads it: a list (full name or "."-suffix), "all-linear", or one regex."""
    if isinstance(targets, str) and targets.lower() != ALL_LINEAR:
        return {n for n in _linear_names(model) if re.fullmatch(targets, n)}
    if not isinstance(targets, (str, list)) or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"{path}: target_modules={json.dumps(targets)}: expected a list of module names or a string")
    if isinstance(targets, str):
        return set(parse_targets(model, targets))
    return {n for n in _linear_names(model) if any(n == t or n.endswith("." + t) for t in targets)}


def load_adapter(model, adapter_dir):
    """Apply the adapter in `adapter_dir` (made by save_adapter or by peft) to `model`, in place.

    Every key and shape is checked before the model is touched; then the layers it names are
    wrapped in LoRALinear (float32 A, B) and A, B loaded. Returns the wrapped names.
    """
    cfg = read_adapter_config(adapter_dir)
    path, r = os.path.join(adapter_dir, WEIGHTS), cfg["r"]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing (an adapter folder needs {WEIGHTS}; .bin pickles are not read)")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"{path}: not a valid safetensors file ({e})") from None
    targets = _configured_targets(model, cfg["target_modules"], os.path.join(adapter_dir, CONFIG))
    shapes = {}  # key -> expected shape; peft also stores the whole base weight of a targeted lm_head
    for name in targets:
        out, inp = model.get_submodule(name).weight.shape
        shapes.update({f"{PREFIX}{name}.lora_A.weight": (r, inp), f"{PREFIX}{name}.lora_B.weight": (out, r),
                       f"{PREFIX}{name}.base_layer.weight": (out, inp)})
    for key in sorted(tensors):
        if key not in shapes:
            raise ValueError(f"{path}: unexpected key {key!r} (not a LoRA weight of a layer in target_modules)")
        if tuple(tensors[key].shape) != shapes[key]:
            raise ValueError(f"{path}: {key} has shape {list(tensors[key].shape)}, expected {list(shapes[key])}")
    for key in sorted(k for k in shapes if ".lora_" in k and k not in tensors):
        raise ValueError(f"{path}: missing key {key}")
    names = add_lora(model, r, cfg["lora_alpha"], cfg.get("lora_dropout") or 0.0, sorted(targets))
    with torch.no_grad():
        for name in names:
            mod = model.get_submodule(name)
            for part, param in (("lora_A", mod.lora_A), ("lora_B", mod.lora_B), ("base_layer", mod.base.weight)):
                if f"{PREFIX}{name}.{part}.weight" in tensors:
                    param.copy_(tensors[f"{PREFIX}{name}.{part}.weight"])
    return names


def adapter_base(adapter_dir):
    """The base model of an adapter folder: base_model_name_or_path, as given if that is a folder,
    else relative to the adapter folder if that is one, else as given (a Hub id)."""
    base = read_adapter_config(adapter_dir).get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise ValueError(f"{os.path.join(adapter_dir, CONFIG)}: base_model_name_or_path is {base!r}; "
                         f"expected the base model's folder or Hub id")
    near = os.path.join(adapter_dir, os.path.expanduser(base))
    return near if not os.path.isdir(os.path.expanduser(base)) and os.path.isdir(near) else base


if __name__ == "__main__":
    # `python -m minisft.lora merge ADAPTER_DIR OUT_DIR` is merge.py's command: merging needs model
    # folders (weights.py), and weights.py needs this module, so the command lives beside both.
    from minisft.merge import main
    sys.exit(main())
