"""--compile: the model's forward through torch.compile, on lengths bucketed so a run compiles a few graphs.

torch.compile traces the forward once per input shape into a graph and generates fused kernels for
it (inductor): fewer, bigger kernels and fewer trips through Python per step, which is where a small
model's step spends its time on a GPU (docs/gpu.md). The numbers are the same up to float rounding
(tests/test_compile.py compares losses and gradients with eager).

Static shapes. A graph is compiled for one shape; a micro-batch of a new length would compile a new
one (seconds to minutes each). So with --compile every micro-batch is padded up to its BUCKET:
the next power of two, at least MIN_BUCKET tokens. A run at --max-length 1024 then meets at most 5
lengths (64 .. 1024), times the few batch sizes (the last micro-batch of a step may be smaller):
a handful of graphs, compiled in the first steps, reused after. The padding is masked (attention
mask 0, labels ignored): the loss is unchanged. Packed rows (--packing) keep their mask, and the
model's test of it breaks the compiled forward in two graphs: correct, less fused.

What is compiled: model.hidden_states (or the whole forward with --no-chunked-loss, the logits
included). The chunked loss stays eager: it keeps only the target positions, whose number changes
with every batch -- a shape compile would have to re-trace each time.

The speed layer (minisft/fast/) is left off under --compile (train.build_model): its hand-written
backwards are code dynamo cannot trace, so the forward would fall back to eager one block at a time;
the compiler fuses model.py's plain ops itself.

Default: off everywhere. "On by default on CUDA if it pays" needs a GPU measurement that has not
been made yet (docs/gpu.md); on the CPU compiling costs more time than a short run wins back.
"""
import weakref

import torch
import torch.nn.functional as F

from minisft.data import IGNORE
from minisft.loss import chunked_cross_entropy, logits_loss
from minisft.model import right_padded

MIN_BUCKET = 64
BACKEND = "inductor"  # torch.compile's default; tests may use "aot_eager" (no code generation)
RECOMPILE_LIMIT = 32  # dynamo's default (8) would fall back to eager after a run's 5 lengths x 2 batch sizes
_compiled = weakref.WeakKeyDictionary()  # model -> {chunked: compiled function}


def bucket(length):
    """A micro-batch length -> the length it is padded to: the next power of two >= length, >= MIN_BUCKET."""
    return max(MIN_BUCKET, 1 << (max(length, 1) - 1).bit_length())


def pad_to_bucket(batch):
    """A collated batch (data.collate: [B, T] tensors, on the host) -> the same batch right-padded to
    [B, bucket(T)]: input_ids and position_ids 0, attention_mask 0 (padding), labels IGNORE (no loss)."""
    T = batch["input_ids"].shape[1]
    extra = bucket(T) - T
    fill = {"labels": IGNORE}
    batch = {k: F.pad(v, (0, extra), value=fill.get(k, 0)) for k, v in batch.items()} if extra else batch
    if right_padded(batch["attention_mask"]):
        # One sequence per row, then padding: the causal mask alone is right (model.build_attn_mask says
        # why), so the mask becomes all ones and data.to_device drops it. Decided here, on the host: inside
        # the compiled forward that test is a data-dependent branch, which breaks the graph in two.
        batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    return batch


def forward_for(model, chunked):
    """The compiled hidden_states (chunked) or forward (not) of `model`, compiled once per model."""
    per_model = _compiled.setdefault(model, {})
    if chunked not in per_model:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        fn = model.hidden_states if chunked else model.forward
        per_model[chunked] = torch.compile(fn, dynamic=False, backend=BACKEND)
    return per_model[chunked]


def batch_loss(model, batch, chunked=True, stats=None):
    """loss.batch_loss with the forward compiled: the same (loss_sum, n_targets) for a bucketed batch."""
    args = (batch["input_ids"], batch["position_ids"], batch["attention_mask"])
    out = forward_for(model, chunked)(*args)
    if chunked:
        return chunked_cross_entropy(out, model.lm_head.weight, batch["labels"], stats=stats)
    return logits_loss(out, batch["labels"], stats)
