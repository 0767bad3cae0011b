"""model.grad_checkpointing: the same losses and gradients as without it (full fine-tuning, a frozen
model with a few trainable matrices, LoRA with dropout), less kept for backward, and never used
where no backward follows (eval, no_grad, a KV cache)."""
import pytest
import torch

import minisft.model
from minisft.memory import saved_for_backward_bytes
from minisft.generate import generate
from minisft.lora import add_lora
from minisft.loss import chunked_cross_entropy
from minisft.model import ModelConfig, SmolLM

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return SmolLM(ModelConfig(**TINY)).train()


def batch(seed=0, padded=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (2, 24), generator=g)
    labels = ids.clone()
    labels[:, :6] = -100  # a prompt
    mask = torch.ones_like(ids)
    if padded:  # a padded row: the explicit-mask path of the attention
        mask[1, -5:], labels[1, -5:] = 0, -100
    return ids, labels, mask


def loss_and_grads(model, checkpointing, seed=0, padded=True):
    model.grad_checkpointing = checkpointing
    model.zero_grad(set_to_none=True)
    ids, labels, mask = batch(seed, padded)
    torch.manual_seed(123)  # LoRA dropout draws from the global generator
    loss_sum, n = chunked_cross_entropy(model.hidden_states(ids, attention_mask=mask), model.lm_head.weight, labels)
    loss = loss_sum / n
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def assert_same(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert abs(loss_a - loss_b) <= 1e-6 * abs(loss_a)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert grads_a[name].abs().sum() > 0, f"{name} got no gradient"
        rel = (grads_a[name] - grads_b[name]).norm() / grads_a[name].norm()
        assert rel <= 1e-6, (name, float(rel))


@pytest.mark.parametrize("padded", [False, True])
def test_full_fine_tuning_same_loss_and_gradients(padded):
    model = tiny_model()
    assert model.grad_checkpointing is False  # off unless asked for
    assert_same(loss_and_grads(model, False, padded=padded), loss_and_grads(model, True, padded=padded))


def test_only_q_proj_trainable_same_gradients():
    # The embedding is frozen, so no block input requires grad: the case non-reentrant checkpointing handles.
    model = tiny_model()
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("q_proj.weight"))
    off, on = loss_and_grads(model, False), loss_and_grads(model, True)
    assert set(on[1]) == {f"model.layers.{i}.self_attn.q_proj.weight" for i in range(3)}
    assert_same(off, on)


def test_lora_with_dropout_same_gradients():
    # Dropout draws a mask in the forward pass and again in the recompute: equal gradients need the
    # RNG state to be restored for the recompute, else the two masks differ.
    model = tiny_model()
    add_lora(model, r=4, alpha=8, dropout=0.3, targets="all-linear")
    with torch.no_grad():  # B = 0 at the start would give A no gradient at all
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05)
    off, on = loss_and_grads(model, False), loss_and_grads(model, True)
    assert all(".lora_" in name for name in on[1])
    assert_same(off, on)


def test_keeps_less_for_backward():
    model = tiny_model()
    ids, labels, mask = batch()

    def step():
        loss_sum, n = chunked_cross_entropy(model.hidden_states(ids), model.lm_head.weight, labels)
        return loss_sum / n

    kept = {}
    for on in (False, True):
        model.grad_checkpointing = on
        kept[on] = saved_for_backward_bytes(step, list(model.parameters()))
    # Without: every block's activations. With: each block's input [B, T, D] and the rotary tables.
    assert 0 < kept[True] < kept[False] / 2, kept


def test_not_used_without_backward(monkeypatch):
    model = tiny_model()
    model.grad_checkpointing = True
    calls = []
    real = minisft.model.checkpoint
    monkeypatch.setattr(minisft.model, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = batch(padded=False)[0]
    model.hidden_states(ids)
    assert len(calls) == 3  # training with grad: one per block
    with torch.no_grad():
        model.hidden_states(ids)
    model.eval()
    model.hidden_states(ids)
    model.train()
    cache = minisft.model.KVCache(3)
    model.hidden_states(ids, cache=cache)
    assert len(calls) == 3 and cache.length == 24  # a recompute would have extended the cache twice


def test_generation_unchanged_by_the_switch():
    model = tiny_model().eval()
    prompt = batch(padded=False)[0][:1, :8].tolist()
    want = generate(model, prompt, max_new_tokens=6)
    model.grad_checkpointing = True
    model.train()  # even left in train mode, generation uses the cache and never recomputes
    assert generate(model, prompt, max_new_tokens=6) == want
