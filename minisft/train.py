"""The supervised fine-tuning loop, and its command line.

Lesson 6 reads this file top to bottom. It owns no maths of its own: it wires together

    data.py          conversations -> examples -> the sample order of every optimizer step
    loss.py          summed, masked token losses (chunked: the full logits never exist)
    schedule.py      the learning rate of every step
    generate.py      sample answers during training, to see what the numbers mean
    weights.py       load the base model, save the result in Hugging Face layout
    checkpoint.py    save and restore the whole training state, to resume exactly

and adds what a run needs to be trusted: gradient accumulation that weighs every target token
the same, gradient clipping, evaluation, early stopping, checkpoints you can resume from exactly,
a guard against NaN, and a record of everything in DIR/metrics.jsonl.

    python -m minisft.train --data data/sft_train.jsonl --val-data data/sft_val.jsonl --out runs/sft
    python -m minisft.train --out runs/sft --resume          # carries on exactly where it stopped

What a run writes into --out DIR:
    metrics.jsonl              one JSON object per optimizer step (val_loss on evaluation steps)
    samples.jsonl              generations for fixed held-out prompts every --sample-every steps
    loss.png, metrics.png      plots (plot.py), refreshed during training
    checkpoints/step_000200/   model.safetensors, optimizer.pt, rng.pt, state.json (the last
                               --keep-checkpoints); step_N holds the state after N optimizer steps
    checkpoints/best.safetensors   the weights of the best evaluation (only with --patience)
    final/                     the fine-tuned model (config.json, model.safetensors, tokenizer)

Steps are counted from 0: metrics line "step": s is optimizer step s, trained at lr_at(s).
"""
import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from minisft import chat_template, data, schedule
from minisft.checkpoint import (list_checkpoints, load_checkpoint, load_weights, read_state, remove_partial,
                                save_checkpoint, save_weights, truncate_jsonl)
from minisft.default_model import DEFAULT_MODEL
from minisft.generate import generate
from minisft.loss import chunked_cross_entropy, masked_cross_entropy
from minisft.weights import load_pretrained, pick_device, save_pretrained


@dataclass
class TrainConfig:
    # -- what to train, on what, and where the run goes
    model: str = DEFAULT_MODEL  # a folder in Hugging Face layout (or a Hub name weights.py can resolve)
    data: str = ""  # training conversations, .jsonl or .json
    val_data: str | None = None  # validation conversations; None: split val_fraction off the training data
    val_fraction: float = 0.0  # used only without val_data; 0 = no validation
    sample_data: str | None = None  # prompts for sample generations; None: the first val conversations
    out: str = "runs/sft"
    resume: bool = False  # continue from the latest checkpoint in out
    overwrite: bool = False  # delete a previous run's files in out and start again
    # -- how conversations become tokens
    template: str | None = None  # smollm2 | smollm3 | chatml; None: guessed from the tokenizer
    train_on: str = "assistant"  # which turns carry loss: assistant | last | all
    max_length: int = 1024  # tokens per example (longer ones are truncated by whole turns)
    packing: bool = False  # several conversations per row (block-diagonal attention)
    group_by_length: bool = False  # batch similar lengths together (less padding)
    skip_bad: bool = False  # skip (and count) malformed records instead of stopping
    # -- optimisation
    batch_size: int = 8  # examples per micro-batch and per process
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 5e-5  # peak learning rate (right for real SmolLM; the tiny default model likes ~1e-3)
    min_lr: float = 0.0  # the cosine ends here
    warmup_steps: int | None = None  # None: warmup_ratio * total steps
    warmup_ratio: float = 0.1
    max_steps: int | None = None  # total optimizer steps; None: epochs
    epochs: int | None = None  # passes over the training data; None with max_steps None: 1
    weight_decay: float = 0.01  # on weight matrices only, see param_groups()
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    seed: int = 0
    # -- evaluation, samples, logging, checkpoints
    eval_every: int = 50  # steps between validation losses (and the last step); 0 = last step only
    patience: int = 0  # early stopping: evaluations without a better val loss; 0 = off
    overfit_evals: int = 3  # warn when the train/val gap grew over this many evaluations in a row
    sample_every: int = 100  # steps between sample generations; 0 = off
    num_samples: int = 3
    sample_tokens: int = 64  # max new tokens per sample
    save_every: int = 200  # steps between checkpoints (one is also written at the end); 0 = end only
    keep_checkpoints: int = 2
    plot_every: int = 50  # steps between plot refreshes; 0 = at the end only
    log_every: int = 1  # steps between progress lines
    # -- the machine
    device: str | None = None  # cuda | mps | cpu; None: the best available
    dtype: str = "auto"  # float32 | bfloat16 (autocast, weights stay float32) | auto: bfloat16 on CUDA
    chunked_loss: bool = True  # loss from hidden states, chunk by chunk (never the full logits)
    stop_after_step: int | None = None  # behave as if Ctrl-C was pressed after this many steps (tests, demos)


# Metrics that measure the machine, not the training: they differ between two identical runs.
TIMING_KEYS = ("tokens_per_sec", "target_tokens_per_sec", "step_time_s", "elapsed_s", "eta_s", "peak_mem_mb")
# Settings that decide what the weights become: a resumed run must use the same ones.
TRAJECTORY_KEYS = ("model", "data", "val_data", "val_fraction", "template", "train_on", "max_length", "packing",
                   "group_by_length", "skip_bad", "batch_size", "grad_accum", "lr", "min_lr", "warmup_steps",
                   "warmup_ratio", "max_steps", "epochs", "weight_decay", "beta1", "beta2", "grad_clip", "seed",
                   "dtype", "chunked_loss")
# Files a run writes into --out (what --overwrite deletes; nothing else is touched).
RUN_FILES = ("metrics.jsonl", "samples.jsonl", "loss.png", "metrics.png", "checkpoints", "final")


def check_config(cfg):
    """Raise ValueError naming the (command-line) setting that is out of range."""
    def bad(name, what):
        return ValueError(f"--{name.replace('_', '-')}={getattr(cfg, name)!r}: expected {what}")

    if not cfg.data and not cfg.resume:
        raise ValueError("--data is required (a .jsonl or .json file of conversations)")
    for name in ("batch_size", "grad_accum", "max_length", "num_samples", "keep_checkpoints", "log_every"):
        if getattr(cfg, name) < 1:
            raise bad(name, "an integer >= 1")
    for name in ("eval_every", "sample_every", "save_every", "plot_every", "patience", "overfit_evals",
                 "sample_tokens"):
        if getattr(cfg, name) < 0:
            raise bad(name, "an integer >= 0")
    if cfg.max_steps is not None and cfg.epochs is not None:
        raise ValueError("--max-steps and --epochs both given: choose one")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise bad("max_steps", "an integer >= 1")
    if cfg.epochs is not None and cfg.epochs < 1:
        raise bad("epochs", "an integer >= 1")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise bad("lr", "a positive number")
    if not 0 <= cfg.min_lr <= cfg.lr:
        raise bad("min_lr", f"0 <= min_lr <= lr ({cfg.lr})")
    if cfg.warmup_steps is not None and cfg.warmup_steps < 0:
        raise bad("warmup_steps", "an integer >= 0")
    if not 0 <= cfg.warmup_ratio <= 1:
        raise bad("warmup_ratio", "a number in [0, 1]")
    if not 0 <= cfg.val_fraction < 1:
        raise bad("val_fraction", "a number in [0, 1)")
    if cfg.weight_decay < 0:
        raise bad("weight_decay", "a number >= 0")
    if cfg.grad_clip < 0:
        raise bad("grad_clip", "a number >= 0 (0 = no clipping)")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(cfg, name) < 1:
            raise bad(name, "a number in [0, 1)")
    if cfg.dtype not in ("auto", "float32", "bfloat16"):
        raise bad("dtype", "auto, float32 or bfloat16")
    if cfg.template is not None and cfg.template not in chat_template.TEMPLATES:
        raise bad("template", f"one of {', '.join(chat_template.TEMPLATES)}")
    if cfg.train_on not in chat_template.TRAIN_ON:
        raise bad("train_on", f"one of {', '.join(chat_template.TRAIN_ON)}")
    if cfg.stop_after_step is not None and cfg.stop_after_step < 1:
        raise bad("stop_after_step", "an integer >= 1")
    if cfg.device and cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise bad("device", "a device this machine has (torch sees no CUDA GPU)")
    if cfg.device == "mps" and not torch.backends.mps.is_available():
        raise bad("device", "a device this machine has (MPS is not available)")
    for name in ("data", "val_data", "sample_data"):
        path = getattr(cfg, name)
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f"--{name.replace('_', '-')} {path}: no such file")


# ---------------------------------------------------------------------------------------------
# Several processes (torchrun). One process is the main path: none of this runs there.
# ---------------------------------------------------------------------------------------------
def setup_distributed(device):
    """-> (rank, world_size, device). torchrun sets WORLD_SIZE, RANK and LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def all_reduce_sum(values, device):
    """Sum a list of numbers over all processes (float64, so counts and loss sums stay exact)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


class WithLoss(nn.Module):
    """Model + loss as ONE forward(), the unit DistributedDataParallel wraps and synchronises."""

    def __init__(self, model, chunked):
        super().__init__()
        self.model, self.chunked = model, chunked

    def forward(self, batch):
        return batch_loss(self.model, batch, self.chunked)


# ---------------------------------------------------------------------------------------------
# The maths of one optimizer step
# ---------------------------------------------------------------------------------------------
def to_device(batch, device):
    """Move a collated batch to `device`. An attention mask of all ones (no padding, no packing)
    is dropped: the model then uses the plain causal mask, which is faster."""
    plain = bool((batch["attention_mask"] == 1).all())  # checked before the copy: no GPU sync
    batch = {k: v.to(device) for k, v in batch.items()}
    if plain:
        batch["attention_mask"] = None
    return batch


def batch_loss(model, batch, chunked=True):
    """One micro-batch -> (loss_sum: 0-dim tensor, n_targets: int): summed token losses, not a mean."""
    args = (batch["input_ids"], batch["position_ids"], batch["attention_mask"])
    if chunked:
        return chunked_cross_entropy(model.hidden_states(*args), model.lm_head.weight, batch["labels"])
    return masked_cross_entropy(model(*args), batch["labels"])


def final_template(tokenizer, template, log):
    """The Jinja chat template final/ should carry: the one the model was trained with.

    A base model often has none, and transformers would then render chats differently from
    training (or refuse). None keeps the tokenizer's own template unchanged."""
    own = tokenizer.chat_template
    try:
        same = own is not None and chat_template.template_for(own) == template
    except ValueError:
        same = False
    if same:
        return None
    if template in chat_template.JINJA:
        return chat_template.JINJA[template]
    log(f"warning: final/ keeps the tokenizer's own chat template; it is not the {template!r} format this run trained on")
    return None


def accumulate_gradients(model, micro_batches, n_targets, *, chunked=True, autocast=nullcontext, grad_scale=1.0):
    """Backward every micro-batch so that the gradients are those of ONE loss:

        loss = (sum of the token losses of ALL micro-batches) / n_targets

    n_targets is the number of target tokens of the whole global batch (all micro-batches of all
    processes), counted before any forward pass. Each micro-batch backwards its own sum / n_targets,
    and gradients add up across backward() calls, so every target token weighs 1 / n_targets
    however the batch was split or padded. (The mean of per-micro-batch means would give the tokens
    of a short micro-batch more weight than those of a long one.)

    model: a SmolLM, or a DistributedDataParallel around WithLoss; then grad_scale = world size
    undoes DDP's averaging of gradients over processes (we want their sum).
    micro_batches: collated batches already on the model's device. Returns the summed loss of
    these micro-batches as a float64 0-dim tensor (detached).
    """
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    scale = grad_scale / max(n_targets, 1)  # max(): a batch with no target at all gives 0, not NaN
    total = torch.zeros((), dtype=torch.float64)
    for i, mb in enumerate(micro_batches):
        # DDP all-reduces gradients during backward; only the last micro-batch needs to.
        sync = model.no_sync() if ddp and i < len(micro_batches) - 1 else nullcontext()
        with sync:
            with autocast():
                loss_sum, _ = model(mb) if ddp else batch_loss(model, mb, chunked)
            (loss_sum * scale).backward()
        total += loss_sum.detach().double().cpu()
    return total


def param_groups(model, weight_decay):
    """AdamW groups: weight decay on the weight matrices of the linear layers, nowhere else.

    - RMSNorm gains are scales whose natural value is 1; decay would pull them towards 0.
    - Biases (when a model has them) are offsets; decaying them buys nothing.
    - The embedding (tied to lm_head in SmolLM) is indexed by token. AdamW's decay is decoupled:
      it shrinks every row by lr * wd at every step, gradient or not. Rows of tokens the SFT data
      never uses would fade away, drifting from the pretrained model for no reason.
    """
    vocab = {id(model.model.embed_tokens.weight), id(model.lm_head.weight)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # named_parameters lists a tied tensor once
        (decay if p.dim() >= 2 and id(p) not in vocab else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def evaluate(model, examples, batch_size, pad_id, device, *, chunked=True, autocast=nullcontext, rank=0, world=1):
    """Token-weighted loss over `examples`: (sum of token losses) / (number of targets), all processes."""
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))  # little padding
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)][rank::world]
    total, n = 0.0, 0
    for idx in batches:
        batch = to_device(data.collate([examples[i] for i in idx], pad_id), device)
        with autocast():
            loss_sum, count = batch_loss(model, batch, chunked)
        total, n = total + float(loss_sum), n + count
    model.train()
    total, n = all_reduce_sum([total, n], device)
    return total / max(n, 1), int(n)


# ---------------------------------------------------------------------------------------------
# Sample generations: read what the model says, not just its loss
# ---------------------------------------------------------------------------------------------
def overfitting(gaps, n):
    """True when the gap val_loss - train_loss grew at each of the last n evaluations AND val loss
    is now above train loss. Early in a run the gap is negative and shrinks towards 0 (the train
    loss averages steps the model has since improved on): growing, but not memorising."""
    gaps = gaps[-(n + 1):]
    return n > 0 and len(gaps) == n + 1 and gaps[-1] > 0 and all(a < b for a, b in zip(gaps, gaps[1:]))


def sample_prompts(convs, n):
    """The first n conversations, cut before their last assistant turn: the prompts to answer."""
    prompts = []
    for conv in convs[:n]:
        last = max(i for i, m in enumerate(conv) if m["role"] == "assistant")
        prompts.append(conv[:last])
    return prompts


def repetition_loop(ids, min_repeats=3, min_span=8):
    """True when the tokens end in a block repeated back to back (>= min_repeats times, >= min_span
    tokens in all): the model is stuck in a loop. A word or phrase that merely recurs ("29 + 3 = 32,
    so 29 + 3 ...") is not a loop; the check looks at the tail, where a loop runs until the token limit."""
    for k in range(1, len(ids) // min_repeats + 1):
        span = max(min_repeats * k, min_span)
        tail = ids[-span:]
        if len(tail) == span and tail[k:] == tail[:-k]:  # periodic with period k
            return True
    return False


def write_samples(model, tokenizer, prompts, template, step, out_dir, max_new_tokens, autocast=nullcontext):
    """Greedy answers to the fixed prompts, checked for format and loops; appended to samples.jsonl."""
    ids = [tokenizer.encode(chat_template.render(m, template, add_generation_prompt=True)) for m in prompts]
    with autocast():  # one batched call: generate() left-pads the prompts and uses the KV cache
        answers = generate(model, ids, max_new_tokens=max_new_tokens, temperature=0.0,
                           stop_ids=tokenizer.stop_ids(), use_cache=True)
    records = []
    for i, (messages, new) in enumerate(zip(prompts, answers)):
        ok_end = bool(new) and new[-1] == tokenizer.im_end_id
        loop = repetition_loop([t for t in new if t not in tokenizer.stop_ids()])
        records.append({"step": step, "prompt": i, "question": messages[-1]["content"] if messages else "",
                        "answer": tokenizer.decode(new), "n_tokens": len(new),
                        "ends_with_im_end": ok_end, "repetition": loop})
        flags = ("ok" if ok_end else "no <|im_end|>") + (", repeats itself" if loop else "")
        print(f"  sample {i} [{flags}]: {tokenizer.decode(new)[:160]!r}", flush=True)
    with open(os.path.join(out_dir, "samples.jsonl"), "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return records


# ---------------------------------------------------------------------------------------------
# The run folder
# ---------------------------------------------------------------------------------------------
def check_out_dir(cfg):
    """Refuse to mix two runs in one folder: an existing run needs --resume or --overwrite.
    Returns the previous run's files that --overwrite will delete."""
    out = cfg.out
    existing = [n for n in RUN_FILES if os.path.exists(os.path.join(out, n))]
    if cfg.resume:
        if not list_checkpoints(os.path.join(out, "checkpoints")):
            raise FileNotFoundError(f"--resume: no checkpoint in {os.path.join(out, 'checkpoints')}")
        return []
    if existing and not cfg.overwrite:
        raise FileExistsError(f"--out {out} already holds a run ({', '.join(existing)}): "
                              f"pass --resume to continue it or --overwrite to start again")
    return existing


def saved_config(out):
    """The TrainConfig fields stored in the latest checkpoint of run folder `out` (for --resume)."""
    ckpts = list_checkpoints(os.path.join(out, "checkpoints"))
    if not ckpts:
        raise FileNotFoundError(f"--resume: no checkpoint in {os.path.join(out, 'checkpoints')}")
    return read_state(ckpts[-1])["config"]


# ---------------------------------------------------------------------------------------------
# Small helpers for the loop
# ---------------------------------------------------------------------------------------------
def peak_memory_mb(device):
    """Peak GPU memory allocated by torch on CUDA; peak resident memory of the process elsewhere."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def refresh_plots(out):
    try:
        from minisft import plot
        plot.plot_run(out)
    except Exception as e:  # a plotting problem must not cost the training run
        print(f"warning: plots not written ({type(e).__name__}: {e})", file=sys.stderr, flush=True)


class StopRequest:
    """Ctrl-C during training asks for a clean stop at the end of the current step (then a
    checkpoint is saved); a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after this step and saving a checkpoint (press again to stop at once)",
              file=sys.stderr, flush=True)

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: Ctrl-C stays a plain KeyboardInterrupt
            self.previous = None
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


# ---------------------------------------------------------------------------------------------
# The training run
# ---------------------------------------------------------------------------------------------
def train(cfg):
    """Fine-tune cfg.model on cfg.data; returns a summary dict (see the end of this function).

    Raises ValueError / FileNotFoundError / FileExistsError for bad settings or data, and
    FloatingPointError when the loss or the gradient norm becomes NaN/inf (nothing is updated
    with it; the last good checkpoint stays the newest one).
    """
    check_config(cfg)
    device = cfg.device or pick_device()
    rank, world, device = setup_distributed(device)
    main_proc = rank == 0
    log = print if main_proc else (lambda *a, **k: None)
    out, ckpt_dir = cfg.out, os.path.join(cfg.out, "checkpoints")
    old_files = check_out_dir(cfg)  # every process checks before any writes
    if world > 1:
        dist.barrier()

    # ---- model: float32 weights; on CUDA the matmuls run in bfloat16 under autocast ----------
    # Why not bfloat16 weights: bf16 keeps 8 bits of mantissa, so an update smaller than ~1/256
    # of a weight rounds away, and fine-tuning's updates (lr 5e-5) are mostly that small.
    # float32 master weights + autocast keep the updates and still run the heavy maths in bf16.
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_pretrained(cfg.model, dtype=torch.float32, device=device)
    if tokenizer is None:
        raise FileNotFoundError(f"{cfg.model}: no tokenizer.json next to the weights (training needs the tokenizer)")
    use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and str(device).startswith("cuda")
                                           and torch.cuda.is_bf16_supported())
    device_type = torch.device(device).type
    autocast = (lambda: torch.autocast(device_type, dtype=torch.bfloat16)) if use_bf16 else nullcontext
    template = cfg.template
    if template is None:
        try:
            template = chat_template.template_for(tokenizer)
        except ValueError:  # guessing a format would train the model on turns it will never see
            raise ValueError(f"{cfg.model}: its chat template is not SmolLM2, SmolLM3 or ChatML; choose the "
                             f"format to train with --template ({', '.join(chat_template.TEMPLATES)})") from None

    # ---- data: conversations -> examples (-> packed rows) ---------------------------------
    train_convs, stats = data.load_conversations(cfg.data, skip_bad=cfg.skip_bad)
    sources = stats["sources"]
    if cfg.val_data:
        val_convs, _ = data.load_conversations(cfg.val_data, skip_bad=cfg.skip_bad)
    elif cfg.val_fraction > 0:
        pairs_train, pairs_val = data.split_train_val(list(zip(train_convs, sources)), cfg.val_fraction, cfg.seed)
        train_convs, sources = [c for c, _ in pairs_train], [s for _, s in pairs_train]
        val_convs = [c for c, _ in pairs_val]
    else:
        val_convs = []
    max_length = min(cfg.max_length, model.config.max_position_embeddings)
    if max_length < cfg.max_length:
        log(f"--max-length {cfg.max_length} is beyond the model's context: using {max_length}")
    opts = dict(template=template, train_on=cfg.train_on, max_length=max_length, skip_bad=cfg.skip_bad)
    examples, ex_stats = data.build_examples(tokenizer, train_convs, sources=sources, **opts)
    if not examples:
        raise ValueError(f"{cfg.data}: no example has a token to train on (train_on={cfg.train_on!r})")
    val_examples = data.build_examples(tokenizer, val_convs, **opts)[0] if val_convs else []
    n_convs = len(examples)
    if cfg.packing:
        examples = data.pack_examples(examples, max_length)
    lengths = [len(ex["input_ids"]) for ex in examples]
    if cfg.sample_data:
        sample_convs = data.load_conversations(cfg.sample_data, skip_bad=cfg.skip_bad)[0]
    else:
        sample_convs = val_convs
    prompts = sample_prompts(sample_convs, cfg.num_samples) if cfg.sample_every else []
    n_prompts = len(prompts)
    prompts = [p for p in prompts  # generate() needs room for one new token at least
               if len(tokenizer.encode(chat_template.render(p, template, add_generation_prompt=True)))
               < model.config.max_position_embeddings]
    if len(prompts) < n_prompts:
        log(f"note: {n_prompts - len(prompts)} sample prompt(s) left out: longer than the model's context")
    if cfg.patience and not val_examples:
        raise ValueError("--patience needs validation data (--val-data or --val-fraction)")
    if cfg.sample_every and not prompts:
        log("note: no sample generations (no validation conversations; --sample-data gives prompts)")

    # ---- steps and schedule -----------------------------------------------------------------
    global_batch = cfg.batch_size * cfg.grad_accum * world
    steps_per_epoch = math.ceil(len(examples) / global_batch)
    total_steps = cfg.max_steps or (cfg.epochs or 1) * steps_per_epoch
    warmup = cfg.warmup_steps
    if warmup is None:
        warmup = schedule.warmup_from_ratio(cfg.warmup_ratio, total_steps)

    def lr_at(step):
        return schedule.lr_at(step, base_lr=cfg.lr, warmup_steps=warmup, total_steps=total_steps, min_lr=cfg.min_lr)

    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=lr_at(0),
                                  betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    # DDP averages gradients over processes; WithLoss puts forward + loss in the call it watches.
    runner = nn.parallel.DistributedDataParallel(WithLoss(model, cfg.chunked_loss)) if world > 1 else model

    # ---- where the run stands: everything a checkpoint must carry besides tensors ----------
    state = {"step": 0, "best_val_loss": None, "best_step": None, "bad_evals": 0, "gaps": [],
             "train_since_eval": [0.0, 0], "tokens_seen": 0, "elapsed_s": 0.0, "stop_reason": None}
    if cfg.resume:
        ckpt = list_checkpoints(ckpt_dir)[-1]
        saved = load_checkpoint(ckpt, model, optimizer)
        diff = [k for k in TRAJECTORY_KEYS if saved["config"].get(k) != getattr(cfg, k)]
        if diff:
            k = diff[0]
            raise ValueError(f"--resume: --{k.replace('_', '-')}={getattr(cfg, k)!r} differs from the checkpoint's "
                             f"{saved['config'].get(k)!r} ({ckpt}/state.json); use the same settings or a new --out")
        if saved["world_size"] != world:
            raise ValueError(f"--resume: the run used {saved['world_size']} processes, now {world} "
                             f"(the global batch would change)")
        state = {k: saved[k] for k in state}
        if main_proc:
            truncate_jsonl(os.path.join(out, "metrics.jsonl"), state["step"])
            truncate_jsonl(os.path.join(out, "samples.jsonl"), state["step"])
        log(f"resumed from {ckpt} (step {state['step']}/{total_steps})")
    if main_proc:
        for n in old_files:  # --overwrite: only now that model and data loaded fine
            p = os.path.join(out, n)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
        os.makedirs(out, exist_ok=True)
        remove_partial(ckpt_dir)

    def checkpoint_state():
        return dict(state, epoch=state["step"] // steps_per_epoch, batch_in_epoch=state["step"] % steps_per_epoch,
                    steps_per_epoch=steps_per_epoch, total_steps=total_steps, world_size=world,
                    template=template, config=dataclasses.asdict(cfg))

    def save():
        path = None
        if main_proc:
            path = save_checkpoint(ckpt_dir, model, optimizer, checkpoint_state(), cfg.keep_checkpoints)
        if world > 1:
            dist.barrier()
        return path

    log(f"model {cfg.model}: {model.num_parameters():,} parameters on {device}"
        f"{' (bfloat16 autocast)' if use_bf16 else ''}; template {template}")
    log(f"data: {n_convs} training conversations ({ex_stats['dropped_no_target']} dropped: nothing to train on, "
        f"{ex_stats['truncated']} truncated){f', packed into {len(examples)} rows' if cfg.packing else ''}; "
        f"{len(val_examples)} validation")
    log(f"{total_steps} steps of {global_batch} examples ({cfg.batch_size} x {cfg.grad_accum} accumulation"
        f"{f' x {world} processes' if world > 1 else ''}), {steps_per_epoch} steps per epoch; "
        f"lr {cfg.lr:g}, warmup {warmup}")

    # ---- the loop ---------------------------------------------------------------------------
    metrics_path = os.path.join(out, "metrics.jsonl")
    orders = {}  # epoch -> its global batches
    start_step, t_start = state["step"], time.perf_counter()
    elapsed0, last_ckpt = state["elapsed_s"], (list_checkpoints(ckpt_dir) or [None])[-1]
    updating = False  # True between optimizer.step() and the step's bookkeeping
    interrupted = False
    model.train()
    with StopRequest() as stop:
        try:
            while state["step"] < total_steps and state["stop_reason"] is None:
                step = state["step"]
                t0 = time.perf_counter()
                epoch, b = divmod(step, steps_per_epoch)
                if epoch not in orders:
                    orders = {epoch: data.global_batches(lengths, global_batch, cfg.seed, epoch, cfg.group_by_length)}
                # This process's share of the global batch, cut into micro-batches.
                mine = orders[epoch][b][rank::world]
                mbs = [data.collate([examples[i] for i in mb], tokenizer.pad_id)
                       for mb in data.micro_batches(mine, cfg.batch_size)]
                if not mbs:  # fewer examples than processes in a last partial batch: a no-target stand-in
                    stand_in = data.collate([examples[orders[epoch][b][0]]], tokenizer.pad_id)
                    stand_in["labels"].fill_(-100)
                    mbs = [stand_in]
                # Count the targets of the whole global batch first: every micro-batch divides by it.
                n_tokens = sum(int((mb["attention_mask"] != 0).sum()) for mb in mbs)
                n_targets = sum(data.count_targets(mb["labels"]) for mb in mbs)
                n_targets, n_tokens = (int(x) for x in all_reduce_sum([n_targets, n_tokens], device))

                lr = lr_at(step)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                optimizer.zero_grad(set_to_none=True)
                loss_sum = accumulate_gradients(runner, [to_device(mb, device) for mb in mbs], n_targets,
                                                chunked=cfg.chunked_loss, autocast=autocast, grad_scale=world)
                loss = all_reduce_sum([float(loss_sum)], device)[0] / max(n_targets, 1)
                # clip_grad_norm_ returns the norm BEFORE clipping: that is what we log.
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                                 cfg.grad_clip if cfg.grad_clip > 0 else float("inf")))
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    optimizer.zero_grad(set_to_none=True)
                    if main_proc:
                        refresh_plots(out)
                    raise FloatingPointError(
                        f"step {step}: {'loss' if not math.isfinite(loss) else 'gradient norm'} is "
                        f"{loss if not math.isfinite(loss) else grad_norm}; stopped before the optimizer step, "
                        f"nothing was updated. Last good checkpoint: {last_ckpt or 'none (no checkpoint yet)'}. "
                        f"Try a lower --lr (now {cfg.lr:g}) or look at the data of this step")
                updating = True
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

                # ---- bookkeeping: metrics, evaluation, samples, checkpoint, plots ----------
                dt = time.perf_counter() - t0
                state["elapsed_s"] = elapsed0 + time.perf_counter() - t_start
                state["tokens_seen"] += n_targets
                state["train_since_eval"] = [state["train_since_eval"][0] + loss * n_targets,
                                             state["train_since_eval"][1] + n_targets]
                done = step + 1
                eta = (time.perf_counter() - t_start) / (done - start_step) * (total_steps - done)
                rec = {"step": step, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                       "tokens": n_targets, "input_tokens": n_tokens,
                       "tokens_per_sec": n_tokens / dt, "target_tokens_per_sec": n_targets / dt,
                       "step_time_s": dt, "elapsed_s": state["elapsed_s"], "eta_s": eta,
                       "peak_mem_mb": peak_memory_mb(device)}
                if done % cfg.log_every == 0 or done == total_steps:
                    log(f"step {step:>5}/{total_steps} | loss {loss:.4f} | lr {lr:.2e} | grad {grad_norm:.3f} | "
                        f"{n_tokens / dt:,.0f} tok/s | eta {fmt_time(eta)}", flush=True)

                last = done == total_steps
                if val_examples and ((cfg.eval_every and done % cfg.eval_every == 0) or last):
                    val_loss, val_n = evaluate(model, val_examples, cfg.batch_size, tokenizer.pad_id, device,
                                               chunked=cfg.chunked_loss, autocast=autocast, rank=rank, world=world)
                    rec.update(val_loss=val_loss, val_tokens=val_n)
                    s, n = state["train_since_eval"]
                    train_loss = s / max(n, 1)  # token-weighted train loss since the previous evaluation
                    state["train_since_eval"] = [0.0, 0]
                    state["gaps"] = (state["gaps"] + [val_loss - train_loss])[-(cfg.overfit_evals + 1):]
                    g = state["gaps"]
                    log(f"eval step {step}: val loss {val_loss:.4f} (train {train_loss:.4f}, gap {g[-1]:+.4f})")
                    if overfitting(g, cfg.overfit_evals):
                        log(f"warning: the val - train gap grew for {cfg.overfit_evals} evaluations in a row "
                            f"({g[0]:+.4f} -> {g[-1]:+.4f}): the model may be memorising the training set "
                            f"(fewer epochs, a lower --lr or --patience help)")
                    if state["best_val_loss"] is None or val_loss < state["best_val_loss"]:
                        state.update(best_val_loss=val_loss, best_step=step, bad_evals=0)
                        if cfg.patience and main_proc:
                            os.makedirs(ckpt_dir, exist_ok=True)
                            save_weights(model, os.path.join(ckpt_dir, "best.safetensors"))
                    else:
                        state["bad_evals"] += 1
                        if cfg.patience and state["bad_evals"] >= cfg.patience:
                            state["stop_reason"] = "early_stopping"
                            log(f"early stopping: no better val loss for {cfg.patience} evaluations "
                                f"(best {state['best_val_loss']:.4f} at step {state['best_step']})")
                if prompts and main_proc and (done % cfg.sample_every == 0 or last):
                    write_samples(model, tokenizer, prompts, template, step, out, cfg.sample_tokens, autocast)
                if main_proc:
                    with open(metrics_path, "a", encoding="utf-8") as f:
                        f.write(json.dumps(rec) + "\n")
                state["step"] = done
                updating = False
                if (cfg.save_every and done % cfg.save_every == 0) or last or state["stop_reason"]:
                    last_ckpt = save() or last_ckpt
                if main_proc and cfg.plot_every and done % cfg.plot_every == 0:
                    refresh_plots(out)
                stop_now = stop.requested or (cfg.stop_after_step is not None and done >= cfg.stop_after_step)
                if world > 1:  # Ctrl-C may reach only some processes: all stop, or none
                    stop_now = all_reduce_sum([float(stop_now)], device)[0] > 0
                if stop_now:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            # Between optimizer.step() and the end of the step's bookkeeping the weights are one
            # step ahead of `state`: that state cannot be saved consistently.
            interrupted = True
            if updating:
                log(f"interrupted in the middle of step {state['step']}: no checkpoint written; "
                    f"the last one is {last_ckpt}", file=sys.stderr)
            else:
                last_ckpt = save()
                log(f"interrupted after {state['step']} steps; checkpoint {last_ckpt}")
            log(f"resume with: python -m minisft.train --out {out} --resume")
            state["stop_reason"] = state["stop_reason"] or "interrupted"

    # ---- the end: plots, final model ------------------------------------------------------------
    final_dir = None
    if not interrupted and main_proc:
        best = os.path.join(ckpt_dir, "best.safetensors")
        if cfg.patience and os.path.isfile(best):
            load_weights(model, best)  # early stopping keeps the best weights, not the last
            log(f"final/ holds the weights of step {state['best_step']} (best val loss {state['best_val_loss']:.4f})")
        final_dir = os.path.join(out, "final")
        save_pretrained(model, tokenizer, final_dir, chat_template=final_template(tokenizer, template, log),
                        overwrite=True)
        log(f"saved {final_dir}")
    if main_proc:
        refresh_plots(out)
    if world > 1:
        dist.barrier()
    last_loss = None
    if main_proc and os.path.isfile(metrics_path):
        with open(metrics_path, encoding="utf-8") as f:
            lines = [json.loads(ln) for ln in f if ln.strip()]
        last_loss = lines[-1]["loss"] if lines else None
    best_txt = ("" if state["best_step"] is None else
                f"; best val loss {state['best_val_loss']:.4f} at step {state['best_step']}")
    last_txt = f"; last train loss {last_loss:.4f}" if last_loss is not None else ""
    log(f"done: {state['step']}/{total_steps} steps ({state['stop_reason'] or 'finished'}){last_txt}{best_txt}")
    return {"out": out, "steps": state["step"], "total_steps": total_steps, "loss": last_loss,
            "best_val_loss": state["best_val_loss"], "best_step": state["best_step"],
            "stop_reason": state["stop_reason"] or "finished", "interrupted": interrupted,
            "tokens": state["tokens_seen"], "elapsed_s": state["elapsed_s"],
            "checkpoint": last_ckpt, "final": final_dir}


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
HELP = {
    "model": "base model folder (Hugging Face layout) or Hub name", "data": "training conversations (.jsonl/.json)",
    "val_data": "validation conversations", "val_fraction": "without --val-data: hold out this fraction",
    "sample_data": "prompts for sample generations (default: the first validation conversations)",
    "out": "run folder", "resume": "continue from the latest checkpoint in --out",
    "overwrite": "delete the previous run in --out first", "template": "chat template: smollm2 | smollm3 | chatml",
    "train_on": "turns that carry loss: assistant | last | all", "max_length": "max tokens per example",
    "packing": "pack several conversations per row", "group_by_length": "batch similar lengths together",
    "skip_bad": "skip malformed records (counted) instead of stopping",
    "batch_size": "examples per micro-batch per process", "grad_accum": "micro-batches per optimizer step",
    "lr": "peak learning rate", "min_lr": "learning rate at the end of the cosine",
    "warmup_steps": "linear warmup steps", "warmup_ratio": "warmup as a fraction of all steps",
    "max_steps": "optimizer steps", "epochs": "passes over the data", "weight_decay": "AdamW weight decay (matrices)",
    "beta1": "AdamW beta1", "beta2": "AdamW beta2", "grad_clip": "max gradient norm (0 = off)", "seed": "random seed",
    "eval_every": "steps between evaluations", "patience": "early stopping patience in evaluations (0 = off)",
    "overfit_evals": "warn when the train/val gap grows this many evaluations in a row",
    "sample_every": "steps between sample generations (0 = off)", "num_samples": "prompts to sample",
    "sample_tokens": "max new tokens per sample", "save_every": "steps between checkpoints",
    "keep_checkpoints": "checkpoints to keep", "plot_every": "steps between plot refreshes",
    "log_every": "steps between progress lines", "device": "cuda | mps | cpu (default: best available)",
    "dtype": "auto | float32 | bfloat16 (autocast)", "chunked_loss": "chunked loss from hidden states",
    "stop_after_step": "stop as if Ctrl-C was pressed after this many steps",
}
OPTIONAL_TYPES = {"val_data": str, "sample_data": str, "template": str, "warmup_steps": int, "max_steps": int,
                  "epochs": int, "device": str, "stop_after_step": int}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser():
    """One option per TrainConfig field. Defaults are SUPPRESSed, so we know what was given:
    TrainConfig holds the defaults, and --resume fills the rest from the checkpoint."""
    p = _Parser(prog="python -m minisft.train", description="Supervised fine-tuning of a SmolLM model.",
                argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_ = f"{HELP[f.name]} (default: {f.default})"
        if isinstance(f.default, bool):  # off by default: --packing; on by default: --no-chunked-loss too
            action = argparse.BooleanOptionalAction if f.default else "store_true"
            p.add_argument(flag, action=action, help=help_)
        else:
            p.add_argument(flag, type=OPTIONAL_TYPES.get(f.name) or type(f.default), help=help_)
    return p


def main(argv=None):
    given = vars(build_parser().parse_args(argv))
    try:
        if "warmup_steps" in given and "warmup_ratio" in given:
            raise ValueError("--warmup-steps and --warmup-ratio both given: choose one")
        if given.get("resume"):
            saved = saved_config(given.get("out", TrainConfig.out))
            keep = {k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
            keep.pop("stop_after_step", None)
            cfg = TrainConfig(**{**keep, **given})
        else:
            cfg = TrainConfig(**given)
        summary = train(cfg)
    except (ValueError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before the loop started: nothing to save
        print("interrupted before training started", file=sys.stderr)
        return 130
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 130 if summary["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
