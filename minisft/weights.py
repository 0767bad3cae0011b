"""Load and save models in the Hugging Face layout: config.json + safetensors + tokenizer files.

Lesson 3 loads SmolLM2 with `load_pretrained`; the training run ends with `save_pretrained`, and
`transformers.AutoModelForCausalLM.from_pretrained` reads the result back unchanged.

What it teaches:
- A checkpoint is a dict name -> tensor. model.py uses the Hugging Face names, so loading is a
  strict name-and-shape check followed by `load_state_dict`; nothing is renamed.
- Loading is strict: every missing, unexpected or mis-shaped tensor is named in one error,
  because a half-loaded model still runs and silently produces nonsense.
- Only safetensors are read. A `.bin`/`.pt` file is a pickle, and unpickling can run any code.
- A tied model stores the embedding once; `lm_head.weight` is the same Parameter.
- A LoRA adapter folder (adapter_config.json, see lora.py) loads as its base model plus the adapter.
- Saving is atomic: files are written into a temporary folder that is renamed into place, so
  an interrupted save never leaves a half-written model behind.
"""
import json
import os
import re

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from minisft import files as disk  # durable writes (files.py)
from minisft.files import read_json
from minisft.lora import adapter_base, load_adapter
from minisft.model import ModelConfig, SmolLM
from minisft.tokenizer import Tokenizer

HUB_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "*.safetensors", "model.safetensors.index.json"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def pick_device():
    """The best device here: "cuda" if available, else "mps" (Apple GPUs), else "cpu"."""
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def _parse_dtype(dtype):
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"dtype {dtype!r} is not supported (expected 'float32' or 'bfloat16')")


# ---- finding the folder: local path or Hub id ------------------------------------------------
def resolve_model_dir(name_or_path):
    """A local folder as is; a Hub id ("owner/name") -> its snapshot folder in the Hugging Face cache.

    The cache is tried first, so a model downloaded once loads offline. Only then is it downloaded.
    """
    path = os.path.expanduser(str(name_or_path))
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ValueError(f"{path}: expected a model folder (with config.json and model.safetensors), got a file")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(name_or_path)) or str(name_or_path).startswith((".", "/")):
        raise FileNotFoundError(f"{path}: no such model folder (and not a Hub id like 'HuggingFaceTB/SmolLM2-135M-Instruct')")
    return _hub_snapshot(str(name_or_path))


def _hub_cache_dir():
    # huggingface_hub reads these variables once, at import; reading them here lets a test or a
    # script change them at run time.
    from huggingface_hub import constants
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return constants.HF_HUB_CACHE


def hub_offline():
    from huggingface_hub import constants
    value = os.environ.get("HF_HUB_OFFLINE")
    if value is None:
        return bool(constants.HF_HUB_OFFLINE)
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def _hub_snapshot(repo_id):
    how = (f"download it where the Hub is reachable (`huggingface-cli download {repo_id}`, "
           f"with HF_HUB_OFFLINE unset or 0), or pass a local model folder")
    # The cache may hold only some files (e.g. a config.json fetched on its own), and
    # huggingface_hub cannot always tell: such a snapshot counts as not cached.
    return hub_snapshot(repo_id, HUB_FILES, _has_model_files, how)


def hub_snapshot(repo_id, patterns, complete, how, repo_type=None, local="folder", missing="not (fully)"):
    """The local snapshot folder of Hub repo `repo_id` holding the files `patterns` select: from the
    Hugging Face cache when complete(folder) says it is all there, else downloaded into that cache.

    Offline, or when the download fails, a one-line ValueError that names the repo and ends in `how`
    (what to run to get it). repo_type: None (a model) or "dataset"; `local` and `missing` word the
    error ("no such local {local}, {missing} in the Hugging Face cache")."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    cache = _hub_cache_dir()
    try:
        folder = snapshot_download(repo_id, repo_type=repo_type, allow_patterns=patterns, cache_dir=cache,
                                   local_files_only=True)
        if complete(folder):
            return folder
    except (LocalEntryNotFoundError, FileNotFoundError):
        pass  # not in the cache (or only partly): download below
    if hub_offline():
        raise ValueError(f"{repo_id}: no such local {local}, {missing} in the Hugging Face cache ({cache}), "
                         f"and HF_HUB_OFFLINE is set: {how}")
    try:
        return snapshot_download(repo_id, repo_type=repo_type, allow_patterns=patterns, cache_dir=cache)
    except RepositoryNotFoundError:
        raise ValueError(f"{repo_id}: no such local {local}, and no such {repo_type or 'model'} on the Hugging Face "
                         f"Hub (or it is private/gated); check the name or pass a local "
                         f"{'model folder' if repo_type is None else local}") from None
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{repo_id}: no such local {local}, and it could not be downloaded from the Hugging Face "
                         f"Hub ({first_line}); {how}") from None


def _has_model_files(folder):
    """config.json and the weights (one file, or an index and every shard it lists) are all there."""
    if not os.path.isfile(os.path.join(folder, "config.json")):
        return False
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return True
    try:
        with open(os.path.join(folder, "model.safetensors.index.json"), encoding="utf-8") as f:
            shards = set(json.load(f)["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return all(os.path.isfile(os.path.join(folder, s)) for s in shards)


# ---- reading tensors ---------------------------------------------------------------------------
def _weight_files(folder):
    """-> {tensor name: safetensors file} for a single or a sharded checkpoint."""
    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(single):
        with _open_safetensors(single) as f:
            return {name: single for name in f.keys()}
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except json.JSONDecodeError as e:
            raise ValueError(f"{index}: line {e.lineno}: not valid JSON ({e.msg})") from None
        except (KeyError, TypeError):
            raise ValueError(f"{index}: missing required key 'weight_map'") from None
        files = {}
        for name, shard in weight_map.items():
            files[name] = os.path.join(folder, shard)
        for shard in sorted(set(files.values())):
            if not os.path.isfile(shard):
                raise FileNotFoundError(f"{shard}: shard listed in {index} is missing")
        return files
    pickles = sorted(n for n in os.listdir(folder) if n.endswith(PICKLE_SUFFIXES))
    if pickles:
        # A pickle can execute arbitrary code when loaded, so it is never opened at all.
        raise ValueError(f"{folder}: holds only pickle checkpoints ({', '.join(pickles)}); minisft reads "
                         f"safetensors only, because unpickling can run arbitrary code. Convert the weights "
                         f"to model.safetensors with a tool you trust")
    raise FileNotFoundError(f"{folder}: no model.safetensors (or model.safetensors.index.json) in this folder")


def _open_safetensors(path):
    try:
        return safe_open(path, framework="pt", device="cpu")
    except SafetensorError as e:
        raise ValueError(f"{path}: not a valid safetensors file, truncated or corrupt ({e})") from None


def _check_tensors(model, files, folder):
    """Compare the checkpoint's names and shapes with the model's; one error lists every problem."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = model.config.tie_word_embeddings
    if tied:
        expected.pop("lm_head.weight")  # stored once, as the embedding
    found = {}
    for path in sorted(set(files.values())):
        with _open_safetensors(path) as f:
            keys = set(f.keys())
            for name in [n for n, p in files.items() if p == path]:
                if name not in keys:
                    raise ValueError(f"{path}: tensor {name!r} is listed in the index but not in this shard")
                found[name] = tuple(f.get_slice(name).get_shape())
    problems = []
    for name in expected:
        if name not in found:
            problems.append(f"missing {name}")
    for name, shape in found.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer some old checkpoints saved; RoPE is recomputed from the config
        if tied and name == "lm_head.weight":
            want = expected["model.embed_tokens.weight"]  # optional copy of the tied matrix: ignored
        elif name not in expected:
            problems.append(f"unexpected {name}")
            continue
        else:
            want = expected[name]
        if shape != want:
            problems.append(f"{name} has shape {list(shape)}, expected {list(want)}")
    if problems:
        raise ValueError(f"{folder}: checkpoint does not match config.json ({len(problems)} problem"
                         f"{'s' if len(problems) > 1 else ''}): " + "; ".join(problems))
    return list(expected)


def load_pretrained(name_or_path, dtype=None, device=None):
    """Load a model folder (or a Hub id) -> (SmolLM in eval mode, Tokenizer or None).

    dtype: None/"float32" or "bfloat16" (or the torch dtypes). device: None -> pick_device().
    The tokenizer is None when the folder has no tokenizer.json.
    A LoRA adapter folder (adapter_config.json, no model weights) loads its base model
    (`base_model_name_or_path`) with the adapter applied, and the adapter folder's tokenizer if it has one.
    """
    folder = resolve_model_dir(name_or_path)
    if os.path.isfile(os.path.join(folder, "adapter_config.json")) and not _has_model_files(folder):
        return _load_with_adapter(folder, dtype, device)
    dtype = _parse_dtype(dtype)
    device = device or pick_device()
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: no config.json in this model folder")
    hf_cfg = read_json(cfg_path)
    config = ModelConfig.from_hf(hf_cfg, source=cfg_path)

    # Build on the "meta" device: shapes only, no memory and no random init that we would overwrite.
    with torch.device("meta"):
        model = SmolLM(config)
    files = _weight_files(folder)
    names = _check_tensors(model, files, folder)
    state = {}
    for path in sorted(set(files.values())):
        with _open_safetensors(path) as f:
            for name in names:
                if files[name] == path:
                    state[name] = f.get_tensor(name).to(device=device, dtype=dtype)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:  # assign=True made two Parameters: tie them again
        model.lm_head.weight = model.model.embed_tokens.weight
    model.eval()

    tokenizer = None
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        tokenizer = Tokenizer.from_dir(folder)
        tokenizer.check_fits(config.vocab_size, folder)
    return model, tokenizer


def _load_with_adapter(adapter_dir, dtype, device):
    base = adapter_base(adapter_dir)
    try:
        base_dir = resolve_model_dir(base)
    except (OSError, ValueError) as e:
        raise type(e)(f"{adapter_dir}: base model {base!r} of this adapter: {e}") from None
    if not _has_model_files(base_dir) and os.path.isfile(os.path.join(base_dir, "adapter_config.json")):
        raise ValueError(f"{adapter_dir}: base model {base!r} is itself an adapter; merge that one first")
    model, tokenizer = load_pretrained(base_dir, dtype=dtype, device=device)
    load_adapter(model, adapter_dir)
    model.eval()
    if os.path.isfile(os.path.join(adapter_dir, "tokenizer.json")):
        tokenizer = Tokenizer.from_dir(adapter_dir)
    return model, tokenizer


# ---- saving ------------------------------------------------------------------------------------
def _looks_like_model_dir(path):
    names = os.listdir(path)
    has_weights = "model.safetensors" in names or "model.safetensors.index.json" in names
    # A run folder (checkpoints/, metrics.jsonl, ...) has sub-folders: never replace one of those.
    no_subdirs = not any(os.path.isdir(os.path.join(path, n)) for n in names)
    return "config.json" in names and has_weights and no_subdirs


def save_pretrained(model, tokenizer, out_dir, chat_template=None, overwrite=False, extra_files=None):
    """Write `out_dir` in the Hugging Face layout that transformers and load_pretrained read.

    Files: config.json, model.safetensors, generation_config.json and, with a tokenizer,
    tokenizer.json + tokenizer_config.json (with `chat_template`, or the tokenizer's own).
    An existing non-empty out_dir is replaced only if it is a model folder and overwrite=True;
    otherwise FileExistsError. extra_files: {name: text} written with the rest (the model card,
    README.md). Returns out_dir.
    """
    out_dir = os.path.abspath(os.path.expanduser(str(out_dir)))
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise FileExistsError(f"{out_dir}: exists and is not a folder")
        if os.listdir(out_dir):
            if not _looks_like_model_dir(out_dir):
                raise FileExistsError(f"{out_dir}: folder exists, is not empty and is not a model folder; "
                                      f"choose another output folder")
            if not overwrite:
                raise FileExistsError(f"{out_dir}: a model folder already exists here; pass overwrite=True to replace it")
    cfg = model.config
    embed = model.model.embed_tokens.weight
    if cfg.tie_word_embeddings and model.lm_head.weight is not embed and not torch.equal(model.lm_head.weight, embed):
        raise ValueError("config says tie_word_embeddings, but lm_head.weight differs from the embedding")

    state = model.state_dict()
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight")  # transformers re-ties it from the embedding on load
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    hf_cfg = cfg.to_hf()
    hf_cfg["dtype"] = str(embed.dtype).removeprefix("torch.")
    gen_cfg = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}
    if tokenizer is not None:
        # A chat model's turn ends with <|im_end|>: that is where generation should stop.
        has_im_end = tokenizer.tk.token_to_id("<|im_end|>") is not None
        gen_cfg["eos_token_id"] = tokenizer.im_end_id if has_im_end else tokenizer.eos_id
        gen_cfg["pad_token_id"] = tokenizer.pad_id

    def write(tmp):
        disk.write_json(os.path.join(tmp, "config.json"), hf_cfg)
        disk.write_json(os.path.join(tmp, "generation_config.json"), gen_cfg)
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp, chat_template=chat_template)
        disk.write_texts(tmp, extra_files)
    return disk.write_dir(out_dir, write)  # atomic and durable (files.py)
