"""The trainer on the dataset shapes the course and TRL ship: Hub ids, parquet shards, prompt/completion, text."""
import json

import pytest

from minisft import train as T
from test_datasets import CHAT, KWARGS, fake_hub, offline_cache, write_jsonl, write_parquet  # noqa: F401
from test_train import config, read_metrics, tiny  # noqa: F401  (fixtures)


def qa(i):
    return {"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                         {"role": "assistant", "content": f"{i} + {i} = {2 * i}."}],
            # no_think: SmolLM3's think-mode system prompt alone is longer than the tiny model's context
            "chat_template_kwargs": {k: (False if k == "enable_thinking" else None) for k in KWARGS},
            "tools": None}


def test_train_from_a_hub_dataset_id_offline(tiny, tmp_path, offline_cache, capsys):
    fake_hub(offline_cache, "HuggingFaceTB/smoltalk2", {
        "SFT/everyday-00000-of-00002.parquet": [qa(i) for i in range(12)],
        "SFT/everyday-00001-of-00002.parquet": [qa(i) for i in range(12, 20)]})
    argv = ["--model", tiny["model"], "--data", "HuggingFaceTB/smoltalk2", "--data-subset", "SFT",
            "--data-split", "everyday", "--template", "smollm3", "--out", str(tmp_path / "run"), "--device", "cpu",
            "--batch-size", "4", "--max-steps", "2", "--sample-every", "0", "--val-fraction", "0.2"]
    assert T.main(argv) == 0
    out = capsys.readouterr().out
    assert "data: 16 training conversations" in out and "4 validation" in out
    rows = read_metrics(str(tmp_path / "run"))
    assert len(rows) == 2 and "val_loss" in rows[-1]
    # Not in the cache and offline: one line of advice, exit 2, nothing written.
    missing = [a if a != "everyday" else "chats" for a in argv] + ["--overwrite"]
    assert T.main(missing) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--repo-type dataset" in err


def test_train_on_prompt_completion_and_text_formats(tiny, tmp_path):
    pc = [{"prompt": [{"role": "user", "content": f"What is {i} + 1?"}],
           "completion": [{"role": "assistant", "content": f"It is {i + 1}."}]} for i in range(16)]
    text = [{"text": f"the river {i} is near the old city {i}."} for i in range(16)]
    plain = [{"prompt": f"{i} + {i} =", "completion": f" {2 * i}."} for i in range(16)]
    for name, records in (("pc", pc), ("text", text), ("plain", plain)):
        path = write_parquet(tmp_path / name / "train-00000-of-00001.parquet", records)
        out = T.train(config(tiny, tmp_path / f"run_{name}", data=str(path.parent), val_data=None, max_steps=2,
                             sample_every=0, grad_accum=1))
        rows = read_metrics(out["out"], timing=True)
        for r in rows:
            if name == "text":  # every token but the first of each row is a target
                assert r["tokens"] == r["input_tokens"] - 4
            else:  # the prompt is context, never a target
                assert 0 < r["tokens"] < r["input_tokens"] - 4


def test_samples_from_template_settings(tiny, tmp_path):
    """Validation records with per-record settings give sample prompts rendered with those settings."""
    val = write_jsonl(tmp_path / "val.jsonl", [qa(1), qa(2)])
    train = write_jsonl(tmp_path / "train.jsonl", [qa(i) for i in range(8)])
    out = T.train(config(tiny, tmp_path / "run", data=str(train), val_data=str(val), template="smollm3", max_steps=1,
                         sample_every=1))
    samples = [json.loads(ln) for ln in open(tmp_path / "run" / "samples.jsonl")]
    assert [s["question"] for s in samples] == ["What is 1 + 1?", "What is 2 + 2?"]
    assert out["steps"] == 1


def test_max_examples_takes_the_first_conversations(tiny, tmp_path, capsys):
    out = T.train(config(tiny, tmp_path / "run", max_examples=8, val_data=None, max_steps=1, sample_every=0,
                         batch_size=4, grad_accum=1))
    assert "data: 8 training conversations" in capsys.readouterr().out and out["steps"] == 1
    assert T.main(["--model", tiny["model"], "--data", tiny["train"], "--out", str(tmp_path / "o"),
                   "--max-examples", "0"]) == 2
    assert "--max-examples=0" in capsys.readouterr().err


def test_packing_trains_every_target_once_per_epoch_within_the_token_budget(tiny, tmp_path, capsys):
    padded = T.train(config(tiny, tmp_path / "padded", max_steps=None, epochs=1, sample_every=0, eval_every=0))
    capsys.readouterr()
    packed = T.train(config(tiny, tmp_path / "packed", max_steps=None, epochs=1, sample_every=0, eval_every=0,
                            packing=True, max_tokens=300))
    log = capsys.readouterr().out
    assert "micro-batches of <= 300 tokens" in log, [ln for ln in log.splitlines() if "data:" in ln or "steps of" in ln]
    rows_padded, rows_packed = read_metrics(padded["out"], timing=True), read_metrics(packed["out"], timing=True)
    assert sum(r["tokens"] for r in rows_packed) == sum(r["tokens"] for r in rows_padded)
    assert sum(r["input_tokens"] for r in rows_packed) == sum(r["input_tokens"] for r in rows_padded)
    assert all(r["input_tokens"] <= 300 * 2 for r in rows_packed)  # 2 micro-batches of <= 120 tokens per step
    assert T.main(["--model", tiny["model"], "--data", tiny["train"], "--out", str(tmp_path / "o"),
                   "--max-tokens", "100"]) == 2
    assert "--max-tokens=100" in capsys.readouterr().err
