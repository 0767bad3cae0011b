"""Dataset formats and sources: TRL's prompt/completion and text records, smoltalk2's per-record
chat_template_kwargs, parquet files, folders of shards and (offline) Hub datasets.

Parity: the smoltalk2-style records render byte for byte as the real SmolLM3 template renders them with
the same kwargs, and TRL's own SFTTrainer tokenizes the same files into the same ids and labels.
"""
import datetime
import json
import sys
from types import SimpleNamespace

import pytest

from minisft import conversations, data
from minisft.chat_template import IGNORE_INDEX
from minisft.tokenizer import Tokenizer

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

DAY = datetime.date(2025, 3, 5)
XML_TOOLS = ['{"name": "get_weather", "parameters": {"city": "string"}}']
PY_TOOLS = ["def add(a: int, b: int) -> int: ..."]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
CHAT = [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": "Sunny."}]
SYSTEM = [{"role": "system", "content": "Answer in French."}]
KWARGS = ["enable_thinking", "xml_tools", "python_tools", "custom_instructions"]


def smoltalk2_rows():
    """Records shaped like smoltalk2's SFT subset: every kwargs key present (null when unused)."""
    def kw(**given):
        return {k: given.get(k) for k in KWARGS}
    return [
        {"messages": CHAT, "chat_template_kwargs": kw(enable_thinking=False), "tools": None},
        {"messages": CHAT, "chat_template_kwargs": kw(enable_thinking=True, custom_instructions="Be brief."),
         "tools": None},
        {"messages": SYSTEM + CHAT, "chat_template_kwargs": kw(custom_instructions="replaced by the system message"),
         "tools": None},
        {"messages": CHAT, "chat_template_kwargs": kw(enable_thinking=False, xml_tools=XML_TOOLS), "tools": None},
        {"messages": CHAT, "chat_template_kwargs": kw(enable_thinking=True, python_tools=PY_TOOLS,
                                                      xml_tools=XML_TOOLS), "tools": None},
        {"messages": SYSTEM + CHAT, "chat_template_kwargs": kw(enable_thinking=False), "tools": json.dumps(TOOLS)},
        {"messages": CHAT, "chat_template_kwargs": kw(), "tools": None},  # enable_thinking null: off
    ]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_parquet(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return Tokenizer.from_dir(smollm2_dir)


@pytest.fixture(scope="module")
def smollm3_jinja(templates_dir):
    """The real SmolLM3 template run the way transformers runs it, kwargs passed as template variables."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation])
    env.globals["strftime_now"] = lambda fmt: DAY.strftime(fmt)
    tpl = env.from_string((templates_dir / "SmolLM3-3B.jinja").read_text(encoding="utf-8"))
    return lambda messages, tools=None, add_generation_prompt=False, **kw: tpl.render(
        messages=messages, tools=tools, documents=None, add_generation_prompt=add_generation_prompt, **kw)


# ---------------------------------------------------------------------------------------------
# formats
# ---------------------------------------------------------------------------------------------
def test_each_format_loads_into_its_shape(tmp_path):
    chat = [{"messages": CHAT}, {"messages": CHAT, "chat_template_kwargs": {"enable_thinking": None},
                                 "tools": json.dumps(TOOLS)}]
    convs, stats = conversations.load_conversations(write_jsonl(tmp_path / "chat.jsonl", chat))
    assert stats["format"] == "chat"
    assert convs[0] == CHAT  # a plain chat stays a list of messages
    assert convs[1] == {"messages": CHAT, "settings": {"enable_thinking": False, "tools": TOOLS}, "completion_start": 0}

    pc = [{"prompt": SYSTEM + CHAT + [{"role": "user", "content": "And Rome?"}],
           "completion": [{"role": "assistant", "content": "Rainy."}],
           "chat_template_kwargs": {"xml_tools": XML_TOOLS}}]
    convs, stats = conversations.load_conversations(write_jsonl(tmp_path / "pc.jsonl", pc))
    assert stats["format"] == "prompt/completion"
    assert convs == [{"messages": pc[0]["prompt"] + pc[0]["completion"], "settings": {"xml_tools": XML_TOOLS},
                      "completion_start": 4}]

    plain = [{"prompt": "The capital of France is", "completion": " Paris."}]
    assert conversations.load_conversations(write_jsonl(tmp_path / "plain.jsonl", plain))[0] == plain
    text = [{"text": "Once upon a time."}]
    convs, stats = conversations.load_conversations(write_jsonl(tmp_path / "text.jsonl", text))
    assert convs == text and stats["format"] == "text"


BAD = [
    ({"prompt": "q"}, r"missing key 'completion'", "missing_key"),
    ({"prompt": [{"role": "user", "content": "q"}], "completion": " a"},
     r"'completion' is a JSON str \(expected a list of messages\)", "bad_messages"),
    ({"prompt": "q", "completion": " a", "plain": True},
     r"'completion' is a JSON list \(expected a string, as in the dataset's first record, .*p\.jsonl:1\)",
     "bad_content"),
    ({"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "a"}]},
     r"no assistant turn in 'completion'", "no_assistant"),
    ({"prompt": [{"role": "user"}], "completion": [{"role": "assistant", "content": "a"}]},
     r"prompt message 0: missing key 'content'", "missing_key"),
    ({"messages": CHAT}, r"missing key 'prompt' \(expected a prompt/completion record, as in the dataset's first "
                         r"record, .*p\.jsonl:1\)", "missing_key"),
    ({"text": "t"}, r"missing key 'prompt'", "missing_key"),
]


@pytest.mark.parametrize("record,error,reason", BAD, ids=[r for _, _, r in BAD])
def test_format_errors_name_the_line(tmp_path, record, error, reason):
    good = {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]}
    record = dict(record)
    if record.pop("plain", False):  # the first record sets plain text: a list is wrong here
        good = {"prompt": "q", "completion": " a"}
        record = {"prompt": "q", "completion": [{"role": "assistant", "content": "a"}]}
    path = write_jsonl(tmp_path / "p.jsonl", [good, record, good])
    with pytest.raises(ValueError, match=rf"p\.jsonl:2: {error}"):
        conversations.load_conversations(path)
    convs, stats = conversations.load_conversations(path, skip_bad=True)
    assert len(convs) == 2 and stats["skipped_by_reason"] == {reason: 1}
    assert stats["sources"] == [f"{path}:1", f"{path}:3"]


SETTINGS_ERRORS = [
    ({"enable_thinkng": True}, None, r"unknown key 'enable_thinkng' \(expected enable_thinking, xml_tools"),
    ({"enable_thinking": "yes"}, None, r"'enable_thinking' is a JSON str \(expected true, false or null\)"),
    ({"xml_tools": "x"}, None, r"'xml_tools' is a JSON str \(expected a list or null\)"),
    ({"custom_instructions": 3}, None, r"'custom_instructions' is a JSON int \(expected a string or null\)"),
    ([1], None, r"'chat_template_kwargs' is a JSON list \(expected an object"),
    (None, "[oops", r"'tools' is a string but not valid JSON"),
    (None, ["x"], r"'tools' is a JSON list holding a non-object \(expected a list of tool descriptions"),
    (None, {"name": "x"}, r"'tools' is a JSON dict \(expected a list"),
]


@pytest.mark.parametrize("kwargs,tools,error", SETTINGS_ERRORS)
def test_bad_settings_are_bad_records(tmp_path, kwargs, tools, error):
    rec = {"messages": CHAT, "chat_template_kwargs": kwargs, "tools": tools}
    path = write_jsonl(tmp_path / "s.jsonl", [{"messages": CHAT}, rec])
    with pytest.raises(ValueError, match=rf"s\.jsonl:2: .*{error}"):
        conversations.load_conversations(path)
    assert conversations.load_conversations(path, skip_bad=True)[1]["skipped_by_reason"] == {"bad_settings": 1}


def test_plain_records_refuse_tools_they_cannot_render(tmp_path):
    recs = [{"text": "a"}, {"text": "b", "tools": TOOLS}, {"text": "c", "chat_template_kwargs": {"enable_thinking": True}}]
    path = write_jsonl(tmp_path / "t.jsonl", recs)
    with pytest.raises(ValueError, match=r"t\.jsonl:2: tools given, but a plain-text record is not rendered"):
        conversations.load_conversations(path)
    convs, stats = conversations.load_conversations(path, skip_bad=True)
    assert convs == [{"text": "a"}, {"text": "c"}] and stats["skipped"] == 1  # enable_thinking alone is ignored


# ---------------------------------------------------------------------------------------------
# per-record settings: parity with the real SmolLM3 template
# ---------------------------------------------------------------------------------------------
def test_smoltalk2_records_render_like_the_real_template(tmp_path, tok, smollm3_jinja):
    rows = smoltalk2_rows()
    convs, stats = conversations.load_conversations(write_parquet(tmp_path / "sft.parquet", rows))
    examples, ex_stats = data.build_examples(tok, convs, "smollm3", today=DAY)
    assert ex_stats["kept"] == len(rows)
    for row, ex, conv in zip(rows, examples, convs):
        tools = json.loads(row["tools"]) if row["tools"] else None  # TRL decodes a JSON-string tools column
        text = smollm3_jinja(row["messages"], tools=tools, **row["chat_template_kwargs"])
        assert ex["input_ids"] == tok.encode(text), row
        trained = tok.decode([t for t, y in zip(ex["input_ids"], ex["labels"]) if y != IGNORE_INDEX])
        assert trained == "Sunny.<|im_end|>"
        # The sample prompt: the same settings, with the generation prompt, before the last assistant turn.
        question, prompt = data.sample_prompt(conv, "smollm3", today=DAY)
        assert question == "Weather in Paris?"
        assert prompt == smollm3_jinja(row["messages"][:-1], tools=tools, add_generation_prompt=True,
                                       **row["chat_template_kwargs"])
    # Record 6 has enable_thinking null: no-think mode, as the template renders a defined, falsy value.
    assert "Reasoning Mode: /no_think" in tok.decode(examples[6]["input_ids"])
    # The record's setting wins over build_examples' enable_thinking.
    forced = data.build_examples(tok, convs[:2], "smollm3", enable_thinking=True, today=DAY)[0]
    assert forced[0]["input_ids"] == examples[0]["input_ids"]


def test_settings_smollm2_cannot_render_are_refused(tok):
    with_tools = {"messages": CHAT, "settings": {"xml_tools": XML_TOOLS}, "completion_start": 0}
    think_only = {"messages": CHAT, "settings": {"enable_thinking": False}, "completion_start": 0}
    with pytest.raises(ValueError, match=r"^d\.jsonl:4: xml_tools given, but the smollm2 template does not render"):
        data.build_examples(tok, [think_only, with_tools], sources=["d.jsonl:3", "d.jsonl:4"])
    examples, stats = data.build_examples(tok, [think_only, with_tools, CHAT], "chatml", skip_bad=True)
    assert stats["skipped_bad"] == 1 and stats["kept"] == 2
    assert examples[0] == examples[1]  # enable_thinking means nothing to ChatML: ignored
    with pytest.raises(ValueError, match="smollm2 template does not render"):
        data.sample_prompt(with_tools, "smollm2")


def test_prompt_completion_trains_the_completion_only(tok):
    prompt = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
              {"role": "user", "content": "and 3+3?"}]
    conv = {"messages": prompt + [{"role": "assistant", "content": "6"}], "settings": {}, "completion_start": 3}
    for template in ("smollm2", "smollm3"):
        (ex,), _ = data.build_examples(tok, [conv], template, today=DAY)
        (full,), _ = data.build_examples(tok, [conv["messages"]], template, today=DAY)
        assert ex["input_ids"] == full["input_ids"]
        assert tok.decode([t for t, y in zip(ex["input_ids"], ex["labels"]) if y != IGNORE_INDEX]) == "6<|im_end|>"
    question, text = data.sample_prompt(conv, "smollm2")
    assert question == "and 3+3?" and text.endswith("and 3+3?<|im_end|>\n<|im_start|>assistant\n")


def test_plain_formats_follow_trl(tok):
    eos = tok.eos_token
    convs = [{"text": "Once upon a time"}, {"text": "ends already" + eos},
             {"prompt": "The capital of France is", "completion": " Paris."}, {"prompt": "a", "completion": "b"}]
    examples, stats = data.build_examples(tok, convs)
    assert examples[0]["input_ids"] == tok.encode("Once upon a time" + eos) == examples[0]["labels"]
    assert examples[1]["input_ids"] == tok.encode("ends already" + eos)  # no second EOS
    ids, labels = examples[2]["input_ids"], examples[2]["labels"]
    assert ids == tok.encode("The capital of France is Paris." + eos)
    n = len(tok.encode("The capital of France is"))
    assert labels == [IGNORE_INDEX] * n + ids[n:]
    # "ab" is one token: it merges across the boundary, so the completion starts at it (TRL's common prefix).
    assert examples[3]["input_ids"] == tok.encode("ab" + eos) == examples[3]["labels"]
    cut, cut_stats = data.build_examples(tok, convs[:1], max_length=2)
    assert cut[0]["input_ids"] == tok.encode("Once upon a time")[:2] and cut_stats["truncated"] == 1
    assert data.sample_prompt(convs[0], "smollm2") is None
    assert data.sample_prompt(convs[2], "smollm2") == ("The capital of France is",) * 2


@pytest.fixture(scope="module")
def trl_prepare(smollm2_dir):
    """Run TRL's SFTTrainer dataset preparation on a table -> its rows (input_ids, labels)."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(smollm2_dir))
    cfg = transformers.LlamaConfig(vocab_size=len(hf_tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    model = transformers.LlamaForCausalLM(cfg)

    def run(table, tmp_path, chat_template=None):
        hf_tok.chat_template = chat_template or hf_tok.chat_template
        args = trl.SFTConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False,
                             max_length=None)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset(table), processing_class=hf_tok)
        return list(trainer.train_dataset)
    return run


def test_same_files_as_trl_sfttrainer(tmp_path, tok, trl_prepare, templates_dir):
    """TRL's own preparation of the same parquet files gives the same ids and labels."""
    cases = {
        "text": [{"text": "Once upon a time"}, {"text": "ends" + tok.eos_token}, {"text": "héllo 🤗\n\nworld"}],
        "plain": [{"prompt": "The capital of France is", "completion": " Paris."}, {"prompt": "a", "completion": "b"},
                  {"prompt": "Q: 2+2?\nA:", "completion": " 4\n"}],
        "conv": [{"prompt": SYSTEM + [{"role": "user", "content": "2+2?"}],
                  "completion": [{"role": "assistant", "content": "4"}]},
                 {"prompt": [{"role": "user", "content": "hi"}],
                  "completion": [{"role": "assistant", "content": " yo"}]}],
    }
    for name, rows in cases.items():
        path = write_parquet(tmp_path / f"{name}.parquet", rows)
        ours, _ = data.build_examples(tok, conversations.load_conversations(path)[0], "smollm2")
        theirs = trl_prepare(pq.read_table(path), tmp_path)
        for o, t in zip(ours, theirs, strict=True):
            assert o["input_ids"] == t["input_ids"]
            if name == "conv":
                # TRL's completion mask also trains the "\n" after <|im_end|>; minisft stops at <|im_end|>.
                assert t["labels"][-1] == tok.encode("\n")[0] and o["labels"] == t["labels"][:-1] + [IGNORE_INDEX]
            else:
                assert o["labels"] == t["labels"]
    # smoltalk2-style chat records: TRL passes chat_template_kwargs and tools to the SmolLM3 template.
    path = write_parquet(tmp_path / "sft.parquet", smoltalk2_rows())
    smollm3 = (templates_dir / "SmolLM3-3B.jinja").read_text(encoding="utf-8")
    today = datetime.date.today()  # transformers' strftime_now reads the clock
    theirs = trl_prepare(pq.read_table(path), tmp_path, chat_template=smollm3)
    ours, _ = data.build_examples(tok, conversations.load_conversations(path)[0], "smollm3", today=today)
    if datetime.date.today() == today:  # not across midnight
        assert [o["input_ids"] for o in ours] == [t["input_ids"] for t in theirs]


# ---------------------------------------------------------------------------------------------
# parquet files and folders of shards
# ---------------------------------------------------------------------------------------------
def test_parquet_matches_jsonl_and_names_rows(tmp_path):
    rows = smoltalk2_rows()
    from_parquet = conversations.load_conversations(write_parquet(tmp_path / "a.parquet", rows))
    from_jsonl = conversations.load_conversations(write_jsonl(tmp_path / "a.jsonl", rows))
    assert from_parquet[0] == from_jsonl[0]
    assert from_parquet[1]["sources"][:2] == [f"{tmp_path / 'a.parquet'}:row 0", f"{tmp_path / 'a.parquet'}:row 1"]
    bad = [{"messages": CHAT}, {"messages": [{"role": "user", "content": "no answer"}]}, {"messages": CHAT}]
    path = write_parquet(tmp_path / "bad.parquet", bad)
    with pytest.raises(ValueError, match=r"bad\.parquet:row 1: no assistant turn"):
        conversations.load_conversations(path)
    convs, stats = conversations.load_conversations(path, skip_bad=True)
    assert len(convs) == 2 and stats["skipped"] == 1 and stats["problems"][0].startswith(f"{path}:row 1: ")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match=r"broken\.parquet:row 0: cannot read this parquet file"):
        conversations.load_conversations(tmp_path / "broken.parquet")


def test_folder_of_shards_in_sorted_order(tmp_path):
    folder = tmp_path / "data"
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(5)]
    write_parquet(folder / "train-00001-of-00002.parquet", rows[3:])  # written first, read second
    write_parquet(folder / "train-00000-of-00002.parquet", rows[:3])
    (folder / "dataset_info.json").write_text("{}")  # metadata, not a shard
    convs, stats = conversations.load_conversations(folder)
    assert [c[0]["content"] for c in convs] == ["q0", "q1", "q2", "q3", "q4"]
    assert stats["sources"][3] == f"{folder / 'train-00001-of-00002.parquet'}:row 0"
    write_jsonl(folder / "zz-extra.jsonl", [rows[0]])  # .jsonl shards are read too, in name order
    convs, stats = conversations.load_conversations(folder)
    assert len(convs) == 6 and stats["sources"][-1] == f"{folder / 'zz-extra.jsonl'}:1"
    with pytest.raises(FileNotFoundError, match=r"empty: no \.parquet or \.jsonl files in this folder"):
        (tmp_path / "empty").mkdir()
        conversations.load_conversations(tmp_path / "empty")
    with pytest.raises(ValueError, match="subset/split choose files in a folder"):
        conversations.load_conversations(folder / "zz-extra.jsonl", split="train")


def test_subset_and_split_in_a_local_folder(tmp_path):
    one = [{"messages": CHAT}]
    write_parquet(tmp_path / "SFT" / "chats_think-00000-of-00001.parquet", one * 2)
    write_parquet(tmp_path / "SFT" / "chats-00000-of-00001.parquet", one)
    write_parquet(tmp_path / "Mid" / "chats-00000-of-00001.parquet", one * 4)
    assert conversations.load_conversations(tmp_path, subset="SFT", split="chats")[1]["loaded"] == 1  # not chats_think
    assert conversations.load_conversations(tmp_path, subset="SFT", split="chats_think")[1]["loaded"] == 2
    assert conversations.load_conversations(tmp_path, subset="Mid", split="chats")[1]["loaded"] == 4
    with pytest.raises(FileNotFoundError, match=r"no \.parquet or \.jsonl files for subset 'SFT', split 'train'"):
        conversations.load_conversations(tmp_path, subset="SFT")


def test_without_pyarrow_parquet_says_how_to_install(tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "a.parquet", [{"messages": CHAT}])
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if it were not installed
    with pytest.raises(ValueError) as e:
        conversations.load_conversations(path)
    assert str(e.value) == f"{path}: reading .parquet files needs pyarrow, which is not installed: pip install pyarrow"
    assert conversations.load_conversations(write_jsonl(tmp_path / "a.jsonl", [{"messages": CHAT}]))[1]["loaded"] == 1


# ---------------------------------------------------------------------------------------------
# Hub datasets, offline, from a cache laid out as huggingface_hub lays it out
# ---------------------------------------------------------------------------------------------
REV = "0123456789abcdef0123456789abcdef01234567"


def fake_hub(cache, repo, files):
    """cache/datasets--owner--name/{refs/main, snapshots/REV/...}: what snapshot_download leaves behind."""
    root = cache / f"datasets--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(REV)
    for rel, rows in files.items():
        write_parquet(root / "snapshots" / REV / rel, rows)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_dataset_from_the_cache(offline_cache):
    qa = lambda i: {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
                    "chat_template_kwargs": {k: (i % 2 == 0 if k == "enable_thinking" else None) for k in KWARGS},
                    "source": "x"}
    fake_hub(offline_cache, "HuggingFaceTB/smoltalk2", {
        "SFT/everyday_no_think-00000-of-00002.parquet": [qa(0), qa(1)],
        "SFT/everyday_no_think-00001-of-00002.parquet": [qa(2)],
        "SFT/everyday_no_think_extra-00000-of-00001.parquet": [qa(9)],
        "Mid/everyday_no_think-00000-of-00001.parquet": [qa(8)],
    })
    convs, stats = conversations.load_conversations("HuggingFaceTB/smoltalk2", subset="SFT", split="everyday_no_think")
    assert [c["messages"][0]["content"] for c in convs] == ["q0", "q1", "q2"]
    assert [c["settings"] for c in convs] == [{"enable_thinking": True}, {"enable_thinking": False},
                                              {"enable_thinking": True}]
    assert stats["sources"] == [
        "hf://datasets/HuggingFaceTB/smoltalk2/SFT/everyday_no_think-00000-of-00002.parquet:row 0",
        "hf://datasets/HuggingFaceTB/smoltalk2/SFT/everyday_no_think-00000-of-00002.parquet:row 1",
        "hf://datasets/HuggingFaceTB/smoltalk2/SFT/everyday_no_think-00001-of-00002.parquet:row 0"]
    # smoltalk's older layout data/<subset>/<split>-*.parquet, and the default one data/train-*.parquet.
    fake_hub(offline_cache, "HuggingFaceTB/smoltalk", {"data/all/train-00000-of-00001.parquet": [qa(1)],
                                                        "data/all/test-00000-of-00001.parquet": [qa(2), qa(3)]})
    assert conversations.load_conversations("HuggingFaceTB/smoltalk", subset="all", split="test")[1]["loaded"] == 2
    fake_hub(offline_cache, "someone/tiny", {"data/train-00000-of-00001.parquet": [qa(4)]})
    assert conversations.load_conversations("someone/tiny")[0][0]["messages"][0]["content"] == "q4"  # split "train"


def test_hub_dataset_not_cached_offline_gives_one_line_advice(offline_cache):
    with pytest.raises(ValueError) as e:
        conversations.load_conversations("HuggingFaceTB/smoltalk2", subset="SFT", split="chats")
    message = str(e.value)
    assert "\n" not in message and "HF_HUB_OFFLINE is set" in message and str(offline_cache) in message
    assert "download HuggingFaceTB/smoltalk2 --repo-type dataset --include 'SFT/chats[-./]*'" in message
    # Half a download (one shard of two) is not a dataset: the same advice, not a silent half.
    fake_hub(offline_cache, "HuggingFaceTB/smoltalk2", {"SFT/chats-00000-of-00002.parquet": [{"messages": CHAT}]})
    with pytest.raises(ValueError, match=r"split 'chats' is not \(fully\) in the Hugging Face cache"):
        conversations.load_conversations("HuggingFaceTB/smoltalk2", subset="SFT", split="chats")
    with pytest.raises(FileNotFoundError, match=r"no such dataset file or folder"):
        conversations.load_conversations("./not/here.jsonl")


def test_download_asks_for_the_split_only(tmp_path, monkeypatch):
    """Online (simulated): snapshot_download gets repo_type="dataset" and patterns that select the split."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
    from huggingface_hub.utils import filter_repo_objects

    from minisft import records

    listing = ["README.md", "SFT/chats-00000-of-00002.parquet", "SFT/chats-00001-of-00002.parquet",
               "SFT/chats_think-00000-of-00001.parquet", "Mid/chats-00000-of-00001.parquet",
               "data/SFT/chats-00000-of-00001.parquet", "SFT/chats/0000.parquet", "xSFT/chats-00000-of-00001.parquet"]
    calls = []

    def fake_download(repo_id, repo_type=None, allow_patterns=None, cache_dir=None, local_files_only=False):
        calls.append((repo_id, repo_type, allow_patterns, local_files_only))
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        folder = tmp_path / "snap"
        for rel in filter_repo_objects(listing, allow_patterns=allow_patterns):
            write_parquet(folder / rel, [{"messages": CHAT}])
        return str(folder)

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    convs, stats = conversations.load_conversations("HuggingFaceTB/smoltalk2", subset="SFT", split="chats")
    assert [c[1] for c in calls] == ["dataset", "dataset"] and [c[3] for c in calls] == [True, False]
    downloaded = sorted(filter_repo_objects(listing, allow_patterns=calls[1][2]))
    # The patterns fetch this split of this subset (in its three layouts) and nothing of chats_think or Mid.
    assert downloaded == ["SFT/chats-00000-of-00002.parquet", "SFT/chats-00001-of-00002.parquet",
                          "SFT/chats/0000.parquet", "data/SFT/chats-00000-of-00001.parquet"]
    assert records.matching_files(downloaded, "SFT", "chats") == downloaded
    assert stats["loaded"] == 4

    def missing(*args, **kwargs):
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        raise RepositoryNotFoundError("404 Repository Not Found", response=SimpleNamespace(headers={}, request=None))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", missing)
    with pytest.raises(ValueError, match=r"^nobody/nothing: no such local file or folder, and no such dataset on the "
                                         r"Hugging Face Hub"):
        conversations.load_conversations("nobody/nothing")
