"""final/README.md (the model card) and python -m minisft.push, offline: the card parses as a Hub model card
and carries the run's numbers; push fails in one line, quickly, where it cannot reach the Hub."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minisft import model_card, push
from tiny_run import shared_run

ROOT = Path(__file__).resolve().parent.parent


def card_of(folder):
    from huggingface_hub import ModelCard  # parses the front matter the way the Hub does

    text = (Path(folder) / "README.md").read_text(encoding="utf-8")
    return text, ModelCard(text).data.to_dict()


def test_a_finished_run_has_a_model_card(tmp_path_factory):
    run = shared_run(tmp_path_factory)
    text, meta = card_of(os.path.join(run, "final"))
    assert meta == {"library_name": "transformers", "tags": ["minisft", "sft"], "pipeline_tag": "text-generation"}
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"), encoding="utf-8")]
    evals = [r for r in rows if "val_loss" in r]
    assert f"| final train loss | {rows[-1]['loss']:.4f} |" in text
    assert f"| final validation loss | {evals[-1]['val_loss']:.4f} (step {evals[-1]['step']}) |" in text
    assert f"| optimizer steps | {len(rows)} |" in text and "| lr | `0.001` |" in text
    assert "`base-model` (local model folder)" in text and "/work" not in text and str(ROOT) not in text


def test_an_adapter_card_says_peft(tmp_path_factory):
    run = shared_run(tmp_path_factory, "lora", lora_r=4)
    text, meta = card_of(os.path.join(run, "final"))
    assert meta["library_name"] == "peft" and "lora" in meta["tags"] and "LoRA adapter (rank 4)" in text


def test_hub_ids_go_into_the_front_matter(tmp_path):
    cfg = {"model": "HuggingFaceTB/SmolLM2-135M", "data": "HuggingFaceTB/smoltalk2", "val_data": None, "lr": 5e-5}
    rows = [{"step": 0, "loss": 2.0}, {"step": 1, "loss": 1.5, "val_loss": 1.7}]
    (tmp_path / "README.md").write_text(model_card.card(cfg, rows, False, "sft"), encoding="utf-8")
    text, meta = card_of(tmp_path)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M" and meta["datasets"] == ["HuggingFaceTB/smoltalk2"]
    assert "| best validation loss | 1.7000 (step 1) |" in text


def test_evaluate_card_puts_the_evaluation_into_the_card(tmp_path_factory, tmp_path, capsys):
    """python -m minisft.evaluate --model RUN/final --card: the numbers the card shows are those an
    evaluation of the same weights gives; weights replaced later drop the section from the card."""
    from minisft import evaluate
    from minisft.default_model import DEFAULT_MODEL
    from minisft.weights import load_pretrained

    run = Path(shutil.copytree(shared_run(tmp_path_factory), tmp_path / "run"))  # the shared run stays as it is
    data = tmp_path / "test6.jsonl"
    data.write_text("".join(open(ROOT / "data" / "sft_test.jsonl", encoding="utf-8").readlines()[:6]), encoding="utf-8")
    assert evaluate.main(["--model", str(run / "final"), "--model", DEFAULT_MODEL, "--data", str(data),
                          "--max-new-tokens", "16", "--card"]) == 0  # the base beside it: compared, no card
    assert capsys.readouterr().out.count(f"results added to the model card {run / 'final' / 'README.md'}") == 1
    model, tok = load_pretrained(str(run / "final"))
    _, summary = evaluate.evaluate_model(model, tok, evaluate.load_records(data), max_new_tokens=16)
    saved = json.loads((run / "evaluation.json").read_text(encoding="utf-8"))
    assert saved["metrics"] == {k.strip(): list(v) for k, v in summary.items()}
    text, meta = card_of(run / "final")
    assert meta["library_name"] == "transformers" and "## Evaluation" in text and "`test6.jsonl` (local file)" in text
    rate, n = summary["format compliance"]
    assert n == 6 and f"| format compliance | {100 * rate:.1f}% | 6 |" in text
    assert "| ends with <\\|im_end\\|> |" in text  # the bars escaped: one row, three cells
    weights = run / "final" / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # other weights now
    assert model_card.main([str(run)]) == 0
    assert "## Evaluation" not in card_of(run / "final")[0]


def test_evaluate_card_refuses_a_model_that_is_not_a_run(tmp_path, capsys):
    from minisft import evaluate
    from minisft.default_model import DEFAULT_MODEL

    assert evaluate.main(["--model", DEFAULT_MODEL, "--card"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --card: no --model ") and err.count("\n") == 1 and "final/ folder" in err


def run_push(*args, **env):
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "minisft.push", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **env})
    return proc, time.time() - start


@pytest.mark.parametrize("env, message", [
    ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set: pushing needs the network"),
    ({"HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_test"}, "cannot push to http://127.0.0.1:9"),
    ({"HF_TOKEN": "", "HF_HOME": "{tmp}"}, "not logged in to the Hub: run `hf auth login`"),
])
def test_push_offline_is_one_line(env, message, tmp_path_factory, tmp_path):
    run = shared_run(tmp_path_factory)
    env = {k: v.format(tmp=tmp_path) for k, v in env.items()}
    proc, took = run_push(run, "someone/model", **env)
    assert proc.returncode == 1 and proc.stdout == "" and took < 60
    assert proc.stderr.startswith("error: ") and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_push_refuses_a_folder_without_a_model(tmp_path):
    proc, _ = run_push(tmp_path, "someone/model")
    assert proc.returncode == 1 and "not a model folder" in proc.stderr and proc.stderr.count("\n") == 1


def test_push_creates_the_repo_and_uploads_final(tmp_path_factory, monkeypatch, capsys):
    """With the Hub replaced by a recorder: the calls huggingface_hub gets."""
    import huggingface_hub

    run = shared_run(tmp_path_factory)
    calls = []
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: calls.append(("create", repo_id, kw)))
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: calls.append(("upload", kw)) or
                        type("Info", (), {"commit_url": "https://hub/commit/1"})())
    assert push.main([run, "me/sft", "--private"]) == 0
    assert calls == [("create", "me/sft", {"private": True, "exist_ok": True}),
                     ("upload", {"folder_path": os.path.join(run, "final"), "repo_id": "me/sft",
                                 "commit_message": "Upload with minisft"})]
    assert capsys.readouterr().out == f"pushed {os.path.join(run, 'final')} to me/sft: https://hub/commit/1\n"
