"""`python -m minisft.lora merge ADAPTER_DIR OUT_DIR`: a LoRA adapter folder -> one plain model folder.

The adapter folder loads as its base model with the adapters applied (weights.load_pretrained,
lora.load_adapter); lora.merge_lora folds each B A into its base weight; save_pretrained writes
the result in the Hugging Face layout, which loads without peft. Lesson 9 trains the adapters.
"""
import argparse
import sys

import torch

from minisft.lora import merge_lora, read_adapter_config
from minisft.weights import load_pretrained, save_pretrained


def main(argv=None):
    """The merge command -> its exit code (0, or 1 after a one-line error on stderr)."""
    ap = argparse.ArgumentParser(prog="python -m minisft.lora", description="Merge a LoRA adapter into its base model.")
    m = ap.add_subparsers(dest="cmd", required=True).add_parser(
        "merge", help="write base + adapter as one plain model folder (Hugging Face layout)")
    m.add_argument("adapter_dir"), m.add_argument("out_dir")
    m.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of the merged weights")
    m.add_argument("--overwrite", action="store_true", help="replace an existing model folder at OUT_DIR")
    args = ap.parse_args(argv)
    try:
        read_adapter_config(args.adapter_dir)
        model, tok = load_pretrained(args.adapter_dir, dtype="float32", device="cpu")
        if not merge_lora(model):  # in float32, then cast once
            raise ValueError(f"{args.adapter_dir}: holds full model weights, not a LoRA adapter to merge")
        save_pretrained(model.to(getattr(torch, args.dtype)), tok, args.out_dir, overwrite=args.overwrite)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"merged {args.adapter_dir} into {args.out_dir}")
    return 0
