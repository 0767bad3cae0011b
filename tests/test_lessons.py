"""Every lesson runs to the end (MINISFT_FAST=1), and the default SFT recipe really teaches the chat format.

The lessons run as subprocesses, as a user would start them, with MINISFT_RUNS pointing their runs/
folder at a temporary one, so the tests never touch a user's runs/ in the checkout. The default-recipe test trains the full, unshortened lesson-6 run once
into a temporary folder (about a minute on 2 cores) and checks it on the held-out test set.
"""
import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minisft.default_model import DEFAULT_MODEL
from minisft.evaluate import (SFT_RECIPE, TEST_DATA, check_answer, contains_answer, evaluate_model, final_answer,
                              load_records, sft_default)
from minisft.tokenizer import Tokenizer
from minisft.weights import load_pretrained

ROOT = Path(__file__).resolve().parent.parent
LESSONS = sorted((ROOT / "lessons").glob("0*.py"))
PNG = re.compile(r"runs/[\w./-]+\.png")  # plot paths a lesson names in its source


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    """One runs/ folder for all lessons: lesson 7 and 8 read what lesson 6 wrote there."""
    return tmp_path_factory.mktemp("runs")


def test_there_are_lessons():
    assert len(LESSONS) >= 8, [p.name for p in LESSONS]


@pytest.mark.parametrize("lesson", LESSONS, ids=[p.stem for p in LESSONS])
def test_lesson_runs(lesson, runs_dir):
    env = dict(os.environ, MINISFT_FAST="1", OMP_NUM_THREADS="2", MPLBACKEND="Agg", MINISFT_RUNS=str(runs_dir))
    start = time.time() - 1
    proc = subprocess.run([sys.executable, str(lesson)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{lesson.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    for rel in sorted(set(PNG.findall(lesson.read_text(encoding="utf-8")))):
        path = runs_dir / rel[len("runs/"):]
        assert path.is_file(), f"{lesson.name} names {rel} but did not write it"
        assert path.stat().st_mtime >= start, f"{rel} is left from an earlier run: {lesson.name} did not rewrite it"


def _load_lesson(name):
    spec = importlib.util.spec_from_file_location(name.replace(".py", ""), ROOT / "lessons" / name)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_lesson6_knobs_are_the_default_recipe():
    # Lesson 7, lesson 8 and the threshold test below train with SFT_RECIPE: it must be lesson 6's run.
    assert _load_lesson("06_sft_loop.py").KNOBS == SFT_RECIPE


# ---- the checks of minisft/evaluate.py on hand-made answers --------------------------------
def test_answer_matching_rules():
    assert contains_answer("The answer is 18.", "18")
    assert not contains_answer("The answer is 118.", "18")
    assert contains_answer("it is FALTER", "Falter")
    assert final_answer("<think>\nmaybe Oster\n</think>\nIt is Kerholm.") == "It is Kerholm."
    assert final_answer("It is Oster.") == "It is Oster."


def test_check_answer_format_and_think():
    tok = Tokenizer.from_dir(DEFAULT_MODEL)
    think = {"prompt": [{"role": "system", "content": "x /think"}], "meta": {"answer": "8", "kind": "arithmetic"}}
    plain = {"prompt": [{"role": "system", "content": "x /no_think"}], "meta": {"answer": "8", "kind": "arithmetic"}}
    end = [tok.im_end_id]
    good = check_answer(tok, tok.encode("<think>\n3 + 5 = 8.\n</think>\nIt is 8.") + end, think)
    assert good["format_ok"] and good["think_ok"] and good["correct"]
    wrong_in_trace = check_answer(tok, tok.encode("<think>\nit is 8\n</think>\nIt is 9.") + end, think)
    assert wrong_in_trace["format_ok"] and not wrong_in_trace["correct"]  # only the final answer counts
    assert not check_answer(tok, tok.encode("It is 8.") + end, think)["think_ok"]
    assert not check_answer(tok, tok.encode("<think>\nhm\n</think>\n8") + end, plain)["think_ok"]
    no_stop = check_answer(tok, tok.encode("It is 8."), plain)
    assert not no_stop["format_ok"] and no_stop["correct"]
    leak = check_answer(tok, tok.encode("It is 8.\nuser\nAnd now?") + end, plain)
    assert leak["role_leak"] and not leak["format_ok"]
    leak2 = check_answer(tok, tok.encode("It is 8.<|im_start|>user") + end, plain)
    assert leak2["role_leak"] and not leak2["format_ok"]


# ---- the full default run -----------------------------------------------------------------
@pytest.fixture(scope="session")
def default_run(tmp_path_factory):
    """The unshortened lesson-6 recipe, trained once per test session -> its summary."""
    out = tmp_path_factory.mktemp("default_sft") / "run"
    return sft_default(str(out), plot_every=0, sample_every=0)  # the same trajectory, fewer side outputs


def test_default_sft_teaches_the_format(default_run):
    assert default_run["stop_reason"] in ("finished", "early_stopping"), default_run
    assert default_run["best_val_loss"] < 0.5, default_run
    records = load_records(TEST_DATA)
    summaries = {}
    for name, path in (("base", DEFAULT_MODEL), ("tuned", default_run["final"])):
        model, tok = load_pretrained(path)
        summaries[name] = evaluate_model(model, tok, records)[1]
    base, tuned = summaries["base"], summaries["tuned"]
    msg = f"base {base}\ntuned {tuned}"
    assert tuned["format compliance"][0] >= 0.95, msg
    assert base["format compliance"][0] <= 0.5, msg
    assert tuned["think mode followed"][0] >= 0.9, msg
    assert tuned["  accuracy fact_seen"][0] >= 0.8, msg
    assert tuned["answer accuracy"][0] > base["answer accuracy"][0] + 0.2, msg
