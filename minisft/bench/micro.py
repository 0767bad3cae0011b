"""What does the chunked loss save? One training step, minisft's model against transformers'.

    python -m minisft.bench --mode micro [--model M] [--batch 4] [--seq 256] [--repeats 5] [--device cpu]

(The end-to-end race of the whole SFT job is `python -m minisft.bench`, see __init__.py; what both
measure on a real model is in docs/benchmarks.md.)

Read it after lesson 4 (the loss): it measures what the chunked loss saves. Three steps are timed on the
same random batch (fixed seed, about 30% of the labels are targets, the rest -100):

  forward (no grad)        logits for the whole batch, no autograd graph;
  train step, full logits  model(input_ids) -> [B, T, V] logits -> masked_cross_entropy -> backward;
  train step, chunked      model.hidden_states -> chunked_cross_entropy with lm_head.weight -> backward.

Each runs once to warm up, then --repeats times; the table shows the MEDIAN time (robust to one
slow run) and tokens/s = B*T / median seconds. When transformers is installed, the same folder is
also loaded with AutoModelForCausalLM in float32 and put through the same steps with the SAME loss
functions (its `.model(...)` body gives the hidden states), so the comparison is between the two
model implementations, not between two losses. The ratio columns are minisft / transformers:
below 1 means minisft is faster (or keeps less).

Memory column:
  CUDA: torch.cuda.max_memory_allocated during one step minus what was allocated before it ("step peak MB"):
        activations, gradients and temporaries, but not the weights (both models stay on the GPU,
        so a plain peak would count the other implementation's weights too).
  CPU (and MPS): there is no allocator peak to read, so we count what autograd SAVES FOR BACKWARD during the
        forward pass ("saved for backward MB", memory.saved_for_backward_bytes): every tensor packed by
        torch.autograd.graph.saved_tensors_hooks, counted once per storage, parameters left out
        (they exist anyway). This is the activation memory a train step adds on top of the model,
        and it is deterministic. The no-grad forward saves nothing, so it reads 0.
  The chunked row should keep less than the full-logits row: the full path keeps the float32
  exp(logits) of every target position ([N, V]) alive until backward; the chunked path
  recomputes each chunk's logits during backward instead (activation checkpointing).
"""
import statistics
import time

import torch

from minisft import fast
from minisft.loss import IGNORE_INDEX, chunked_cross_entropy, masked_cross_entropy
from minisft.memory import saved_for_backward_bytes
from minisft.weights import load_pretrained, resolve_model_dir

ROWS = ["forward (no grad)",
        "train step: forward+backward, full logits + masked_cross_entropy",
        "train step: chunked_cross_entropy from hidden states"]
TARGET_FRACTION = 0.3


def make_batch(vocab_size, batch, seq, seed=0):
    """Random input_ids [B, T] and labels [B, T] (unshifted; ~30% targets, the rest -100)."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch, seq), generator=gen)
    is_target = torch.rand(batch, seq, generator=gen) < TARGET_FRACTION
    labels = torch.where(is_target, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return input_ids, labels


# ---- the two implementations behind one small interface: logits(ids), hidden(ids), lm_head weight ----
def minisft_fns(model):
    return model, model.hidden_states, model.lm_head.weight


def transformers_fns(model):
    # use_cache=False: transformers would otherwise fill a KV cache on every call, work that
    # minisft's forward does not do.
    return (lambda ids: model(input_ids=ids, use_cache=False).logits,
            lambda ids: model.model(input_ids=ids, use_cache=False).last_hidden_state,
            model.lm_head.weight)


def step_fns(fns, input_ids, labels):
    """-> {row name: function() -> loss tensor (None for the no-grad forward)}."""
    logits_fn, hidden_fn, weight = fns

    def forward():
        with torch.no_grad():
            logits_fn(input_ids)

    def full():
        loss_sum, n = masked_cross_entropy(logits_fn(input_ids), labels)
        return loss_sum / n

    def chunked():
        loss_sum, n = chunked_cross_entropy(hidden_fn(input_ids), weight, labels)
        return loss_sum / n

    return dict(zip(ROWS, (forward, full, chunked)))


def run_step(fn, model):
    model.zero_grad(set_to_none=True)  # gradients of the previous step do not count as this step's memory
    loss = fn()
    if loss is not None:
        loss.backward()


def synchronize(device):
    """GPU kernels run asynchronously: wait for them before reading the clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def measure(fn, model, repeats, device):
    """-> (median seconds, memory bytes): 1 warm-up, then `repeats` timed runs."""
    cuda = device.type == "cuda"
    run_step(fn, model)
    times, peaks = [], []
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        synchronize(device)
        if cuda:
            # Both models sit on the GPU: count only what this step adds on top of what is
            # already allocated, or each row would include the other implementation's weights.
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        run_step(fn, model)
        synchronize(device)
        if cuda:
            peaks.append(torch.cuda.max_memory_allocated(device) - base)
        times.append(time.perf_counter() - t0)
    memory = max(peaks) if cuda else saved_for_backward_bytes(fn, list(model.parameters()))
    model.zero_grad(set_to_none=True)
    return statistics.median(times), memory


def load_transformers(folder, device):
    """AutoModelForCausalLM in float32, or None (and the reason) when transformers is not importable."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        return None, f"transformers is not importable ({e}): minisft rows only"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)
    model.train()
    return model, None


def benchmark(model_path, batch, seq, repeats, device="cpu", seed=0):
    """-> (results, note). results: list of dicts {row, impl, ms, tokens_per_s, mem_bytes} in table order."""
    device = torch.device(device)
    folder = resolve_model_dir(model_path)
    ours, _ = load_pretrained(folder, dtype="float32", device=device)
    fast.apply(ours).train()  # as the trainer runs it
    input_ids, labels = make_batch(ours.config.vocab_size, batch, seq, seed)
    input_ids, labels = input_ids.to(device), labels.to(device)
    theirs, note = load_transformers(folder, device)
    impls = [("minisft", ours, minisft_fns(ours))]
    if theirs is not None:
        impls.append(("transformers", theirs, transformers_fns(theirs)))

    results = []
    for row in ROWS:
        for name, model, fns in impls:
            seconds, mem = measure(step_fns(fns, input_ids, labels)[row], model, repeats, device)
            results.append({"row": row, "impl": name, "ms": seconds * 1e3,
                            "tokens_per_s": batch * seq / seconds, "mem_bytes": mem})
    return results, note


def format_table(results, device, note=None):
    """Markdown table; the ratio columns sit on the minisft row of each step."""
    mem_name = "step peak MB" if torch.device(device).type == "cuda" else "saved for backward MB"
    lines = [f"| step | implementation | median ms | tokens/s | {mem_name} | ms ratio | mem ratio |",
             "|---|---|---:|---:|---:|---:|---:|"]
    by_key = {(r["row"], r["impl"]): r for r in results}
    for r in results:
        other = by_key.get((r["row"], "transformers"))
        ms_ratio = mem_ratio = ""
        if r["impl"] == "minisft" and other is not None:
            ms_ratio = f"{r['ms'] / other['ms']:.2f}"
            mem_ratio = f"{r['mem_bytes'] / other['mem_bytes']:.2f}" if other["mem_bytes"] else "-"
        lines.append(f"| {r['row']} | {r['impl']} | {r['ms']:.1f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['mem_bytes'] / 2**20:.2f} | {ms_ratio} | {mem_ratio} |")
    lines.append("ratios are minisft / transformers (below 1: minisft faster or keeps less)")
    if note:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def check_device(name):
    """ValueError unless `name` ("cpu", "cuda", "cuda:1", "mps") is a device this machine has."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device name (expected cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this torch has no CUDA device (try --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {name}: this torch has no MPS (Apple GPU) device (try --device cpu)")
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: not supported (expected cpu, cuda, cuda:N or mps)")
