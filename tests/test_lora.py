"""lora.py: LoRALinear maths and init (as peft's), targets, freezing, merging, and byte-compatible
adapter folders: minisft <-> peft in both directions, merged folders in transformers, load_pretrained."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from minisft.lora import (LoRALinear, add_lora, count_parameters, lora_parameters, merge_lora, parse_targets)
from minisft.model import ModelConfig, SmolLM

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, bos_token_id=1, eos_token_id=2, pad_token_id=2)
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_model(seed=0, **over):
    torch.manual_seed(seed)
    return SmolLM(ModelConfig(**{**TINY, **over})).eval()


def randomize_b(model, seed=1):
    """Give every lora_B non-zero values so the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora_parameters(model):
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def ids(n=12, vocab=128, seed=0):
    return torch.randint(3, vocab, (2, n), generator=torch.Generator().manual_seed(seed))


# ---- the layer -----------------------------------------------------------------------------------
def test_layer_forward_is_base_plus_low_rank():
    torch.manual_seed(0)
    base = nn.Linear(20, 12, bias=True)
    lin = LoRALinear(base, r=4, alpha=8)
    assert lin.lora_A.shape == (4, 20) and lin.lora_B.shape == (12, 4) and lin.scaling == 2.0
    nn.init.normal_(lin.lora_B)
    x = torch.randn(3, 5, 20)
    want = x @ (base.weight + 2.0 * lin.lora_B @ lin.lora_A).T + base.bias
    torch.testing.assert_close(lin(x), want, atol=1e-5, rtol=1e-5)
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert lin.lora_A.requires_grad and lin.lora_B.requires_grad


def test_init_b_zero_and_a_like_peft():
    torch.manual_seed(0)
    lin = LoRALinear(nn.Linear(256, 64), r=16)
    assert torch.count_nonzero(lin.lora_B) == 0
    lin(torch.randn(3, 256)).pow(2).sum().backward()  # at B = 0 only B learns first, A follows
    assert lin.lora_B.grad.abs().sum() > 0 and torch.count_nonzero(lin.lora_A.grad) == 0
    # kaiming_uniform_(a=sqrt(5)) on [r, in]: U(-1/sqrt(in), 1/sqrt(in)), std = bound / sqrt(3)
    bound = 1 / math.sqrt(256)
    assert lin.lora_A.abs().max() <= bound and lin.lora_A.abs().max() > 0.95 * bound
    assert abs(lin.lora_A.std().item() - bound / math.sqrt(3)) < 0.05 * bound
    # peft's own layer, same input size and rank: same distribution
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.layer import Linear as PeftLinear
    torch.manual_seed(0)
    pl = PeftLinear(nn.Linear(256, 64), "default", peft.LoraConfig(r=16), r=16, lora_alpha=16)
    pa = pl.lora_A["default"].weight
    assert pa.shape == lin.lora_A.shape and pa.abs().max() <= bound
    assert abs(pa.std().item() - lin.lora_A.std().item()) < 0.05 * bound
    assert torch.count_nonzero(pl.lora_B["default"].weight) == 0


def test_zero_b_model_equals_base_exactly():
    model, base = tiny_model(), tiny_model()
    add_lora(model, r=4, alpha=8)
    x = ids()
    assert torch.equal(model(x), base(x))


def test_bf16_base_fp32_adapters_grads():
    torch.manual_seed(0)
    lin = LoRALinear(nn.Linear(32, 16).to(torch.bfloat16), r=4)
    nn.init.normal_(lin.lora_B)
    y = lin(torch.randn(2, 3, 32, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    y.float().pow(2).sum().backward()
    for p in (lin.lora_A, lin.lora_B):
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
        assert p.grad.abs().sum() > 0
    assert lin.base.weight.grad is None
    # whole model: bf16 base, fp32 adapters, a backward through everything
    model = tiny_model().to(torch.bfloat16)
    add_lora(model)
    model(ids()).float().logsumexp(-1).sum().backward()
    for name, p in lora_parameters(model):
        assert p.dtype == torch.float32 and p.grad is not None and torch.isfinite(p.grad).all(), name


# ---- targets and freezing ----------------------------------------------------------------------------
def test_all_linear_wraps_every_linear_but_lm_head():
    for tied in (True, False):
        model = tiny_model(tie_word_embeddings=tied)
        names = add_lora(model)
        assert len(names) == 2 * len(ALL) and "lm_head" not in names
        assert isinstance(model.model.layers[1].mlp.down_proj, LoRALinear)
        assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, LoRALinear)


def test_only_adapter_params_train():
    model = tiny_model()
    add_lora(model, r=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in lora_parameters(model)} and len(trainable) == 2 * 2 * len(ALL)
    n_train, n_total = count_parameters(model)
    D, I, KV = 64, 96, 2 * 16
    per_layer = 4 * (D + D) + 2 * (4 * (D + KV)) + 4 * (D + D) + 2 * 4 * (D + I) + 4 * (I + D)
    assert n_train == 2 * per_layer
    assert n_total == n_train + sum(p.numel() for p in tiny_model().parameters())


@pytest.mark.parametrize("targets,want", [
    ("q_proj,v_proj", {"q_proj", "v_proj"}),
    (" q_proj , down_proj ", {"q_proj", "down_proj"}),
    (["mlp.up_proj"], {"up_proj"}),
    ("ALL-LINEAR", set(ALL)),
])
def test_targets_parsing(targets, want):
    names = parse_targets(tiny_model(), targets)
    assert {n.rsplit(".", 1)[1] for n in names} == want and len(names) == 2 * len(want)


def test_lm_head_on_request_and_full_name():
    assert parse_targets(tiny_model(), "lm_head") == ["lm_head"]
    assert parse_targets(tiny_model(), ["model.layers.1.self_attn.q_proj"]) == ["model.layers.1.self_attn.q_proj"]


@pytest.mark.parametrize("kwargs,match", [
    (dict(targets="q_proj,qproj"), r"no linear layer matches 'qproj' \(valid: all-linear or .*q_proj"),
    (dict(targets="mlp"), "no linear layer matches 'mlp'"),
    (dict(targets=""), "none given"),
    (dict(r=0), "r=0"), (dict(r=2.5), "r=2.5"),
    (dict(alpha=0), "alpha=0"), (dict(alpha=-1), "alpha=-1"),
    (dict(dropout=1.0), r"dropout=1.0"), (dict(dropout=-0.1), "dropout=-0.1"),
])
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        add_lora(tiny_model(), **kwargs)
    assert "\n" not in str(e.value)


def test_add_twice_refused():
    model = tiny_model()
    add_lora(model)
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model)


# ---- merging ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [True, False])
def test_merge_keeps_logits_and_restores_linear(tied):
    model = tiny_model(tie_word_embeddings=tied)
    add_lora(model, r=4, alpha=8, targets="all-linear" if not tied else ALL + ["lm_head"])
    randomize_b(model)
    for _, p in lora_parameters(model):
        if p.shape[0] == 4:
            with torch.no_grad():
                p.add_(0.01)  # A: move off its init too
    x = ids()
    with torch.no_grad():
        want = model(x)
        names = merge_lora(model)
        got = model(x)
    assert names and not any(isinstance(m, LoRALinear) for m in model.modules())
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert (got - want).abs().max() <= 1e-5
    if tied:  # the lm_head LoRA made the output layer differ from the embedding
        assert not model.config.tie_word_embeddings
        assert model.lm_head.weight is not model.model.embed_tokens.weight
        assert torch.equal(model.model.embed_tokens.weight, tiny_model().model.embed_tokens.weight)


def test_merge_in_bf16_keeps_dtype():
    model = tiny_model().to(torch.bfloat16)
    add_lora(model)
    randomize_b(model)
    lin = model.model.layers[0].mlp.up_proj
    want = (lin.base.weight.float() + 2.0 * lin.lora_B.float() @ lin.lora_A.float()).to(torch.bfloat16)
    assert not torch.equal(want, lin.base.weight)
    merge_lora(model)
    w = model.model.layers[0].mlp.up_proj.weight
    assert w.dtype == torch.bfloat16 and torch.equal(w, want)


# ---- adapter folders: minisft <-> peft <-> transformers ----------------------------------------------
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
transformers.logging.set_verbosity_error()


def hf_logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    """A tiny random Llama saved by transformers (tied embeddings): the base of the tiny tests."""
    cfg = transformers.LlamaConfig(**{k: v for k, v in TINY.items()}, tie_word_embeddings=True, rope_theta=50000.0)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("hf") / "base"
    transformers.LlamaForCausalLM(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def our_adapter(hf_base):
    """minisft's LoRA on hf_base, moved off its init by a few AdamW steps, saved with save_adapter.
    -> (adapter folder, the logits of minisft's LoRA model on ids())"""
    from minisft.lora import save_adapter
    from minisft.weights import load_pretrained
    model, _ = load_pretrained(hf_base, device="cpu")
    add_lora(model, r=4, alpha=8, targets="all-linear")
    opt = torch.optim.AdamW([p for _, p in lora_parameters(model)], lr=1e-2)
    x = ids()
    for _ in range(3):
        model(x)[:, :-1].log_softmax(-1).gather(-1, x[:, 1:, None]).sum().neg().backward()
        opt.step(), opt.zero_grad()
    model.eval()
    out = save_adapter(model, None, hf_base.parent / "ours", hf_base)
    with torch.no_grad():
        return Path(out), model(x)


def test_peft_loads_our_adapter(hf_base, our_adapter):
    adapter_dir, want = our_adapter
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_base)
    x = ids()
    base_logits = hf_logits(base, x)
    pm = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    assert max_diff(hf_logits(pm, x), want) <= 1e-5
    assert max_diff(base_logits, want) > 1e-3  # the adapter really changes the output
    cfg = peft.PeftConfig.from_pretrained(adapter_dir)
    assert (cfg.r, cfg.lora_alpha, cfg.task_type, set(cfg.target_modules)) == (4, 8, "CAUSAL_LM", set(ALL))


def test_load_pretrained_adapter_and_merge_cli(hf_base, our_adapter, tmp_path):
    from minisft.weights import load_pretrained
    adapter_dir, want = our_adapter
    model, tok = load_pretrained(adapter_dir, device="cpu")
    assert tok is None and sum(isinstance(m, LoRALinear) for m in model.modules()) == 2 * len(ALL)
    with torch.no_grad():
        assert max_diff(model(ids()), want) <= 1e-5
    r = subprocess.run([sys.executable, "-m", "minisft.lora", "merge", str(adapter_dir), str(tmp_path / "merged")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert max_diff(hf_logits(merged, ids()), want) <= 1e-5


def test_bf16_base_with_loaded_adapter(our_adapter):
    from minisft.weights import load_pretrained
    model, _ = load_pretrained(our_adapter[0], dtype="bfloat16", device="cpu")
    q = model.model.layers[0].self_attn.q_proj
    assert q.base.weight.dtype == torch.bfloat16 and q.lora_A.dtype == q.lora_B.dtype == torch.float32
    with torch.no_grad():
        got = model(ids())
    assert got.dtype == torch.bfloat16 and max_diff(got, our_adapter[1]) < 0.05


def test_merge_cli_errors(our_adapter, tmp_path, capsys):
    from minisft.merge import main
    adapter_dir, _ = our_adapter
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    r = subprocess.run([sys.executable, "-m", "minisft.lora", "merge", str(adapter_dir), str(tmp_path / "out")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    for bad in (tmp_path / "nowhere", adapter_dir.parent / "base"):  # missing; a model, not an adapter
        capsys.readouterr()
        assert main(["merge", str(bad), str(tmp_path / "o2")]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {bad}") and err.count("\n") == 1, err
    assert not (tmp_path / "o2").exists()


def test_dropout_only_on_the_adapter_path():
    torch.manual_seed(0)
    lin = LoRALinear(nn.Linear(16, 8), r=4, dropout=0.5).train()
    x = torch.randn(4, 16)
    assert torch.equal(lin(x), lin.base(x))  # B = 0: dropout must not touch the base path
    nn.init.normal_(lin.lora_B)
    assert not torch.allclose(lin(x), lin(x))  # random masks on the adapter path in training
    lin.eval()
    torch.testing.assert_close(lin(x), lin.base(x) + 4.0 * x @ lin.lora_A.T @ lin.lora_B.T)


def test_relative_base_and_overwrite(hf_base, our_adapter, tmp_path, monkeypatch):
    from minisft.lora import save_adapter
    from minisft.weights import load_pretrained
    model, _ = load_pretrained(our_adapter[0], device="cpu")
    out = hf_base.parent / "relative"
    save_adapter(model, None, out, "../base", overwrite=True)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_adapter(model, None, out, "../base")
    with pytest.raises(FileExistsError, match="not an adapter folder"):
        save_adapter(model, None, hf_base, "x", overwrite=True)
    monkeypatch.chdir(tmp_path)  # "../base" is found beside the adapter, not from here
    again, _ = load_pretrained(out, device="cpu")
    with torch.no_grad():
        assert max_diff(again(ids()), our_adapter[1]) <= 1e-5
    assert sorted(p.name for p in hf_base.parent.iterdir() if p.name.startswith(".")) == []  # no temp left


@pytest.mark.parametrize("tied,targets", [(True, "all-linear"), (False, ["q_proj", "v_proj", "lm_head"])])
def test_we_load_peft_adapter(tmp_path, tied, targets):
    from minisft.lora import load_adapter
    from minisft.weights import load_pretrained
    cfg = transformers.LlamaConfig(**TINY, tie_word_embeddings=tied, rope_theta=50000.0)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    pm.eval().save_pretrained(tmp_path / "peft")
    want = hf_logits(pm, ids())
    model, _ = load_pretrained(tmp_path / "base", device="cpu")
    names = load_adapter(model, tmp_path / "peft")
    assert ("lm_head" in names) == (not tied)
    with torch.no_grad():
        assert max_diff(model(ids()), want) <= 1e-5
    via_folder, _ = load_pretrained(tmp_path / "peft", device="cpu")  # its base_model_name_or_path
    with torch.no_grad():
        assert max_diff(via_folder(ids()), want) <= 1e-5


def test_real_smollm2_adapter_in_peft(smollm2_dir, tmp_path):
    from minisft.lora import save_adapter
    from minisft.weights import load_pretrained
    model, tok = load_pretrained(smollm2_dir, device="cpu")
    add_lora(model, r=8, alpha=16)
    randomize_b(model, seed=3)
    x = torch.tensor([tok.encode("The capital of France is")])
    with torch.no_grad():
        want = model(x)
    out = save_adapter(model, tok, tmp_path / "ad", str(smollm2_dir))
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    del model
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)  # the checkpoint is bf16
    pm = peft.PeftModel.from_pretrained(hf, out).eval()
    assert max_diff(hf_logits(pm, x), want) <= 1e-5


def test_adapter_folder_tokenizer(smollm2_dir, our_adapter, tmp_path):
    """load_pretrained(adapter) takes the adapter folder's tokenizer (here with its own chat template)."""
    from minisft.lora import save_adapter
    from minisft.tokenizer import Tokenizer
    from minisft.weights import load_pretrained
    model, tok = load_pretrained(our_adapter[0], device="cpu")
    assert tok is None  # neither the adapter nor its base has one
    out = save_adapter(model, Tokenizer.from_dir(smollm2_dir), tmp_path / "ad", our_adapter[0].parent / "base",
                       chat_template="{{ 'x' }}")
    again, tok2 = load_pretrained(out, device="cpu")
    assert tok2 is not None and tok2.chat_template == "{{ 'x' }}"
    with torch.no_grad():
        assert max_diff(again(ids()), our_adapter[1]) <= 1e-5


# ---- bad adapter folders: one line naming the file and the key -----------------------------------------
def _broken_copy(src, dst, edit_config=None, edit_tensors=None):
    import json
    import shutil
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    if edit_config:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        edit_config(cfg)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if edit_tensors:
        t = load_file(dst / "adapter_model.safetensors")
        edit_tensors(t)
        save_file(t, dst / "adapter_model.safetensors")
    return dst


Q = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize("config,tensors,match", [
    (lambda c: c.update(peft_type="IA3"), None, "adapter_config.json: peft_type is 'IA3', expected 'LORA'"),
    (lambda c: c.update(use_dora=True), None, "adapter_config.json: use_dora=true is not supported"),
    (lambda c: c.pop("r"), None, "adapter_config.json: missing required key 'r'"),
    (lambda c: c.update(r=0), None, r"adapter_config.json: LoRA r=0"),
    (lambda c: c.update(target_modules=["q_proj"]), None, "adapter_model.safetensors: unexpected key .base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"),
    (None, lambda t: t.pop(Q), f"adapter_model.safetensors: missing key {Q}"),
    (None, lambda t: t.update({Q: torch.zeros(4, 63)}), f"adapter_model.safetensors: {Q} has shape \\[4, 63\\], expected \\[4, 64\\]"),
    (None, lambda t: t.update({"base_model.model.model.layers.0.mlp.lora_A.weight": torch.zeros(1)}), "unexpected key 'base_model.model.model.layers.0.mlp.lora_A.weight' \\(not a LoRA weight"),
])
def test_bad_adapter_errors(hf_base, our_adapter, tmp_path, config, tensors, match):
    from minisft.weights import load_pretrained
    bad = _broken_copy(our_adapter[0], tmp_path / "bad", config, tensors)
    with pytest.raises(ValueError, match=match) as e:
        load_pretrained(bad, device="cpu")
    assert "\n" not in str(e.value)


def test_missing_files(hf_base, our_adapter, tmp_path):
    from minisft.lora import load_adapter
    bad = _broken_copy(our_adapter[0], tmp_path / "bad")
    (bad / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors: missing"):
        load_adapter(tiny_model(), bad)
    with pytest.raises(FileNotFoundError, match="adapter_config.json: no adapter_config.json"):
        load_adapter(tiny_model(), tmp_path)
    (bad / "adapter_config.json").write_text("{\n  \"r\": 4,,\n}")
    with pytest.raises(ValueError, match="adapter_config.json: line 2: not valid JSON"):
        load_adapter(tiny_model(), bad)
    (bad / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], '
                                             '"base_model_name_or_path": "no/such-model-here"}')
    with pytest.raises((FileNotFoundError, ValueError), match="base model 'no/such-model-here' of this adapter"):
        from minisft.weights import load_pretrained
        load_pretrained(bad, device="cpu")
