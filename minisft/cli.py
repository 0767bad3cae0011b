"""The command line of the trainer: `python -m minisft.train --help` (train.main -> run).

One flag per TrainConfig field (config.py), spelled with dashes: `batch_size` -> `--batch-size`.
Every error a user can cause -- a bad value, a missing file, a folder that already holds a run --
is one line on stderr and exit code 2; a loss that became NaN is exit code 1; Ctrl-C is 130.
"""
import argparse
import dataclasses
import sys

from minisft import distributed
from minisft.config import TrainConfig, flag, integer_or_auto
from minisft.rundir import saved_config

HELP = {
    "model": "base model folder (Hugging Face layout) or Hub name", "data": "training data: .jsonl/.json/.parquet, a folder of shards or a Hub dataset id",
    "val_data": "validation conversations", "val_fraction": "without --val-data: hold out this fraction",
    "sample_data": "prompts for sample generations (default: the first validation conversations)",
    "out": "run folder", "resume": "continue from the latest checkpoint in --out",
    "overwrite": "delete the previous run in --out first", "template": "chat template: smollm2 | smollm3 | chatml",
    "train_on": "turns that carry loss: assistant | last | all", "max_length": "max tokens per example",
    "packing": "pack several conversations per row; micro-batches hold ~batch-size conversations' tokens",
    "max_tokens": "with --packing: real tokens per micro-batch (default: batch size x mean length)", "group_by_length": "batch similar lengths together",
    "skip_bad": "skip malformed records (counted) instead of stopping",
    "batch_size": "examples per micro-batch per process, or auto: the largest that fits, --grad-accum keeping 8 x grad-accum per step", "grad_accum": "micro-batches per optimizer step",
    "lr": "peak learning rate", "min_lr": "learning rate at the end of the cosine",
    "warmup_steps": "linear warmup steps", "warmup_ratio": "warmup as a fraction of all steps",
    "max_steps": "optimizer steps", "epochs": "passes over the data", "weight_decay": "AdamW weight decay (matrices)",
    "beta1": "AdamW beta1", "beta2": "AdamW beta2", "grad_clip": "max gradient norm (0 = off)", "seed": "random seed",
    "eval_every": "steps between evaluations", "patience": "early stopping patience in evaluations (0 = off)",
    "overfit_evals": "warn when the train/val gap grows this many evaluations in a row",
    "sample_every": "steps between sample generations (0 = off)", "num_samples": "prompts to sample",
    "sample_tokens": "max new tokens per sample", "save_every": "steps between checkpoints",
    "keep_checkpoints": "checkpoints to keep", "plot_every": "steps between plot refreshes",
    "log_every": "steps between progress lines",
    "report_to": "trackers for a copy of the metrics: none, or trackio,wandb,tensorboard (comma-separated)", "device": "cuda | mps | cpu (default: best available)",
    "dtype": "auto | float32 | bfloat16 | float16 (autocast; float16 with loss scaling; auto: bf16 on CUDA >= 8.0, fp16 below, float32 on CPU/MPS)", "chunked_loss": "chunked loss from hidden states",
    "stop_after_step": "stop as if Ctrl-C was pressed after this many steps",
    "lora_r": "LoRA rank (0 = full fine-tuning)", "lora_alpha": "LoRA alpha (update scale alpha / r)",
    "lora_dropout": "dropout on the LoRA adapters' input", "lora_targets": "all-linear or names, e.g. q_proj,v_proj",
    "base_dtype": "frozen base dtype with LoRA: auto | float32 | bfloat16",
    "data_subset": "subset of a Hub dataset or folder (e.g. SFT)", "data_split": "split to train on (default: train)",
    "val_split": "split of --val-data when it is a Hub dataset or folder",
    "max_examples": "train on the first N conversations only",
    "freeze_embeddings": "train only the chat tokens' embedding rows (text tokens keep their pretrained rows)",
    "freeze_top_mlps": "keep the MLPs of the last N decoder blocks as pretraining left them (0 = none)",
    "fsdp": "under torchrun: shard weights, gradients and AdamW state over the processes (FSDP2)",
    "grad_checkpointing": "recompute each block's activations in backward (less memory, ~1/3 more time)",
    "compile": "torch.compile the model's forward, micro-batch lengths padded to powers of two (off: not yet measured on a GPU)",
    "fast": "apply the speed layer minisft/fast/ (--no-fast: train model.py's plain modules as written)",
}
# Fields whose default is None: argparse needs the type of the value they take.
OPTIONAL_TYPES = {"max_tokens": int, "max_examples": int, "data_subset": str, "data_split": str, "val_split": str, "val_data": str, "sample_data": str, "template": str, "warmup_steps": int, "max_steps": int,
                  "epochs": int, "device": str, "stop_after_step": int, "batch_size": integer_or_auto}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser():
    """One option per TrainConfig field. Defaults are SUPPRESSed, so we know what was given:
    TrainConfig holds the defaults, and --resume fills the rest from the checkpoint."""
    p = _Parser(prog="python -m minisft.train", description="Supervised fine-tuning of a SmolLM model.",
                argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(TrainConfig):
        help_ = f"{HELP[f.name]} (default: {f.default})"
        if isinstance(f.default, bool):  # off by default: --packing; on by default: --no-chunked-loss too
            action = argparse.BooleanOptionalAction if f.default else "store_true"
            p.add_argument(flag(f.name), action=action, help=help_)
        else:
            p.add_argument(flag(f.name), type=OPTIONAL_TYPES.get(f.name) or type(f.default), help=help_)
    return p


def config_from_args(given):
    """The TrainConfig of a command line; with --resume, what was not given comes from the checkpoint."""
    if "warmup_steps" in given and "warmup_ratio" in given:
        raise ValueError("--warmup-steps and --warmup-ratio both given: choose one")
    if not given.get("resume"):
        return TrainConfig(**given)
    saved = saved_config(given.get("out", TrainConfig.out))
    keep = {k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
    keep.pop("stop_after_step", None)
    return TrainConfig(**{**keep, **given})


def run(train, argv=None):
    """Parse `argv` (default: sys.argv), run `train` (train.train) on its TrainConfig -> the exit code.
    train.py's main() calls this: the trainer imports its command line, never the other way round."""
    given = vars(build_parser().parse_args(argv))
    try:
        summary = train(config_from_args(given))
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
        distributed.close()
    return 130 if summary["interrupted"] else 0
