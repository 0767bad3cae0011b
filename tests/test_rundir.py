"""Nothing lost to a crash: torn log lines, durable checkpoints, the run lock, tokenizers that do not fit."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from minisft import checkpoint as C, files, train as T
from minisft.rundir import RunLock
from test_train import ROOT, config, final_weights, read_metrics, tiny  # noqa: F401  (fixtures)

ENV = dict(os.environ, OMP_NUM_THREADS="1")


def cli(tiny, out, *extra):
    return ["--model", tiny["model"], "--data", tiny["train"], "--val-data", tiny["val"], "--out", str(out),
            "--batch-size", "4", "--grad-accum", "2", "--lr", "3e-3", "--max-steps", "6", "--eval-every", "2",
            "--save-every", "2", "--sample-every", "3", "--num-samples", "2", "--sample-tokens", "8",
            "--plot-every", "0", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def full_run(tiny, tmp_path_factory):
    """An uninterrupted run: what every interrupted-and-resumed run must reproduce exactly."""
    return T.train(config(tiny, tmp_path_factory.mktemp("full") / "run"))


def same_as_full(full_run, out):
    assert read_metrics(full_run["out"]) == read_metrics(str(out))
    fw, dw = final_weights(full_run["out"]), final_weights(str(out))
    assert fw.keys() == dw.keys() and all(torch.equal(fw[k], dw[k]) for k in fw)
    with open(os.path.join(full_run["out"], "samples.jsonl")) as a, open(os.path.join(out, "samples.jsonl")) as b:
        assert a.read() == b.read()


def test_torn_last_lines_are_dropped_on_resume(tiny, tmp_path, full_run, capsys):
    out = tmp_path / "run"
    T.train(config(tiny, out, stop_after_step=4))
    # A kill while appending: half a JSON object, no newline, at the end of both logs.
    for name in ("metrics.jsonl", "samples.jsonl"):
        with open(out / name, "a", encoding="utf-8") as f:
            f.write('{"step": 5, "loss": 4.3')
    capsys.readouterr()
    T.train(config(tiny, out, resume=True))
    notes = [ln for ln in capsys.readouterr().out.splitlines() if "torn last line" in ln]
    assert len(notes) == 2 and all(ln.startswith("note: ") and ":" in ln for ln in notes)
    same_as_full(full_run, out)


def test_bad_line_inside_a_log_is_an_error_not_a_silent_drop(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    T.train(config(tiny, out, stop_after_step=4, sample_every=0))
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[1] = "garbage\n"
    (out / "metrics.jsonl").write_text("".join(lines))
    capsys.readouterr()
    assert T.main(["--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out / 'metrics.jsonl'}:2: not a JSON object") and err.count("\n") == 1
    assert (out / "metrics.jsonl").read_text().splitlines()[1] == "garbage"  # left as it was


def test_kill_9_at_any_moment_then_resume_is_exact(tiny, tmp_path, full_run):
    """SIGKILL (no handler runs) in the middle of the run: --resume still finishes it, identically."""
    out = tmp_path / "killed"
    slow = cli(tiny, out)
    proc = subprocess.Popen([sys.executable, "-m", "minisft.train", *slow], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # kill once a checkpoint exists
        if C.list_checkpoints(str(out / "checkpoints")):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert C.list_checkpoints(str(out / "checkpoints")), "the run ended before a checkpoint was written"
    r = subprocess.run([sys.executable, "-m", "minisft.train", "--out", str(out), "--resume"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    same_as_full(full_run, out)


def test_checkpoint_and_final_are_fsynced_before_they_appear(tiny, tmp_path, monkeypatch):
    events = []
    real_file, real_dir, real_replace, real_rename = files.fsync_file, files.fsync_dir, os.replace, os.rename
    monkeypatch.setattr(files, "fsync_file", lambda p: (events.append(("file", os.path.abspath(p))), real_file(p)))
    monkeypatch.setattr(files, "fsync_dir", lambda p: (events.append(("dir", os.path.abspath(p))), real_dir(p)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("move", os.path.abspath(a), os.path.abspath(b))),
                                                     real_replace(a, b))[1])
    monkeypatch.setattr(os, "rename", lambda a, b: (events.append(("move", os.path.abspath(a), os.path.abspath(b))),
                                                    real_rename(a, b))[1])
    out = tmp_path / "run"
    T.train(config(tiny, out, max_steps=2, save_every=2, sample_every=0, eval_every=0))
    for final in (out / "checkpoints" / "step_000002", out / "final"):
        final = str(final)
        i = next(i for i, e in enumerate(events) if e[0] == "move" and e[2] == final)
        tmp = events[i][1]
        synced = {e[1] for e in events[:i] if e[0] == "file"}
        written = {os.path.join(final, n) for n in os.listdir(final)}
        assert {p.replace(tmp, final) for p in synced if p.startswith(tmp + os.sep)} == written, final
        assert ("dir", tmp) in events[:i]  # the folder's own list of names
        assert ("dir", os.path.dirname(final)) in events[i + 1:]  # the rename, recorded in the parent


def test_second_run_into_the_same_folder_is_refused(tiny, tmp_path):
    out = tmp_path / "run"
    T.train(config(tiny, out, max_steps=2, sample_every=0))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from minisft.rundir import RunLock; "
                               "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)", str(out)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = subprocess.run([sys.executable, "-m", "minisft.train", *cli(tiny, out, "--overwrite")], cwd=ROOT,
                           env=ENV, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and r.stderr.count("\n") == 1
        assert r.stderr.startswith(f"error: --out {out}: another run (pid {holder.pid})"), r.stderr
        after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
        assert after == before  # --overwrite deleted nothing of the running one
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_of_a_dead_process_does_not_block(tiny, tmp_path):
    out = tmp_path / "run"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out.mkdir()
    (out / ".lock").write_text(str(dead.pid))  # left behind by a run that was killed
    summary = T.train(config(tiny, out, max_steps=2, sample_every=0))
    assert summary["steps"] == 2 and not summary["interrupted"]
    lock = RunLock(str(out)).acquire()  # and the finished run released it
    lock.release()


def test_tokenizer_that_does_not_fit_the_model_is_named_at_load(tiny, tmp_path, capsys):
    import shutil
    from minisft.weights import load_pretrained
    small = tmp_path / "small_vocab"
    shutil.copytree(tiny["model"], small)
    cfg = json.loads((small / "config.json").read_text())
    cfg["vocab_size"] = 100  # the tokenizer has 300 ids
    (small / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import load_file, save_file
    w = load_file(small / "model.safetensors")
    w = {k: (v[:100].clone() if v.shape[0] == tiny["cfg"].vocab_size else v) for k, v in w.items()}
    save_file(w, small / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"tokenizer.json has token .* with id 2\d\d, but the model has only 100"):
        load_pretrained(str(small), device="cpu")
    assert T.main(["--model", str(small), "--data", tiny["train"], "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {small}: tokenizer.json has token") and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_tokenizer_without_chat_tokens_is_named_before_training(tiny, tmp_path, capsys):
    from tokenizers import Tokenizer as HF
    from minisft.default_model import train_tokenizer
    bare = tmp_path / "bare"
    import shutil
    shutil.copytree(tiny["model"], bare)
    corpus = tmp_path / "c.txt"
    corpus.write_text("a b c d e f g " * 50)
    tk = train_tokenizer(str(corpus), vocab_size=300)
    vocab = tk.get_vocab()
    j = json.loads(tk.to_str())
    j["added_tokens"] = [t for t in j["added_tokens"] if t["content"] != "<|im_start|>"]
    j["model"]["vocab"] = {k: v for k, v in j["model"]["vocab"].items() if k != "<|im_start|>"}
    HF.from_str(json.dumps(j)).save(str(bare / "tokenizer.json"))
    assert "<|im_start|>" in vocab
    rc = T.main(["--model", str(bare), "--data", tiny["train"], "--out", str(tmp_path / "o"), "--device", "cpu",
                 "--template", "chatml"])
    err = capsys.readouterr().err
    assert rc == 2 and "'<|im_start|>' is not in tokenizer.json's vocabulary" in err and err.count("\n") == 1
