"""Every knob of a fine-tuning run, in one dataclass, and the rules each must obey.

Lesson 6 fills a TrainConfig; `python -m minisft.train --help` (cli.py) turns every field into a
flag of the same name (`batch_size` -> `--batch-size`). train.py reads it; nothing else decides
what a run does. The values below are the defaults of the command line.

Two groups of fields matter for --resume (train.py checks them):
  TRAJECTORY_KEYS  decide what the weights become: a resumed run must use the same values
  the rest         (evaluation, samples, logging) may change between the halves of a run
"""
import math
import os
import re
from dataclasses import dataclass

import torch

from minisft import chat_template, trackers
from minisft.default_model import DEFAULT_MODEL


@dataclass
class TrainConfig:
    # -- what to train, on what, and where the run goes
    model: str = DEFAULT_MODEL  # a folder in Hugging Face layout (or a Hub name weights.py can resolve)
    data: str = ""  # training data: .jsonl / .json / .parquet, a folder of shards, or a Hub dataset id
    data_subset: str | None = None  # with a Hub id or folder: the subset (e.g. SFT for HuggingFaceTB/smoltalk2)
    data_split: str | None = None  # with a Hub id or folder: the split to train on (default: train)
    max_examples: int | None = None  # train on the first N conversations only (a slice of a big dataset)
    val_data: str | None = None  # validation data (same kinds); None: split val_fraction off the training data
    val_split: str | None = None  # with a Hub id or folder as --val-data: its split
    val_fraction: float = 0.0  # used only without val_data; 0 = no validation
    sample_data: str | None = None  # prompts for sample generations; None: the first val conversations
    out: str = "runs/sft"
    resume: bool = False  # continue from the latest checkpoint in out
    overwrite: bool = False  # delete a previous run's files in out and start again
    # -- how conversations become tokens
    template: str | None = None  # smollm2 | smollm3 | chatml; None: guessed from the tokenizer
    train_on: str = "assistant"  # which turns carry loss: assistant | last | all
    max_length: int = 1024  # tokens per example (longer ones are truncated by whole turns)
    packing: bool = False  # several conversations per row (block-diagonal attention), micro-batches by tokens
    max_tokens: int | None = None  # with packing: real tokens per micro-batch; None: batch_size * mean length
    group_by_length: bool = False  # batch similar lengths together (less padding)
    skip_bad: bool = False  # skip (and count) malformed records instead of stopping
    # -- optimisation
    batch_size: int | str = 8  # examples per micro-batch and per process; auto: the largest that fits (fit.py)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 5e-5  # peak learning rate (right for real SmolLM; the tiny default model likes ~1e-3)
    min_lr: float = 0.0  # the cosine ends here
    warmup_steps: int | None = None  # None: warmup_ratio * total steps
    warmup_ratio: float = 0.1
    max_steps: int | None = None  # total optimizer steps; None: epochs
    epochs: int | None = None  # passes over the training data; None with max_steps None: 1
    weight_decay: float = 0.01  # on weight matrices only, see train.param_groups()
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
    report_to: str = "none"  # trackers getting a copy of metrics.jsonl: none | trackio,wandb,tensorboard (trackers.py)
    # -- LoRA (lesson 9): train small low-rank adapters instead of every weight
    lora_r: int = 0  # adapter rank; 0 = full fine-tuning
    lora_alpha: float = 16.0  # the adapters' update is scaled by lora_alpha / lora_r
    lora_dropout: float = 0.0  # dropout on the input of the adapters (training only)
    lora_targets: str = "all-linear"  # all-linear (every linear layer but lm_head) or e.g. q_proj,v_proj
    base_dtype: str = "auto"  # the frozen base with LoRA: float32 | bfloat16 | auto (bfloat16 on CUDA)
    # -- what full fine-tuning may change (lesson 10)
    freeze_embeddings: bool = False  # keep the text tokens' embedding rows as pretraining left them
    freeze_top_mlps: int = 0  # keep the MLPs of the last N decoder blocks as pretraining left them
    # -- the machine
    device: str | None = None  # cuda | mps | cpu; None: the best available
    dtype: str = "auto"  # float32 | bfloat16 | float16 (autocast, weights stay float32) | auto: precision.py decides
    chunked_loss: bool = True  # loss from hidden states, chunk by chunk (never the full logits)
    grad_checkpointing: bool = False  # keep only each block's input for backward; recompute the rest
    compile: bool = False  # torch.compile the forward, lengths bucketed (compiled.py); off until measured on a GPU
    fsdp: bool = False  # shard weights, gradients and AdamW state over the torchrun processes (fsdp.py)
    fast: bool = True  # the speed layer (minisft/fast/): the same numbers, less memory and time; off: model.py as written
    stop_after_step: int | None = None  # behave as if Ctrl-C was pressed after this many steps (tests, demos)


# Settings that decide what the weights become: a resumed run must use the same ones.
TRAJECTORY_KEYS = ("model", "data", "data_subset", "data_split", "max_examples", "val_data", "val_split",
                   "val_fraction", "template", "train_on", "max_length", "packing", "max_tokens", "group_by_length",
                   "skip_bad", "batch_size", "grad_accum", "lr", "min_lr", "warmup_steps", "warmup_ratio", "max_steps",
                   "epochs", "weight_decay", "beta1", "beta2", "grad_clip", "seed", "dtype", "chunked_loss",
                   "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "base_dtype",
                   "freeze_embeddings", "freeze_top_mlps")


def looks_like_hub_id(spec):
    """"HuggingFaceTB/smoltalk2": two names and one slash, no file ending, and not a path under a local folder."""
    return (re.fullmatch(r"[\w.-]+/[\w.-]+", spec) is not None and not spec.endswith((".jsonl", ".json", ".parquet"))
            and not os.path.isdir(spec.split("/")[0]))


def integer_or_auto(text):
    """--batch-size's value: a whole number, or "auto"."""
    return text if text == "auto" else int(text)


def flag(name):
    """The command-line spelling of a field: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")


def check_config(cfg):
    """Raise ValueError naming the (command-line) setting that is out of range."""
    def bad(name, what):
        return ValueError(f"{flag(name)}={getattr(cfg, name)!r}: expected {what}")

    if not cfg.data and not cfg.resume:
        raise ValueError("--data is required (a .jsonl or .json file of conversations)")
    if cfg.batch_size != "auto" and not (isinstance(cfg.batch_size, int) and cfg.batch_size >= 1):
        raise bad("batch_size", "an integer >= 1 or auto (the largest that fits, fit.py)")
    for name in ("grad_accum", "max_length", "num_samples", "keep_checkpoints", "log_every"):
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
    if cfg.max_tokens is not None and cfg.max_tokens < 1:
        raise bad("max_tokens", "an integer >= 1")
    if cfg.max_tokens is not None and not cfg.packing:
        raise bad("max_tokens", "no value without --packing (a padded micro-batch is --batch-size examples)")
    if cfg.max_examples is not None and cfg.max_examples < 1:
        raise bad("max_examples", "an integer >= 1")
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
    if cfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise bad("dtype", "auto, float32, bfloat16 or float16")
    if cfg.lora_r < 0:
        raise bad("lora_r", "an integer >= 0 (0 = full fine-tuning)")
    if not cfg.lora_alpha > 0:
        raise bad("lora_alpha", "a number > 0")
    if not 0 <= cfg.lora_dropout < 1:
        raise bad("lora_dropout", "a number in [0, 1)")
    if cfg.base_dtype not in ("auto", "float32", "bfloat16"):
        raise bad("base_dtype", "auto, float32 or bfloat16")
    if cfg.base_dtype == "bfloat16" and not cfg.lora_r:
        # Full fine-tuning updates the weights themselves: they stay float32 (train.py says why).
        raise bad("base_dtype", "float32 or auto without --lora-r (a frozen base needs LoRA)")
    if cfg.freeze_embeddings and cfg.lora_r:
        raise bad("freeze_embeddings", "no value with --lora-r (LoRA already keeps every base weight frozen)")
    if cfg.freeze_top_mlps < 0:
        raise bad("freeze_top_mlps", "an integer >= 0 (0 = every MLP trains)")
    if cfg.freeze_top_mlps and cfg.lora_r:
        raise bad("freeze_top_mlps", "0 with --lora-r (LoRA already keeps every base weight frozen)")
    if cfg.template is not None and cfg.template not in chat_template.TEMPLATES:
        raise bad("template", f"one of {', '.join(chat_template.TEMPLATES)}")
    if cfg.train_on not in chat_template.TRAIN_ON:
        raise bad("train_on", f"one of {', '.join(chat_template.TRAIN_ON)}")
    if cfg.stop_after_step is not None and cfg.stop_after_step < 1:
        raise bad("stop_after_step", "an integer >= 1")
    if cfg.fsdp:
        from minisft import fsdp
        fsdp.check(cfg)
    if cfg.device and cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise bad("device", "a device this machine has (torch sees no CUDA GPU)")
    if cfg.device == "mps" and not torch.backends.mps.is_available():
        raise bad("device", "a device this machine has (MPS is not available)")
    trackers.parse(cfg.report_to)  # an unknown name or a missing package: ValueError before anything loads
    for name in ("data", "val_data", "sample_data"):
        path = getattr(cfg, name)
        if path and not os.path.exists(path) and (name == "sample_data" or not looks_like_hub_id(path)):
            raise FileNotFoundError(f"{flag(name)} {path}: no such file or folder")
