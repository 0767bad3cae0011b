"""Trackers (--report-to) and TRL's metric names: what a tracker stores, read back, equals metrics.jsonl;
the accuracy and entropy the chunked loss reads off its logits equal those of the full logits."""
import importlib.machinery
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from minisft import trackers
from minisft.loss import batch_loss, chunked_cross_entropy, mean_entropy, token_accuracy
from tiny_run import small_val

ROOT = Path(__file__).resolve().parent.parent


def random_batch(B=3, T=11, D=8, V=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.4] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
@pytest.mark.parametrize("grads", [True, False])
def test_chunked_stats_equal_those_of_the_full_logits(chunk_size, grads):
    hidden, weight, labels = random_batch()
    logits = hidden @ weight.T
    correct, n = token_accuracy(logits, labels)
    entropy, _ = mean_entropy(logits, labels)
    h = hidden.clone().requires_grad_(grads)
    stats = {}
    with torch.set_grad_enabled(grads):
        loss, n2 = chunked_cross_entropy(h, weight, labels, chunk_size=chunk_size, stats=stats)
        plain, _ = chunked_cross_entropy(hidden.clone().requires_grad_(grads), weight, labels, chunk_size=chunk_size)
    assert n2 == n and 0 < correct < n
    assert int(stats["correct"]) == correct
    assert float(stats["entropy"]) == pytest.approx(entropy, rel=1e-10)
    assert float(loss.detach()) == float(plain.detach())  # reading the stats changes nothing of the loss


def test_stats_of_the_unchunked_loss_path(tmp_path):
    from minisft.default_model import DEFAULT_MODEL
    from minisft import conversations, data
    from minisft.weights import load_pretrained

    model, tok = load_pretrained(DEFAULT_MODEL, device="cpu")
    convs = conversations.load_conversations(small_val(str(tmp_path), 4))[0]
    examples = data.build_examples(tok, convs, template="smollm2")[0]
    batch = data.to_device(data.collate(examples, tok.pad_id), "cpu")
    a, b = {}, {}
    with torch.no_grad():
        la, _ = batch_loss(model, batch, chunked=True, stats=a)
        lb, _ = batch_loss(model, batch, chunked=False, stats=b)
    assert float(la) == pytest.approx(float(lb), rel=1e-5)
    assert int(a["correct"]) == int(b["correct"]) > 0
    assert float(a["entropy"]) == pytest.approx(float(b["entropy"]), rel=1e-5)


def test_names_and_parse():
    assert trackers.tracker_name("val_loss") == "eval/loss"
    assert trackers.tracker_name("mean_token_accuracy") == "train/mean_token_accuracy"
    assert trackers.scalars({"step": 3, "lr": 0.1, "learning_rate": 0.1, "ok": True, "x": None, "loss": 2}) == {
        "train/learning_rate": 0.1, "train/loss": 2.0}
    assert trackers.parse("none") == () and trackers.parse("tensorboard, none,tensorboard") == ("tensorboard",)
    with pytest.raises(ValueError, match="--report-to 'mlflow': expected none or"):
        trackers.parse("mlflow")


def test_a_missing_package_is_a_one_line_error(tmp_path, monkeypatch):
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda n: None if n == "wandb" else real(n))
    with pytest.raises(ValueError, match=r"--report-to wandb: the wandb package is not installed \(pip install wandb\)"):
        trackers.parse("trackio,wandb")


def test_no_tracker_is_imported_unless_asked():
    code = ("import sys, minisft.train, minisft.trackers; "
            "print(sorted(m for m in ('trackio', 'wandb', 'tensorboard', 'torch.utils.tensorboard') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """A tiny run through the command line with --report-to trackio,tensorboard and a local trackio store."""
    pytest.importorskip("trackio")
    pytest.importorskip("tensorboard")
    d = tmp_path_factory.mktemp("tracked")
    env = dict(os.environ, TRACKIO_DIR=str(d / "trackio"), TRACKIO_PROJECT="minisft-test", OMP_NUM_THREADS="1")
    args = ["--data", str(ROOT / "data" / "sft_train.jsonl"), "--val-data", small_val(str(d)), "--max-examples", "32",
            "--max-steps", "4", "--batch-size", "4", "--lr", "1e-3", "--eval-every", "2", "--sample-every", "0",
            "--plot-every", "0", "--save-every", "0", "--device", "cpu", "--out", str(d / "run"),
            "--report-to", "trackio,tensorboard"]
    proc = subprocess.run([sys.executable, "-m", "minisft.train", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [json.loads(line) for line in open(d / "run" / "metrics.jsonl", encoding="utf-8")]
    return d, env, rows


def test_metrics_carry_trl_names(tracked_run):
    _, _, rows = tracked_run
    seen = 0
    for r in rows:
        seen += r["input_tokens"]
        assert r["learning_rate"] == r["lr"] and r["num_tokens"] == seen
        assert 0 <= r["mean_token_accuracy"] <= 1 and r["entropy"] > 0 and r["grad_norm"] > 0
    assert [r["step"] for r in rows if "val_loss" in r] == [1, 3]


def test_trackio_store_reads_back_metrics_jsonl(tracked_run):
    d, env, rows = tracked_run
    code = ("import json, trackio.sqlite_storage as s; "
            "print(json.dumps(s.SQLiteStorage.get_logs('minisft-test', 'run')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    logged = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [x["step"] for x in logged] == [r["step"] for r in rows]
    for got, row in zip(logged, rows):
        want = trackers.scalars(row)
        assert {k: got[k] for k in want} == want
        assert "train/mean_token_accuracy" in want and "train/learning_rate" in want
    assert "eval/loss" in logged[1] and logged[1]["eval/loss"] == rows[1]["val_loss"]


def test_tensorboard_events_read_back_metrics_jsonl(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    d, _, rows = tracked_run
    acc = EventAccumulator(str(d / "run" / "tensorboard"))
    acc.Reload()
    for key in ("train/loss", "train/mean_token_accuracy", "train/entropy", "train/num_tokens", "eval/loss"):
        events = acc.Scalars(key)
        src = "val_loss" if key == "eval/loss" else key[len("train/"):]
        want = [(r["step"], r[src]) for r in rows if src in r]
        assert [(e.step, e.value) for e in events] == [(s, pytest.approx(v, rel=1e-6)) for s, v in want]


def test_wandb_gets_the_same_calls(tmp_path, monkeypatch):
    """wandb is not installed here: a recording stand-in checks what minisft hands it (names, steps, config)."""
    calls = []

    class Run:
        def log(self, values, step):
            calls.append(("log", values, step))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: calls.append(("init", kw)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = types.SimpleNamespace(report_to="wandb", out=str(tmp_path / "myrun"), lr=0.1)
    with trackers.start(cfg) as tracking:
        tracking.log({"step": 0, "loss": 2.5, "lr": 0.1, "learning_rate": 0.1, "val_loss": 2.0})
    assert calls[0][0] == "init" and calls[0][1]["name"] == "myrun" and calls[0][1]["config"]["lr"] == 0.1
    assert calls[1:] == [("log", {"train/loss": 2.5, "train/learning_rate": 0.1, "eval/loss": 2.0}, 0), ("finish",)]
