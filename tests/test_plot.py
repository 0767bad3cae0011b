"""plot.py: PNGs from metrics.jsonl for one run and several, and clear errors for bad files."""
import json
import math

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
