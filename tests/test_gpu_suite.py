"""`python -m minisft.bench --suite gpu` runs end to end on the CPU with tiny shapes (the figures need a GPU)."""
import json

import pytest
import torch

from minisft import compiled
from minisft.bench import gpu, main as bench_main
from minisft.model import ModelConfig, SmolLM


@pytest.fixture
def tiny_config(tmp_path, monkeypatch):
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")  # inductor's compile is minutes on 2 shared cores
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=256)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_hf()))
    yield str(path)
    torch._dynamo.reset()
    torch.set_num_threads(old)


def test_the_suite_runs_every_row_on_the_cpu(tiny_config, capfd):
    """Every step row, the packed-rows check, and the rows against TRL (one of them, tiny)."""
    from pathlib import Path
    base = str(Path(__file__).resolve().parent.parent / "data" / "base-model")
    argv = ["--suite", "gpu", "--device", "cpu", "--model", tiny_config, "--lora-model", tiny_config, "--seq", "32",
            "--batches", "2,4", "--steps", "1", "--gemm-seconds", "0.05", "--trl-model", base,
            "--trl-rows", "equal/shape", "--trl-steps", "1", "--trl-max-length", "512", "--json"]
    assert bench_main(argv) == 0  # through the bench's own entry point
    text = capfd.readouterr().out
    out = text.strip().splitlines()
    result = json.loads(out[-1])
    rows = result["rows"]
    assert result["packed_grad_diff"] < 1e-5 and result["packed_loss_diff"] < 1e-6
    assert "packed rows, one attention per conversation against the dense mask (float32)" in text
    assert "--rows equal/shape" in text and "TRL" in text  # the end-to-end bench's table
    # 2 batch sizes + 1 LoRA row, x (float32, float16) on the CPU, x (eager, compiled)
    assert len(rows) == 12 and out[0].split()[:3] == ["model", "lora", "dtype"]
    assert {(r["dtype"], r["compile"]) for r in rows} == {(d, c) for d in ("float32", "float16") for c in (False, True)}
    assert sum(r["lora_r"] > 0 for r in rows) == 4
    for r in rows:
        assert r["step_ms"] > 0 and r["tokens_per_s"] > 0 and 0 < r["mfu"] and r["peak_mb"] is None
        assert r["seq"] == 32


def test_flops_per_token_is_6n_plus_attention():
    cfg = ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=256)
    model = SmolLM(cfg)
    n = sum(p.numel() for p in model.parameters())  # tied: the embedding counted once, as lm_head
    assert gpu.flops_per_token(model, 100, lora=False) == 6 * n + 12 * 2 * 32 * 100
    assert gpu.flops_per_token(model, 100, lora=True) == 4 * n + 12 * 2 * 32 * 100


def test_bad_batches_are_one_line_errors(capsys):
    assert gpu.main(["--suite", "gpu", "--device", "cpu", "--batches", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: --batches")
