"""How fast is a real SFT run? minisft's trainer against TRL's SFTTrainer, end to end.

    python -m minisft.bench [--model data/base-model] [--steps 30] [--repeats 3] [--device cpu] [--threads 1] [--json]
                            [--dtype auto|float32|bfloat16|float16]
    python -m minisft.bench --mode micro [--batch 4] [--seq 256]     # one step, model against model
    python -m minisft.bench --suite gpu [--device cuda]              # issue 25's step rows (bench/gpu.py)

Read it after lesson 6. Each trainer runs the same job through its command line, in its own process:
data file -> chat template -> batches -> optimizer steps (minisft: `python -m minisft.train`;
TRL: `python -m minisft.bench.trl_side`, skipped with a note when trl is not installed). Same model
folder with float32 weights, same conversations, same batch, accumulation and max length, AdamW at
5e-5 with a cosine decay. The matmuls run in --dtype on both sides: float32 on a CPU; on CUDA
bfloat16 autocast (each trainer's own: minisft `--dtype bfloat16`, TRL `bf16=True`), since that is
how a GPU is used and float32 there would time a mode nobody trains in. Runs alternate (minisft,
trl, minisft, trl, ...) so a machine that slows down hurts both; each number is the median over
--repeats runs. Each run says its own figures on stderr as it ends; the table waits for the last.

Columns:
  tokens/s   non-padding tokens per second over the steps after the first two (warm-up, allocator)
  step ms    median optimizer-step time over the same steps
  peak MB    CPU: the process's peak resident memory (os.wait4's rusage: the whole process, Python
             included); CUDA: torch.cuda.max_memory_allocated
  MFU        6 * parameters * tokens/s over the peak this machine reaches on a matmul shaped like the
             model's (timed here, same device and dtype): how much of the hardware the job uses
  wall s     the whole process: imports, tokenizing, the steps, the final save

Rows (the two datasets are built by the bench, deterministically):
  equal/shape    one conversation shape: 30-word question, 300-word answer (padding costs nothing)
  equal/skewed   1-2 turns, answers of 20-900 words; padding, no checkpointing on both sides
  grouped/skewed minisft --group-by-length: batches of similar lengths
  ckpt/skewed    minisft --grad-checkpointing on the padded batches of equal/skewed: what activation
                 checkpointing saves (peak MB) and costs (step ms), next to that row
  best/skewed    each at its best documented setting: minisft --packing; TRL packing "bfd" with
                 its default gradient checkpointing (both then put more tokens in a step than the
                 padded rows do: compare tokens/s, not step ms)
  shipped/skewed TRL as it ships (padding, gradient checkpointing on) against minisft's low-memory
                 setting (--packing --grad-checkpointing): the speed at no more memory
  lesson6        the embedded default model on data/sft_train.jsonl with lesson 6's knobs
                 (evaluation, samples and plots included in wall s, not in tokens/s)
Then decoding: minisft.generate (KV cache, greedy) against transformers' generate on the same
model and prompt, new tokens per second.

--json prints one JSON object as the last line (null where a row did not run): minisft_tokens_per_sec
and trl_tokens_per_sec are the equal/skewed row, mfu is minisft's there; the *_useful_tokens_per_sec
are minisft's padded (equal/skewed), grouped and packed (best/skewed) rows.

The package: this file is the race; micro.py the one-step comparison (--mode micro); tools.py its
instruments (datasets, matmul peak, decoding race); trl_side.py the TRL trainer it races against.
The numbers it gives on a CPU and on the real SmolLM2-135M are in docs/benchmarks.md (docs/gpu.md
on a GPU). No lesson imports this package: it is tooling, not course material.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from minisft.bench.micro import benchmark, check_device, format_table
from minisft.bench.tools import decode_speed, gemm_peak_flops, make_dataset
from minisft.fast import heap
from minisft.default_model import DEFAULT_MODEL
from minisft.recipes import SFT_RECIPE, TRAIN_DATA, VAL_DATA

JOBS = ("equal/shape", "equal/skewed", "grouped/skewed", "ckpt/skewed", "best/skewed", "shipped/skewed", "lesson6")
JSON_KEYS = ("minisft_tokens_per_sec", "trl_tokens_per_sec", "minisft_peak_mb", "trl_peak_mb", "mfu",
             "padded_useful_tokens_per_sec", "grouped_useful_tokens_per_sec", "packed_useful_tokens_per_sec",
             "decode_tokens_per_sec", "transformers_decode_tokens_per_sec", "device")



# ---- running one job in its own process -----------------------------------------------------
def run_process(cmd, log_path, threads=None, as_shipped=False):
    """-> (exit code, wall seconds, peak RSS MB of that process). os.wait4 returns the rusage of
    exactly this child (RUSAGE_CHILDREN would be the maximum over every child so far).
    as_shipped: undo the huge-page setting that importing minisft put in this environment
    (heap.py), so another trainer runs with PyTorch's default. "0", not unset: the TRL runner imports
    minisft too, which would turn it on again."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    if as_shipped and heap.set_by_minisft:
        env[heap.HUGE_PAGES] = "0"  # PyTorch's default
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    rss = usage.ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)  # bytes on macOS, KiB on Linux
    return proc.returncode, time.perf_counter() - t0, rss


def read_steps(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize(steps):
    """Steps -> (tokens/s, median step seconds, peak MB reported by the trainer), skipping the first two."""
    timed = steps[2:] or steps[1:] or steps  # short test runs: whatever is left
    seconds = sum(s["step_time_s"] for s in timed)
    peaks = [s["peak_mem_mb"] for s in timed if s.get("peak_mem_mb") is not None]
    return (sum(s["input_tokens"] for s in timed) / seconds,
            statistics.median(s["step_time_s"] for s in timed), max(peaks) if peaks else None)


def job_commands(job, args, work, model, max_length):
    """-> (dataset path, minisft argv, trl argv or None) of one row."""
    py = [sys.executable, "-m"]
    n = max(8, args.steps * args.batch_size * args.grad_accum)
    common = ["--max-steps", str(args.steps), "--device", args.device]
    knobs = dict(batch_size=args.batch_size, grad_accum=args.grad_accum, max_length=max_length, lr=5e-5)
    if job == "lesson6":
        model, data, knobs = DEFAULT_MODEL, TRAIN_DATA, dict(SFT_RECIPE)
        knobs.pop("max_steps")
        flags = lambda k, v: ([f"--{k.replace('_', '-')}"] if v else []) if isinstance(v, bool) else [
            f"--{k.replace('_', '-')}={v}"]  # a True switch is a bare flag (--packing)
        mine = ["--val-data", VAL_DATA] + [f for k, v in knobs.items() for f in flags(k, v)]
    else:
        kind = job.split("/")[1]
        data = os.path.join(work, f"{kind}.jsonl")
        if not os.path.exists(data):
            make_dataset(data, kind, n)
        mine = [f"--batch-size={knobs['batch_size']}", f"--grad-accum={knobs['grad_accum']}",
                f"--max-length={max_length}", "--lr=5e-5", "--min-lr=0", "--warmup-steps=0", "--weight-decay=0",
                "--eval-every=0", "--sample-every=0", "--save-every=0", "--plot-every=0", f"--log-every={args.steps}"]
        mine += {"grouped/skewed": ["--group-by-length"], "best/skewed": ["--packing"],
                 "ckpt/skewed": ["--grad-checkpointing"], "shipped/skewed": ["--packing", "--grad-checkpointing"]
                 }.get(job, [])
    mine = py + ["minisft.train", "--model", model, "--data", data, "--overwrite", "--dtype", args.dtype] + common + mine
    trl = None
    if args.trl and job not in ("grouped/skewed", "ckpt/skewed"):
        trl = py + ["minisft.bench.trl_side", "--model", model, "--data", data] + common + [
            f"--batch-size={knobs['batch_size']}", f"--grad-accum={knobs['grad_accum']}",
            f"--max-length={knobs['max_length']}", f"--lr={knobs['lr']}"] + {"bfloat16": ["--bf16"], "float16": ["--fp16"]}.get(args.dtype, [])
        trl += {"best/skewed": ["--packing", "--gradient-checkpointing"],
                "shipped/skewed": ["--gradient-checkpointing"]}.get(job, [])
    return mine, trl


def trl_available():
    try:
        import trl  # noqa: F401
        import datasets  # noqa: F401
    except ImportError as e:
        return f"trl is not importable ({e}): TRL rows skipped (pip install trl)"
    return None


def end_to_end(args):
    """-> (rows, notes, meta). rows: dicts {job, trainer, tokens_per_s, step_ms, peak_mb, mfu, wall_s, runs}."""
    from minisft.weights import load_pretrained, resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    model, _ = load_pretrained(model_dir, dtype="float32", device="cpu")
    cfg, n_params = model.config, model.num_parameters()
    max_length = min(args.max_length, cfg.max_position_embeddings)
    gemm_tokens = min(4096, args.batch_size * max_length)
    peak = gemm_peak_flops(cfg.hidden_size, cfg.intermediate_size, gemm_tokens, args.device, args.dtype)
    l6_params = load_pretrained(DEFAULT_MODEL, dtype="float32", device="cpu")[0].num_parameters()
    notes = [] if args.trl else ["TRL rows skipped (--no-trl)"]
    if args.trl and (why := trl_available()):
        args.trl = False
        notes.append(why)
    work = args.work or tempfile.mkdtemp(prefix="minisft-bench-")
    os.makedirs(work, exist_ok=True)
    jobs = [j for j in JOBS if j in args.rows]
    results = {}  # (job, trainer) -> list of (tokens/s, step s, peak MB, wall s)
    try:
        commands = {job: job_commands(job, args, work, model_dir, max_length) for job in jobs}
        n_runs = args.repeats * sum(cmd is not None for pair in commands.values() for cmd in pair)
        for r in range(args.repeats):
            for job in jobs:
                mine, trl = commands[job]
                for trainer, cmd in (("minisft", mine), ("trl", trl)):
                    if cmd is None:
                        continue
                    out = os.path.join(work, f"{job.replace('/', '_')}_{trainer}_{r}")
                    shutil.rmtree(out, ignore_errors=True)
                    rc, wall, rss = run_process(cmd + ["--out", out], out + ".log", args.threads, trainer == "trl")
                    if rc != 0:
                        with open(out + ".log") as f:
                            tail = f.read().strip().splitlines()[-1:] or ["(no output)"]
                        raise RuntimeError(f"{job} {trainer} exited with {rc}: {tail[0]} (log {out}.log)")
                    # The matmul peak again after every run, the best one kept: a busy moment of the machine
                    # must not lower the peak and so raise every MFU.
                    peak = max(peak, gemm_peak_flops(cfg.hidden_size, cfg.intermediate_size, gemm_tokens, args.device,
                                                     args.dtype))
                    steps = read_steps(os.path.join(out, "metrics.jsonl" if trainer == "minisft" else "steps.jsonl"))
                    tok_s, step_s, gpu_peak = summarize(steps)
                    mem = gpu_peak if args.device.startswith("cuda") else rss
                    results.setdefault((job, trainer), []).append((tok_s, step_s, mem, wall))
                    # One line a run on stderr: a full bench takes many minutes (hours on a real model), and
                    # the table can only come at the end. stdout stays the table and the JSON line.
                    done = sum(len(runs) for runs in results.values())
                    print(f"[{done}/{n_runs}] {job} {trainer}: {tok_s:,.0f} tokens/s, {step_s * 1e3:,.0f} ms a step, "
                          f"{'-' if mem is None else f'{mem:,.0f}'} MB, {wall:.0f} s", file=sys.stderr, flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    rows = []
    for (job, trainer), runs in results.items():
        tok_s, step_s, peak_mb, wall = (statistics.median(x) for x in zip(*runs))
        params = l6_params if job == "lesson6" else n_params
        rows.append({"job": job, "trainer": trainer, "tokens_per_s": tok_s, "step_ms": step_s * 1e3,
                     "peak_mb": peak_mb, "mfu": 6 * params * tok_s / peak, "wall_s": wall, "runs": len(runs)})
    return rows, notes, {"gemm_gflops": peak / 1e9, "params": n_params}


def format_e2e(rows, notes, meta, decode, device, dtype="float32"):
    lines = ["| row | trainer | tokens/s | step ms | peak MB | MFU | wall s | runs |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (JOBS.index(r["job"]), r["trainer"])):
        peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:,.0f}"
        lines.append(f"| {r['job']} | {r['trainer']} | {r['tokens_per_s']:,.0f} | {r['step_ms']:,.1f} | {peak} | "
                     f"{100 * r['mfu']:.2f}% | {r['wall_s']:.1f} | {r['runs']} |")
    by = {(r["job"], r["trainer"]): r for r in rows}

    def speed(a, b):
        return f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}"

    def memory(a, b):
        return f" at {a['peak_mb'] / b['peak_mb']:.2f}x its peak memory" if a["peak_mb"] and b["peak_mb"] else ""

    for job in JOBS:  # the ratios the targets are stated in
        if (job, "minisft") in by and (job, "trl") in by:
            a, b = by[job, "minisft"], by[job, "trl"]
            lines.append(f"{job}: minisft runs {speed(a, b)}x TRL's tokens/s{memory(a, b)}")
    if ("best/skewed", "minisft") in by and ("shipped/skewed", "trl") in by:
        # The pair the skewed target is stated in: minisft as recommended against TRL as a user gets it.
        a, b = by["best/skewed", "minisft"], by["shipped/skewed", "trl"]
        lines.append(f"recommended vs as shipped: minisft --packing (best/skewed) runs {speed(a, b)}x the tokens/s of "
                     f"TRL as it ships (shipped/skewed){memory(a, b)}")
    lines.append(f"MFU peak: a model-shaped {dtype} matmul reaches {meta['gemm_gflops']:,.1f} GFLOP/s on {device}")
    ours, theirs, same = decode
    lines.append(f"decode (greedy, KV cache): minisft {ours:,.1f} tokens/s"
                 + ("" if theirs is None else f", transformers {theirs:,.1f} tokens/s"
                    f" ({'same tokens' if same else 'different tokens'})"))
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


def summary_json(rows, decode, device):
    by = {(r["job"], r["trainer"]): r for r in rows}

    def get(job, trainer, key):
        r = by.get((job, trainer))
        return None if r is None else r[key]

    # The headline pair is equal settings on skewed lengths; a run that left that row out reports the
    # one-shape row instead (the row the equal-settings target is stated on), not nothing.
    equal = "equal/skewed" if ("equal/skewed", "minisft") in by else "equal/shape"
    return {"minisft_tokens_per_sec": get(equal, "minisft", "tokens_per_s"),
            "trl_tokens_per_sec": get(equal, "trl", "tokens_per_s"),
            "minisft_peak_mb": get(equal, "minisft", "peak_mb"),
            "trl_peak_mb": get(equal, "trl", "peak_mb"),
            "mfu": get(equal, "minisft", "mfu"),
            "padded_useful_tokens_per_sec": get("equal/skewed", "minisft", "tokens_per_s"),
            "grouped_useful_tokens_per_sec": get("grouped/skewed", "minisft", "tokens_per_s"),
            "packed_useful_tokens_per_sec": get("best/skewed", "minisft", "tokens_per_s"),
            "decode_tokens_per_sec": decode[0], "transformers_decode_tokens_per_sec": decode[1], "device": device}


def main(argv=None):
    if "--suite" in (sys.argv[1:] if argv is None else argv):  # the GPU suite has a command line of its own
        from minisft.bench import gpu
        return gpu.main(argv)
    p = argparse.ArgumentParser(prog="python -m minisft.bench", description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("e2e", "micro"), default="e2e", help="e2e: the whole job; micro: one step")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model folder or Hub id (default: the embedded model)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | mps")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="e2e: the matmuls' dtype in both trainers; auto: what minisft.precision picks on the device")
    p.add_argument("--repeats", type=int, default=None, help="runs per row, the median is shown (e2e 3, micro 5)")
    p.add_argument("--steps", type=int, default=30, help="e2e: optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=8, help="e2e: conversations per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="e2e: micro-batches per optimizer step")
    p.add_argument("--max-length", type=int, default=1024, help="e2e: tokens per conversation")
    p.add_argument("--rows", default=",".join(JOBS), help=f"e2e: comma-separated subset of {','.join(JOBS)}")
    p.add_argument("--no-trl", dest="trl", action="store_false", help="e2e: minisft rows only")
    p.add_argument("--decode-tokens", type=int, default=64, help="e2e: new tokens in the decoding race")
    p.add_argument("--work", default=None, help="e2e: keep datasets, run folders and logs here (default: a temp dir)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per run (OMP_NUM_THREADS); on a shared machine 1 gives steadier numbers")
    p.add_argument("--json", action="store_true", help="e2e: end with one JSON line of the headline numbers")
    p.add_argument("--batch", type=int, default=4, help="micro: batch size")
    p.add_argument("--seq", type=int, default=256, help="micro: sequence length")
    args = p.parse_args(argv)
    try:
        args.repeats = args.repeats or (5 if args.mode == "micro" else 3)
        names = ("batch", "seq", "repeats") if args.mode == "micro" else (
            "repeats", "steps", "batch_size", "grad_accum", "max_length", "decode_tokens")
        for flag in names:
            if getattr(args, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
        if args.seq < 2:
            raise ValueError("--seq must be >= 2 (the loss needs a next token)")
        args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
        if unknown := [r for r in args.rows if r not in JOBS]:
            raise ValueError(f"--rows {unknown[0]}: unknown row (expected some of {', '.join(JOBS)})")
        check_device(args.device)
        if args.dtype == "auto":  # what minisft.train itself picks on this device
            from minisft import precision
            args.dtype = precision.choose("auto", args.device).name
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)  # this process: the matmul peak and the decoding race
        if args.mode == "micro":
            results, note = benchmark(args.model, args.batch, args.seq, args.repeats, args.device)
            print(f"model {args.model}  batch {args.batch} x seq {args.seq}  device {args.device}  "
                  f"median of {args.repeats} after 1 warm-up")
            print(format_table(results, args.device, note))
            return 0
        print(f"model {args.model}  {args.steps} steps of {args.batch_size} x {args.grad_accum}  max length "
              f"{args.max_length}  device {args.device} ({args.dtype})  median of {args.repeats} run(s) per row",
              flush=True)
        rows, notes, meta = end_to_end(args)
        decode = decode_speed(args.model, args.device, args.decode_tokens, args.repeats, args.dtype)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(format_e2e(rows, notes, meta, decode, args.device, args.dtype))
    if args.json:
        print(json.dumps(summary_json(rows, decode, args.device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
