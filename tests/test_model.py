"""model.py + weights.py against transformers: same checkpoint files -> same logits.

Tiny random checkpoints are written by transformers' own save_pretrained (Llama with GQA, tied
and untied with biases, sharded; SmolLM3 with NoPE layers, listed or from the interval default);
the real SmolLM2-135M-Instruct checks the numbers at full size.
"""
import json

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


def test_random_init_model_runs():
    from minisft.model import ModelConfig
    cfg = ModelConfig(**TINY)
    model = SmolLM(cfg)
    out = model(torch.zeros(2, 5, dtype=torch.long))
    assert out.shape == (2, 5, TINY["vocab_size"])


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
