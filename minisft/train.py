"""The supervised fine-tuning loop. Lesson 6 reads this file top to bottom.

    python -m minisft.train --data data/sft_train.jsonl --val-data data/sft_val.jsonl --out runs/sft
    python -m minisft.train --out runs/sft --resume          # carries on exactly where it stopped

One optimizer step of SFT, in `sft_step` below:

  1. take the step's global batch: batch_size x grad_accum examples (x processes), as micro-batches
  2. count the TARGET tokens of the whole global batch, before any forward pass
  3. accumulate: forward + backward each micro-batch with loss = (its summed token losses) / count,
     so the gradients add up to those of one big batch in which every target token weighs the same
  4. clip the global gradient norm
  5. AdamW step at the learning rate of this step, lr_at(step) (warmup + cosine, schedule.py)
  6. hand the step's numbers to what watches the run (watch.py) and records it (rundir.py)

`train()` sets the stage -- build_model, load_data, plan_schedule, optim.make_optimizer, resume -- and
calls sft_step until the run is done; record_step writes down each step. It owns no maths of its
own; the pieces live in one module each:

    config.py     TrainConfig: every knob of a run           cli.py         the command line
    data.py       conversations -> examples -> batches       loss.py        masked, summed token losses
    schedule.py   the learning rate of every step            watch.py       eval, samples, early stopping
    rundir.py     metrics, plots, checkpoints, resume        distributed.py several processes (torchrun)
    optim.py      AdamW's groups, frozen parts (lesson 10)   console.py     what the console shows
    precision.py  --dtype: the matmuls' format per device    fit.py, compiled.py   --batch-size auto, --compile
    fast/         the speed layer build_model applies: the same numbers, less time and memory (lesson 11)

Steps are counted from 0: metrics line "step": s is optimizer step s, trained at lr_at(s).
"""
import math
import random
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn as nn

from minisft import (chat_template, cli, compiled, console, conversations, data, distributed, fast, fit, precision,
                     trackers)
from minisft.checkpoint import list_checkpoints
from minisft.config import TrainConfig, check_config  # noqa: F401
from minisft.data import to_device  # noqa: F401  (part of this module's API since lesson 4)
from minisft.lora import add_lora
from minisft.loss import batch_loss
from minisft.optim import freeze_text_embeddings, freeze_top_mlps, make_optimizer, param_groups  # noqa: F401
from minisft.rundir import TIMING_KEYS, RunFolder, StopRequest, check_out_dir, final_template  # noqa: F401
from minisft.rundir import after_interrupt, match_world, save_final, stop_requested
from minisft.rundir import peak_memory_mb, saved_config  # noqa: F401
from minisft.schedule import plan as plan_schedule
from minisft.watch import Watch, overfitting, repetition_loop  # noqa: F401
from minisft.weights import load_pretrained, pick_device

def accumulate_gradients(model, micro_batches, n_targets, *, chunked=True, autocast=nullcontext, grad_scale=1.0,
                         stats=None, scaler=None, loss_fn=batch_loss):
    """Backward every micro-batch so that the gradients are those of ONE loss:

        loss = (sum of the token losses of ALL micro-batches) / n_targets

    n_targets is the number of target tokens of the whole global batch (all micro-batches of all
    processes), counted before any forward pass. Each micro-batch backwards its own sum / n_targets,
    and gradients add up across backward() calls, so every target token weighs 1 / n_targets
    however the batch was split or padded. (The mean of per-micro-batch means would give the tokens
    of a short micro-batch more weight than those of a long one: lesson 4 measures the bias.)

    model: a SmolLM, or a DistributedDataParallel around distributed.WithLoss; then grad_scale =
    world size undoes DDP's averaging of gradients over processes (we want their sum).
    micro_batches: collated batches already on the model's device. Returns the summed loss of these
    micro-batches as a float64 0-dim tensor on that device (detached: no host sync per micro-batch).
    stats: a dict that gains the targets' "correct" and "entropy" sums (loss.batch_loss), or None (and
    always with DDP). scaler: a GradScaler with --dtype float16 (precision.py): each backward starts
    from the loss times its scale, sft_step divides it out. loss_fn: loss.batch_loss, or
    compiled.batch_loss with --compile (the same numbers, a compiled forward).
    """
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    scale = grad_scale / max(n_targets, 1)  # max(): a batch with no target at all gives 0, not NaN
    total = 0
    for i, mb in enumerate(micro_batches):
        # DDP all-reduces gradients during backward; only the last micro-batch needs to.
        sync = model.no_sync() if ddp and i < len(micro_batches) - 1 else nullcontext()
        with sync:
            with autocast():
                loss_sum, _ = model(mb) if ddp else loss_fn(model, mb, chunked, stats)
            loss = loss_sum * scale
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total = total + loss_sum.detach().double()
    return total


def sft_step(step, batches, model, runner, optimizer, lr_at, cfg, state, device, autocast, world=1, scaler=None):
    """Optimizer step `step` (0-based) -> its numbers (loss, lr, grad_norm, tokens, input_tokens).

    batches(step): this process's share of the step's global batch, as collated micro-batches
    (data.step_batches). runner: the model, or its DDP wrapper with several processes.
    state["updating"] turns True just before AdamW changes the weights: from then until the step
    is recorded, a checkpoint would not match `state`, and train() writes none if interrupted there.
    Raises FloatingPointError, before touching the weights, when the loss or the gradient is not finite
    -- except a float16 step (scaler) whose gradient overflowed at a loss scale > 1: the scale was too
    big, not the gradient. That step is skipped (no update), the scale halves, state["skipped_steps"] counts it.
    """
    # 1. The global batch of this step (this process's rows of it), cut into micro-batches.
    micro_batches = batches(step)

    # 2. Count the target tokens of the WHOLE global batch (all micro-batches, all processes) first.
    n_targets = sum(data.count_targets(mb["labels"]) for mb in micro_batches)
    n_tokens = sum(int((mb["attention_mask"] != 0).sum()) for mb in micro_batches)
    n_targets, n_tokens = (int(x) for x in distributed.all_reduce_sum([n_targets, n_tokens], device))

    # 3. Accumulate: every micro-batch's summed loss / n_targets, gradients adding up.
    lr = lr_at(step)
    for g in optimizer.param_groups:
        g["lr"] = lr
    # Zeroed in place, not freed: the gradient buffers are made once and stay, instead of coming back
    # mid-backward into a heap the activations have fragmented (docs/heap.md: the peak memory it saves).
    # Every trainable parameter gets a gradient in every backward, so AdamW steps the same.
    optimizer.zero_grad(set_to_none=False)
    pad = compiled.pad_to_bucket if cfg.compile else (lambda mb: mb)  # --compile: length buckets (compiled.py)
    stats = {}
    loss_sum = accumulate_gradients(runner, [to_device(pad(mb), device) for mb in micro_batches], n_targets,
                                    chunked=cfg.chunked_loss, autocast=autocast, grad_scale=world, scaler=scaler,
                                    loss_fn=compiled.batch_loss if cfg.compile else batch_loss, stats=stats)

    # 4. Clip. clip_grad_norm_ returns the norm BEFORE clipping: that is what we log. float16: the
    # gradients are divided by the loss scale first, so the norm and the clip are those of the true gradient.
    if scaler is not None:
        scaler.unscale_(optimizer)
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if hasattr(grad_norm, "full_tensor"):  # --fsdp: a DTensor, the same number on every process (fsdp.py)
        grad_norm = grad_norm.full_tensor()
    sums = [loss_sum, grad_norm.double()] + ([stats["correct"], stats["entropy"]] if stats else [])
    loss_sum, grad_norm, *stat_sums = torch.stack([t.to(loss_sum.device) for t in sums]).tolist()  # one host sync
    loss = distributed.all_reduce_sum([loss_sum], device)[0] / max(n_targets, 1)
    overflow = scaler is not None and math.isfinite(loss) and not math.isfinite(grad_norm) and scaler.get_scale() > 1
    if not (math.isfinite(loss) and math.isfinite(grad_norm)) and not overflow:
        optimizer.zero_grad(set_to_none=True)
        what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", grad_norm)
        raise FloatingPointError(f"step {step}: {what} is {value}; stopped before the optimizer step, nothing was "
                                 f"updated")

    # 5. AdamW at this step's learning rate (float16: GradScaler skips it after an overflow, then adapts its scale).
    state["updating"] = True
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
        state["scaler"] = scaler.state_dict()  # the scale goes into every checkpoint: resume is exact
    state["skipped_steps"] += int(overflow)

    # 6. The numbers, for what watches and records the run. The accuracy (greedy pick = target) and the
    # entropy of the predictions, over the target tokens, carry TRL's names (trackers.py).
    numbers = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": n_targets, "input_tokens": n_tokens,
               "skipped_steps": state["skipped_steps"], **({"loss_scale": scaler.get_scale()} if scaler else {})}
    if stat_sums:  # none with several processes (DDP's wrapper returns the loss only)
        numbers.update(mean_token_accuracy=stat_sums[0] / max(n_targets, 1), entropy=stat_sums[1] / max(n_targets, 1))
    return numbers


def load_data(cfg, model, tokenizer, template, log):
    """Conversations -> (train examples (packed rows with --packing), val examples, sample prompts, info)."""
    train_convs, stats = conversations.load_conversations(cfg.data, cfg.skip_bad, cfg.data_subset, cfg.data_split)
    sources = stats["sources"]
    if cfg.max_examples:  # the slice comes first, the validation split (if any) is taken from it
        train_convs, sources = train_convs[:cfg.max_examples], sources[:cfg.max_examples]
    val_convs = []
    if cfg.val_data:
        val_convs, _ = conversations.load_conversations(cfg.val_data, cfg.skip_bad, cfg.data_subset, cfg.val_split)
    elif cfg.val_fraction > 0:
        pairs_train, pairs_val = conversations.split_train_val(list(zip(train_convs, sources)), cfg.val_fraction, cfg.seed)
        train_convs, sources = [c for c, _ in pairs_train], [s for _, s in pairs_train]
        val_convs = [c for c, _ in pairs_val]
    max_length = min(cfg.max_length, model.config.max_position_embeddings)
    if max_length < cfg.max_length:
        log(f"--max-length {cfg.max_length} is beyond the model's context: using {max_length}")
    opts = dict(template=template, train_on=cfg.train_on, max_length=max_length, skip_bad=cfg.skip_bad)
    examples, info = data.build_examples(tokenizer, train_convs, sources=sources, **opts)
    if not examples:
        raise ValueError(f"{cfg.data}: no example has a token to train on (train_on={cfg.train_on!r})")
    val_examples = data.build_examples(tokenizer, val_convs, **opts)[0] if val_convs else []
    info["conversations"] = len(examples)
    if cfg.packing:
        # A packed micro-batch holds about as many real TOKENS as a padded one of batch_size examples
        # would (data.token_budget): the recipe's lr and steps still fit, and no slot goes on padding.
        # From here on each "example" is one micro-batch: a single packed row.
        lengths = [len(ex["input_ids"]) for ex in examples]
        info["budget"] = max(data.token_budget(lengths, cfg.batch_size, cfg.max_tokens), max(lengths))
        examples = data.pack_to_budget(examples, info["budget"], max_length)

    sample_convs = conversations.load_conversations(cfg.sample_data, skip_bad=cfg.skip_bad)[0] if cfg.sample_data else val_convs
    prompts = []  # (question, rendered prompt) of the first num_samples conversations that give one
    for conv in sample_convs[:cfg.num_samples] if cfg.sample_every else []:
        try:
            prompt = data.sample_prompt(conv, template)
        except ValueError as e:  # settings this template cannot render: no sample, but say why
            log(f"note: a sample prompt left out: {e}")
            continue
        # generate() needs room for one new token at least
        if prompt and len(tokenizer.encode(prompt[1])) < model.config.max_position_embeddings:
            prompts.append(prompt)
        elif prompt:
            log("note: 1 sample prompt(s) left out: longer than the model's context")
    if cfg.patience and not val_examples:
        raise ValueError("--patience needs validation data (--val-data or --val-fraction)")
    if cfg.sample_every and not prompts:
        log("note: no sample generations (no validation conversations; --sample-data gives prompts)")
    return examples, val_examples, prompts, info


def build_model(cfg, device):
    """The model to train -> (model, tokenizer): the pretrained weights, then what the recipe changes.

    float32 weights; the matmuls run in the format precision.choose picks (bfloat16 or float16
    autocast on CUDA). Why not
    bfloat16 weights: bf16 keeps 8 bits of mantissa, so an update smaller than ~1/256 of a weight
    rounds away, and fine-tuning's updates (lr 5e-5) are mostly that small. With LoRA the base is
    frozen: nothing is added to its weights, so bfloat16 loses nothing there and halves their memory;
    the adapters, which do train, stay float32 (lora.py).
    """
    random.seed(cfg.seed)  # before anything random: LoRA's init, dropout, the data order
    torch.manual_seed(cfg.seed)
    bf16_base = cfg.lora_r and precision.bf16_base(cfg.base_dtype, precision.choose(cfg.dtype, device))
    model, tokenizer = load_pretrained(cfg.model, dtype=torch.bfloat16 if bf16_base else torch.float32, device=device)
    if tokenizer is None:
        raise FileNotFoundError(f"{cfg.model}: no tokenizer.json next to the weights (training needs the tokenizer)")
    if cfg.lora_r:  # New in lesson 9: freeze the model, train low-rank adapters on its linear layers
        add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    if cfg.freeze_embeddings:  # New in lesson 10: the text tokens keep their pretrained embedding rows
        freeze_text_embeddings(model, tokenizer.added_ids)
    if cfg.freeze_top_mlps:  # New in lesson 10: so do the MLPs of the upper blocks
        freeze_top_mlps(model, cfg.freeze_top_mlps)
    if cfg.fast and not cfg.compile:  # New in lesson 11: the same numbers, faster (not under --compile: compiled.py)
        fast.apply(model)
    model.grad_checkpointing = cfg.grad_checkpointing
    return model, tokenizer


def pick_template(cfg, tokenizer):
    """The chat format to train with: --template, else the one the model's tokenizer carries."""
    if cfg.template is not None:
        return cfg.template
    try:
        return chat_template.template_for(tokenizer)
    except ValueError:  # guessing a format would train the model on turns it will never see
        raise ValueError(f"{cfg.model}: its chat template is not SmolLM2, SmolLM3 or ChatML; choose the "
                         f"format to train with --template ({', '.join(chat_template.TEMPLATES)})") from None


def step_batches(cfg, examples, pad_id, rank, world):
    """-> (batches(step): this process's micro-batches of that step, micro-batch size, global batch size).
    With --packing each example is already one micro-batch (a packed row)."""
    micro = 1 if cfg.packing else cfg.batch_size
    global_batch = micro * cfg.grad_accum * world
    return data.step_batches(examples, global_batch, micro, cfg.seed, pad_id, cfg.group_by_length, rank, world,
                             packed=cfg.packing), micro, global_batch


def new_state():
    """Where the run stands: everything a checkpoint must carry besides tensors."""
    return {"step": 0, "best_val_loss": None, "best_step": None, "bad_evals": 0, "gaps": [],
            "train_since_eval": [0.0, 0], "tokens_seen": 0, "num_tokens": 0, "elapsed_s": 0.0, "stop_reason": None,
            "skipped_steps": 0, "scaler": None}


def record_step(step, numbers, dt, eta, state, steps_per_epoch, total_steps, cfg, device, watch, run, model, log):
    """After optimizer step `step`: the progress line, evaluation and samples (watch.py), the best
    weights, the metrics line (rundir.py) -> that line. `state` already counts the step's tokens and time.
    learning_rate and num_tokens (every real token so far) repeat lr and tokens under TRL's names."""
    rec = {"step": step, "epoch": step // steps_per_epoch, **numbers, "learning_rate": numbers["lr"],
           "num_tokens": state["num_tokens"],
           "tokens_per_sec": numbers["input_tokens"] / dt, "target_tokens_per_sec": numbers["tokens"] / dt,
           "step_time_s": dt, "elapsed_s": state["elapsed_s"], "eta_s": eta, "peak_mem_mb": peak_memory_mb(device)}
    last = step + 1 == total_steps
    if (step + 1) % cfg.log_every == 0 or last:
        log(console.progress_line(rec, total_steps), flush=True)
    seen = watch.after_step(state, step, numbers["loss"], numbers["tokens"], last)
    if seen.pop("new_best", False) and cfg.patience:
        run.save_best(model)
    run.append("samples.jsonl", seen.pop("samples", []))
    rec.update(seen)
    run.append("metrics.jsonl", [rec])
    return rec


def train(cfg):
    """Fine-tune cfg.model on cfg.data; returns a summary dict (see the end of this function).

    Raises ValueError / FileNotFoundError / FileExistsError for bad settings or data, and
    FloatingPointError when the loss or the gradient norm becomes NaN/inf (nothing is updated
    with it; the last good checkpoint stays the newest one).
    """
    check_config(cfg)
    rank, world, device = distributed.setup(cfg.device or pick_device(), cfg.fsdp)
    main_proc = rank == 0
    log = print if main_proc else (lambda *a, **k: None)
    old_files = check_out_dir(cfg)  # every process checks before anything is loaded or written
    cfg = match_world(cfg, world, log)  # --resume on another number of processes: the same global batch
    distributed.barrier(world)

    # ---- model, data, steps, schedule, optimizer ---------------------------------------------
    model, tokenizer = build_model(cfg, device)
    prec = precision.choose(cfg.dtype, device)
    cfg = fit.resolve(cfg, model, device, prec, log)  # --batch-size auto -> the micro-batch that fits
    template = pick_template(cfg, tokenizer)
    tokenizer.check_fits(model.config.vocab_size, cfg.model, needs=("<|im_start|>", "<|im_end|>"))
    examples, val_examples, prompts, info = load_data(cfg, model, tokenizer, template, log)
    batches, micro, global_batch = step_batches(cfg, examples, tokenizer.pad_id, rank, world)
    steps_per_epoch = batches.steps_per_epoch
    total_steps, warmup, lr_at = plan_schedule(cfg, steps_per_epoch)
    runner = distributed.wrap(model, cfg.chunked_loss, world, cfg.fsdp, prec)  # before AdamW: FSDP swaps the params
    optimizer = make_optimizer(model, cfg, lr_at(0), torch.device(device).type)

    state = new_state()
    run = RunFolder(cfg.out, main_proc, log)
    if cfg.resume:  # weights, AdamW moments, RNG states and `state` as the last checkpoint left them
        saved, ckpt = run.resume(model, optimizer, cfg, world, keys=list(state))
        state.update(saved)  # a key newer than the checkpoint keeps its fresh value
    scaler = prec.scaler(state["scaler"])  # float16: a GradScaler, at the checkpoint's scale on resume
    watch = Watch(cfg, model, tokenizer, template, val_examples, prompts, device, prec.autocast, rank, world, log)

    def save():
        path = run.save_checkpoint(model, optimizer, dict(
            state, epoch=state["step"] // steps_per_epoch, batch_in_epoch=state["step"] % steps_per_epoch,
            steps_per_epoch=steps_per_epoch, total_steps=total_steps, world_size=world, template=template,
            config=vars(cfg).copy()), cfg.keep_checkpoints)
        distributed.barrier(world)
        return path

    for line in console.opening_lines(cfg, model, device, prec, template, examples, val_examples, info,
                                     (total_steps, warmup, steps_per_epoch, global_batch, micro, world)):
        log(line)

    # ---- the loop ---------------------------------------------------------------------------
    start_step, t_start, elapsed0 = state["step"], time.perf_counter(), state["elapsed_s"]
    last_ckpt = (list_checkpoints(run.ckpt_dir) or [None])[-1]
    interrupted = False
    model.train()
    with run.open(old_files, resume_step=state["step"] if cfg.resume else None), StopRequest() as stop, \
            trackers.start(cfg, active=main_proc) as tracking:
        if cfg.resume:
            log(f"resumed from {ckpt} (step {state['step']}/{total_steps})")
        try:
            while state["step"] < total_steps and state["stop_reason"] is None:
                step, t0 = state["step"], time.perf_counter()
                try:
                    numbers = sft_step(step, batches, model, runner, optimizer, lr_at, cfg, state, device,
                                       prec.autocast, world, scaler)
                except FloatingPointError as e:
                    run.refresh_plots()
                    raise FloatingPointError(f"{e}. Last good checkpoint: {last_ckpt or 'none (no checkpoint yet)'}. "
                                             f"Try a lower --lr (now {cfg.lr:g}) or look at the data of this step") from None

                # ---- what watches and records the run: metrics, evaluation, samples, checkpoint, plots
                dt, done = time.perf_counter() - t0, step + 1
                state["elapsed_s"] = elapsed0 + time.perf_counter() - t_start
                state["tokens_seen"] += numbers["tokens"]
                state["num_tokens"] += numbers["input_tokens"]  # TRL's num_tokens: every real token seen so far
                eta = (time.perf_counter() - t_start) / (done - start_step) * (total_steps - done)
                tracking.log(record_step(step, numbers, dt, eta, state, steps_per_epoch, total_steps, cfg, device, watch,
                                         run, model, log))  # metrics.jsonl is the source of truth; trackers get a copy
                state["step"] = done
                state.pop("updating", None)  # the weights and `state` agree again
                if (cfg.save_every and done % cfg.save_every == 0) or done == total_steps or state["stop_reason"]:
                    last_ckpt = save() or last_ckpt
                if cfg.plot_every and done % cfg.plot_every == 0:
                    run.refresh_plots()
                if stop_requested(stop, done, cfg, world, device):
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            interrupted = True
            last_ckpt = after_interrupt(state, save, last_ckpt, cfg, log)
        finally:
            state.pop("updating", None)

        # ---- the end: final model, plots ------------------------------------------------------
        final_dir = None if interrupted else save_final(run, model, tokenizer, template, cfg, state, log)
        run.refresh_plots()
        distributed.barrier(world)
    last_loss = run.last_loss() if main_proc else None
    log(console.closing_line(state, total_steps, last_loss))
    return {"out": cfg.out, "steps": state["step"], "total_steps": total_steps, "loss": last_loss,
            "best_val_loss": state["best_val_loss"], "best_step": state["best_step"],
            "stop_reason": state["stop_reason"] or "finished", "interrupted": interrupted,
            "tokens": state["tokens_seen"], "elapsed_s": state["elapsed_s"], "checkpoint": last_ckpt, "final": final_dir}


def main(argv=None):
    """`python -m minisft.train ...`: the command line (cli.py) -> train() -> the exit code."""
    return cli.run(train, argv)


if __name__ == "__main__":
    sys.exit(main())
