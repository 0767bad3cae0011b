"""Training checkpoints: everything needed to carry on a run exactly where it stopped.

A run stopped half-way (Ctrl-C) and continued with `python -m minisft.train --out DIR --resume` ends
with the very same weights as one that was never interrupted (tests/test_train.py checks it, bit
for bit). That takes more than the weights:

    checkpoints/step_000200/
        model.safetensors   the weights after 200 optimizer steps (a tied lm_head stored once)
        optimizer.pt        AdamW's moments and step counts: without them the first steps after a
                            resume would be taken with fresh, zero moments, a different trajectory
        rng.pt              the Python, NumPy and torch random states: whatever draws random numbers
                            after the resume draws the same ones
        state.json          the step, early-stopping bookkeeping and the run's settings

Every checkpoint is written into a hidden temporary folder first, fsynced, and renamed into place
with one os.replace() (files.commit_dir): a step_N folder is complete by construction, even after a
power cut, and a run killed while saving leaves the previous checkpoint intact. The final model is
not saved here but by weights.save_pretrained, in the Hugging Face layout, by the same rule.
"""
import json
import os
import random
import shutil
import tempfile

import torch
from safetensors.torch import load_file, save_file

from minisft.files import commit_dir, replace_file, write_error


def checkpoint_names(model):
    """The names of the tensors a checkpoint keeps.

    Full fine-tuning: the whole state_dict (a tied lm_head stored once). With LoRA only the
    parameters that train, the adapters: the frozen base never changes, and --resume reads it
    again from --model, so a checkpoint of a 3B model holds megabytes, not gigabytes."""
    params = dict(model.named_parameters())
    if not all(p.requires_grad for p in params.values()):
        return sorted(n for n, p in params.items() if p.requires_grad)
    names = set(model.state_dict())
    if model.config.tie_word_embeddings:
        names.discard("lm_head.weight")
    return sorted(names)


def model_tensors(model):
    """{name: tensor} of checkpoint_names(model), on the CPU and contiguous (as safetensors wants)."""
    sd = model.state_dict()
    return {k: sd[k].detach().contiguous().cpu() for k in checkpoint_names(model)}


def save_weights(model, path):
    """Write the model's tensors to the safetensors file `path`, atomically (temp file + rename)."""
    save_file(model_tensors(model), path + ".tmp", metadata={"format": "pt"})
    replace_file(path + ".tmp", path)


def load_weights(model, path):
    """Load a safetensors file written by save_weights into `model`: exactly the tensors
    checkpoint_names(model) names must be there, each of the right shape."""
    tensors = load_file(path)
    expected = set(checkpoint_names(model))
    if set(tensors) != expected:
        raise ValueError(f"{path}: does not fit the model (missing {sorted(expected - set(tensors))}, "
                         f"unexpected {sorted(set(tensors) - expected)})")
    model.load_state_dict(tensors, strict=False)


def rng_state():
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        # As tensors and plain numbers: torch.load(weights_only=True) reads those back.
        state["numpy"] = (name, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(gauss))
    except ImportError:
        pass
    return state


def set_rng_state(state):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np
        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, gauss))


def save_checkpoint(ckpt_dir, model, optimizer, state, keep):
    """Write ckpt_dir/step_N (N = state["step"], steps done) atomically; keep the newest `keep`.
    Returns the checkpoint's path."""
    os.makedirs(ckpt_dir, exist_ok=True)
    final = os.path.join(ckpt_dir, f"step_{state['step']:06d}")
    if os.path.isdir(final):
        return final  # this very state is already saved (e.g. Ctrl-C right after a periodic save)
    tmp = tempfile.mkdtemp(prefix=f".tmp-step_{state['step']:06d}-", dir=ckpt_dir)
    try:
        save_file(model_tensors(model), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        torch.save(rng_state(), os.path.join(tmp, "rng.pt"))
        with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as f:
            json.dump(state, f, indent=1)
            f.write("\n")
        commit_dir(tmp, final)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(final, e) from e
    except BaseException:  # Ctrl-C: leave no temporary folder either, and let the interrupt go on
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(ckpt_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def list_checkpoints(ckpt_dir):
    """Complete checkpoints, oldest first (temporary .tmp-* folders are never listed)."""
    if not os.path.isdir(ckpt_dir):
        return []
    names = sorted(n for n in os.listdir(ckpt_dir) if n.startswith("step_") and n[5:].isdigit())
    return [os.path.join(ckpt_dir, n) for n in names]


def remove_partial(ckpt_dir):
    """Delete the .tmp-* folders a run killed while saving left behind (nothing reads them)."""
    for n in os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []:
        if n.startswith(".tmp-"):
            shutil.rmtree(os.path.join(ckpt_dir, n), ignore_errors=True)


def read_state(path):
    """The state.json of checkpoint folder `path` as a dict."""
    with open(os.path.join(path, "state.json"), encoding="utf-8") as f:
        return json.load(f)


def load_checkpoint(path, model, optimizer):
    """Restore weights, optimizer and RNG states from checkpoint folder `path`; return its state.json.

    torch.load(weights_only=True): these are our own files, and even so we never unpickle code.
    """
    state = read_state(path)
    load_weights(model, os.path.join(path, "model.safetensors"))
    device = next(model.parameters()).device
    optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), map_location=device, weights_only=True))
    set_rng_state(torch.load(os.path.join(path, "rng.pt"), weights_only=True))
    return state


def truncate_jsonl(path, keep_before_step, log=print):
    """Keep the lines of an append-only log whose "step" < keep_before_step (rewritten atomically):
    a resumed run rewrites the steps after its checkpoint, so their old lines must go.

    A run killed while appending leaves a torn last line (half a JSON object, no newline): it is
    dropped with a one-line note. A bad line anywhere else is not a kill: that is an error."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.readlines()
    keep = []
    for i, ln in enumerate(lines, 1):
        if not ln.strip():
            continue
        try:
            step = json.loads(ln)["step"]
        except (ValueError, KeyError, TypeError):
            if i == len(lines):
                log(f"note: {path}:{i}: dropped a torn last line (the run was killed while writing it)")
                continue
            raise ValueError(f"{path}:{i}: not a JSON object with a \"step\" (the file was edited or damaged)") from None
        if step < keep_before_step:
            keep.append(ln)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)
