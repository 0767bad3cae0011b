"""plot.py: PNGs from metrics.jsonl for one run and several, and clear errors for bad files."""
import json
import math
from pathlib import Path

import pytest

from minisft import plot

PNG = b"\x89PNG\r\n\x1a\n"


def fake_run(folder, n=40, seed=0.0):
    folder.mkdir(parents=True)
    with open(folder / "metrics.jsonl", "w") as f:
        for s in range(n):
            row = {"step": s, "loss": 3 * math.exp(-s / 15) + 0.1 * math.sin(s + seed), "lr": 1e-3 * min(1, s / 4),
                   "grad_norm": 1.0 + (s % 5) / 10, "tokens": 100 + s, "tokens_per_sec": 900.0 + s,
                   "peak_mem_mb": 400.0}
            if s % 10 == 9:
                row["val_loss"] = 2.8 * math.exp(-s / 20)
            f.write(json.dumps(row) + "\n")
    return folder


def test_one_run_writes_loss_and_dashboard(tmp_path):
    run = fake_run(tmp_path / "run")
    paths = plot.plot_run(str(run))
    for name in ("loss.png", "metrics.png"):
        data = (run / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
    assert sorted(p.split("/")[-1] for p in paths) == ["loss.png", "metrics.png"]
    assert not list(run.glob("*.tmp"))


def test_several_runs_compared(tmp_path, capsys):
    a, b = fake_run(tmp_path / "lr-1e-3"), fake_run(tmp_path / "lr-3e-3", seed=1.0)
    out = tmp_path / "cmp.png"
    assert plot.main([str(a), str(b), "--out", str(out)]) == 0
    assert out.read_bytes().startswith(PNG)
    assert plot.plot_runs([str(a), str(b)]).endswith("compare.png") and (tmp_path / "compare.png").is_file()
    # the legend names the runs by folder name
    assert [name for name, _ in plot.load_runs([str(a), str(b)])] == ["lr-1e-3", "lr-3e-3"]


def test_ema_is_bias_corrected_and_smooths():
    assert plot.ema([2.0, 2.0, 2.0], beta=0.9) == pytest.approx([2.0, 2.0, 2.0])
    noisy = [1.0 + (-1) ** i for i in range(200)]
    assert max(plot.ema(noisy)[50:]) - min(plot.ema(noisy)[50:]) < 0.5


def test_malformed_metrics_name_file_and_line(tmp_path, capsys):
    run = fake_run(tmp_path / "bad", n=3)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": \n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:4: not valid JSON"):
        plot.read_metrics(str(run))
    (run / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0}\n{"step": 1}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: missing or non-numeric 'loss'"):
        plot.read_metrics(str(run))
    assert plot.main([str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "metrics.jsonl:2" in err and err.count("\n") == 1


def test_missing_metrics_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl: no such file"):
        plot.read_metrics(str(tmp_path))
    assert plot.main([str(tmp_path / "nope")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_odd_but_valid_metrics_still_plot(tmp_path, recwarn):
    """One step, NaN and inf values, fields missing or null, a zero gradient norm: all still give PNGs."""
    runs = {
        "one-step": [{"step": 0, "loss": 2.5, "lr": 0.0, "grad_norm": 1.0}],
        "nan": [{"step": s, "loss": float("nan") if s == 2 else 3.0 - s / 10, "grad_norm": float("inf") if s == 1
                 else 1.0, "val_loss": float("nan") if s == 3 else 2.0} for s in range(6)],
        "all-nan": [{"step": s, "loss": float("nan")} for s in range(3)],
        "sparse": [{"step": s, "loss": 1.0, "lr": None, "grad_norm": 0.0} for s in range(3)],
    }
    for name, rows in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        for path in plot.plot_run(str(tmp_path / name)):
            assert Path(path).read_bytes().startswith(PNG)
    assert plot.series(plot.read_metrics(str(tmp_path / "nan")), "loss") == ([0, 1, 3, 4, 5], [3.0, 2.9, 2.7, 2.6, 2.5])
    assert plot.series(plot.read_metrics(str(tmp_path / "nan")), "val_loss")[0] == [0, 1, 2, 4, 5]
    assert plot.main([str(tmp_path / n) for n in runs] + ["--out", str(tmp_path / "all.png")]) == 0
    # Nothing to complain about: no log axis without a positive value, no legend without a line.
    assert not [str(w.message) for w in recwarn.list], [str(w.message) for w in recwarn.list]


def test_metrics_file_path_writes_beside_it(tmp_path):
    run = fake_run(tmp_path / "run", n=3)
    paths = plot.plot_run(str(run / "metrics.jsonl"))
    assert paths == [str(run / "loss.png"), str(run / "metrics.png")] and (run / "loss.png").is_file()
    assert plot.load_runs([str(run / "metrics.jsonl")])[0][0] == "run"


def test_not_utf8_names_file_and_line(tmp_path, capsys):
    run = fake_run(tmp_path / "bad", n=2)
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 2, "loss": 1.0, "note": "caf\xe9"}\n')
    assert plot.main([str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "metrics.jsonl:3: not UTF-8 (byte 0xe9)" in err and err.count("\n") == 1


def test_live_reading_waits_for_a_file_being_written(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert plot.read_metrics(str(run), live=True) == []  # training has not finished a step yet
    with pytest.raises(FileNotFoundError):
        plot.read_metrics(str(run))
    (run / "metrics.jsonl").write_text('{"step": 0, "loss": 2.0}\n{"step": 1, "lo')  # a line half written
    assert [r["step"] for r in plot.read_metrics(str(run), live=True)] == [0]
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not valid JSON"):
        plot.read_metrics(str(run))  # a finished file with a broken line is an error
