"""minisft.memory: the counted activations match a full count over all layers, the weights /
gradients / optimizer parts equal what a real AdamW step allocates, the CLI's --json line and errors,
and SmolLM3-3B with LoRA and checkpointing fits in 16 GB."""
import json
import os
import subprocess
import sys

import pytest
import torch

from minisft import memory
from minisft.memory import saved_for_backward_bytes
from minisft.default_model import DEFAULT_MODEL
from minisft.lora import add_lora
from minisft.model import ModelConfig
from minisft.train import batch_loss, param_groups
from minisft.weights import load_pretrained

from conftest import SHARED

# A SmolLM3-style config with NoPE layers (every 4th), so the scaled layers are not all alike.
TINY6 = ModelConfig(model_type="smollm3", vocab_size=300, hidden_size=64, intermediate_size=160,
                    num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    use_rope=[True, True, True, False, True, True], max_position_embeddings=4096)


def full_count(cfg, batch, length, bf16, lora_r, checkpointing):
    """What the trainer's forward + chunked loss save for backward with ALL layers, counted as bench does."""
    torch.manual_seed(0)
    model = memory.build(cfg, lora_r, "all-linear", bf16)
    model.grad_checkpointing = checkpointing
    ids = torch.randint(0, cfg.vocab_size, (batch, length), generator=torch.Generator().manual_seed(1))
    mb = {"input_ids": ids, "position_ids": torch.arange(length).expand(batch, length), "attention_mask": None,
          "labels": ids}  # every position a target, as the estimate assumes

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False):
            return batch_loss(model, mb)[0]

    return saved_for_backward_bytes(step, list(model.parameters()))


@pytest.fixture(scope="module")
def base_cfg():
    return memory.read_config(DEFAULT_MODEL)


@pytest.mark.parametrize("which, length, bf16, lora_r, ckpt", [
    ("base", 300, True, 0, False), ("base", 300, False, 0, False), ("base", 300, True, 8, True),
    ("tiny6", 400, True, 0, False), ("tiny6", 400, True, 0, True), ("tiny6", 100, False, 4, False),
])
def test_activations_match_a_full_count(base_cfg, which, length, bf16, lora_r, ckpt):
    cfg = base_cfg if which == "base" else TINY6
    est = memory.activation_bytes(cfg, 2, length, bf16, lora_r, "all-linear", ckpt)
    want = full_count(cfg, 2, length, bf16, lora_r, ckpt)
    got = est["activations"] + est["loss"]
    assert abs(got - want) <= 0.02 * want, (got, want)  # the fit is exact when no layer differs


def real_step_bytes(lora):
    """Load the embedded model as the trainer would, take one AdamW step -> bytes of weights, grads, state."""
    model = load_pretrained(DEFAULT_MODEL, dtype=torch.bfloat16 if lora else torch.float32, device="cpu")[0]
    if lora:
        add_lora(model, r=8, alpha=16, targets="all-linear")
    model.train()
    ids = torch.randint(3, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    mb = {"input_ids": ids, "position_ids": torch.arange(32).expand(2, 32), "attention_mask": None, "labels": ids}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(param_groups(model, 0.01) if not lora else trainable, lr=1e-3)
    batch_loss(model, mb)[0].backward()
    opt.step()
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    return {"weights": sum(nbytes(p) for p in model.parameters()),
            "gradients": sum(nbytes(p.grad) for p in model.parameters() if p.grad is not None),
            "optimizer": sum(nbytes(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v))}


@pytest.mark.parametrize("lora", [False, True])
def test_weights_gradients_optimizer_are_exact(lora):
    est = memory.estimate(DEFAULT_MODEL, 2, 32, lora_r=8 if lora else 0, dtype="bfloat16")
    real = real_step_bytes(lora)
    assert {k: est[k] for k in real} == real
    if lora:  # sum over the wrapped linears of r * (in + out)
        cfg = memory.read_config(DEFAULT_MODEL)
        D, I, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * cfg.head_dim, \
            cfg.num_key_value_heads * cfg.head_dim
        per_layer = 8 * ((D + q) * 2 + (D + kv) * 2 + (D + I) * 3)
        assert est["n_trainable"] == cfg.num_hidden_layers * per_layer


def test_json_last_line(capsys):
    config_json = os.path.join(DEFAULT_MODEL, "config.json")  # a bare config.json is enough
    assert memory.main(["--model", config_json, "--batch-size", "2", "--max-length", "64", "--lora-r", "4",
                        "--grad-checkpointing", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "saved-tensor hooks" in out[-2]
    row = json.loads(out[-1])
    parts = [row[f"{p}_gb"] for p in memory.PARTS]
    assert row["total_gb"] > 0 and all(p >= 0 for p in parts)
    assert row["total_gb"] == pytest.approx(sum(parts), abs=1e-3)


def test_lora_dropout_adds_one_byte_mask_per_adapter_input():
    """LoRA dropout keeps a mask of each adapter's input for backward. CUDA's fused dropout
    (torch.native_dropout, which the CPU can run too) keeps it as bool: one byte per number, which the
    estimate adds per adapted layer; under checkpointing only one block's, while it runs again."""
    x = torch.randn(3, 5, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        torch.native_dropout(x, 0.1, True)[0].sum()
    assert [(t.dtype, t.element_size()) for t in saved] == [(torch.bool, 1)]
    kw = dict(lora_r=4, dtype="bfloat16")
    plain = memory.estimate(DEFAULT_MODEL, 2, 32, **kw)
    drop = memory.estimate(DEFAULT_MODEL, 2, 32, lora_dropout=0.05, **kw)
    cfg = memory.read_config(DEFAULT_MODEL)
    # all-linear: q, k, v, gate and up read [.., D]; o_proj reads [.., H * hd]; down_proj reads [.., I]
    per_layer = 5 * cfg.hidden_size + cfg.num_attention_heads * cfg.head_dim + cfg.intermediate_size
    assert drop["activations"] - plain["activations"] == 2 * 32 * per_layer * cfg.num_hidden_layers
    ck_plain = memory.estimate(DEFAULT_MODEL, 2, 32, grad_checkpointing=True, **kw)
    ck_drop = memory.estimate(DEFAULT_MODEL, 2, 32, grad_checkpointing=True, lora_dropout=0.05, **kw)
    assert ck_drop["activations"] == ck_plain["activations"]
    assert ck_drop["transient"] >= ck_plain["transient"]
    assert memory.estimate(DEFAULT_MODEL, 2, 32, lora_dropout=0.05, dtype="bfloat16")["total"] == \
        memory.estimate(DEFAULT_MODEL, 2, 32, dtype="bfloat16")["total"]  # no LoRA, no adapters' dropout


@pytest.mark.parametrize("args, words", [
    (["--model", "no/such-model-here"], "no/such-model-here"),
    (["--model", "/nonexistent/folder"], "/nonexistent/folder"),
    (["--model", DEFAULT_MODEL, "--dtype", "float16"], "--dtype"),
    (["--model", DEFAULT_MODEL, "--max-length", "1"], "--max-length"),
    (["--model", DEFAULT_MODEL, "--lora-r", "4", "--lora-dropout", "1.5"], "--lora-dropout"),
])
def test_bad_arguments_are_one_line_errors(capsys, monkeypatch, args, words):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert memory.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err


def test_cli_exit_code_and_stderr(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "minisft.memory", "--model", str(tmp_path / "missing")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "missing" in r.stderr


def test_smollm3_3b_lora_with_checkpointing_fits_in_16_gb():
    path = SHARED / "configs" / "SmolLM3-3B" / "config.json"
    if not path.is_file():
        pytest.skip(f"{path} is absent: this test needs ../shared beside the checkout")
    est = memory.estimate(str(path), 2, 2048, lora_r=8, grad_checkpointing=True, dtype="bfloat16")
    assert est["weights"] > 6e9  # 3B frozen parameters in bf16 are in it
    assert est["total"] < 16e9, memory.format_report(est)


def test_fsdp_divides_weights_gradients_and_adamw_but_not_activations():
    """--world-size 4 --fsdp: each process keeps its dim-0 rows of every parameter (padded to 4);
    activations, loss and transient stay whole; the gathered block and root come in. Without
    --fsdp (DDP) the world size changes nothing."""
    config_json = os.path.join(DEFAULT_MODEL, "config.json")
    one = memory.estimate(config_json, 2, 64)
    four = memory.estimate(config_json, 2, 64, world_size=4, fsdp=True)
    ddp = memory.estimate(config_json, 2, 64, world_size=4)
    model = memory.build(memory.read_config(config_json), device="meta")
    rows = sum(-(-p.shape[0] // 4) * (p.numel() // p.shape[0]) for p in model.parameters())
    assert four["weights"] == four["gradients"] == 4 * rows
    assert four["optimizer"] == 8 * rows + 4 * len(list(model.parameters()))
    assert one["weights"] / 4 <= four["weights"] < one["weights"] / 4 * 1.05
    for part in ("activations", "loss", "transient"):
        assert four[part] == one[part]
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    root = model.num_parameters() - block * len(model.model.layers)
    assert four["gathered"] == 2 * (root + 2 * block) + 4 * block  # bf16 root + 2 blocks, a block's f32 grads
    assert one["gathered"] == 0 and four["total"] < one["total"]
    assert {k: ddp[k] for k in memory.PARTS} == {k: one[k] for k in memory.PARTS}
    assert memory.main(["--model", config_json, "--world-size", "0", "--fsdp"]) == 2
