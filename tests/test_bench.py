"""minisft.bench: the end-to-end race prints every row asked for and its JSON keys (TRL rows when trl is
installed); the micro mode's table has every row with positive numbers, and the chunked loss keeps less for backward."""
import json
import re
import sys

import pytest

from minisft import bench
from minisft.bench import micro
from minisft.memory import saved_for_backward_bytes
from minisft.default_model import DEFAULT_MODEL
from minisft.weights import load_pretrained

# 4 x 256 tokens, ~300 targets: enough that their [N, V] logits outweigh the [V, D] lm_head gradient the chunked
# loss keeps from forward (below V * D / (V - D), ~236 targets here, keeping the logits would be smaller).
ARGS = ["--mode", "micro", "--batch", "4", "--seq", "256", "--repeats", "1"]


def table_rows(out):
    """Printed table -> {(step, implementation): [median ms, tokens/s, memory MB]}."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0] in micro.ROWS:
            rows[(cells[0], cells[1])] = [float(c.replace(",", "")) for c in cells[2:5]]
    return rows


def check_table(out, impls):
    rows = table_rows(out)
    assert set(rows) == {(r, i) for r in micro.ROWS for i in impls}
    for (row, impl), (ms, tok_s, mem) in rows.items():
        assert ms > 0 and tok_s > 0, (row, impl)
        # On CPU the column is "saved for backward": nothing for the no-grad forward, something for a train step.
        assert (mem == 0) if row == micro.ROWS[0] else (mem > 0), (row, impl, mem)
    full, chunked = micro.ROWS[1], micro.ROWS[2]
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
    It keeps the gradients it made in forward instead: dh [N, D] and dW [V, D].

    So the difference in saved bytes is at least (N * V - N * D - V * D) * 4, not just any small margin.
    """
    model, _ = load_pretrained(DEFAULT_MODEL, device="cpu")
    model.train()
    input_ids, labels = micro.make_batch(model.config.vocab_size, batch=4, seq=512)
    n_targets = int((labels[:, 1:] != -100).sum())
    assert n_targets > 0
    steps = micro.step_fns(micro.minisft_fns(model), input_ids, labels)
    params = list(model.parameters())
    full = saved_for_backward_bytes(steps[micro.ROWS[1]], params)
    chunked = saved_for_backward_bytes(steps[micro.ROWS[2]], params)
    V, D = model.config.vocab_size, model.config.hidden_size
    assert full - chunked >= (n_targets * V - n_targets * D - V * D) * 4 > 0, (full, chunked, n_targets)
    assert saved_for_backward_bytes(steps[micro.ROWS[0]], params) == 0


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


# ---------------------------------------------------------------------------------------------
# The end-to-end race (default mode): real trainer processes on a tiny model, 2 steps, 1 run each
# ---------------------------------------------------------------------------------------------
E2E = ["--steps", "2", "--repeats", "1", "--batch-size", "2", "--max-length", "96", "--decode-tokens", "4",
       "--threads", "1", "--json"]


def e2e_rows(out):
    """Printed end-to-end table -> {(row, trainer): [tokens/s, step ms, MFU %]}."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and cells[0] in bench.JOBS:
            rows[(cells[0], cells[1])] = [float(cells[2].replace(",", "")), float(cells[3].replace(",", "")),
                                          float(cells[5].rstrip("%"))]
    return rows


@pytest.fixture(scope="module")
def e2e_run(tmp_path_factory):
    """One bench run with TRL when it is installed: the equal-settings and best-settings rows."""
    import contextlib
    import io

    work = tmp_path_factory.mktemp("bench")
    argv = E2E + ["--rows", "equal/skewed,best/skewed,shipped/skewed", "--work", str(work)]
    trl = bench.trl_available() is None
    if not trl:
        argv.append("--no-trl")
    buf, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err):
        rc = bench.main(argv)
    return rc, buf.getvalue(), trl, work, err.getvalue()


def test_e2e_table_and_json(e2e_run):
    rc, out, trl, work, _ = e2e_run
    assert rc == 0, out
    rows = e2e_rows(out)
    trainers = ["minisft", "trl"] if trl else ["minisft"]
    assert set(rows) == {(r, t) for r in ("equal/skewed", "best/skewed", "shipped/skewed") for t in trainers}, out
    for key, (tok_s, step_ms, mfu) in rows.items():
        assert tok_s > 0 and step_ms > 0 and mfu > 0, key
    summary = json.loads(out.strip().splitlines()[-1])
    assert list(summary) == list(bench.JSON_KEYS)
    assert summary["device"] == "cpu"
    for key in ("minisft_tokens_per_sec", "minisft_peak_mb", "mfu", "padded_useful_tokens_per_sec",
                "packed_useful_tokens_per_sec", "decode_tokens_per_sec", "transformers_decode_tokens_per_sec"):
        assert summary[key] > 0, key
    assert summary["grouped_useful_tokens_per_sec"] is None  # that row was not asked for
    assert (summary["trl_tokens_per_sec"] > 0) if trl else summary["trl_tokens_per_sec"] is None
    assert abs(summary["minisft_tokens_per_sec"] - rows[("equal/skewed", "minisft")][0]) <= 1  # the table rounds
    assert "decode (greedy, KV cache): minisft" in out
    if trl:  # the ratios the targets are stated in, from the table's own rows
        for job in ("equal/skewed", "best/skewed", "shipped/skewed"):
            ratio = rows[(job, "minisft")][0] / rows[(job, "trl")][0]
            got = float(re.search(rf"{job}: minisft runs ([0-9.]+)x TRL's tokens/s at [0-9.]+x its peak memory",
                                  out).group(1))
            assert abs(got - ratio) < 0.02 * ratio + 0.01, (job, got, ratio)
        ratio = rows[("best/skewed", "minisft")][0] / rows[("shipped/skewed", "trl")][0]
        got = float(re.search(r"recommended vs as shipped: minisft --packing \(best/skewed\) runs ([0-9.]+)x the "
                              r"tokens/s of TRL as it ships \(shipped/skewed\) at [0-9.]+x its peak memory", out).group(1))
        assert abs(got - ratio) < 0.02 * ratio + 0.01, (got, ratio)
    # The run folders and logs are kept in --work: each trainer really wrote its per-step records.
    assert (work / "equal_skewed_minisft_0" / "metrics.jsonl").is_file()
    if trl:
        assert (work / "best_skewed_trl_0" / "steps.jsonl").is_file()


def test_e2e_says_each_run_as_it_ends(e2e_run):
    # One progress line a run on stderr, numbered, with that run's own figures; stdout holds only the table.
    rc, out, trl, work, err = e2e_run
    lines = [line for line in err.splitlines() if line.startswith("[")]
    expected = [(job, t) for job in ("equal/skewed", "best/skewed", "shipped/skewed")
                for t in (["minisft", "trl"] if trl else ["minisft"])]
    assert len(lines) == len(expected), err
    for i, (line, (job, trainer)) in enumerate(zip(lines, expected), 1):
        assert re.fullmatch(rf"\[{i}/{len(expected)}\] {job} {trainer}: [0-9,]+ tokens/s, [0-9,]+ ms a step, "
                            r"[0-9,]+ MB, [0-9]+ s", line), line
    assert not any(line.startswith("[") for line in out.splitlines())


def test_e2e_without_trl_says_so(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` raises ImportError
    assert bench.main(E2E + ["--rows", "grouped/skewed", "--work", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "note: trl is not importable" in out
    assert set(e2e_rows(out)) == {("grouped/skewed", "minisft")}
    assert json.loads(out.strip().splitlines()[-1])["trl_tokens_per_sec"] is None


def test_datasets_are_deterministic_and_shaped(tmp_path):
    a = bench.make_dataset(tmp_path / "a.jsonl", "skewed", 40)
    b = bench.make_dataset(tmp_path / "b.jsonl", "skewed", 40)
    assert a.read_text() == b.read_text()
    convs = [json.loads(line)["messages"] for line in a.read_text().splitlines()]
    answers = [len(m["content"].split()) for c in convs for m in c if m["role"] == "assistant"]
    assert all(20 <= n <= 900 for n in answers) and max(answers) > 4 * min(answers)
    assert {len(c) for c in convs} <= {2, 4}
    shape = bench.make_dataset(tmp_path / "s.jsonl", "shape", 3).read_text().splitlines()
    for line in shape:
        q, a_ = json.loads(line)["messages"]
        assert (len(q["content"].split()), len(a_["content"].split())) == (30, 300)


def test_e2e_bad_arguments(capsys):
    for argv, message in ((["--steps", "0"], r"--steps must be >= 1"),
                          (["--rows", "nope"], r"--rows nope: unknown row"),
                          (["--threads", "0"], r"--threads must be >= 1")):
        assert bench.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert re.fullmatch(f"error: {message}.*\n", err), (argv, err)


def test_dtype_reaches_both_trainers_and_the_peak(tmp_path):
    """--dtype bfloat16 (what auto means on CUDA) is each trainer's own autocast: minisft --dtype bfloat16,
    TRL --bf16; float32 (auto on a CPU) gives neither. The matmul peak and decoding take the same dtype."""
    import argparse
    from minisft.bench import tools as bench_tools

    for dtype in ("bfloat16", "float32"):
        args = argparse.Namespace(steps=2, batch_size=2, grad_accum=1, device="cpu", trl=True, dtype=dtype)
        mine, trl = bench.job_commands("equal/shape", args, str(tmp_path), "MODEL", 64)
        assert mine[mine.index("--dtype") + 1] == dtype
        assert ("--bf16" in trl) == (dtype == "bfloat16")
    flops = bench_tools.gemm_peak_flops(64, 128, 32, "cpu", "bfloat16", seconds=0.05)
    assert 0 < flops < 1e15
    mine, theirs, same = bench_tools.decode_speed(DEFAULT_MODEL, "cpu", new_tokens=2, repeats=1, dtype="bfloat16",
                                                  min_rounds=1)
    assert mine > 0


def test_matmul_peak_is_the_best_of_every_measurement(monkeypatch, capsys, tmp_path):
    """The peak behind MFU is measured before the runs and after each one, and the best counts: a slow
    first measurement (a busy moment) must not raise every MFU."""
    measured = iter([1e9, 4e9, 2e9, 3e9])  # before the runs, then after each of the 2 runs (and one spare)
    calls = []
    monkeypatch.setattr(bench, "gemm_peak_flops", lambda *a: calls.append(1) or next(measured))
    argv = ["--rows", "equal/shape", "--no-trl", "--steps", "2", "--repeats", "2", "--batch-size", "2",
            "--max-length", "256", "--decode-tokens", "2", "--threads", "1", "--work", str(tmp_path), "--json"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert len(calls) == 3  # before, and after each of the 2 runs
    assert "reaches 4.0 GFLOP/s" in out
    tok_s, _, mfu = e2e_rows(out)[("equal/shape", "minisft")]
    from minisft.weights import load_pretrained
    params = load_pretrained(bench.DEFAULT_MODEL, dtype="float32", device="cpu")[0].num_parameters()
    assert mfu == pytest.approx(100 * 6 * params * tok_s / 4e9, rel=0.02)  # the table rounds tokens/s
    # Without the equal/skewed row, the JSON's headline numbers come from the one-shape row.
    summary = json.loads(out.strip().splitlines()[-1])
    assert abs(summary["minisft_tokens_per_sec"] - tok_s) <= 1 and summary["minisft_peak_mb"] > 0
    assert summary["mfu"] == pytest.approx(mfu / 100, rel=0.01) and summary["trl_tokens_per_sec"] is None


def test_decoding_race_takes_turns(monkeypatch):
    """minisft and transformers decode in turns, at least 5 rounds after a warm-up each: at batch 1 both
    are memory-bound and close, so a slow minute of the machine must hit both, not one."""
    pytest.importorskip("transformers")
    import torch
    import transformers
    import minisft.generate
    from minisft.bench import tools as bench_tools

    order, answers = [], []
    ours = minisft.generate.generate
    monkeypatch.setattr(minisft.generate, "generate",
                        lambda *a, **k: order.append("minisft") or answers.append(ours(*a, **k)) or answers[-1])

    class FakeHF:  # stands in for transformers' model: records its turn, answers what minisft answers
        def to(self, device):
            return self

        def eval(self):
            return self

        def generate(self, ids, max_new_tokens, **kw):
            order.append("transformers")
            return torch.cat([ids, torch.zeros(1, max_new_tokens, dtype=ids.dtype)], dim=1)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: FakeHF())
    mine, theirs, same = bench_tools.decode_speed(DEFAULT_MODEL, "cpu", new_tokens=3, repeats=2)
    assert order == ["minisft", "transformers"] * 6  # warm-up + max(2, 5) rounds, alternating
    assert mine > 0 and theirs > 0
    assert same == (answers[0] == [0, 0, 0])  # the fake answered token 0 three times
