"""python -m minisft.bench --suite gpu: issue 25's step measurements in one process, one table.

    python -m minisft.bench --suite gpu --device cuda [--model data/base-model] [--lora-model CONFIG]
                            [--seq 1024] [--batches 4,16,32] [--steps 10]

Every row times minisft's optimizer step (forward, chunked loss, backward, clip, AdamW) on random
tokens of one shape, after 2 warm-up steps (compilation, the allocator), and reports:

  step ms     median over --steps steps, the device synchronized around each
  tokens/s    batch x seq / step time (every token is real: no padding in these rows)
  MFU         FLOPs per token x tokens/s over the peak of a model-shaped matmul timed here in the
              same dtype (bench.tools.gemm_peak_flops). FLOPs per token, forward + backward:
                full fine-tuning  6N + 12 L d T   (N parameters without the embedding lookup; the
                                                   attention's QK^T and AV over T positions, L layers
                                                   of width d = heads x head_dim, the full square)
                LoRA              4N + 12 L d T   (the frozen base computes no weight gradients)
  peak MB     torch.cuda.max_memory_allocated (CPU: not measured, "-")

Rows: each precision the device has (bfloat16 from compute capability 8.0, float16 + loss scaling;
float32 and float16 on the CPU) at each --batches size, eager and --compile, and the LoRA model
(--lora-model, e.g. a SmolLM3-3B config.json) at the first batch size.

Then a check, not a timing: packed rows through the fast layer (CUDA: FlexAttention, whose backward
only a GPU runs; CPU: one attention per conversation) against model.py's dense mask, loss and every
gradient, in float32. Last, with --trl-model (a model folder with its tokenizer), the end-to-end
bench's rows against TRL (`python -m minisft.bench --rows --trl-rows`): each trainer runs the whole
job in processes of its own, at its best and as shipped; packed against padded minisft is
best/skewed against equal/skewed. docs/gpu.md holds the figures once a GPU has run this.
"""
import copy
import statistics
import subprocess
import sys
import time

import torch

from minisft import compiled, data, fast, loss as L, memory, precision
from minisft.bench.tools import gemm_peak_flops
from minisft.lora import add_lora
from minisft.model import SmolLM


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def flops_per_token(model, seq, lora):
    """6N (LoRA: 4N) + 12 L d T, N the parameters that multiply (the embedding lookup does not)."""
    cfg = model.config
    n = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    if model.lm_head.weight is model.model.embed_tokens.weight:  # tied: listed once, as the lookup
        n += model.lm_head.weight.numel()  # but lm_head multiplies
    return (4 if lora else 6) * n + 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq


def precisions(device):
    """The --dtype values worth timing on `device`."""
    if torch.device(device).type != "cuda":
        return ["float32", "float16"]
    return (["bfloat16"] if torch.cuda.get_device_capability(torch.device(device)) >= (8, 0) else []) + ["float16"]


def time_row(model, batch, seq, prec, use_compile, steps, device):
    """-> (median step seconds, peak MB or None) of `steps` optimizer steps on one random batch."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True if torch.device(device).type == "cuda" else None)
    scaler = prec.scaler()
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    mb = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids),
          "position_ids": torch.arange(seq).expand(batch, seq)}
    mb = compiled.pad_to_bucket(mb) if use_compile else mb
    mb = {k: v.to(device) for k, v in mb.items()}
    mb["attention_mask"] = None  # one sequence per row: the plain causal mask
    loss_fn = compiled.batch_loss if use_compile else L.batch_loss
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps + 2):
        sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        with prec.autocast():
            loss_sum, n = loss_fn(model, mb, True)
        out = loss_sum / max(n, 1)
        (scaler.scale(out) if scaler else out).backward()
        if scaler:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.device(device).type == "cuda" else None
    return statistics.median(times), peak


def run(args):
    """-> the suite's rows, each a dict (model, dtype, compile, batch, step_ms, tokens_per_s, mfu, peak_mb)."""
    jobs = [(args.model, 0, b) for b in args.batches]
    if args.lora_model:
        jobs.append((args.lora_model, 16, args.batches[0]))
    rows, peaks = [], {}
    for model_path, lora_r, batch in jobs:
        for dtype in precisions(args.device):
            prec = precision.choose(dtype, args.device)
            for use_compile in (False, True):
                torch.manual_seed(0)
                cfg = memory.read_config(model_path)
                model = SmolLM(cfg).to(args.device)
                if lora_r:
                    model.to(torch.bfloat16 if prec.dtype == torch.bfloat16 else torch.float32)
                    add_lora(model, lora_r, 32.0, 0.0, "all-linear")
                seq = min(args.seq, cfg.max_position_embeddings)
                key = (cfg.hidden_size, cfg.intermediate_size, dtype)
                if key not in peaks:
                    mm = "float16" if dtype == "float16" else ("bfloat16" if dtype == "bfloat16" else "float32")
                    peaks[key] = gemm_peak_flops(cfg.hidden_size, cfg.intermediate_size, 4096, args.device, mm,
                                                 seconds=args.gemm_seconds)
                dt, peak = time_row(model, batch, seq, prec, use_compile, args.steps, args.device)
                tps = batch * seq / dt
                rows.append(dict(model=model_path, lora_r=lora_r, dtype=dtype, compile=use_compile, batch=batch,
                                 seq=seq, step_ms=1000 * dt, tokens_per_s=tps, peak_mb=peak,
                                 mfu=flops_per_token(model, seq, lora_r) * tps / peaks[key]))
                del model
                if torch.device(args.device).type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def packed_check(model_path, device, seq):
    """Two packed rows of up to seq tokens, skewed conversations: the fast layer against the plain model's dense
    mask, float32 -> (relative loss difference, largest relative gradient difference)."""
    torch.manual_seed(0)
    cfg = memory.read_config(model_path)
    plain = SmolLM(cfg).to(device)
    quick = fast.apply(copy.deepcopy(plain))
    seq = min(seq, cfg.max_position_embeddings)
    rows = []
    for shares in ([0.1, 0.6, 0.2], [0.45, 0.05, 0.3, 0.1]):  # each row's conversations; collate pads the rest
        lengths = [max(2, int(share * seq)) for share in shares]
        ids = torch.randint(0, cfg.vocab_size, (sum(lengths),)).tolist()
        rows.append({"input_ids": ids, "labels": ids, "seq_ids": [i for i, n in enumerate(lengths, 1) for _ in range(n)],
                     "position_ids": [p for n in lengths for p in range(n)]})
    mb = data.to_device(data.collate(rows, pad_id=0), device)
    results = []
    for model in (plain, quick):
        model.zero_grad()
        loss_sum, n = L.batch_loss(model, mb, True)
        (loss_sum / n).backward()
        results.append((float(loss_sum.detach() / n), {k: p.grad for k, p in model.named_parameters()}))
    (a, ga), (b, gb) = results
    grad = max(float((ga[k] - gb[k]).abs().max() / ga[k].abs().max().clamp(min=1e-30)) for k in ga)
    return abs(a - b) / abs(a), grad


def trl_rows(args):
    """The end-to-end bench's rows against TRL, in a process of their own -> its exit code."""
    cmd = [sys.executable, "-m", "minisft.bench", "--model", args.trl_model, "--device", args.device,
           "--rows", args.trl_rows, "--steps", str(args.trl_steps), "--repeats", "1", "--batch-size", "4",
           "--max-length", str(args.trl_max_length), "--decode-tokens", "8"]
    print("\n$ " + " ".join(cmd[1:]), flush=True)
    return subprocess.run(cmd).returncode


def format_rows(rows):
    lines = [f"{'model':<28} {'lora':>4} {'dtype':<9} {'compile':<7} {'batch':>5} {'seq':>5} {'step ms':>9} "
             f"{'tokens/s':>10} {'MFU':>6} {'peak MB':>8}"]
    for r in rows:
        peak = f"{r['peak_mb']:,.0f}" if r["peak_mb"] is not None else "-"
        lines.append(f"{str(r['model'])[-28:]:<28} {r['lora_r']:>4} {r['dtype']:<9} {str(r['compile']):<7} "
                     f"{r['batch']:>5} {r['seq']:>5} {r['step_ms']:>9.1f} {r['tokens_per_s']:>10,.0f} "
                     f"{100 * r['mfu']:>5.1f}% {peak:>8}")
    return "\n".join(lines)


def main(argv=None):
    """`python -m minisft.bench --suite gpu ...` -> exit code (bench/__init__.main hands the command line here)."""
    import argparse
    import json
    import sys
    from minisft.bench.micro import check_device
    from minisft.default_model import DEFAULT_MODEL
    p = argparse.ArgumentParser(prog="python -m minisft.bench --suite gpu", description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=("gpu",), required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda | cpu | mps")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model folder or config.json (random weights of its shape)")
    p.add_argument("--lora-model", default=None, help="a model folder or config.json for the LoRA row (e.g. SmolLM3-3B)")
    p.add_argument("--seq", type=int, default=1024, help="tokens per row")
    p.add_argument("--batches", default="4,16,32", help="comma-separated batch sizes")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row (after 2 warm-up steps)")
    p.add_argument("--gemm-seconds", type=float, default=1.0, help="how long the matmul peak is timed")
    p.add_argument("--trl-model", default=None, help="a model folder with its tokenizer: run the rows against TRL")
    p.add_argument("--trl-rows", default="equal/skewed,best/skewed,shipped/skewed", help="the bench rows to run")
    p.add_argument("--trl-steps", type=int, default=10, help="optimizer steps per run of those rows")
    p.add_argument("--trl-max-length", type=int, default=1024, help="tokens per conversation in those rows")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the rows")
    args = p.parse_args(argv)
    try:
        args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
        if not args.batches or min(args.batches) < 1 or args.steps < 1 or args.seq < 2:
            raise ValueError("--batches needs integers >= 1, --steps >= 1 and --seq >= 2")
        check_device(args.device)
        rows = run(args)
        print(format_rows(rows), flush=True)
        loss_diff, grad_diff = packed_check(args.model, args.device, args.seq)
        way = "FlexAttention" if torch.device(args.device).type == "cuda" else "one attention per conversation"
        print(f"\npacked rows, {way} against the dense mask (float32): loss differs by {loss_diff:.1e}, "
              f"the largest gradient by {grad_diff:.1e} of its size", flush=True)
        if max(loss_diff, grad_diff) > 1e-3:
            raise RuntimeError(f"packed rows: the fast layer differs from the dense mask ({grad_diff:.1e})")
        if args.trl_model and trl_rows(args) != 0:
            raise RuntimeError("the rows against TRL failed (their output is above)")
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(dict(rows=rows, packed_loss_diff=loss_diff, packed_grad_diff=grad_diff)))
    return 0
