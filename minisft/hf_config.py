"""Hugging Face config.json <-> the settings of minisft's model (model.ModelConfig). Lesson 3.

A SmolLM checkpoint describes its architecture in config.json, in the words of `transformers`:
SmolLM and SmolLM2 are `model_type: "llama"`, SmolLM3 is `"smollm3"` with some layers that skip
RoPE ("NoPE"). This module reads those words into the plain fields of ModelConfig and writes them
back, so that `transformers` loads what minisft saves into the same architecture. It only reads
and writes dicts: model.py builds the model, weights.py reads the files.

Everything minisft cannot run is refused here, with the file and the key named, rather than
loaded into a model that would compute something else.
"""
SUPPORTED_TYPES = ("llama", "smollm3")


def _rope_settings(cfg, source):
    """The one plain RoPE every layer uses -> its dict (may be empty)."""
    # Newer transformers write rope settings under "rope_parameters", older ones under
    # "rope_scaling" with rope_theta at the top level. When both are present transformers
    # follows "rope_scaling" (a scaling added to a newer config), so we read it first too.
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if not isinstance(rope, dict) or any(isinstance(v, dict) for v in rope.values()):
        raise ValueError(f"{source}: rope settings {rope!r} are not supported (expected one plain RoPE for all layers)")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"{source}: rope type {rope_type!r} is not supported (expected plain RoPE)")
    return rope


def _use_rope(cfg, n_layers, source):
    """SmolLM3's NoPE layers -> use_rope [n_layers] (True: the layer rotates q and k)."""
    # no_rope_layers[i] == 0 means layer i skips RoPE; without the list, every
    # `no_rope_layer_interval`-th layer (3, 7, 11, ... for 4) skips it.
    interval = cfg.get("no_rope_layer_interval", 4)
    flags = cfg.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n_layers)]
    use_rope = [bool(f) for f in flags[:n_layers]]  # transformers allows a longer list
    # With use_sliding_window, transformers gives the "sliding_attention" layers (by default
    # the NoPE ones) a sliding window; this model only has full attention.
    kinds = cfg.get("layer_types") or ["full_attention" if u or cfg.get("sliding_window") is None
                                       else "sliding_attention" for u in use_rope]
    if cfg.get("use_sliding_window") and "sliding_attention" in kinds[:n_layers]:
        raise ValueError(f"{source}: use_sliding_window is not supported (expected false: full attention in every layer)")
    return use_rope


def fields_from_hf(cfg, source="config.json"):
    """A config.json dict -> the keyword arguments of ModelConfig. `source` names the file in errors."""
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
    rope = _rope_settings(cfg, source)
    is3 = mtype == "smollm3"
    n_layers, n_heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    return dict(
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
        use_rope=_use_rope(cfg, n_layers, source) if is3 else [True] * n_layers,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
        pad_token_id=cfg.get("pad_token_id"),
    )


def to_hf(c):
    """A ModelConfig -> the config.json dict that transformers reads back into the same architecture."""
    out = {
        "architectures": ["SmolLM3ForCausalLM" if c.model_type == "smollm3" else "LlamaForCausalLM"],
        "model_type": c.model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": c.tie_word_embeddings,
        "max_position_embeddings": c.max_position_embeddings,
        "attention_bias": c.attention_bias,
        "attention_dropout": 0.0,
        "mlp_bias": c.mlp_bias,
        "initializer_range": c.initializer_range,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id,
    }
    if c.model_type == "smollm3":
        out["no_rope_layers"] = [int(u) for u in c.use_rope]
        out["use_sliding_window"] = False
    return out
