"""The bench's instruments: its datasets, the matmul peak that MFU divides by, and the decoding race.

`python -m minisft.bench` (__init__.py) uses them; read it first. Each is small on purpose: a benchmark
is only as trustworthy as what it measures, so each one says exactly what it times.
"""
import json
import random
import statistics
import time

import torch

SYLLABLES = ["ka", "lo", "mi", "ren", "to", "sa", "vel", "du", "ni", "ro", "pe", "mar", "is", "ul", "fen", "ta"]


def _words(rng, n):
    return " ".join("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(n))


def make_dataset(path, kind, n, seed=0):
    """Write n conversations to path (.jsonl). kind "shape": 30-word question, 300-word answer;
    "skewed": 1-2 turns with answers of 20-900 words, log-uniform (many short, a few very long)."""
    rng = random.Random(f"{kind}-{seed}")
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            if kind == "shape":
                turns = [(30, 300)]
            else:
                turns = [(rng.randint(5, 40), int(20 * 45 ** rng.random())) for _ in range(rng.randint(1, 2))]
            messages = []
            for q, a in turns:
                messages += [{"role": "user", "content": _words(rng, q)},
                             {"role": "assistant", "content": _words(rng, a)}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def gemm_peak_flops(hidden, intermediate, tokens, device, dtype="float32", seconds=1.0):
    """FLOP/s of a model-shaped matmul [tokens, hidden] @ [hidden, intermediate] in `dtype`.

    The best of many timings over `seconds`: a peak is what the machine CAN do, so the fastest
    run counts, not the typical one (the bench measures it again after every run and keeps the max).
    A core that was idle needs a moment to reach full speed, so the timings go on for `seconds`
    (docs/benchmarks.md shows how much a shorter window lowers the peak).
    On a GPU one such matmul takes microseconds, about what a synchronize costs, so each timing
    there spans `repeat` matmuls queued back to back (as a training step queues them).
    """
    dt = getattr(torch, dtype)
    a = torch.randn(tokens, hidden, device=device, dtype=dt)
    b = torch.randn(hidden, intermediate, device=device, dtype=dt)
    repeat = 1 if torch.device(device).type == "cpu" else 50
    a @ b  # warm-up
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(repeat):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / repeat)
    return 2 * tokens * hidden * intermediate / best


def _sync(device):
    """Wait for the GPU: its kernels run asynchronously, so a timer read before this would stop early."""
    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.synchronize()
    elif kind == "mps":
        torch.mps.synchronize()


def decode_speed(model_path, device, new_tokens, repeats, dtype="float32", min_rounds=5):
    """-> (minisft tokens/s, transformers tokens/s or None, same tokens?) for greedy decoding of one prompt.

    Both hold the weights in `dtype` (bfloat16 is how a GPU serves a model; float32 on a CPU).
    Both decode the same prompt in turns (minisft, transformers, minisft, ...) for max(repeats,
    min_rounds) rounds after one warm-up each; each speed is n new tokens over the median time.
    Taking turns matters here: at batch 1 both are bound by reading the weights from memory, so
    they run within a few percent of each other, and a machine that slows down for a minute would
    otherwise decide the race.
    """
    from minisft import chat_template
    from minisft.generate import generate
    from minisft.weights import load_pretrained, resolve_model_dir

    folder = resolve_model_dir(model_path)
    model, tok = load_pretrained(folder, dtype=dtype, device=device)
    text = chat_template.render([{"role": "user", "content": "Tell me about the " + "old stone bridge " * 8}],
                                chat_template.template_for(tok), add_generation_prompt=True)
    prompt = tok.encode(text)
    n = max(1, min(new_tokens, model.config.max_position_embeddings - len(prompt)))
    racers = {"minisft": lambda: generate(model, prompt, max_new_tokens=n, stop_ids=())}
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        AutoModelForCausalLM = None
    if AutoModelForCausalLM is not None:
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).to(device).eval()
        ids = torch.tensor([prompt], device=device)

        def hf_generate():
            with torch.inference_mode():
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                                  min_new_tokens=n, pad_token_id=model.config.pad_token_id or 0)
            return out[0, len(prompt):].tolist()
        racers["transformers"] = hf_generate

    outs = {name: fn() for name, fn in racers.items()}  # warm-up, and the tokens to compare
    times = {name: [] for name in racers}
    for _ in range(max(repeats, min_rounds)):
        for name, fn in racers.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    speed = {name: n / statistics.median(t) for name, t in times.items()}
    if "transformers" not in racers:
        return speed["minisft"], None, None
    return speed["minisft"], speed["transformers"], outs["minisft"] == outs["transformers"]
