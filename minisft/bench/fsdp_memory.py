"""The memory of one process under --fsdp, measured on the CPU and set against the count.

    python -m minisft.bench.fsdp_memory --model CONFIG_OR_FOLDER [--world-sizes 1,2,4] [--batch-size 1]
                                        [--max-length 256] [--steps 3] [--json]

Read with docs/memory.md's `--fsdp` section. For each N of --world-sizes, N processes run the
trainer's optimizer step (train.sft_step: forward, chunked loss, backward, clip, AdamW) on random
tokens, every position a target, float32 on the CPU. N = 1 is one plain process, as the trainer runs
without torchrun; N > 1 runs under torchrun (gloo) with the model sharded by fsdp.shard. The model
is built as `python -m minisft.memory` builds it (random weights, shapes from the config).

Each process measures its resident memory (Linux's /proc/self/status):
  base       before the model exists: Python, torch, gloo
  step       the highest resident memory during the steps after the first, minus base. The first step
             makes the gradients and AdamW's moments; writing 5 to /proc/self/clear_refs then resets
             the high-water mark, so building and sharding the model are not in it.
  whole run  the process's peak over its whole life, minus base: with N > 1 every process builds
             the whole model before sharding it, which can be the larger of the two.
The table shows the largest over the processes, and the count of `python -m minisft.memory
--dtype float32 --world-size N [--fsdp]` for the same shapes. Resident memory also holds what the
allocator keeps free for later (glibc keeps freed small blocks), so it sits above the count.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

MB = 1e6


def status_bytes(key):
    """A size line of /proc/self/status (VmRSS, VmHWM) -> bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {key} line")


def reset_peak():
    """Set the high-water mark of resident memory (VmHWM) back to what is resident now."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def worker(args):
    """One process: build, (shard,) warm up one step, then measure the next steps -> writes rank_R.json."""
    import torch

    from minisft import data, distributed, fsdp, memory, precision, train
    from minisft.config import TrainConfig
    rank, world, device = distributed.setup("cpu")
    base = status_bytes("VmRSS")
    cfg = memory.read_config(args.model)
    model = memory.build(cfg, bf16=False)
    tcfg = TrainConfig(batch_size=args.batch_size, max_length=args.max_length, grad_accum=1, device="cpu",
                       fsdp=world > 1)
    runner = distributed.wrap(model, tcfg.chunked_loss, world, tcfg.fsdp)
    optimizer = train.make_optimizer(model, tcfg, 1e-5, "cpu")
    g = torch.Generator().manual_seed(rank)
    rows = [torch.randint(0, cfg.vocab_size, (args.max_length,), generator=g).tolist() for _ in range(args.batch_size)]
    batch = data.collate([{"input_ids": r, "labels": r} for r in rows], pad_id=0)
    state, autocast = train.new_state(), precision.choose("float32", "cpu").autocast
    for step in range(args.steps):
        if step == 1:
            reset_peak()
        train.sft_step(step, lambda s: [batch], model, runner, optimizer, lambda s: 1e-5, tcfg, state, device,
                       autocast, world)
    life = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, status_bytes("VmHWM"))  # KiB on Linux
    result = {"rank": rank, "base": base, "step": status_bytes("VmHWM") - base, "life": life - base,
              "sharded": fsdp.is_sharded(model)}
    with open(os.path.join(args.out, f"rank_{rank}.json"), "w") as f:
        json.dump(result, f)
    distributed.close()


def measure(args, n, work):
    """Run n processes -> their results (a list of dicts)."""
    out = os.path.join(work, f"n{n}")
    os.makedirs(out)
    me = ["-m", "minisft.bench.fsdp_memory", "--worker", "--out", out, "--model", args.model,
          "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--steps", str(args.steps)]
    launch = [] if n == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n)]
    threads = str(max(1, (os.cpu_count() or 1) // n))
    r = subprocess.run([sys.executable, *launch, *me], capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS=threads))
    if r.returncode != 0:
        raise RuntimeError(f"{n} process(es) failed (exit {r.returncode}): {r.stderr.strip()[-2000:]}")
    results = []
    for i in range(n):
        with open(os.path.join(out, f"rank_{i}.json")) as f:
            results.append(json.load(f))
    return results


def table(rows):
    lines = [f"{'processes':>9}  {'sharding':<8}  {'base MB':>8}  {'counted MB':>10}  {'step MB':>8}  "
             f"{'step/count':>10}  {'whole run MB':>12}"]
    for r in rows:
        lines.append(f"{r['processes']:>9}  {r['sharding']:<8}  {r['base_mb']:>8,.0f}  {r['counted_mb']:>10,.0f}  "
                     f"{r['step_mb']:>8,.0f}  {r['step_mb'] / r['counted_mb']:>10.2f}  {r['whole_run_mb']:>12,.0f}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m minisft.bench.fsdp_memory", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model folder, Hub id or config.json (random weights are used)")
    p.add_argument("--world-sizes", default="1,2,4", help="numbers of processes, comma-separated (1: no FSDP)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per process; the first is not measured")
    p.add_argument("--json", action="store_true", help="end with the rows as one JSON line")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    from minisft import memory
    try:
        sizes = [int(x) for x in args.world_sizes.split(",")]
        if args.steps < 2 or min(sizes) < 1:
            raise ValueError(f"--steps {args.steps} --world-sizes {args.world_sizes}: expected --steps >= 2 and "
                             f"sizes >= 1")
        if not os.path.exists("/proc/self/clear_refs"):
            raise OSError("this measurement reads Linux's /proc/self/status and resets /proc/self/clear_refs")
        rows = []
        with tempfile.TemporaryDirectory(prefix="minisft-fsdp-memory-") as work:
            for n in sizes:
                got = measure(args, n, work)
                est = memory.estimate(args.model, args.batch_size, args.max_length, dtype="float32",
                                      world_size=n, fsdp=n > 1)
                rows.append({"processes": n, "sharding": "FSDP" if got[0]["sharded"] else "none",
                             "base_mb": max(x["base"] for x in got) / MB, "counted_mb": est["total"] / MB,
                             "step_mb": max(x["step"] for x in got) / MB,
                             "whole_run_mb": max(x["life"] for x in got) / MB})
                print(f"{n} process(es): step {rows[-1]['step_mb']:,.0f} MB, counted {rows[-1]['counted_mb']:,.0f} MB",
                      file=sys.stderr, flush=True)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"\nper process, {args.batch_size} x {args.max_length} tokens, float32 on the CPU, {args.model}")
    print(table(rows))
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
