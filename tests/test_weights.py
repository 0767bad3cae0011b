"""weights.py: strict loading (every bad checkpoint gets its named error), atomic saving, the
round trip through transformers, Hub resolution from the cache, and the tokenizer wrapper."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import minisft.weights as weights
from minisft.model import ModelConfig, SmolLM
from minisft.tokenizer import Tokenizer
from minisft.weights import load_pretrained, pick_device, save_pretrained

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

TINY = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, bos_token_id=1, eos_token_id=2, pad_token_id=2)
MESSAGES = [{"role": "user", "content": "Hi there!"}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "What is 2+2?"}]


def tiny_model(seed=0, **over):
    torch.manual_seed(seed)
    return SmolLM(ModelConfig(**{**TINY, **over}))


@pytest.fixture
def tiny_dir(tmp_path):
    """A valid tiny tied checkpoint (no tokenizer) written by save_pretrained."""
    return save_pretrained(tiny_model(), None, tmp_path / "tiny")


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return Tokenizer.from_dir(smollm2_dir)


def rewrite_tensors(folder, fn):
    path = os.path.join(folder, "model.safetensors")
    t = load_file(path)
    fn(t)
    save_file(t, path)


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- loading ----------------------------------------------------------------------------------
def test_load_own_checkpoint(tiny_dir):
    model, tok = load_pretrained(tiny_dir, device="cpu")
    assert tok is None
    assert same_weights(model, tiny_model())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not model.training
    assert "lm_head.weight" not in load_file(os.path.join(tiny_dir, "model.safetensors"))


def test_pick_device():
    want = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert pick_device() == want


def test_tied_checkpoint_may_carry_lm_head(tiny_dir):
    rewrite_tensors(tiny_dir, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].clone()))
    model, _ = load_pretrained(tiny_dir, device="cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    rewrite_tensors(tiny_dir, lambda t: t.__setitem__("lm_head.weight", torch.zeros(5, 5)))
    with pytest.raises(ValueError, match=r"lm_head.weight has shape \[5, 5\], expected \[300, 32\]"):
        load_pretrained(tiny_dir, device="cpu")


def test_untied_requires_lm_head(tmp_path):
    folder = save_pretrained(tiny_model(tie_word_embeddings=False), None, tmp_path / "untied")
    model, _ = load_pretrained(folder, device="cpu")
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert same_weights(model, tiny_model(tie_word_embeddings=False))
    rewrite_tensors(folder, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ValueError, match="missing lm_head.weight"):
        load_pretrained(folder, device="cpu")


def test_all_tensor_problems_in_one_error(tiny_dir):
    def damage(t):
        del t["model.layers.1.mlp.up_proj.weight"]
        del t["model.norm.weight"]
        t["model.layers.9.extra.weight"] = torch.zeros(3)
        t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 32)
    rewrite_tensors(tiny_dir, damage)
    with pytest.raises(ValueError) as e:
        load_pretrained(tiny_dir, device="cpu")
    msg = str(e.value)
    assert str(tiny_dir) in msg and "4 problems" in msg and "\n" not in msg
    for part in ("missing model.layers.1.mlp.up_proj.weight", "missing model.norm.weight",
                 "unexpected model.layers.9.extra.weight",
                 "model.layers.0.self_attn.k_proj.weight has shape [8, 32], expected [16, 32]"):
        assert part in msg


def test_truncated_safetensors_named(tiny_dir):
    path = os.path.join(tiny_dir, "model.safetensors")
    data = open(path, "rb").read()
    for cut in (len(data) - 100, 20):
        with open(path, "wb") as f:
            f.write(data[:cut])
        with pytest.raises(ValueError, match="model.safetensors: not a valid safetensors file"):
            load_pretrained(tiny_dir, device="cpu")


def test_sharded_missing_shard_named(tiny_dir):
    t = load_file(os.path.join(tiny_dir, "model.safetensors"))
    os.remove(os.path.join(tiny_dir, "model.safetensors"))
    names = sorted(t)
    half = len(names) // 2
    save_file({k: t[k] for k in names[:half]}, os.path.join(tiny_dir, "a.safetensors"))
    save_file({k: t[k] for k in names[half:]}, os.path.join(tiny_dir, "b.safetensors"))
    index = {"metadata": {}, "weight_map": {k: ("a" if i < half else "b") + ".safetensors" for i, k in enumerate(names)}}
    with open(os.path.join(tiny_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    assert same_weights(load_pretrained(tiny_dir, device="cpu")[0], tiny_model())
    os.remove(os.path.join(tiny_dir, "b.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"b\.safetensors: shard listed in .*index.json is missing"):
        load_pretrained(tiny_dir, device="cpu")


def edit_config(folder, fn):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        d = json.load(f)
    fn(d)
    with open(path, "w") as f:
        json.dump(d, f)
    return path


def test_missing_config_key_named(tiny_dir):
    path = edit_config(tiny_dir, lambda d: d.pop("hidden_size"))
    with pytest.raises(ValueError, match=f"{path}: missing required key 'hidden_size'"):
        load_pretrained(tiny_dir, device="cpu")


def test_unsupported_model_type_named(tiny_dir):
    edit_config(tiny_dir, lambda d: d.update(model_type="gpt2"))
    with pytest.raises(ValueError, match="config.json: model_type 'gpt2' is not supported"):
        load_pretrained(tiny_dir, device="cpu")


def test_missing_config_and_weights(tmp_path, tiny_dir):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_pretrained(tmp_path, device="cpu")
    os.remove(os.path.join(tiny_dir, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_pretrained(tiny_dir, device="cpu")
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        load_pretrained(tmp_path / "nope", device="cpu")


def test_pickle_checkpoint_refused_never_unpickled(tiny_dir, monkeypatch):
    os.remove(os.path.join(tiny_dir, "model.safetensors"))
    with open(os.path.join(tiny_dir, "pytorch_model.bin"), "wb") as f:
        f.write(b"\x80\x04not really a pickle")
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a))
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*safetensors only.*arbitrary code"):
        load_pretrained(tiny_dir, device="cpu")
    assert calls == []


def test_bad_dtype(tiny_dir):
    with pytest.raises(ValueError, match="dtype 'float16' is not supported"):
        load_pretrained(tiny_dir, dtype="float16", device="cpu")


# ---- the Hub: cache first, clear error offline ----------------------------------------------------
def test_offline_hub_id_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(ValueError) as e:
        load_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct", device="cpu")
    msg = str(e.value)
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in msg and "huggingface-cli download" in msg
    assert "HF_HUB_OFFLINE" in msg and "local model folder" in msg and "\n" not in msg


def fake_hub_cache(root, files_from, names):
    """huggingface_hub's cache layout (refs/main -> snapshots/<commit>/) holding `names` only."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / "hf" / "hub" / "models--someone--tiny-model"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name in names:
        (snap / name).write_bytes(open(os.path.join(files_from, name), "rb").read())
    return snap


def test_hub_id_loads_from_cache(tmp_path, monkeypatch, tiny_dir):
    fake_hub_cache(tmp_path, tiny_dir, os.listdir(tiny_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    model, _ = load_pretrained("someone/tiny-model", device="cpu")
    assert same_weights(model, tiny_model())


def test_hub_partial_cache_is_completed_not_trusted(tmp_path, monkeypatch, tiny_dir):
    """A cache with only config.json (fetched on its own) is not a model: download the rest."""
    import huggingface_hub

    snap = fake_hub_cache(tmp_path, tiny_dir, ["config.json"])
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"someone/tiny-model: no such local folder, not \(fully\) in the Hugging Face cache"):
        load_pretrained("someone/tiny-model", device="cpu")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    real = huggingface_hub.snapshot_download
    downloads = []

    def download(repo_id, local_files_only=False, **kw):
        if local_files_only:
            return real(repo_id, local_files_only=True, **kw)
        downloads.append(repo_id)  # stands in for the network: fetch the missing weights
        (snap / "model.safetensors").write_bytes(open(os.path.join(tiny_dir, "model.safetensors"), "rb").read())
        return str(snap)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    model, _ = load_pretrained("someone/tiny-model", device="cpu")
    assert downloads == ["someone/tiny-model"] and same_weights(model, tiny_model())
    load_pretrained("someone/tiny-model", device="cpu")
    assert downloads == ["someone/tiny-model"]  # complete now: served from the cache


# ---- saving -----------------------------------------------------------------------------------
def test_save_refuses_foreign_folder(tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "thesis.txt").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match=f"{out}: folder exists, is not empty and is not a model folder"):
            save_pretrained(tiny_model(), None, out, overwrite=overwrite)
    assert os.listdir(out) == ["thesis.txt"]
    assert sorted(os.listdir(tmp_path)) == ["notes"]  # no temp folder left behind


def test_save_overwrite_replaces_model_folder(tmp_path):
    out = save_pretrained(tiny_model(seed=0), None, tmp_path / "m")
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        save_pretrained(tiny_model(seed=1), None, out)
    save_pretrained(tiny_model(seed=1), None, out, overwrite=True)
    assert same_weights(load_pretrained(out, device="cpu")[0], tiny_model(seed=1))
    assert sorted(os.listdir(tmp_path)) == ["m"]
    (tmp_path / "empty").mkdir()
    save_pretrained(tiny_model(), None, tmp_path / "empty")  # an empty folder is fine
    assert "model.safetensors" in os.listdir(tmp_path / "empty")


def test_save_failure_leaves_nothing(tmp_path, monkeypatch):
    out = save_pretrained(tiny_model(seed=0), None, tmp_path / "m")

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(weights, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(tiny_model(seed=1), None, tmp_path / "new")
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(tiny_model(seed=1), None, out, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no half-written folder, no temp folders
    monkeypatch.undo()
    assert same_weights(load_pretrained(out, device="cpu")[0], tiny_model(seed=0))  # old model intact


# ---- round trip through transformers -------------------------------------------------------------
@pytest.mark.parametrize("over", [{}, {"tie_word_embeddings": False, "attention_bias": True},
                                  {"model_type": "smollm3", "use_rope": [True, False], "rope_theta": 1e6}],
                         ids=["llama", "untied", "smollm3"])
def test_round_trip_through_transformers(tmp_path, smollm2_dir, tokenizer, over):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = tiny_model(seed=3, vocab_size=tokenizer.vocab_size, **over)
    with torch.no_grad():  # non-trivial norms and biases
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.1 * torch.randn(p.shape))
    out = save_pretrained(model, tokenizer, tmp_path / "out")
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors",
                                       "tokenizer.json", "tokenizer_config.json"]
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = tokenizer.encode("<|im_start|>user\nHello, world!<|im_end|>\n<|im_start|>assistant\n")
    x = torch.tensor([ids])
    with torch.no_grad():
        diff = (model(x) - theirs(x).logits).abs().max().item()
    assert diff <= 1e-5, diff
    assert theirs.generation_config.eos_token_id == tokenizer.im_end_id

    back, tok = load_pretrained(out, device="cpu")
    assert same_weights(back, model)
    assert back.config == model.config
    assert tok.encode("Hello <|im_end|>") == tokenizer.encode("Hello <|im_end|>")

    hf_tok = AutoTokenizer.from_pretrained(out)
    for text in ("Hello, world!", "<|im_start|>user\nCafé naïve 123<|im_end|>\n", "  spaces\tand\nlines "):
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text)
        assert hf_tok(text)["input_ids"] == tokenizer.encode(text)  # no hidden BOS either
    rendered = hf_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered == AutoTokenizer.from_pretrained(smollm2_dir).apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_save_with_custom_chat_template(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    out = save_pretrained(tiny_model(vocab_size=tokenizer.vocab_size), tokenizer, tmp_path / "o", chat_template=template)
    assert AutoTokenizer.from_pretrained(out).chat_template == template
    assert Tokenizer.from_dir(out).chat_template == template


# ---- the tokenizer wrapper --------------------------------------------------------------------
def test_tokenizer_special_ids_and_no_hidden_bos(tokenizer):
    assert tokenizer.im_start_id == tokenizer.token_to_id("<|im_start|>") == 1
    assert tokenizer.im_end_id == tokenizer.token_to_id("<|im_end|>") == 2
    assert tokenizer.eos_id == 2 and tokenizer.pad_id == 2
    assert tokenizer.stop_ids() == [2]
    assert {"<|im_start|>", "<|im_end|>", "<|endoftext|>"} <= tokenizer.special_tokens
    ids = tokenizer.encode("hello")
    assert tokenizer.decode(ids) == "hello" and 1 not in ids and 0 not in ids
    with pytest.raises(KeyError):
        tokenizer.token_to_id("<|no such token|>")


def test_tokenizer_round_trip_and_offsets(tokenizer):
    for text in ("The capital of France is Paris.", "<|im_start|>user\nx<|im_end|>\n", "naïve café 日本 😀", ""):
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
    ids, offsets = tokenizer.encode_with_offsets("Hello world")
    assert len(ids) == len(offsets) and offsets[-1][1] == len("Hello world")
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_tokenizer_matches_transformers(smollm2_dir, tokenizer):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(smollm2_dir)
    texts = ["What is the capital of France?", "<|im_start|>assistant\nSure! 1 + 1 = 2.<|im_end|>\n",
             "   leading spaces, tabs\t, newlines\n\n and unicode: ü ß ∑ 🤖", "<|endoftext|>def f(x):\n    return x"]
    for text in texts:
        assert tokenizer.encode(text) == hf(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.encode(text) == hf(text)["input_ids"]
    assert tokenizer.chat_template == hf.chat_template
    assert tokenizer.vocab_size == len(hf)


def test_a_failed_write_names_the_folder_and_keeps_the_old_model(tmp_path, monkeypatch):
    """safetensors and torch report a full disk with their own error classes: save_pretrained turns any
    failure into one OSError naming the folder, removes its temporary folder and keeps the model there."""
    first = save_pretrained(tiny_model(), None, tmp_path / "m")
    before = sorted(os.listdir(first))

    def full_disk(*a, **k):
        raise RuntimeError("No space left on device (os error 28)")

    monkeypatch.setattr(weights, "save_file", full_disk)
    with pytest.raises(OSError, match=r"m: could not be written \(No space left on device .*Is the disk full\?"):
        save_pretrained(tiny_model(), None, tmp_path / "m", overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["m"] and sorted(os.listdir(first)) == before  # no temp, old model kept
