"""Experiment trackers: a copy of every metrics line for a dashboard. Lesson 12 names them.

    python -m minisft.train ... --report-to trackio            # the tracker the smol course uses
    python -m minisft.train ... --report-to trackio,tensorboard   # several at once

metrics.jsonl (rundir.py) is always written and stays the source of truth: a tracker gets a copy of
each line as it is written, and a run reads the same with or without one. Each tracker is an optional
package, imported only when --report-to names it (requirements-dev.txt lists them):

    trackio       trackio.init / log / finish; a local store (~/.cache/huggingface/trackio, or
                  $TRACKIO_DIR), `trackio show` opens its dashboard. Project: $TRACKIO_PROJECT or "minisft".
    wandb         wandb.init / log / finish (project $WANDB_PROJECT or "minisft"; WANDB_MODE=offline works)
    tensorboard   torch.utils.tensorboard's SummaryWriter, into RUN/tensorboard/

The names. TRL's trainer logs through transformers' Trainer, whose trackers show "train/loss",
"train/learning_rate", "train/grad_norm", "train/mean_token_accuracy", "train/entropy",
"train/num_tokens" and "eval/loss". minisft's metrics lines carry the same quantities under the same
names where the concept is the same (train.py adds learning_rate and num_tokens beside the older lr and
tokens), so `tracker_name` only adds the prefix: a val_X key becomes "eval/X", any other "train/X".
The step axis is the metrics line's "step" (0-based optimizer steps).
"""
import importlib.util
import os

NAMES = ("none", "trackio", "wandb", "tensorboard")
PACKAGES = {"trackio": "trackio", "wandb": "wandb", "tensorboard": "tensorboard"}
# Keys of a metrics line that are not a quantity to plot, or repeat another one under an older name.
SKIP = ("step", "lr")


def parse(report_to):
    """"trackio,tensorboard" (or a list) -> ("trackio", "tensorboard"); "none" or "" -> ().
    Raises ValueError naming an unknown tracker or one whose package is not installed."""
    names = report_to if isinstance(report_to, (list, tuple)) else str(report_to or "none").split(",")
    names = [n.strip() for n in names if n.strip()]
    for n in names:
        if n not in NAMES:
            raise ValueError(f"--report-to {n!r}: expected none or a comma-separated list of "
                             f"{', '.join(NAMES[1:])}")
        if n != "none" and importlib.util.find_spec(PACKAGES[n]) is None:
            raise ValueError(f"--report-to {n}: the {PACKAGES[n]} package is not installed (pip install {PACKAGES[n]})")
    return tuple(dict.fromkeys(n for n in names if n != "none"))


def tracker_name(key):
    """A metrics.jsonl key -> the name a TRL dashboard shows: val_loss -> eval/loss, loss -> train/loss."""
    return f"eval/{key[len('val_'):]}" if key.startswith("val_") else f"train/{key}"


def scalars(record):
    """A metrics line -> {tracker name: float} of its numbers (booleans, strings and None left out)."""
    return {tracker_name(k): float(v) for k, v in record.items()
            if k not in SKIP and isinstance(v, (int, float)) and not isinstance(v, bool)}


class _Trackio:
    def __init__(self, out, config):
        import trackio
        self.lib = trackio
        trackio.init(project=os.environ.get("TRACKIO_PROJECT", "minisft"), name=os.path.basename(os.path.abspath(out)),
                     config=config, resume="allow" if config.get("resume") else "never")

    def log(self, values, step):
        self.lib.log(values, step=step)

    def finish(self):
        self.lib.finish()


class _Wandb:
    def __init__(self, out, config):
        import wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "minisft"), name=os.path.basename(os.path.abspath(out)),
                              config=config, dir=out)

    def log(self, values, step):
        self.run.log(values, step=step)

    def finish(self):
        self.run.finish()


class _TensorBoard:
    def __init__(self, out, config):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=os.path.join(out, "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {k} = {v!r}" for k, v in config.items()))

    def log(self, values, step):
        for k, v in values.items():
            self.writer.add_scalar(k, v, global_step=step)
        self.writer.flush()

    def finish(self):
        self.writer.close()


KINDS = {"trackio": _Trackio, "wandb": _Wandb, "tensorboard": _TensorBoard}


class Trackers:
    """The trackers of one run: `with start(cfg) as tracking: ... tracking.log(record)`."""

    def __init__(self, names, out, config):
        self.names, self.out, self.config, self.open = names, out, config, []

    def __enter__(self):
        for n in self.names:
            self.open.append(KINDS[n](self.out, self.config))
        return self

    def log(self, record):
        """Hand one metrics line to every tracker (its "step" is the step axis)."""
        values = scalars(record)
        for t in self.open:
            t.log(values, int(record["step"]))

    def __exit__(self, *exc):
        for t in self.open:
            t.finish()
        self.open = []


def start(cfg, active=True):
    """The trackers cfg.report_to names (none on processes other than the main one, `active` False)."""
    names = parse(getattr(cfg, "report_to", "none")) if active else ()
    return Trackers(names, cfg.out, dict(vars(cfg)))
