"""The speed work changes no number: token-budget packing, mask-free attention for right-padded
batches, and the preallocated KV cache give what the slow, plain paths give."""
import pytest
import torch

from minisft import data
from minisft.generate import generate
from minisft import fast
from minisft.fast import modules as fast_modules
from minisft.fast.packed import attends_per_conversation, conversation_spans
from minisft.model import KVCache, build_attn_mask, right_padded
from test_data import PAD, assert_same, loss_and_grads, random_examples, separate_loss_and_grads, tiny_model


# ---------------------------------------------------------------------------------------------
# token-budget packing
# ---------------------------------------------------------------------------------------------
def test_budget_packing_respects_the_budget_and_keeps_every_example_once():
    lengths = [3, 17, 9, 30, 2, 12, 25, 7, 7, 14, 5, 21, 1, 8, 19, 30, 4]
    examples = random_examples(lengths, seed=3)
    for budget, max_length in ((40, 30), (64, 16 + 14), (30, 30), (100, 32)):
        batches = data.pack_to_budget(examples, budget, max_length)
        assert all(len(mb) == 1 for mb in batches)  # one row per micro-batch: no padding at all
        assert all(sum(len(r["input_ids"]) for r in mb) <= budget for mb in batches), budget
        # every example exactly once: the multiset of (tokens of each packed conversation) is the input
        found = sorted(tuple(r["input_ids"][i:j]) for mb in batches for r in mb
                       for i, j in _spans(r["seq_ids"]))
        assert found == sorted(tuple(e["input_ids"]) for e in examples)
        # best fit leaves few micro-batches: no two could be merged into one under the budget
        sizes = sorted(sum(len(r["input_ids"]) for r in mb) for mb in batches)
        assert len(sizes) < 2 or sizes[0] + sizes[1] > budget
    assert data.pack_to_budget(examples, 40, 30) == data.pack_to_budget(examples, 40, 30)  # deterministic


def _spans(seq_ids):
    """seq_ids of a packed row -> [(start, end)] of each conversation."""
    spans, start = [], 0
    for t in range(1, len(seq_ids) + 1):
        if t == len(seq_ids) or seq_ids[t] != seq_ids[start]:
            spans.append((start, t))
            start = t
    return spans


def test_budget_packing_errors_name_the_example():
    examples = random_examples([5, 12], seed=0)
    with pytest.raises(ValueError, match="example 1 has 12 tokens, more than the token budget max_tokens=10"):
        data.pack_to_budget(examples, 10, 64)
    with pytest.raises(ValueError, match="example 1 has 12 tokens, more than max_length=8"):
        data.pack_to_budget(examples, 64, 8)
    with pytest.raises(ValueError, match=r"max_tokens=0 \(expected >= 1\)"):
        data.token_budget([5, 12], 8, max_tokens=0)


def test_token_budget_is_batch_size_times_mean_length():
    assert data.token_budget([10, 20, 31], batch_size=4) == 4 * 21  # ceil(61 / 3) = 21
    assert data.token_budget([10, 20, 31], batch_size=4, max_tokens=500) == 500


def test_budget_packed_micro_batches_equal_separate_conversations():
    """Loss and every gradient of the packed micro-batches equal those of each conversation alone."""
    model = tiny_model(seed=4)
    examples = random_examples([9, 14, 5, 7, 3, 12, 6, 11], seed=4)
    batches = data.pack_to_budget(examples, 30, 16)
    assert len(batches) > 1 and any(max(mb[0]["seq_ids"]) > 1 for mb in batches)  # rows of several conversations
    assert any(len(mb[0]["input_ids"]) > 16 for mb in batches)  # a row longer than max_length: fine, positions restart
    model.zero_grad()
    total, grads = 0.0, None
    for mb in batches:
        loss, g = loss_and_grads(model, data.collate(mb, PAD))
        total = total + loss
        grads = g if grads is None else {n: grads[n] + g[n] for n in g}
    assert_same((total, grads), separate_loss_and_grads(model, examples))


# ---------------------------------------------------------------------------------------------
# attention without a dense mask
# ---------------------------------------------------------------------------------------------
def test_right_padded_batches_take_the_causal_path_with_equal_results():
    model = tiny_model(seed=5)
    examples = random_examples([11, 4, 8], seed=5)
    batch = data.collate(examples, PAD)
    assert right_padded(batch["attention_mask"])
    assert build_attn_mask(batch["attention_mask"], 0, batch["input_ids"].shape[1], "cpu") is None
    assert_same(loss_and_grads(model, batch), separate_loss_and_grads(model, examples))
    # Packed rows and left padding still get their mask: the fast path must not leak across conversations.
    packed = data.collate([r for mb in data.pack_to_budget(examples, 23, 23) for r in mb], PAD)
    assert not right_padded(packed["attention_mask"])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert not right_padded(left) and build_attn_mask(left, 0, 4, "cpu") is not None


def test_conversation_spans_are_the_runs_of_each_row():
    mask = torch.tensor([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 2, 0]])
    assert conversation_spans(mask) == [(0, 0, 2), (0, 2, 5), (1, 0, 6), (2, 2, 4), (2, 4, 5)]
    assert conversation_spans(torch.tensor([[1, 2, 1, 0]])) is None  # an id split in two: only a mask says it
    assert conversation_spans(torch.tensor([[0, 0, 0]])) == []


def test_packed_rows_attend_per_conversation_with_the_masked_results(monkeypatch):
    """Packed rows (and left padding without a cache) run one causal attention per conversation;
    outputs at real positions and every gradient equal the masked path's."""
    model = fast.apply(tiny_model(seed=8))
    examples = random_examples([9, 14, 5, 7, 3, 12, 6], seed=8)
    packed = data.collate([r for mb in data.pack_to_budget(examples, 24, 24) for r in mb], PAD)
    assert packed["attention_mask"].max() > 1 and (packed["attention_mask"] == 0).any()  # several convs + padding
    calls = []
    per_conversation = fast_modules.per_conversation
    monkeypatch.setattr(fast_modules, "per_conversation", lambda *a: calls.append(1) or per_conversation(*a))
    split = loss_and_grads(model, packed)
    assert len(calls) == model.config.num_hidden_layers  # the span path ran in every layer
    monkeypatch.setattr(fast_modules, "conversation_spans", lambda mask: None)  # force the dense mask
    masked = loss_and_grads(model, packed)
    assert len(calls) == model.config.num_hidden_layers
    assert_same(split, masked, tol=1e-10)
    assert_same(split, separate_loss_and_grads(model, examples))
    # Left padding (batched generation without a cache): the real positions' logits agree too.
    monkeypatch.undo()
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(8))
    left = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1] * 7])
    pos = (left.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        got = model(ids, position_ids=pos, attention_mask=left)
        alone = model(ids[:1, 3:])
    assert torch.allclose(got[0, 3:], alone[0], atol=1e-10, rtol=0)


def test_packed_rows_take_the_mask_where_the_device_says_so(monkeypatch):
    """Only a CPU attends per conversation (a GPU pays per kernel launch); elsewhere the same packed
    batch goes through one masked call per layer and gives the same loss and gradients."""
    assert attends_per_conversation("cpu")
    assert not attends_per_conversation("cuda") and not attends_per_conversation("mps")
    model = fast.apply(tiny_model(seed=9))
    examples = random_examples([9, 14, 5, 7, 3, 12], seed=9)
    packed = data.collate([r for mb in data.pack_to_budget(examples, 24, 24) for r in mb], PAD)
    calls = []
    per_conversation = fast_modules.per_conversation
    monkeypatch.setattr(fast_modules, "per_conversation", lambda *a: calls.append(1) or per_conversation(*a))
    split = loss_and_grads(model, packed)
    assert len(calls) == model.config.num_hidden_layers
    monkeypatch.setattr(fast_modules, "attends_per_conversation", lambda device: False)  # as on a GPU
    masked = loss_and_grads(model, packed)
    assert len(calls) == model.config.num_hidden_layers  # the loop did not run again
    assert_same(split, masked, tol=1e-10)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_packed_rows_on_cuda_go_through_flexattention_with_the_masked_results(monkeypatch):
    """On CUDA, packed rows get one FlexMask per forward, shared by every layer, and FlexAttention.
    Its forward runs on a CPU too (its backward does not: the GPU suite checks that): pretending to
    be CUDA, the logits at real positions equal the dense mask's."""
    from minisft.fast import packed as P
    assert P.attends_with_flex("cuda") and not P.attends_with_flex("cpu")
    model = fast.apply(tiny_model(seed=10)).float()
    examples = random_examples([9, 14, 5, 7, 3, 12, 6], seed=10)
    batch = data.collate([r for mb in data.pack_to_budget(examples, 24, 24) for r in mb], PAD)
    ids, pos, seq = batch["input_ids"], batch["position_ids"], batch["attention_mask"]
    assert seq.max() > 1 and (seq == 0).any()
    monkeypatch.setattr(fast_modules, "attends_per_conversation", lambda device: False)
    with torch.no_grad():
        dense = model(ids, position_ids=pos, attention_mask=seq)
        masks, flexed = [], []
        monkeypatch.setattr(fast_modules, "attends_with_flex", lambda device: True)
        monkeypatch.setattr(fast_modules, "flex_mask", lambda m: masks.append(1) or P.flex_mask(m))
        monkeypatch.setattr(fast_modules, "flex", lambda *a: flexed.append(a[3]) or P.flex(*a))
        got = model(ids, position_ids=pos, attention_mask=seq)
    assert masks == [1] and len(flexed) == model.config.num_hidden_layers
    assert all(m is flexed[0] for m in flexed)  # one block mask for all layers
    real = seq != 0
    assert torch.allclose(got[real], dense[real], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# the preallocated KV cache
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("capacity", [None, 3, 64])
def test_preallocated_cache_equals_full_forward(capacity):
    """capacity None / 3: the buffers grow (by doubling) while decoding; 64: allocated once."""
    model = tiny_model(seed=6).eval()
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config.num_hidden_layers, capacity=capacity)
        steps = [model(ids[:, :5], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(5, 12)]
    assert cache.length == 12
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-10


def test_generate_with_and_without_cache_agree_on_padded_batches():
    model = tiny_model(seed=7).float().eval()
    prompts = [[5, 17, 40, 3, 42, 8], [7, 7, 20], [33]]
    with_cache = generate(model, prompts, max_new_tokens=10, use_cache=True)
    without = generate(model, prompts, max_new_tokens=10, use_cache=False)
    assert with_cache == without and all(len(a) == 10 for a in with_cache)
    assert [generate(model, p, max_new_tokens=10) for p in prompts] == with_cache
