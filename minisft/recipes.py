"""The training recipes: the settings of the default SFT run, and how a lesson gets its fine-tuned model.

Lesson 6 spells SFT_RECIPE out as its knobs (a test checks they agree); lessons 5, 7, 8, 9 and 10,
the bench and the tests take the recipe from here. Why each setting is what it is, and the runs
that chose it, are in docs/ablations.md (lesson 10 replays the main ones).

    SFT_RECIPE          the tiny default model on data/sft_train.jsonl: TrainConfig fields
    REAL_MODEL_RECIPE   what changes for any other model (a real, pretrained SmolLM)
    sft_config          -> the TrainConfig of the default run for a model, writing to a folder
    sft_default         run it
    tuned_model         lesson 6's fine-tuned model for lessons 7 and 8: found, or trained first
"""
import os

from minisft.default_model import DEFAULT_MODEL

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")  # the checkout's data/
TRAIN_DATA, VAL_DATA, TEST_DATA = (os.path.join(DATA_DIR, f"sft_{s}.jsonl") for s in ("train", "val", "test"))

# The default fine-tuning recipe for the tiny default model: about 1.6 epochs of the 3000 training
# conversations.
SFT_RECIPE = dict(
    max_steps=300, batch_size=8, grad_accum=2,  # 16 conversations per optimizer step
    # Frozen text embeddings (lesson 10): with every weight trainable, SFT teaches the model to answer
    # questions about facts it never shows with the names it does show; frozen, the model keeps saying
    # what it knows, and a higher lr is then safe and needed to learn the format in 300 steps.
    lr=1.5e-3, min_lr=1.5e-4, warmup_ratio=0.05, weight_decay=0.0, freeze_embeddings=True,
    # The MLPs of the upper two of the default model's four blocks stay frozen too (lesson 10): trained,
    # they learn the seen answers by heart and lend their subjects to questions about unseen ones.
    freeze_top_mlps=2,
    max_length=192,  # all but ~20 of 3000 conversations fit (the others lose trailing turns)
    packing=True,  # micro-batches of ~8 conversations of tokens, packed: little padding (lesson 11)
    eval_every=25, patience=4, sample_every=100, plot_every=50, save_every=0, log_every=10, seed=0,
)
# A real SmolLM (135M parameters and up) was pretrained on trillions of tokens: steps as large as the
# tiny model's overwrite what it knows (docs/real-model.md shows what it then says). Any model but the
# embedded default takes the usual SFT learning rate instead, and trains every MLP (which blocks hold
# what is a finding about the default model, not a rule).
REAL_MODEL_RECIPE = dict(lr=5e-5, min_lr=5e-6, freeze_top_mlps=0)


def sft_config(out, model=DEFAULT_MODEL, **overrides):
    """The TrainConfig of the default SFT run (SFT_RECIPE, with REAL_MODEL_RECIPE unless `model` is the
    embedded default), writing to `out`; overrides win."""
    from minisft.train import TrainConfig  # imported here: reading a recipe needs no trainer

    recipe = dict(SFT_RECIPE, **({} if same_model(model, DEFAULT_MODEL) else REAL_MODEL_RECIPE))
    return TrainConfig(**{**dict(model=model, data=TRAIN_DATA, val_data=VAL_DATA, out=out, overwrite=True),
                          **recipe, **overrides})


def sft_default(out, model=DEFAULT_MODEL, **overrides):
    """Run the default SFT recipe into `out` (replacing a previous run there); return train()'s summary."""
    from minisft.train import train

    return train(sft_config(out, model=model, **overrides))


def trained_from(final_dir):
    """The base model (as the run was given it) that the run writing final_dir fine-tuned, or None
    when that run left no checkpoint to read it from."""
    from minisft.train import saved_config

    try:
        return saved_config(os.path.dirname(os.path.abspath(final_dir)))["model"]
    except (OSError, ValueError, KeyError):
        return None


def same_model(a, b):
    """Do two model names (folders or Hub ids) point at the same files?"""
    from minisft.weights import resolve_model_dir

    try:
        return os.path.realpath(resolve_model_dir(a)) == os.path.realpath(resolve_model_dir(b))
    except (OSError, ValueError):
        return a == b


def tuned_model(final_dir, base, train_if_missing, **overrides):
    """Lesson 6's fine-tuned model of `base` in final_dir, for lessons 7 and 8.

    Missing: trained first with the default recipe when train_if_missing (the lessons' own scratch
    folder), else an error. A final_dir fine-tuned from another base model is an error too: a base
    vs tuned comparison of two different models would mean nothing."""
    if not os.path.isdir(final_dir):
        if not train_if_missing:
            raise FileNotFoundError(f"{final_dir}: no such fine-tuned model folder")
        print(f"{final_dir} not found: running lesson 6's recipe on {base} first")
        return sft_default(os.path.dirname(os.path.abspath(final_dir)), model=base, **overrides)["final"]
    source = trained_from(final_dir)
    if source is not None and not same_model(source, base):
        raise ValueError(f"{final_dir} was fine-tuned from {source}, not from {base}: run "
                         f"lessons/06_sft_loop.py --model {base} first (or pass --tuned)")
    return final_dir
