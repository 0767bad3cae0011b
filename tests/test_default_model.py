"""The committed default base model (data/base-model) and the shipped data files (data/*.jsonl, corpus.txt)."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minisft.default_model import DEFAULT_MODEL, SMOLLM2_CHAT_TEMPLATE
from minisft.model import ModelConfig, SmolLM
from minisft.tokenizer import Tokenizer

DATA = Path(__file__).resolve().parent.parent / "data"
FILES = ["corpus.txt", "sft_train.jsonl", "sft_val.jsonl", "sft_test.jsonl"]


def load_jsonl(name):
    with open(DATA / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig.from_hf(json.loads(Path(DEFAULT_MODEL, "config.json").read_text()))
    m = SmolLM(cfg)
    state = {k: v.float() for k, v in load_file(Path(DEFAULT_MODEL, "model.safetensors")).items()}
    missing, unexpected = m.load_state_dict(state, strict=False)
    assert unexpected == [] and missing == ["lm_head.weight"]  # tied: stored once, as the embedding
    return m.eval()


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(DEFAULT_MODEL)


def test_files_are_small():
    sizes = {p.name: p.stat().st_size for p in Path(DEFAULT_MODEL).iterdir()}
    assert set(sizes) == {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                          "generation_config.json"}
    assert sum(sizes.values()) < 8e6
    assert (DATA / "corpus.txt").stat().st_size < 2e6


def test_tokenizer_special_tokens(tok):
    for i, t in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]):  # SmolLM2's ids
        assert tok.token_to_id(t) == i
        assert tok.encode(f"a{t}b")[1] == i
    assert tok.special_tokens == {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}
    think = tok.encode("<think>\nx\n</think>\n")
    assert think[0] == tok.token_to_id("<think>") and tok.token_to_id("</think>") in think
    # Added but not special (as in SmolLM3): the tags survive skip_special_tokens.
    assert tok.decode(think + [tok.im_end_id], skip_special_tokens=True) == "<think>\nx\n</think>\n"
    assert tok.chat_template == SMOLLM2_CHAT_TEMPLATE
    assert tok.eos_id == tok.pad_id == tok.im_end_id and tok.bos_token == "<|im_start|>"
    assert tok.tk.encode("12 + 345").tokens == ["1", "2", "Ġ+", "Ġ", "3", "4", "5"]  # one digit per token
    assert tok.decode(tok.encode("The capital of Varnia is Oster.")) == "The capital of Varnia is Oster."


def test_chat_template_is_smollm2(tok, templates_dir):
    assert SMOLLM2_CHAT_TEMPLATE == (templates_dir / "SmolLM2-135M-Instruct.jinja").read_text(encoding="utf-8")


def test_transformers_loads_it_with_the_same_logits_and_render(model):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32).eval()
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    ht = transformers.AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    msgs = [{"role": "user", "content": "What is 7 + 8?"}, {"role": "assistant", "content": "15"}]
    text = ht.apply_chat_template(msgs, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nWhat is 7 + 8?<|im_end|>\n<|im_start|>assistant\n15<|im_end|>\n")
    ids = torch.tensor([Tokenizer.from_dir(DEFAULT_MODEL).encode(text)])
    assert ht(text, add_special_tokens=False)["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


@torch.no_grad()
def complete(model, tok, prompt, n=6):
    ids = tok.encode(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return tok.decode(ids[len(tok.encode(prompt)):])


def test_base_model_knows_the_corpus(model, tok):
    assert complete(model, tok, "The capital of Varnia is").startswith(" Oster")
    # The worked-steps pattern is learnt; bare table lookups ("7 + 8 =") are right less often.
    assert complete(model, tok, "7 + 8:", n=30).startswith(" first 7 + 3 = 10, then 10 + 5 = 15.")
    # The held-out facts (never in a conversation) are known from pretraining alone.
    unseen = {r["meta"]["subject"]: r for r in load_jsonl("sft_test.jsonl") if r["meta"]["kind"] == "fact_unseen"}
    prompts = {"capital": "The capital of {} is", "colour": "The colour of the {} is", "inventor": "The {} was invented by"}
    hits = 0
    for subject, r in unseen.items():
        said = complete(model, tok, prompts[r["meta"]["relation"]].format(subject))
        hits += said.strip().lower().startswith(r["meta"]["answer"].lower())
    assert hits >= 0.8 * len(unseen), f"{hits}/{len(unseen)}"


def test_data_files_are_valid_messages_jsonl():
    counts = {}
    for name in FILES[1:]:
        records = load_jsonl(name)
        counts[name] = len(records)
        for i, rec in enumerate(records, 1):
            where = f"{name}:{i}"
            msgs = rec["messages"]
            assert set(rec) == ({"messages", "meta"} if name == "sft_test.jsonl" else {"messages"}), where
            assert msgs[0]["role"] == "system" and msgs[-1]["role"] == "assistant", where
            assert [m["role"] for m in msgs[1:]] == ["user", "assistant"] * ((len(msgs) - 1) // 2), where
            assert all(set(m) == {"role", "content"} and m["content"] for m in msgs), where
            think = "/think" in msgs[0]["content"]
            assert think != ("/no_think" in msgs[0]["content"]), where
            for m in msgs[2::2]:
                has = m["content"].startswith("<think>\n") and "\n</think>\n" in m["content"]
                assert has == think and m["content"].count("<think>") == int(think), where
            if name == "sft_test.jsonl":
                meta = rec["meta"]
                assert meta["kind"] in ("arithmetic", "fact_seen", "fact_unseen") and meta["think"] == think, where
                assert meta["answer"].lower() in msgs[-1]["content"].split("</think>")[-1].lower(), where
    assert 2000 <= counts["sft_train.jsonl"] <= 4000 and counts["sft_val.jsonl"] >= 150 and counts["sft_test.jsonl"] >= 150
    multi = sum(len(r["messages"]) > 3 for r in load_jsonl("sft_train.jsonl"))
    assert multi > 0.1 * counts["sft_train.jsonl"]


def test_unseen_facts_are_in_the_corpus_only():
    corpus = (DATA / "corpus.txt").read_text(encoding="utf-8")
    assert "<|im_start|>" not in corpus and "<think>" not in corpus  # a base model's text: no chat markup
    test = load_jsonl("sft_test.jsonl")
    unseen = {r["meta"]["subject"]: r["meta"]["answer"] for r in test if r["meta"]["kind"] == "fact_unseen"}
    seen = {r["meta"]["subject"] for r in test if r["meta"]["kind"] == "fact_seen"}
    assert len(unseen) >= 10 and len(seen) >= 10
    sft_text = " ".join(m["content"] for name in ("sft_train.jsonl", "sft_val.jsonl")
                        for r in load_jsonl(name) for m in r["messages"])
    sft_words = set(re.findall(r"\w+", sft_text))
    for subject, answer in unseen.items():
        assert subject not in sft_words, subject
        assert re.search(rf"\b{subject}\b[^.]*\b{answer}\b|\b{answer}\b[^.]*\b{subject}\b", corpus), subject
    assert seen <= sft_words


def test_make_data_is_deterministic(tmp_path):
    subprocess.run([sys.executable, str(DATA / "make_data.py"), "--out", str(tmp_path)], check=True, capture_output=True)
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name


def test_load_pretrained_reads_it(model):
    from minisft.weights import load_pretrained
    loaded, tokenizer = load_pretrained(DEFAULT_MODEL, device="cpu")
    ids = torch.tensor([tokenizer.encode("The capital of Varnia is Oster.")])
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_rebuild_never_overwrites_without_asking(tmp_path, capsys):
    from minisft.default_model import main
    out = tmp_path / "my-model"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"the user's weights")
    assert main(["--out", str(out), "--steps", "1"]) == 2  # refused before any training
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == b"the user's weights"


def test_write_model_replaces_the_folder_whole(tmp_path, tok):
    from minisft.default_model import write_model
    from minisft.weights import load_pretrained
    cfg = ModelConfig.from_hf(json.loads(Path(DEFAULT_MODEL, "config.json").read_text()))
    model = SmolLM(cfg)
    out = tmp_path / "base-model"
    out.mkdir()
    (out / "stale.bin").write_bytes(b"old")
    write_model(model, tok, str(out))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer.json", "tokenizer_config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["base-model"]  # no temporary folder left behind
    loaded, _ = load_pretrained(str(out), dtype="float32", device="cpu")
    assert loaded.num_parameters() == model.num_parameters()
