"""The same SFT job through TRL's SFTTrainer: the reference `python -m minisft.bench` races against.

    python -m minisft.bench.trl_side --model DIR --data FILE.jsonl --out DIR --max-steps N
                                      [--batch-size 8] [--grad-accum 1] [--max-length 1024] [--lr 5e-5]
                                      [--packing] [--gradient-checkpointing] [--device cpu] [--bf16|--fp16]

minisft.bench runs this file as its own process, once per TRL row; nothing else imports it, and it
is the only place that imports trl (an optional extra: pip install trl). It writes DIR/steps.jsonl,
one line per optimizer step, with the same fields minisft's metrics.jsonl has for timing:
    {"step", "input_tokens" (non-padding tokens of the step), "step_time_s", "peak_mem_mb"}
so the bench reads both trainers the same way.

The job is the one minisft.train runs: the same model folder in float32 (with --bf16, the Trainer's
bfloat16 autocast over those float32 weights, as minisft's --dtype bfloat16), the same conversations
("messages" records) rendered with the model's chat template, AdamW at --lr with a cosine decay and
no warmup, --batch-size x --grad-accum conversations per step, --max-length tokens per conversation.
TRL computes the loss on every token here (its default for conversations without a template that
marks the assistant turns); which tokens carry loss changes no compute, so the speed is comparable.
"""
import argparse
import json
import os
import sys
import time


def peak_mem_mb(device):
    """Peak GPU memory torch allocated on CUDA; elsewhere None (the bench reads the process's peak RSS)."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if str(device).startswith("cuda") else None


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m minisft.bench.trl_side", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--max-steps", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--packing", action="store_true", help='TRL packing, strategy "bfd" (padding-free rows)')
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (float32 weights), as minisft on CUDA >= 8.0")
    p.add_argument("--fp16", action="store_true", help="float16 autocast + loss scaling, as minisft on older CUDA GPUs")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        import torch
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
        from trl import SFTConfig, SFTTrainer
    except ImportError as e:
        print(f"error: trl is not importable ({e}); pip install trl", file=sys.stderr)
        return 3

    with open(args.data, encoding="utf-8") as f:
        records = [{"messages": json.loads(line)["messages"]} for line in f if line.strip()]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.chat_template is None:
        from minisft.jinja_templates import JINJA  # the format minisft.train would guess for this folder
        tokenizer.chat_template = JINJA["chatml"]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(args.device)

    steps, t0 = [], [0.0]
    device = args.device

    class Timer(TrainerCallback):
        # on_step_begin .. on_step_end spans the forward/backward of every micro-batch and the
        # optimizer step; the log that follows carries TRL's running count of non-padding tokens.
        # The Trainer fetches and collates a step's batches BEFORE on_step_begin, so TRL's step
        # time leaves out its data loading, which minisft's includes: a small edge for TRL.
        def on_step_begin(self, a, state, control, **kw):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0[0] = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            steps.append({"step": state.global_step - 1, "step_time_s": time.perf_counter() - t0[0],
                          "peak_mem_mb": peak_mem_mb(device)})

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "num_tokens" in logs and steps and "num_tokens" not in steps[-1]:
                steps[-1]["num_tokens"] = logs["num_tokens"]

    cfg = SFTConfig(
        output_dir=args.out, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, max_length=args.max_length, learning_rate=args.lr,
        lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, seed=args.seed,
        packing=args.packing, packing_strategy="bfd", gradient_checkpointing=args.gradient_checkpointing,
        bf16=args.bf16, fp16=args.fp16, use_cpu=device == "cpu", logging_steps=1, save_strategy="no",
        report_to=[], dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(records),
                         processing_class=tokenizer, callbacks=[Timer()])
    trainer.train()

    previous = 0
    os.makedirs(args.out, exist_ok=True)
    tmp = os.path.join(args.out, "steps.jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for s in steps:
            total = s.pop("num_tokens", previous)
            s["input_tokens"], previous = int(total - previous), total
            f.write(json.dumps(s) + "\n")
    os.replace(tmp, os.path.join(args.out, "steps.jsonl"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
