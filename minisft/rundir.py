"""The run folder: what a fine-tuning run leaves on disk, and how a stopped run carries on.

Lesson 6 writes one. What a run writes into --out DIR:

    metrics.jsonl              one JSON object per optimizer step (val_loss on evaluation steps)
    samples.jsonl              generations for fixed held-out prompts every --sample-every steps
    loss.png, metrics.png      plots (plot.py), refreshed during training
    report.html, tensorboard/  python -m minisft.report RUN; --report-to tensorboard (trackers.py)
    checkpoints/step_000200/   model.safetensors, optimizer.pt, rng.pt, state.json (the last
                               --keep-checkpoints); step_N holds the state after N optimizer steps
    checkpoints/best.safetensors   the weights of the best evaluation (only with --patience)
    final/                     the fine-tuned model (config.json, model.safetensors, tokenizer) and
                               its model card, README.md (model_card.py)
    .lock                      held while a run writes here (released by the OS when it exits)

The rules that make a run safe to stop at any moment, and to resume:
- Nothing of a previous run is touched without --resume (carry on) or --overwrite (start again).
- Two runs never write into one folder at once: the second finds the lock held and stops.
- Checkpoints and final/ appear complete or not at all (files.py), so a kill -9 or a power cut
  costs at most the steps since the last checkpoint. A kill while a line of metrics.jsonl or
  samples.jsonl is being appended leaves a torn last line: --resume drops it with a note.
- Ctrl-C stops cleanly after the current step and writes a checkpoint; a second Ctrl-C stops at once.
"""
import dataclasses
import json
import os
import shutil
import signal
import sys

from minisft import chat_template, distributed, fsdp
from minisft.checkpoint import (list_checkpoints, load_checkpoint, load_weights, read_state, remove_partial,
                                save_checkpoint, save_weights, truncate_jsonl)
from minisft.config import TRAJECTORY_KEYS, flag
from minisft.jinja_templates import JINJA
from minisft.lora import lora_parameters, save_adapter
from minisft.weights import save_pretrained

# Files a run writes into --out (what --overwrite deletes; nothing else is touched).
RUN_FILES = ("metrics.jsonl", "samples.jsonl", "loss.png", "metrics.png", "checkpoints", "final",
             "report.html", "tensorboard")  # the last two: report.py and --report-to tensorboard
# Metrics that measure the machine, not the training: they differ between two identical runs.
TIMING_KEYS = ("tokens_per_sec", "target_tokens_per_sec", "step_time_s", "elapsed_s", "eta_s", "peak_mem_mb")


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


def match_world(cfg, world, log=print):
    """--resume with another number of processes -> cfg with the --grad-accum that keeps each step's data.

    Step s trains on global batch s (data.step_batches): batch size x grad-accum x processes
    examples, its loss divided by the targets of all of them. Keeping that product keeps every step's
    data, loss and schedule: 2 processes x grad-accum 2 carry on as 4 x 1 or as 1 x 4, and the run
    follows the same path to float rounding (the sums run in another order). Random draws (LoRA
    dropout) cannot follow: each process had its own stream, and there are now more or fewer of them.
    A --grad-accum given for the new count is checked; the checkpoint's is scaled."""
    if not cfg.resume:
        return cfg
    saved = read_state(list_checkpoints(os.path.join(cfg.out, "checkpoints"))[-1])
    was, accum = saved["world_size"], saved["config"]["grad_accum"]
    per_step = was * accum  # micro-batches per optimizer step, over all processes
    if cfg.grad_accum * world == per_step:
        return cfg
    if cfg.grad_accum != accum:
        raise ValueError(f"--resume: --grad-accum {cfg.grad_accum} x {world} processes makes {cfg.grad_accum * world} "
                         f"micro-batches per step; the run made {per_step} ({was} processes x --grad-accum {accum})")
    if per_step % world:
        raise ValueError(f"--resume: the run made {per_step} micro-batches per step ({was} processes x --grad-accum "
                         f"{accum}); {world} processes cannot share them evenly: use a number that divides {per_step}")
    log(f"--resume: {was} -> {world} processes, so --grad-accum {accum} -> {per_step // world}: "
        f"every step keeps its {per_step} micro-batches")
    return dataclasses.replace(cfg, grad_accum=per_step // world)


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
    if template in JINJA:
        return JINJA[template]
    log(f"warning: final/ keeps the tokenizer's own chat template; it is not the {template!r} format this run trained on")
    return None


class RunLock:
    """An exclusive lock on DIR/.lock, so that a second run into the same folder stops at once.

    It is an OS lock (flock), not the mere existence of a file: the kernel releases it when the
    process dies, however it dies, so a lock left by a killed run never blocks the next one.
    The file stays behind and holds the pid of the last holder, for the error message."""

    def __init__(self, folder):
        self.path, self.fd = os.path.join(folder, ".lock"), None

    def acquire(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl
        except ImportError:  # Windows: no flock; the folder checks of check_out_dir still apply
            self.fd = fd
            return self
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise FileExistsError(f"--out {os.path.dirname(self.path)}: another run (pid {holder}) is writing to this "
                               f"folder; wait for it to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def release(self):
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None


class RunFolder:
    """The --out folder of one run, as seen by the main process (other ranks write nothing)."""

    def __init__(self, out, main_proc=True, log=print):
        self.out, self.main, self.log = out, main_proc, log
        self.ckpt_dir = os.path.join(out, "checkpoints")
        self.metrics_path = os.path.join(out, "metrics.jsonl")
        self.lock = RunLock(out)

    def open(self, old_files, resume_step=None):
        """Take the lock, then (only now that model and data loaded fine) clear what --overwrite
        replaces, or cut the logs back to the checkpoint --resume continues from.
        Use as `with run.open(...):` -- the lock is released however the block ends."""
        if not self.main:
            return self
        self.lock.acquire()
        for n in old_files:
            p = os.path.join(self.out, n)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
        if resume_step is not None:
            for name in ("metrics.jsonl", "samples.jsonl"):
                truncate_jsonl(os.path.join(self.out, name), resume_step, self.log)
        remove_partial(self.ckpt_dir)
        return self

    def resume(self, model, optimizer, cfg, world, keys):
        """Restore the latest checkpoint into model and optimizer (and the RNG states) -> (state, path).

        The settings that decide the trajectory (config.TRAJECTORY_KEYS) must be those of the
        checkpoint: else the resumed half would be another run. The number of processes may change
        when the micro-batches per step stay (match_world set --grad-accum for that)."""
        ckpt = list_checkpoints(self.ckpt_dir)[-1]
        saved = read_state(ckpt)
        sharded = os.path.isdir(os.path.join(ckpt, "sharded"))
        if sharded != fsdp.is_sharded(model):
            raise ValueError(f"--resume: {ckpt} was written {'with' if sharded else 'without'} --fsdp; "
                             f"resume it {'with' if sharded else 'without'} --fsdp")
        if saved["world_size"] * saved["config"]["grad_accum"] != world * cfg.grad_accum:
            raise ValueError(f"--resume: {world} processes x --grad-accum {cfg.grad_accum} differs from the run's "
                             f"{saved['world_size']} x {saved['config']['grad_accum']} (the global batch would change)")
        if sharded:  # every process reads its part of the shards, and RNG states
            fsdp.load_checkpoint(ckpt, model, optimizer, saved)
        else:
            load_checkpoint(ckpt, model, optimizer)
        # A setting newer than the checkpoint is missing from it: the run had that setting's default.
        defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
        for k in TRAJECTORY_KEYS:
            was = saved["config"].get(k, defaults[k])
            if k == "grad_accum" and saved["world_size"] != world:
                continue  # checked above as processes x grad-accum
            if was != getattr(cfg, k):
                raise ValueError(f"--resume: {flag(k)}={getattr(cfg, k)!r} differs from the checkpoint's "
                                 f"{was!r} ({ckpt}/state.json); use the same settings or a new --out")
        return {k: saved[k] for k in keys if k in saved}, ckpt  # a key newer than the checkpoint: absent

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.lock.release()

    def append(self, name, records):
        """Append JSON lines to DIR/name (metrics.jsonl, samples.jsonl)."""
        if self.main and records:
            with open(os.path.join(self.out, name), "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))

    def save_checkpoint(self, model, optimizer, state, keep):
        if fsdp.is_sharded(model):  # every process writes its shard
            return fsdp.save_checkpoint(self.ckpt_dir, model, optimizer, state, keep)
        return save_checkpoint(self.ckpt_dir, model, optimizer, state, keep) if self.main else None

    def save_best(self, model):
        if self.main:
            os.makedirs(self.ckpt_dir, exist_ok=True)
            save_weights(model, os.path.join(self.ckpt_dir, "best.safetensors"))

    def load_best(self, model):
        """Load the best evaluation's weights into `model`; False when there are none."""
        best = os.path.join(self.ckpt_dir, "best.safetensors")
        if not os.path.isfile(best):
            return False
        load_weights(model, best)
        return True

    def save_final(self, model, tokenizer, template, base_model):
        """final/: a model folder in Hugging Face layout; with LoRA a peft adapter folder that
        names `base_model` (a local folder is written as an absolute path, so it loads from anywhere)."""
        final_dir = os.path.join(self.out, "final")
        chat = final_template(tokenizer, template, self.log)
        adapter = bool(lora_parameters(model))
        try:  # final/README.md, the model card (model_card.py); a card problem must not cost the run
            from minisft.model_card import card_text
            extra = {"README.md": card_text(self.out, adapter, evaluated=False)}
        except (OSError, ValueError, KeyError) as e:
            extra = None
            self.log(f"warning: no model card in {final_dir} ({e})")
        if adapter:
            base = os.path.abspath(base_model) if os.path.isdir(base_model) else base_model
            save_adapter(model, tokenizer, final_dir, base, chat_template=chat, overwrite=True, extra_files=extra)
        else:
            save_pretrained(model, tokenizer, final_dir, chat_template=chat, overwrite=True, extra_files=extra)
        self.log(f"saved {final_dir}")
        return final_dir

    def refresh_plots(self):
        if not self.main:
            return
        try:
            from minisft import plot
            plot.plot_run(self.out)
        except Exception as e:  # a plotting problem must not cost the training run
            print(f"warning: plots not written ({type(e).__name__}: {e})", file=sys.stderr, flush=True)

    def last_loss(self):
        """The train loss of the last metrics line (None without one)."""
        from minisft.plot import read_metrics
        rows = read_metrics(self.out, live=True) if os.path.isfile(self.metrics_path) else []
        return rows[-1]["loss"] if rows else None


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


def peak_memory_mb(device):
    """Peak GPU memory allocated by torch on CUDA; peak resident memory of the process elsewhere."""
    if str(device).startswith("cuda"):
        import torch
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


def stop_requested(stop, done, cfg, world, device):
    """Ctrl-C (or --stop-after-step) after `done` steps? With several processes: if any saw it, all stop."""
    stop_now = stop.requested or (cfg.stop_after_step is not None and done >= cfg.stop_after_step)
    if world > 1:  # Ctrl-C may reach only some processes: all stop, or none
        stop_now = distributed.all_reduce_sum([float(stop_now)], device)[0] > 0
    return stop_now


def after_interrupt(state, save, last_ckpt, cfg, log):
    """Ctrl-C: a checkpoint if the weights and `state` agree, and how to resume -> the last checkpoint.

    Between optimizer.step() and the end of the step's bookkeeping (state["updating"]) the weights
    are one step ahead of `state`: that state cannot be saved consistently."""
    if state.pop("updating", False):
        log(f"interrupted in the middle of step {state['step']}: no checkpoint written; "
            f"the last one is {last_ckpt}", file=sys.stderr)
    else:
        last_ckpt = save()
        log(f"interrupted after {state['step']} steps; checkpoint {last_ckpt}")
    log(f"resume with: python -m minisft.train --out {cfg.out} --resume")
    state["stop_reason"] = state["stop_reason"] or "interrupted"
    return last_ckpt


def save_final(run, model, tokenizer, template, cfg, state, log):
    """final/: the fine-tuned model; with early stopping the best weights, not the last -> its path."""
    if cfg.patience and run.load_best(model):
        log(f"final/ holds the weights of step {state['best_step']} (best val loss {state['best_val_loss']:.4f})")
    model = fsdp.full_model(model, cfg) if cfg.fsdp else model  # every process gathers; rank 0 writes
    return run.save_final(model, tokenizer, template, cfg.model) if run.main else None
