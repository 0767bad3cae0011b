"""python -m minisft.chat: driven through its stdin as a user would, on the embedded default model and on
a tiny trained run (its final/ folder, its checkpoints, a LoRA adapter). Answers are greedy, so each one
must equal what generate.chat gives for the same conversation."""
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minisft import chat as C
from minisft.default_model import DEFAULT_MODEL
from minisft.generate import chat as reference_chat
from minisft.weights import load_pretrained
from tiny_run import shared_run

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="160", PYTHONPATH=str(ROOT))
N = 12  # --max-new-tokens of every test answer


def run_chat(*args, stdin="", timeout=120):
    return subprocess.run([sys.executable, "-m", "minisft.chat", *map(str, args), "--max-new-tokens", str(N)],
                          input=stdin, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=timeout)


@pytest.fixture(scope="module")
def base():
    return load_pretrained(DEFAULT_MODEL, device="cpu")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return shared_run(tmp_path_factory)


def expected(model_dir, messages):
    model, tok = load_pretrained(model_dir, device="cpu")
    return reference_chat(model, tok, messages, max_new_tokens=N)


def test_one_question_equals_generate_chat(base):
    proc = run_chat(DEFAULT_MODEL, "-p", "What is 2 + 3?")
    assert proc.returncode == 0, proc.stderr
    want = reference_chat(*base, [{"role": "user", "content": "What is 2 + 3?"}], max_new_tokens=N)
    assert proc.stdout == want + "\n"


def test_session_through_stdin_keeps_history_and_obeys_commands(run):
    final = os.path.join(run, "final")
    lines = ["What is 2 + 3?", "And 4 + 4?", "/system You are terse.", "Name the capital of Calria.",
             "/no_think", "What is 7 - 2?", "/clear", "/bogus", "What is 7 - 2?"]
    proc = run_chat(run, stdin="\n".join(lines) + "\n")
    assert proc.returncode == 0, proc.stderr
    q1, q2 = [{"role": "user", "content": "What is 2 + 3?"}], {"role": "user", "content": "And 4 + 4?"}
    a1 = expected(final, q1)
    a2 = expected(final, q1 + [{"role": "assistant", "content": a1}, q2])  # the second turn sees the first
    sys_terse = [{"role": "system", "content": "You are terse."}]
    a3 = expected(final, sys_terse + [{"role": "user", "content": "Name the capital of Calria."}])
    # /no_think: the flag goes at the end of the system prompt (smollm2 format), and the history stays
    q4 = [{"role": "user", "content": "Name the capital of Calria."}, {"role": "assistant", "content": a3},
          {"role": "user", "content": "What is 7 - 2?"}]
    a4 = expected(final, [{"role": "system", "content": "You are terse. /no_think"}] + q4)
    a5 = expected(final, [{"role": "system", "content": "You are terse. /no_think"},
                          {"role": "user", "content": "What is 7 - 2?"}])
    want = [a1, a2, "(system prompt: 'You are terse.'; conversation cleared)", a3,
            "(reasoning off: a flag in the system prompt)", a4, "(conversation cleared)",
            "unknown command /bogus (/help lists them)", a5]
    assert proc.stdout.split("\n")[:-1] == want
    assert "chatting with" in proc.stderr and "Traceback" not in proc.stderr


def test_think_default_system_and_quit(run):
    final = os.path.join(run, "final")
    proc = run_chat(run, stdin="/think\nWhat is 3 + 3?\n/quit\nnever read\n")
    assert proc.returncode == 0, proc.stderr
    a = expected(final, [{"role": "system", "content": f"{C.FLAG_SYSTEM} /think"},
                         {"role": "user", "content": "What is 3 + 3?"}])
    assert proc.stdout.split("\n")[:-1] == ["(reasoning on: a flag in the system prompt)", a]


def test_compare_side_by_side(run, base):
    q = [{"role": "user", "content": "Name the capital of Calria."}]
    proc = run_chat(run, "--compare", DEFAULT_MODEL, "-p", q[0]["content"])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.rstrip("\n").split("\n")
    header, rows = lines[0], lines[2:]
    assert header.split(" | ")[0].strip() == C.label_of(run) and header.split(" | ")[1] == C.label_of(DEFAULT_MODEL)
    assert set(lines[1]) == {"-"}
    left = " ".join(r.split(" | ")[0].strip() for r in rows).split()
    right = " ".join(r.split(" | ")[1] if " | " in r else "" for r in rows).split()
    assert left == expected(os.path.join(run, "final"), q).split()
    assert right == reference_chat(*base, q, max_new_tokens=N).split()


def test_run_without_final_uses_its_checkpoint_and_adapter_folders_load(run, tmp_path_factory):
    lora = shared_run(tmp_path_factory, "lora", lora_r=4)
    q = "What is 5 + 1?"
    from_final = run_chat(os.path.join(lora, "final"), "-p", q)  # an adapter folder
    assert from_final.returncode == 0, from_final.stderr
    assert from_final.stdout == expected(os.path.join(lora, "final"), [{"role": "user", "content": q}]) + "\n"
    # A run folder whose final/ is gone: its latest checkpoint, here the same weights as final/ (last step)
    bare = tmp_path_factory.mktemp("bare") / "run"
    os.makedirs(bare / "checkpoints")
    os.symlink(os.path.join(lora, "checkpoints", "step_000004"), bare / "checkpoints" / "step_000004")
    from_ckpt = run_chat(bare, "-p", q)
    assert from_ckpt.returncode == 0, from_ckpt.stderr
    assert from_ckpt.stdout == from_final.stdout


@pytest.mark.parametrize("spec, message", [("no/such/folder/x", "no such model folder"),
                                           ("data/no-such-model", "data/no-such-model: no such folder"),
                                           (DEFAULT_MODEL + "/config.json", "expected a model folder"),
                                           ("empty-run", "no final/ and no checkpoint")])
def test_bad_model_is_one_line_error(spec, message, tmp_path):
    if spec == "empty-run":
        spec = tmp_path / "run"
        (spec / "checkpoints").mkdir(parents=True)
    proc = run_chat(spec, "-p", "hi")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and message in proc.stderr


def test_bad_sampling_flag_is_one_line_error():
    proc = run_chat(DEFAULT_MODEL, "-p", "hi", "--top-p", "1.5")
    assert proc.returncode == 2 and proc.stderr.startswith("error: --top-p") and proc.stderr.count("\n") == 1


def test_ctrl_c_stops_the_answer_not_the_session(base, monkeypatch):
    """A Ctrl-C during an answer: the partial answer is shown, the turn leaves the history, the next works."""
    real = C.generate
    calls = []

    def interrupted_once(*args, on_token=None, **kw):
        calls.append(1)
        if len(calls) > 1:
            return real(*args, on_token=on_token, **kw)

        def stop_after_3(row, token, seen=[]):
            seen.append(token)
            on_token(row, token)
            if len(seen) == 3:
                raise KeyboardInterrupt
        return real(*args, on_token=stop_after_3, **kw)

    monkeypatch.setattr(C, "generate", interrupted_once)
    out = io.StringIO()
    bot = C.Bot(*base, "smollm2", "base")
    session = C.Session([bot], dict(max_new_tokens=N), out=out, width=100)
    session.run(["What is 2 + 3?", "What is 2 + 3?"])
    first, second = out.getvalue().split("\n")[:2]
    want = reference_chat(*base, [{"role": "user", "content": "What is 2 + 3?"}], max_new_tokens=N)
    assert first.endswith(" [stopped: this turn is not kept]") and want.startswith(first.split(" [stopped")[0])
    assert second == want  # the same answer: the stopped turn left nothing in the history
    assert bot.turns == [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": want}]


def test_ctrl_c_at_the_prompt_keeps_the_session():
    proc = subprocess.Popen([sys.executable, "-m", "minisft.chat", DEFAULT_MODEL, "--max-new-tokens", str(N)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=ENV)
    assert "chatting with" in proc.stderr.readline()  # loaded, now waiting for a line
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    time.sleep(1)
    out, err = proc.communicate("/help\n", timeout=60)
    assert proc.returncode == 0, err
    assert "(Ctrl-D or /quit exits)" in out and "/system TEXT" in out


def test_streaming_waits_for_whole_characters(base):
    """Tokens that end in half a UTF-8 character are held back until the character is whole."""
    model, tok = base
    pieces = []
    bot = C.Bot(model, tok, "smollm2", "base")
    ids = tok.encode("é ü")  # byte-level BPE: the default tokenizer has no token for either letter
    assert any(tok.decode(ids[:i]).endswith("\ufffd") for i in range(1, len(ids)))  # half a character on the way
    # Feed a known token sequence through the streaming path by replacing the model's choices.
    real = C.generate

    def fixed(model_, prompt, on_token=None, **kw):
        for t in ids:
            on_token(0, t)
        return ids
    C.generate = fixed
    try:
        text = bot.answer(None, None, {}, on_text=pieces.append)
    finally:
        C.generate = real
    assert "".join(pieces) == text == "é ü" and all("\ufffd" not in p for p in pieces)


def test_columns_wrap_each_side():
    lines = C.columns("a " * 30, "b", 43)
    assert all(len(line) <= 43 for line in lines) and lines[0].endswith("| b") and len(lines) > 1


def test_smollm3_template_switches_enable_thinking(base):
    """With SmolLM3's format /no_think is the template's switch (an empty think block), not system-prompt text."""
    import datetime

    from minisft.chat_template import render
    from minisft.generate import generate

    model, tok = base
    proc = run_chat(DEFAULT_MODEL, "--template", "smollm3", "--no-think", "-p", "What is 2 + 3?")
    assert proc.returncode == 0, proc.stderr
    text = render([{"role": "user", "content": "What is 2 + 3?"}], "smollm3", add_generation_prompt=True,
                  enable_thinking=False, today=datetime.date.today())
    assert "<think>\n\n</think>" in text and "Reasoning Mode: /no_think" in text
    want = tok.decode(generate(model, tok.encode(text), max_new_tokens=N, stop_ids=tok.stop_ids()),
                      skip_special_tokens=True)
    assert proc.stdout == want + "\n"
