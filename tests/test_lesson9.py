"""Lesson 9 (LoRA vs full fine-tuning) runs to the end and what it prints holds.

The lesson runs as a subprocess with MINISFT_FAST=1 and MINISFT_RUNS pointing at a temporary folder
(as tests/test_lessons.py runs every lesson). That folder has no lesson-6 run, so the lesson trains
both sides itself: the path that takes longest.
"""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LESSON = ROOT / "lessons" / "09_lora.py"


def run_lesson(runs, *args):
    env = dict(os.environ, MINISFT_FAST="1", OMP_NUM_THREADS="2", MPLBACKEND="Agg", MINISFT_RUNS=str(runs))
    return subprocess.run([sys.executable, str(LESSON), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def lesson(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    start = time.time() - 1
    proc = run_lesson(runs)
    assert proc.returncode == 0, f"lesson 9 failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout, runs, start


def memory_row(out, label):
    """The (full FT, LoRA) MB values of one row of the memory table."""
    m = re.search(rf"^\s*{re.escape(label)}\s+([\d.]+) MB\s+([\d.]+) MB$", out, re.MULTILINE)
    assert m, f"no memory row {label!r} in:\n{out[-3000:]}"
    return float(m[1]), float(m[2])


def test_trains_both_sides_when_lesson6_is_missing(lesson):
    out, runs, _ = lesson
    assert "training it here with lesson 6's recipe, 30 steps" in out, out[-3000:]
    assert (runs / "09_lora" / "full" / "final" / "model.safetensors").is_file()
    assert (runs / "09_lora" / "lora" / "final" / "adapter_config.json").is_file()  # LoRA's final/ is an adapter


def test_trainable_share(lesson):
    out = lesson[0]
    shares = dict(re.findall(r"^\s+(full FT|LoRA)\s+[\d,]+\s+\(\s*([\d.]+)% of", out, re.MULTILINE))
    # Full fine-tuning as lesson 6 runs it: every weight but the MLPs of the recipe's frozen upper blocks.
    from minisft.default_model import DEFAULT_MODEL
    from minisft.recipes import SFT_RECIPE
    from minisft.weights import load_pretrained
    model, _ = load_pretrained(DEFAULT_MODEL)
    frozen = sum(p.numel() for block in model.model.layers[-SFT_RECIPE["freeze_top_mlps"]:]
                 for p in block.mlp.parameters())
    assert frozen > 0 and float(shares["full FT"]) == round(100 * (1 - frozen / model.num_parameters()), 2), out[-3000:]
    assert 0 < float(shares["LoRA"]) < 100, out[-3000:]


def test_memory_counts(lesson):
    out = lesson[0]
    formula, counted = memory_row(out, "AdamW moments: 2 x 4 B x trainable"), memory_row(out, "AdamW moments: counted in state")
    assert formula == counted, (formula, counted)  # the optimizer holds exactly two float32 moments per trainable weight
    assert counted[1] < counted[0] / 5, counted  # LoRA's moments are a small fraction of full fine-tuning's
    grads = memory_row(out, "gradients (4 B x trainable)")
    assert grads[1] < grads[0] / 5, grads
    act = memory_row(out, "activations saved for backward")
    assert act[0] > 0 and act[1] > 0, act


def test_merged_model_answers_identically(lesson):
    out = lesson[0]
    assert "merged answers identical: True" in out, out[-3000:]
    m = re.search(r"(\d+)/(\d+) identical token for token", out)
    assert m and m[1] == m[2] == "40", out[-3000:]
    diff = float(re.search(r"max \|logit difference\| on a training micro-batch: (\S+)", out)[1])
    assert diff < 1e-3, diff
    assert (lesson[1] / "09_lora" / "merged" / "model.safetensors").is_file()


def test_plot_and_evaluation(lesson):
    out, runs, start = lesson
    plot = runs / "09_lora" / "compare.png"
    assert plot.is_file() and plot.stat().st_mtime >= start
    for metric in ("format compliance", "accuracy fact_seen", "accuracy fact_unseen"):
        assert re.search(rf"{metric}\s+[\d.]+% /\d+\s+[\d.]+% /\d+", out), metric


def test_bad_model_is_a_one_line_error(tmp_path):
    bad = str(tmp_path / "no-such-model")
    proc = run_lesson(tmp_path, "--model", bad)
    assert proc.returncode != 0, proc.stdout[-2000:]
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and bad in err[0], proc.stderr[-3000:]
