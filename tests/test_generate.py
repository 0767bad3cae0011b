"""generate.py: the KV cache changes nothing, batching changes nothing, stops and sampling behave,
and on the real SmolLM2-135M-Instruct greedy decoding equals transformers' token for token."""
import pytest
import torch

from minisft.generate import chat, generate
from minisft.model import ModelConfig, SmolLM
from minisft.weights import load_pretrained, save_pretrained

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, initializer_range=0.15, bos_token_id=1, eos_token_id=2, pad_token_id=2)
PROMPTS = [[5, 17, 99, 3, 42, 8, 61], [7, 7, 120], [33]]


@pytest.fixture(scope="module")
def tiny():
    """A random tiny model, large init so its distributions are peaked (no near-ties in greedy)."""
    torch.manual_seed(0)
    cfg = ModelConfig(**TINY, model_type="smollm3", use_rope=[True, False, True])  # one NoPE layer too
    return SmolLM(cfg).eval()


def test_cache_and_no_cache_give_the_same_tokens(tiny):
    for prompt in PROMPTS:
        a = generate(tiny, prompt, max_new_tokens=12, use_cache=True)
        b = generate(tiny, prompt, max_new_tokens=12, use_cache=False)
        assert a == b and len(a) == 12
        s1 = generate(tiny, prompt, max_new_tokens=12, temperature=1.0, seed=3, use_cache=True)
        s2 = generate(tiny, prompt, max_new_tokens=12, temperature=1.0, seed=3, use_cache=False)
        assert s1 == s2


def test_batched_left_padded_equals_single(tiny):
    singles = [generate(tiny, p, max_new_tokens=12) for p in PROMPTS]
    for use_cache in (True, False):
        assert generate(tiny, PROMPTS, max_new_tokens=12, use_cache=use_cache) == singles


def test_stop_ids_per_row(tiny):
    free = [generate(tiny, p, max_new_tokens=15) for p in PROMPTS]
    stop = free[0][4]  # a token the first row produces at step 5
    out = generate(tiny, PROMPTS, max_new_tokens=15, stop_ids=[stop])
    for row, full in zip(out, free):
        cut = full.index(stop) + 1 if stop in full else len(full)
        assert row == full[:cut]  # stops right after the stop token, which is included
    assert out[0][-1] == stop and len(out[0]) <= 5
    assert generate(tiny, PROMPTS[0], max_new_tokens=15, stop_ids=stop) == out[0]  # a bare int works too


def test_matches_transformers_generate_batched(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(save_pretrained(tiny, None, tmp_path / "m"), dtype=torch.float32).eval()
    ours = generate(tiny, PROMPTS, max_new_tokens=10)
    T = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in PROMPTS])
    mask = (torch.arange(T)[None] >= torch.tensor([T - len(p) for p in PROMPTS])[:, None]).long()
    out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False,
                      pad_token_id=0, eos_token_id=None)
    assert out[:, T:].tolist() == ours


def test_sampling(tiny):
    p = PROMPTS[0]
    a = generate(tiny, p, max_new_tokens=16, temperature=1.0, seed=1)
    assert a == generate(tiny, p, max_new_tokens=16, temperature=1.0, seed=1)
    assert a != generate(tiny, p, max_new_tokens=16, temperature=1.0, seed=2)
    greedy = generate(tiny, p, max_new_tokens=16)
    assert a != greedy
    assert generate(tiny, p, max_new_tokens=16, temperature=1.0, top_k=1, seed=5) == greedy
    assert generate(tiny, p, max_new_tokens=16, temperature=1.0, top_p=1e-6, seed=5) == greedy
    assert generate(tiny, p, max_new_tokens=16, temperature=1e-4, seed=5) == greedy


def test_top_k_top_p_restrict_the_choices(tiny):
    from minisft.generate import _filter_logits

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 3.0]])
    assert torch.isfinite(_filter_logits(logits, 2, None)).tolist() == [[True, False, False, False, True]]
    # probs ~ [.24, .09, .03, .01, .64]: the nucleus for 0.8 is tokens 4 and 0.
    assert torch.isfinite(_filter_logits(logits, None, 0.8)).tolist() == [[True, False, False, False, True]]
    assert torch.isfinite(_filter_logits(logits, None, 0.5)).tolist() == [[False, False, False, False, True]]
    seen = {t for s in range(20) for t in generate(tiny, PROMPTS[1], max_new_tokens=1, temperature=2.0, top_k=3, seed=s)}
    assert 1 <= len(seen) <= 3


def test_filters_match_transformers_warpers():
    """temperature, then top-k, then top-p: the same tokens survive as with transformers' sampling."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from minisft.generate import _filter_logits

    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        V = int(torch.randint(2, 300, (1,), generator=g))
        logits = torch.randn(3, V, generator=g, dtype=torch.float64) * 4  # no ties
        temp = 0.3 + float(torch.rand(1, generator=g)) * 1.5
        k = int(torch.randint(1, V + 3, (1,), generator=g))
        p = 0.01 + float(torch.rand(1, generator=g)) * 0.98
        for top_k, top_p in ((k, None), (None, p), (k, p)):
            want = TemperatureLogitsWarper(temp)(None, logits.clone())
            want = TopKLogitsWarper(top_k)(None, want) if top_k else want
            want = TopPLogitsWarper(top_p)(None, want) if top_p else want
            got = _filter_logits(logits / temp, top_k, top_p)
            assert torch.equal(torch.isfinite(got), torch.isfinite(want)), (V, top_k, top_p)
            assert torch.equal(got[torch.isfinite(got)], want[torch.isfinite(want)])


def test_generation_stops_at_the_context():
    torch.manual_seed(0)
    model = SmolLM(ModelConfig(**{**TINY, "max_position_embeddings": 16})).eval()
    assert len(generate(model, [[1] * 10, [2, 3]], max_new_tokens=6)[0]) == 6  # 10 + 6 fills the context exactly
    long, short = generate(model, [[1] * 10, [2, 3]], max_new_tokens=50)
    assert len(long) == 6 and len(short) == 6  # the longest row sets the limit for the batch
    assert generate(model, [1] * 16, max_new_tokens=0) == []
    with pytest.raises(ValueError, match=r"prompt of 16 tokens leaves no room .*max_position_embeddings=16"):
        generate(model, [1] * 16, max_new_tokens=1)


def test_prompt_forms(tiny):
    a = generate(tiny, PROMPTS[0], max_new_tokens=5)
    assert generate(tiny, torch.tensor(PROMPTS[0]), max_new_tokens=5) == a  # a 1-D tensor is one prompt
    assert generate(tiny, torch.tensor([PROMPTS[0]] * 2), max_new_tokens=5) == [a, a]  # a 2-D tensor is a batch
    assert generate(tiny, PROMPTS[0], max_new_tokens=5, stop_ids=None) == a
    with pytest.raises(ValueError, match=r"token id 128 is outside the vocabulary \[0, 128\)"):
        generate(tiny, [[1, 2], [3, 128]])
    with pytest.raises(ValueError, match="not text"):
        generate(tiny, "Hello")


def test_edge_cases_and_errors(tiny):
    assert generate(tiny, [1, 2], max_new_tokens=0) == []
    assert generate(tiny, [[1, 2], [3]], max_new_tokens=0) == [[], []]
    tiny.train()
    generate(tiny, [1, 2], max_new_tokens=2)
    assert tiny.training  # the caller's mode is restored
    tiny.eval()
    with pytest.raises(ValueError, match="at least one token"):
        generate(tiny, [[1], []])
    with pytest.raises(ValueError, match="temperature"):
        generate(tiny, [1], temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        generate(tiny, [1], temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        generate(tiny, [1], temperature=1.0, top_k=0)


# ---- the real SmolLM2-135M-Instruct ---------------------------------------------------------------
@pytest.fixture(scope="module")
def real(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = load_pretrained(smollm2_dir, device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return model, tok, hf, AutoTokenizer.from_pretrained(smollm2_dir)


def test_real_greedy_equals_transformers(real):
    model, tok, hf, hf_tok = real
    messages = [{"role": "user", "content": "Write a short poem about the sea."}]
    prompt = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok.encode(prompt)
    ours = generate(model, ids, max_new_tokens=30, stop_ids=tok.stop_ids())
    x = torch.tensor([ids])
    theirs = hf.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=30, do_sample=False)
    assert ours == theirs[0, len(ids):].tolist()
    assert len(ours) == 30  # a poem is longer than 30 tokens: the comparison covered all of them


def test_real_model_knows_paris(real):
    model, tok, hf, hf_tok = real
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    new = generate(model, tok.encode(ids), max_new_tokens=20, stop_ids=tok.stop_ids())
    assert new[-1] == tok.im_end_id
    assert "Paris" in tok.decode(new)
    # chat() renders with minisft.chat_template (template guessed from the tokenizer): same answer.
    assert chat(model, tok, messages, max_new_tokens=20) == tok.decode(new, skip_special_tokens=True)
