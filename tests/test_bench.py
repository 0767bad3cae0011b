"""minisft.bench: the table has every row with positive numbers, and the chunked loss keeps less for backward."""
import re
import sys

import pytest

from minisft import bench
from minisft.default_model import DEFAULT_MODEL
from minisft.weights import load_pretrained

ARGS = ["--batch", "2", "--seq", "32", "--repeats", "1"]


def table_rows(out):
    """Printed table -> {(step, implementation): [median ms, tokens/s, memory MB]}."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0] in bench.ROWS:
            rows[(cells[0], cells[1])] = [float(c.replace(",", "")) for c in cells[2:5]]
    return rows


def check_table(out, impls):
    rows = table_rows(out)
    assert set(rows) == {(r, i) for r in bench.ROWS for i in impls}
    for (row, impl), (ms, tok_s, mem) in rows.items():
        assert ms > 0 and tok_s > 0, (row, impl)
        # On CPU the column is "saved for backward": nothing for the no-grad forward, something for a train step.
        assert (mem == 0) if row == bench.ROWS[0] else (mem > 0), (row, impl, mem)
    full, chunked = bench.ROWS[1], bench.ROWS[2]
    for impl in impls:
        assert rows[(chunked, impl)][2] < rows[(full, impl)][2], impl
    return rows


def test_bench_table_against_transformers(capsys):
    pytest.importorskip("transformers")
    assert bench.main(ARGS) == 0
    out = capsys.readouterr().out
    assert "saved for backward MB" in out and "ms ratio" in out
    check_table(out, ["minisft", "transformers"])
    # The ratio cells sit on the minisft rows and are positive numbers.
    ratios = [line.split("|")[6].strip() for line in out.splitlines() if "| minisft |" in line]
    assert len(ratios) == 3 and all(float(r) > 0 for r in ratios)


def test_bench_without_transformers(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` raise ImportError
    assert bench.main(ARGS) == 0
    out = capsys.readouterr().out
    assert "note: transformers is not importable" in out
    check_table(out, ["minisft"])


def test_chunked_loss_keeps_less_than_the_logits_it_avoids():
    """The full-logits step keeps exp(logits) [N, V] float32 for backward; the chunked step must not.

    So the difference in saved bytes is at least N * V * 4, not just any small margin.
    """
    model, _ = load_pretrained(DEFAULT_MODEL, device="cpu")
    model.train()
    input_ids, labels = bench.make_batch(model.config.vocab_size, batch=2, seq=32)
    n_targets = int((labels[:, 1:] != -100).sum())
    assert n_targets > 0
    steps = bench.step_fns(bench.minisft_fns(model), input_ids, labels)
    params = list(model.parameters())
    full = bench.saved_for_backward_bytes(steps[bench.ROWS[1]], params)
    chunked = bench.saved_for_backward_bytes(steps[bench.ROWS[2]], params)
    assert full - chunked >= n_targets * model.config.vocab_size * 4, (full, chunked, n_targets)
    assert bench.saved_for_backward_bytes(steps[bench.ROWS[0]], params) == 0


def test_bad_arguments_are_one_line_errors(capsys):
    import torch

    cases = [(["--seq", "1"], r"--seq must be >= 2"),
             (["--batch", "0"], r"--batch must be >= 1"),
             (["--model", "/nonexistent/folder"], r"/nonexistent/folder: no such model folder"),
             (["--device", "gpu0"], r"--device gpu0: not a device name"),
             (["--device", "xpu"], r"--device xpu: not supported"),
             (["--device", f"cuda:{torch.cuda.device_count()}"], r"--device cuda:\d+: (this torch has no CUDA|there are only)")]
    if not torch.backends.mps.is_available():
        cases.append((["--device", "mps"], r"--device mps: this torch has no MPS"))
    for argv, message in cases:
        assert bench.main(ARGS + argv) == 2, argv  # the last value of a flag wins
        err = capsys.readouterr().err
        assert re.fullmatch(f"error: {message}.*\n", err), (argv, err)  # one line, nothing else
