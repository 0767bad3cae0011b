"""A tiny real fine-tuning run of the embedded default model, for the tests of what comes after training
(chat, report, model card, trackers): a few steps on the shipped data, on the CPU, in seconds."""
import os

from minisft.config import TrainConfig
from minisft.default_model import DEFAULT_MODEL
from minisft.recipes import TRAIN_DATA, VAL_DATA


def small_val(folder, n=12):
    """The first n validation conversations, as a file in `folder` (evaluating all 200 takes long)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"val{n}.jsonl")
    with open(VAL_DATA, encoding="utf-8") as f:
        lines = f.readlines()[:n]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)
    return path


def tiny_config(out, **overrides):
    """The TrainConfig of a 4-step run into `out` with evaluations, samples and checkpoints."""
    out = os.path.abspath(str(out))
    base = dict(model=DEFAULT_MODEL, data=TRAIN_DATA, val_data=small_val(os.path.dirname(out)), out=out,
                max_examples=48, max_steps=4, batch_size=4, lr=1e-3, eval_every=2, sample_every=2, num_samples=2,
                sample_tokens=12, save_every=2, plot_every=0, device="cpu", seed=0)
    return TrainConfig(**{**base, **overrides})


def tiny_run(out, **overrides):
    """Train the tiny run; returns train()'s summary."""
    from minisft.train import train

    return train(tiny_config(out, **overrides))


_RUNS = {}


def shared_run(tmp_path_factory, name="full", **overrides):
    """One tiny run per name and pytest session, shared by the test modules that only read it."""
    if name not in _RUNS:
        out = tmp_path_factory.mktemp(f"tiny-{name}") / "run"
        tiny_run(out, **overrides)
        _RUNS[name] = str(out)
    return _RUNS[name]
