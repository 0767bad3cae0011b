"""python -m minisft.report: one self-contained HTML page whose numbers are the run's own."""
import html
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minisft import report
from minisft.chat_template import tokenize_conversation
from minisft.conversations import load_conversations
from minisft.loss import masked_cross_entropy
from minisft.rundir import saved_config
from minisft.weights import load_pretrained
from tiny_run import shared_run

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    run = shared_run(tmp_path_factory)
    path = report.write_report(run, n_conversations=2)
    assert path == os.path.join(run, "report.html")
    return run, open(path, encoding="utf-8").read()


def shown(text):
    """{data-key: the number printed in that cell}."""
    return dict(re.findall(r'data-key="([\w]+)">([^<]*)<', text))


def rows_of(run):
    return [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"), encoding="utf-8")]


def test_summary_numbers_are_the_runs(page):
    run, text = page
    rows, values = rows_of(run), shown(page[1])
    evals = [r for r in rows if "val_loss" in r]
    best = min(evals, key=lambda r: r["val_loss"])
    assert values["steps"] == str(len(rows)) == "4"
    assert values["loss"] == f"{rows[-1]['loss']:.4f}"
    assert values["best_val_loss"] == f"{best['val_loss']:.4f}" and values["best_step"] == str(best["step"])
    assert values["last_val_loss"] == f"{evals[-1]['val_loss']:.4f}"
    for key in ("mean_token_accuracy", "entropy", "learning_rate", "grad_norm"):
        assert values[key] == report.fmt(rows[-1][key]), key
    assert report.fmt(0.00015) == "0.00015" and report.fmt(2.0) == "2.0000" and report.fmt(7) == "7"
    assert values["num_tokens"] == str(rows[-1]["num_tokens"])


def test_per_token_losses_equal_the_loss_of_each_model(page):
    run, text = page
    cfg, values = saved_config(run), shown(text)
    convs = load_conversations(cfg["val_data"])[0][:2]
    base, tok = load_pretrained(cfg["model"], device="cpu")
    tuned, _ = load_pretrained(os.path.join(run, "final"), device="cpu")
    for i, conv in enumerate(convs):
        ex = tokenize_conversation(tok, conv, "smollm2")
        ids, labels = torch.tensor([ex["input_ids"]]), torch.tensor([ex["labels"]])
        for model, when in ((base, "before"), (tuned, "after")):
            with torch.no_grad():
                loss_sum, n = masked_cross_entropy(model(ids), labels)
            assert values[f"conv{i}_{when}"] == f"{float(loss_sum) / n:.4f}", (i, when)
        # the <|im_end|> that closes the answer is the "markup" target, the answer text the rest
        assert values[f"conv{i}_markup_before"] and values[f"conv{i}_text_after"]
    block = text.split("<h3>conversation 0</h3>")[1].split("<h3>")[0]
    before = block.split("after SFT")[0]
    n_targets = int(re.search(r'<td>all</td><td class="num">(\d+)</td>', block).group(1))
    assert before.count('title="loss ') == n_targets > 0  # one coloured span per target token
    assert 'class="tok masked"' in before  # the prompt is shown, greyed


def test_samples_and_self_contained(page):
    run, text = page
    samples = [json.loads(line) for line in open(os.path.join(run, "samples.jsonl"), encoding="utf-8")]
    assert samples and all(html.escape(s["answer"]) in text for s in samples)
    assert "data:image/png;base64," in text
    assert not re.search(r'(src|href)=["\']?(https?:)?//', text)  # nothing fetched from anywhere


def test_cli_and_errors(page, tmp_path):
    run, _ = page
    out = tmp_path / "r.html"
    proc = subprocess.run([sys.executable, "-m", "minisft.report", run, "--conversations", "0", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout == f"wrote {out}\n", proc.stderr
    assert "No validation conversations" in out.read_text(encoding="utf-8")
    bad = subprocess.run([sys.executable, "-m", "minisft.report", str(tmp_path / "nope")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1
