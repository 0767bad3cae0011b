"""What a training run says on the console: four lines to open it, a progress line every
--log-every steps, one line to close it. train.py decides when; this module only words them.

The numbers behind every line are also in the run folder's metrics.jsonl (rundir.py), which is
what plots and tests read; these lines are for the person watching.
"""
import torch

from minisft.lora import count_parameters
from minisft.rundir import fmt_time


def opening_lines(cfg, model, device, prec, template, examples, val_examples, info, plan):
    """-> [the model line, the precision line, the data line, the steps line].

    prec: the run's precision.Precision (its format and why).

    plan: (total_steps, warmup, steps_per_epoch, global_batch, micro, world), as train() planned them.
    info: data's counts (conversations, dropped_no_target, truncated, and budget with --packing)."""
    total_steps, warmup, steps_per_epoch, global_batch, micro, world = plan
    trainable, total = count_parameters(model)
    bf16_base = model.model.embed_tokens.weight.dtype == torch.bfloat16  # the frozen base, with LoRA
    lora = (f"; LoRA r={cfg.lora_r}: {trainable:,} trainable ({100 * trainable / total:.2f}%)"
            f"{', base in bfloat16' if bf16_base else ''}" if cfg.lora_r else "")
    packed = f", packed into {len(examples)} micro-batches of <= {info['budget']} tokens" if cfg.packing else ""
    processes = f" x {world} processes" if world > 1 else ""
    return [f"model {cfg.model}: {total:,} parameters on {device}; template {template}{lora}", prec.line(),
            f"data: {info['conversations']} training conversations ({info['dropped_no_target']} dropped: nothing to "
            f"train on, {info['truncated']} truncated){packed}; {len(val_examples)} validation",
            f"{total_steps} steps of {global_batch} {'micro-batches' if cfg.packing else 'examples'} "
            f"({micro} x {cfg.grad_accum} accumulation{processes}), {steps_per_epoch} steps per epoch; "
            f"lr {cfg.lr:g}, warmup {warmup}"]


def progress_line(rec, total_steps):
    """One step's metrics line (a dict: step, loss, lr, grad_norm, tokens_per_sec, eta_s) -> its progress line."""
    return (f"step {rec['step']:>5}/{total_steps} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | "
            f"grad {rec['grad_norm']:.3f} | {rec['tokens_per_sec']:,.0f} tok/s | eta {fmt_time(rec['eta_s'])}")


def closing_line(state, total_steps, last_loss):
    """The run's last line: steps done, why it stopped, the last train loss and the best val loss."""
    best = ("" if state["best_step"] is None else
            f"; best val loss {state['best_val_loss']:.4f} at step {state['best_step']}")
    last = f"; last train loss {last_loss:.4f}" if last_loss is not None else ""
    return f"done: {state['step']}/{total_steps} steps ({state['stop_reason'] or 'finished'}){last}{best}"
