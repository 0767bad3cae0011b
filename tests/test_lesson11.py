"""Lesson 11 (speed and memory) runs to the end, and the numbers it prints agree with each other.

The lesson runs once (MINISFT_FAST=1) as a subprocess, as a user would start it, with MINISFT_RUNS
pointing its runs/ folder at a temporary one. Times are not compared with each other (the machine may
be busy); byte counts and padding efficiencies are deterministic and are.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LESSON = ROOT / "lessons" / "11_speed_and_memory.py"
NUM = r"([\d,]+(?:\.\d+)?)"


def number(pattern, text):
    """The first group of `pattern` (NUM where the number is) in text, as a float."""
    m = re.search(pattern, text)
    assert m, f"no line matching {pattern!r} in:\n{text}"
    return float(m.group(1).replace(",", ""))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    env = dict(os.environ, MINISFT_FAST="1", OMP_NUM_THREADS="2", MPLBACKEND="Agg", MINISFT_RUNS=str(runs))
    proc = subprocess.run([sys.executable, str(LESSON)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"lesson 11 failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout, runs / "11_speed_and_memory"


def test_writes_its_plots(run):
    _, out = run
    for name in ("memory.png", "speed.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 1000, name


def test_memory_parts_add_up(run):
    text = run[0].split("\n2. ")[0]
    first = text.split("SmolLM2-135M")[0]  # the default model's block
    n_params = number(r"data/base-model: " + NUM + " parameters", first)
    parts = {p: number(rf"{p}\s+" + NUM + " MB", first)
             for p in ("weights", "gradients", "optimizer", "activations", "loss", "transient", "total")}
    assert parts["weights"] == pytest.approx(n_params * 4 / 1e6, abs=0.006)  # float32: 4 bytes a parameter
    assert parts["gradients"] == parts["weights"]
    assert parts["optimizer"] == pytest.approx(2 * parts["weights"], abs=0.02)  # two AdamW moments
    assert parts["activations"] > parts["weights"]  # at 8 x 192 tokens the activations dominate a tiny model
    assert parts["total"] == pytest.approx(sum(v for k, v in parts.items() if k != "total"), abs=0.03)
    if (ROOT.parent / "shared" / "configs" / "SmolLM2-135M" / "config.json").is_file():
        assert number(r"SmolLM2-135M .*?: " + NUM + " parameters", text) == 134_515_008
    else:
        assert "the SmolLM2-135M comparison is skipped" in text


def test_chunked_loss_and_checkpointing_keep_less(run):
    text = run[0]
    full = number(r"full logits \+ masked_cross_entropy\s+" + NUM + " MB", text)
    chunked = number(r"\n\s+chunked_cross_entropy\s+" + NUM + " MB", text)
    assert 0 < chunked < full
    off = number(r"off\s+kept for backward\s+" + NUM + " MB", text)
    on = number(r"on\s+kept for backward\s+" + NUM + " MB", text)
    assert off == chunked  # the same micro-batch, the same loss: step 4's "off" is step 2's chunked count
    assert 0 < on < off / 2  # only each block's input is kept


def test_hand_written_backwards_keep_less(run):
    """Step 5: per token, a block keeps two float32 [D] less per norm (its normalised x, and the copy the
    Linears after it read) and two [I] (silu(gate), down_proj's input) less."""
    rows = re.findall(r"^\s+(\S+)\s+plain ops\s+" + NUM + r"\s+minisft\s+" + NUM
                      + r".*?2 x D=(\d+) \+ 2 x I=(\d+)", run[0], re.MULTILINE)
    assert rows and rows[0][0] == "data/base-model", run[0][-3000:]
    for _, plain, ours, D, I in rows:
        plain, ours = float(plain.replace(",", "")), float(ours.replace(",", ""))
        assert 0 < ours < plain and plain - ours == 4 * (2 * 2 * int(D) + 2 * int(I))


def test_packing_pads_less_than_random_batches(run):
    text = run[0]
    random_eff = number(r"random micro-batches of 8\s+" + NUM + "%", text)
    grouped = number(r"--group-by-length\s+" + NUM + "%", text)
    packed = number(r"--packing \(budget \d+ tokens\)\s+" + NUM + "%", text)
    assert 0 < random_eff < grouped <= 100
    assert packed == 100.0  # one row per packed micro-batch: nothing to pad
    for kind in ("padded", "packed"):
        ms = number(kind + r"\s+" + NUM + " ms/step", text)
        tokens = number(kind + r".*?ms/step\s+" + NUM + " real tokens", text)
        slots = number(kind + r".*?real tokens in\s+" + NUM + " slots", text)
        tok_s = number(kind + r".*?slots\s+->\s+" + NUM + " useful tokens/s", text)
        assert 0 < tokens <= slots and ms > 0
        assert kind == "padded" or tokens == slots
        assert tok_s == pytest.approx(tokens / (ms / 1000), rel=0.02)  # ms are rounded to whole ones


def test_bad_model_is_a_one_line_error(tmp_path):
    env = dict(os.environ, MINISFT_FAST="1", MPLBACKEND="Agg", MINISFT_RUNS=str(tmp_path))
    bad = str(tmp_path / "no-such-model")
    proc = subprocess.run([sys.executable, str(LESSON), "--model", bad], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0, proc.stdout[-2000:]
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and bad in err[0], proc.stderr[-3000:]
