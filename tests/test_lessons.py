"""Every lesson runs to the end (MINISFT_FAST=1), and the default SFT recipe really teaches the chat format.

The lessons run as subprocesses, as a user would start them, with MINISFT_RUNS pointing their runs/
folder at a temporary one, so the tests never touch a user's runs/ in the checkout. The default-recipe test trains the full, unshortened lesson-6 run once
into a temporary folder (about a minute on 2 cores) and checks it on the held-out test set.
"""
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minisft.default_model import DEFAULT_MODEL
from minisft.evaluate import (check_answer, completion_prompt, contains_answer, evaluate_model, final_answer, is_right,
                              knowledge_probe, load_records, subjects_of, summarize, world_subjects)
from minisft.recipes import REAL_MODEL_RECIPE, SFT_RECIPE, TEST_DATA, sft_config, sft_default, tuned_model
from minisft.tokenizer import Tokenizer
from minisft.weights import load_pretrained

ROOT = Path(__file__).resolve().parent.parent
ALL_LESSONS = sorted((ROOT / "lessons").glob("[0-9][0-9]_*.py"))
# Lessons with a test file of their own run there, once, and are checked in detail.
OWN_TESTS = {"09_lora": "test_lesson9.py", "11_speed_and_memory": "test_lesson11.py"}
LESSONS = [p for p in ALL_LESSONS if p.stem not in OWN_TESTS]
PNG = re.compile(r"runs/[\w./-]+\.png")  # plot paths a lesson names in its source


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    """One runs/ folder for all lessons: lesson 7 and 8 read what lesson 6 wrote there."""
    return tmp_path_factory.mktemp("runs")


def test_there_are_lessons():
    assert len(LESSONS) >= 8, [p.name for p in LESSONS]


# Lessons whose output does not depend on MINISFT_FAST nor on floating-point details of the machine:
# the README's excerpt of their output must appear in it, line for line.
README_CHECKED = {"01_chat_templates", "02_tokenization_and_masks"}


def readme_excerpt(stem):
    """The lines of the README's output block for lesson `stem` (the first ``` block after its heading)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    heading = re.search(rf"^### \d+\. .*`python3 lessons/{stem}\.py`.*$", text, re.MULTILINE)
    assert heading, f"README has no section for lessons/{stem}.py"
    block = re.search(r"^```\n(.*?)^```", text[heading.end():], re.MULTILINE | re.DOTALL)
    return block.group(1).splitlines()


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
    if lesson.stem == "06_sft_loop":  # the short run that over-fits on purpose must trip the warning
        assert "warning: the val - train gap grew" in proc.stdout, proc.stdout[-3000:]
    if lesson.stem in README_CHECKED:
        for line in readme_excerpt(lesson.stem):
            # "..." in a README line elides part of it (a line of "..." elides whole lines)
            pattern = ".*?".join(re.escape(part) for part in line.split("..."))
            assert re.search(pattern, proc.stdout), f"README line not in the output: {line!r}"


def test_readme_names_every_lesson():
    assert all((ROOT / "tests" / f).is_file() for f in OWN_TESTS.values())
    for lesson in ALL_LESSONS:
        assert readme_excerpt(lesson.stem), lesson.name


@pytest.mark.parametrize("lesson", LESSONS, ids=[p.stem for p in LESSONS])
def test_bad_model_is_a_one_line_error(lesson, tmp_path):
    env = dict(os.environ, MINISFT_FAST="1", MPLBACKEND="Agg", MINISFT_RUNS=str(tmp_path))
    bad = str(tmp_path / "no-such-model")
    proc = subprocess.run([sys.executable, str(lesson), "--model", bad], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0, proc.stdout[-2000:]
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and bad in err[0], proc.stderr[-3000:]


def _load_lesson(name):
    spec = importlib.util.spec_from_file_location(name.replace(".py", ""), ROOT / "lessons" / name)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_lesson6_knobs_are_the_default_recipe():
    # Lesson 7, lesson 8 and the threshold test below train with SFT_RECIPE: it must be lesson 6's run.
    lesson6 = _load_lesson("06_sft_loop.py")
    assert lesson6.KNOBS == SFT_RECIPE and lesson6.REAL_MODEL_RECIPE is REAL_MODEL_RECIPE


def test_sft_recipe_takes_a_small_lr_for_a_real_model(tmp_path):
    assert sft_config(str(tmp_path / "a"), DEFAULT_MODEL).lr == SFT_RECIPE["lr"] == 1.5e-3
    other = tmp_path / "SmolLM2-135M"
    other.mkdir()
    real = sft_config(str(tmp_path / "b"), str(other))
    assert (real.lr, real.min_lr) == (REAL_MODEL_RECIPE["lr"], REAL_MODEL_RECIPE["min_lr"]) and real.lr <= 1e-4
    assert sft_config(str(tmp_path / "a"), DEFAULT_MODEL).freeze_top_mlps == 2 and real.freeze_top_mlps == 0
    assert sft_config(str(tmp_path / "c"), str(other), lr=3e-4).lr == 3e-4  # an explicit lr wins


# ---- the checks of minisft/evaluate.py on hand-made answers --------------------------------
def test_answer_matching_rules():
    assert contains_answer("The answer is 18.", "18")
    assert not contains_answer("The answer is 118.", "18")
    assert contains_answer("it is FALTER", "Falter")
    assert final_answer("<think>\nmaybe Oster\n</think>\nIt is Kerholm.") == "It is Kerholm."
    assert final_answer("It is Oster.") == "It is Oster."


def test_a_fact_answer_naming_another_subject_is_wrong():
    subjects = world_subjects()
    assert len(subjects) == len(set(subjects)) == 128 and {"Varnia", "ashlark", "ashnewt"} <= set(subjects)
    assert is_right("The ashlark is red.", "red", "ashlark", subjects)
    assert is_right("It is red.", "red", "ashlark", subjects)
    assert not is_right("The colour of the ashnewt is red.", "red", "ashlark", subjects)  # right colour, wrong animal
    assert not is_right("The ashlark is blue.", "red", "ashlark", subjects)
    assert is_right("The answer is 18.", "18", None, subjects)  # arithmetic has no subject
    rec = {"prompt": [{"role": "system", "content": "x /no_think"}, {"role": "user", "content": "What color is the ashlark?"}],
           "meta": {"answer": "red", "kind": "fact_unseen", "subject": "ashlark", "relation": "colour"}}
    assert set(subjects_of([rec])) == set(subjects)
    tok = Tokenizer.from_dir(DEFAULT_MODEL)
    end = [tok.im_end_id]
    assert check_answer(tok, tok.encode("The ashlark is red.") + end, rec, subjects)["correct"]
    assert not check_answer(tok, tok.encode("The colour of the ashnewt is red.") + end, rec, subjects)["correct"]
    assert completion_prompt(rec["meta"]) == "The colour of the ashlark is"


def test_knowledge_probe_reads_the_base_model():
    # The committed base model completes the held-out facts: the probe must see it, by the honest rule.
    model, tok = load_pretrained(DEFAULT_MODEL)
    records = load_records(TEST_DATA)
    results, summary = knowledge_probe(model, tok, records)
    assert len(results) == sum(1 for r in records if r["meta"].get("relation"))
    assert summary["  knows fact_unseen"][0] >= 0.95 and summary["  knows fact_seen"][0] >= 0.95, summary
    r = results[0]
    assert r["correct"] == is_right(r["completion"].split(".")[0], r["expected"], r["subject"], world_subjects())


def test_check_answer_format_and_think():
    tok = Tokenizer.from_dir(DEFAULT_MODEL)
    think = {"prompt": [{"role": "system", "content": "x /think"}], "meta": {"answer": "8", "kind": "arithmetic"}}
    plain = {"prompt": [{"role": "system", "content": "x /no_think"}], "meta": {"answer": "8", "kind": "arithmetic"}}
    end = [tok.im_end_id]
    ids = tok.encode("<think>\n3 + 5 = 8.\n</think>\nIt is 8.") + end
    good = check_answer(tok, ids, think)
    assert good["format_ok"] and good["think_ok"] and good["correct"]
    assert good["answer_ids"] == ids  # the generation itself, stop token included (lesson 9 compares them)
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
    # A <think> that never closes is no trace: the summary's "think trace" row agrees with "think mode followed".
    unclosed = check_answer(tok, tok.encode("<think>\nIt is 8.") + end, think)
    assert unclosed["has_think"] and not unclosed["has_trace"] and not unclosed["think_ok"]
    summary = summarize([good, unclosed])
    assert summary["think trace when /think"] == (0.5, 2) and summary["think mode followed"] == (0.5, 2)


def test_load_records_jsonl_and_json(tmp_path):
    recs = [{"messages": [{"role": "system", "content": "s /no_think"}, {"role": "user", "content": "What is 1 + 2?"},
                          {"role": "assistant", "content": "3"}], "meta": {"kind": "arithmetic", "answer": "3"}},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n\n", encoding="utf-8")
    (tmp_path / "t.json").write_text(json.dumps(recs), encoding="utf-8")
    for name in ("t.jsonl", "t.json"):
        got = load_records(tmp_path / name)
        assert [r["meta"] for r in got] == [recs[0]["meta"], {}], name
        assert got[0]["prompt"] == recs[0]["messages"][:2] and got[1]["prompt"] == recs[1]["messages"][:1], name
    bad = dict(recs[0], meta="3")
    (tmp_path / "bad.jsonl").write_text(json.dumps(recs[1]) + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: 'meta' must be an object"):
        load_records(tmp_path / "bad.jsonl")


def test_tuned_model_refuses_a_fine_tune_of_another_base(tmp_path):
    # A run folder as lesson 6 leaves it: final/ and a checkpoint whose state.json names the base model.
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "checkpoints" / "step_000010").mkdir(parents=True)
    (run / "checkpoints" / "step_000010" / "state.json").write_text(json.dumps({"config": {"model": DEFAULT_MODEL}}))
    final = str(run / "final")
    assert tuned_model(final, DEFAULT_MODEL, train_if_missing=False) == final
    other = tmp_path / "other-base"
    other.mkdir()
    with pytest.raises(ValueError, match="was fine-tuned from .* not from .*other-base"):
        tuned_model(final, str(other), train_if_missing=False)
    with pytest.raises(FileNotFoundError, match="no such fine-tuned model folder"):
        tuned_model(str(tmp_path / "missing" / "final"), DEFAULT_MODEL, train_if_missing=False)


# ---- the full default run -----------------------------------------------------------------
# Measured 78.8% known (52 of 66) and 93.9% said (62 of 66; README, lesson 7): what the recipe does at
# seed 0. The said bound is the 80% (53 of 66), 9 answers below the measured rate; the known
# bound leaves 3 answers for another machine's rounding (49 of 66 passes), as the seen facts' bound
# leaves 3 (64 of 67 is the least that passes; 67 measured).
UNSEEN_KNOWS_MIN, UNSEEN_SAYS_MIN = 0.74, 0.8
@pytest.fixture(scope="session")
def default_run(tmp_path_factory):
    """The unshortened lesson-6 recipe, trained once per test session -> its summary."""
    out = tmp_path_factory.mktemp("default_sft") / "run"
    return sft_default(str(out), plot_every=0, sample_every=0)  # the same trajectory, fewer side outputs


def test_default_sft_teaches_the_format(default_run):
    assert default_run["stop_reason"] in ("finished", "early_stopping"), default_run
    # Frozen text embeddings and MLPs end higher (measured 0.88) than plain SFT (0.30), which memorises the seen
    # subjects the val set asks about again: a lower val loss is not a better chat model (lesson 10).
    assert default_run["best_val_loss"] < 1.0, default_run
    records = load_records(TEST_DATA)
    summaries, knows = {}, {}
    for name, path in (("base", DEFAULT_MODEL), ("tuned", default_run["final"])):
        model, tok = load_pretrained(path)
        summaries[name] = evaluate_model(model, tok, records)[1]
        knows[name] = knowledge_probe(model, tok, records)[1]
    base, tuned = summaries["base"], summaries["tuned"]
    msg = f"base {base}\ntuned {tuned}\nknows {knows}"
    assert tuned["format compliance"][0] >= 0.95, msg
    assert base["format compliance"][0] <= 0.5, msg
    assert tuned["think mode followed"][0] >= 0.9, msg
    assert tuned["  accuracy fact_seen"][0] >= 0.95, msg
    assert tuned["answer accuracy"][0] > base["answer accuracy"][0] + 0.2, msg
    # The base model knows the held-out facts; SFT with frozen text embeddings and upper MLPs keeps most
    # of them stored and says most of them in chat (plain SFT says 17%: lesson 10).
    assert knows["base"]["  knows fact_unseen"][0] >= 0.95, msg
    assert knows["tuned"]["  knows fact_unseen"][0] >= UNSEEN_KNOWS_MIN, msg
    assert tuned["  accuracy fact_unseen"][0] >= UNSEEN_SAYS_MIN, msg
