"""model.py + weights.py against transformers: same checkpoint files -> same logits.

Tiny random checkpoints are written by transformers' own save_pretrained (Llama with GQA, tied
and untied with biases, sharded; SmolLM3 with NoPE layers, listed or from the interval default);
the real SmolLM2-135M-Instruct checks the numbers at full size.
"""
import json
import re

import pytest
import torch

from minisft.model import KVCache, SmolLM
from minisft.weights import load_pretrained

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5)


def randomize_(model, seed):
    """Random values for every parameter (norm weights near 1, biases non-zero): nothing trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.08 * noise)


def make_hf_checkpoint(path, kind, seed=0):
    """Write a tiny transformers checkpoint of the given kind into `path`; return path."""
    from transformers import LlamaConfig, LlamaForCausalLM, SmolLM3Config, SmolLM3ForCausalLM

    shard = None
    if kind in ("llama_tied", "llama_sharded"):
        cfg, cls = LlamaConfig(**TINY, tie_word_embeddings=True, rope_theta=50000.0), LlamaForCausalLM
        shard = "60KB" if kind == "llama_sharded" else None
    elif kind == "llama_untied":
        cfg = LlamaConfig(**TINY, tie_word_embeddings=False, attention_bias=True, mlp_bias=True, rope_theta=50000.0)
        cls = LlamaForCausalLM
    elif kind in ("smollm3", "smollm3_interval"):
        cfg = SmolLM3Config(**TINY, no_rope_layers=[1, 0, 1, 1], rope_theta=50000.0,
                            bos_token_id=1, eos_token_id=2, pad_token_id=2)
        cls = SmolLM3ForCausalLM
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    model = cls(cfg)
    randomize_(model, seed)
    model.save_pretrained(path, max_shard_size=shard) if shard else model.save_pretrained(path)
    if kind == "smollm3_interval":
        # No list in config.json: both sides must derive the NoPE layers from the interval.
        cfg_path = path / "config.json"
        d = json.loads(cfg_path.read_text())
        for key in ("no_rope_layers", "layer_types"):
            d.pop(key, None)
        d["no_rope_layer_interval"] = 2
        cfg_path.write_text(json.dumps(d))
    return path


KINDS = ["llama_tied", "llama_untied", "llama_sharded", "smollm3", "smollm3_interval"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {k: make_hf_checkpoint(root / k, k, seed=i) for i, k in enumerate(KINDS)}


def hf_model(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def padded_batch(rows, left=True):
    """Rows of ids -> (input_ids, attention_mask 1/0, position_ids) padded to the longest row."""
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(T - len(r), T) if left else slice(0, len(r))
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers(checkpoints, kind):
    path = checkpoints[kind]
    ours, tok = load_pretrained(path, device="cpu")
    assert tok is None  # these folders have no tokenizer files
    theirs = hf_model(path)
    if kind.startswith("smollm3"):
        want = [bool(f) for f in theirs.config.no_rope_layers]
        assert ours.config.use_rope == want
        assert want == ([True, False, True, True] if kind == "smollm3" else [True, False, True, False])
    assert ours.config.tie_word_embeddings == (kind != "llama_untied")
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == ours.config.tie_word_embeddings

    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (12, 7, 3)]
    with torch.no_grad():
        full = torch.tensor([rows[0]])
        diff = (ours(full) - theirs(full).logits).abs().max().item()
        assert diff <= 1e-4, f"unpadded: max |logit diff| {diff}"
        for left in (True, False):
            ids, mask, pos = padded_batch(rows, left=left)
            a = ours(ids, position_ids=pos, attention_mask=mask)
            b = theirs(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            real = mask.bool()
            diff = (a[real] - b[real]).abs().max().item()
            assert diff <= 1e-4, f"{'left' if left else 'right'} padded: max |logit diff| {diff}"
            assert torch.isfinite(a).all()  # padding rows never produce NaN


def test_sharded_equals_single(checkpoints, tmp_path):
    sharded, _ = load_pretrained(checkpoints["llama_sharded"], device="cpu")
    assert len(list(checkpoints["llama_sharded"].glob("model-*.safetensors"))) > 1
    hf_model(checkpoints["llama_sharded"]).save_pretrained(tmp_path / "single")
    single, _ = load_pretrained(tmp_path / "single", device="cpu")
    a, b = sharded.state_dict(), single.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["llama_tied", "smollm3"])
def test_kv_cache_matches_full_forward(checkpoints, kind):
    model, _ = load_pretrained(checkpoints[kind], device="cpu")
    g = torch.Generator().manual_seed(2)
    rows = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (10, 6)]
    ids, mask, pos = padded_batch(rows)
    with torch.no_grad():
        full = model(ids, position_ids=pos, attention_mask=mask)
        cache = KVCache(model.config.num_hidden_layers)
        steps = [model(ids[:, :4], position_ids=pos[:, :4], attention_mask=mask[:, :4], cache=cache)]
        for t in range(4, ids.shape[1]):  # then one token at a time, the mask always covering all of S
            steps.append(model(ids[:, t:t + 1], position_ids=pos[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache))
        inc = torch.cat(steps, dim=1)
        real = mask.bool()
        assert (inc[real] - full[real]).abs().max().item() <= 1e-5
        # Unpadded, no mask: the cache path with plain causal attention.
        one = ids[:1]
        full1 = model(one)
        cache = KVCache(model.config.num_hidden_layers)
        inc1 = torch.cat([model(one[:, :5], cache=cache)] + [model(one[:, t:t + 1], cache=cache) for t in range(5, one.shape[1])], 1)
        assert (inc1 - full1).abs().max().item() <= 1e-5


def test_bf16_load_smoke(checkpoints):
    path = checkpoints["llama_tied"]
    model, _ = load_pretrained(path, dtype="bfloat16", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ref, _ = load_pretrained(path, dtype=torch.float32, device="cpu")
    x = torch.arange(20)[None] * 7 % 256
    with torch.no_grad():
        lo, hi = model(x).float(), ref(x)
    assert torch.isfinite(lo).all()
    assert (lo - hi).abs().max().item() < 0.1 * hi.abs().max().item()  # bf16 keeps ~3 significant digits


# ---- config.json as users have them: v4-style keys, SmolLM v1 shapes, rope settings ----------------
V1 = dict(model_type="llama", vocab_size=96, hidden_size=36, intermediate_size=64, num_hidden_layers=3,
          num_attention_heads=3, num_key_value_heads=1, rms_norm_eps=1e-5, hidden_act="silu", rope_theta=10000.0,
          rope_scaling=None, tie_word_embeddings=True, max_position_embeddings=2048, pretraining_tp=1)
S3 = {**V1, "model_type": "smollm3", "num_hidden_layers": 5, "rope_theta": 5e6, "pad_token_id": 0}
HAND_WRITTEN = {
    # SmolLM-135M/360M shape: no head_dim key (hidden/heads), 3 query heads per key/value head.
    "smollm1_gqa": V1,
    # SmolLM-1.7B shape: as many key/value heads as query heads.
    "smollm1_mha": {**V1, "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 4},
    "no_kv_key_untied_biases": {**{k: v for k, v in V1.items() if k != "num_key_value_heads"},
                                "tie_word_embeddings": False, "attention_bias": True, "mlp_bias": True},
    "head_dim_not_hidden_over_heads": {**V1, "head_dim": 20},
    "rope_parameters": {**{k: v for k, v in V1.items() if k not in ("rope_theta", "rope_scaling")},
                        "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}},
    # Both keys: transformers follows rope_scaling, so rope_parameters' theta is not used.
    "rope_scaling_wins": {**{k: v for k, v in V1.items() if k != "rope_theta"},
                          "rope_scaling": {"type": "default"}, "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}},
    "smollm3_interval_no_theta": {k: v for k, v in S3.items() if k not in ("rope_theta", "tie_word_embeddings")},
    "smollm3_long_list_window_off": {**S3, "no_rope_layers": [1, 0, 1, 1, 0, 0, 0], "use_sliding_window": False,
                                     "sliding_window": 4},
}


@pytest.mark.parametrize("name", list(HAND_WRITTEN))
def test_hand_written_configs_match_transformers(tmp_path, name):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = HAND_WRITTEN[name]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    theirs = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path))
    randomize_(theirs, 0)
    theirs.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))  # both sides read the hand-written file
    theirs = hf_model(tmp_path)
    ours, _ = load_pretrained(tmp_path, device="cpu")
    x = torch.randint(0, cfg["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(x) - theirs(x).logits).abs().max().item()
    assert diff <= 1e-5, diff


@pytest.mark.parametrize("over, message", [
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope type 'linear' is not supported"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope type 'llama3' is not supported"),
    # A scaling added to a newer config: transformers applies it, so must not be read past.
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
     "rope type 'linear' is not supported"),
    ({**S3, "rope_scaling": {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 1024}},
     "rope type 'yarn' is not supported"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default"}}}, "expected one plain RoPE for all layers"),
    ({**S3, "use_sliding_window": True, "sliding_window": 8}, "use_sliding_window is not supported"),
    ({**S3, "use_sliding_window": True, "layer_types": ["sliding_attention"] * 5}, "use_sliding_window is not supported"),
    ({**S3, "no_rope_layers": [1, 0]}, "no_rope_layers has 2 entries, expected num_hidden_layers=5"),
    ({"num_key_value_heads": 2}, "num_attention_heads=3 is not a multiple of num_key_value_heads=2"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
])
def test_unsupported_configs_are_one_line_errors(over, message):
    from minisft.model import ModelConfig
    with pytest.raises(ValueError, match=r"^m/config\.json: .*" + re.escape(message)) as e:
        ModelConfig.from_hf({**V1, **over}, source="m/config.json")
    assert "\n" not in str(e.value)


def test_config_must_be_an_object():
    from minisft.model import ModelConfig
    with pytest.raises(ValueError, match=r"m/config\.json: expected a JSON object of model settings, got list"):
        ModelConfig.from_hf([V1], source="m/config.json")


def test_attention_mask_must_cover_the_cache():
    from minisft.model import ModelConfig
    model = SmolLM(ModelConfig(**TINY)).eval()
    ids = torch.arange(6)[None]
    cache = KVCache(model.config.num_hidden_layers)
    with torch.no_grad():
        model(ids[:, :5], attention_mask=torch.ones(1, 5, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match=r"attention_mask has shape \[1, 1\], expected .* = \[1, 6\]"):
            model(ids[:, 5:], attention_mask=torch.ones(1, 1, dtype=torch.long), cache=cache)


def test_random_init_model_runs():
    """A fresh model is initialised as transformers does it: N(0, 0.02) matrices, zero biases, unit norms."""
    from minisft.model import ModelConfig
    torch.manual_seed(0)
    model = SmolLM(ModelConfig(**TINY, attention_bias=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied by default
    for name, p in model.named_parameters():
        if "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        else:
            assert abs(p.std().item() - 0.02) < 0.004 and abs(p.mean().item()) < 0.004, name
    out = model(torch.randint(0, 256, (2, 5)))
    assert out.shape == (2, 5, TINY["vocab_size"]) and torch.isfinite(out).all()


# ---- the real SmolLM2-135M-Instruct ---------------------------------------------------------------
def test_real_weights_logits_match_transformers(smollm2_dir):
    ours, tok = load_pretrained(smollm2_dir, device="cpu")
    assert ours.num_parameters() == 134_515_008
    theirs = hf_model(smollm2_dir)
    ids = tok.encode("<|im_start|>user\nWhat is gradient descent? Explain briefly.<|im_end|>\n<|im_start|>assistant\n")
    rows = [ids, ids[5:]]
    batch, mask, pos = padded_batch(rows)
    with torch.no_grad():
        a = ours(batch, position_ids=pos, attention_mask=mask)
        b = theirs(input_ids=batch, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    diff = (a[real] - b[real]).abs().max().item()
    assert diff <= 1e-3, f"max |logit diff| {diff}"
    assert torch.equal(a[0, -1].argmax(), b[0, -1].argmax())
