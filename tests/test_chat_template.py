"""chat_template: byte parity with the real Jinja templates, and label masks on the real SmolLM2 tokenizer.

The reference renderer below sets up Jinja the way transformers does (sandboxed, trim_blocks,
lstrip_blocks, raise_exception/strftime_now globals, a {% generation %} tag that renders its body).
"""
import datetime
import random

import jinja2
import jinja2.ext
import pytest
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from minisft.chat_template import (IGNORE_INDEX, TEMPLATES, render, render_spans, show_mask, template_for,
                                   tokenize_conversation)
from minisft.tokenizer import Tokenizer

TEMPLATE_FILES = {"smollm2": "SmolLM2-135M-Instruct.jinja", "smollm3": "SmolLM3-3B.jinja",
                  "chatml": "SmolLM-135M-Instruct.jinja"}
DAY = datetime.date(2025, 3, 5)


# ---- the reference: the real templates run by Jinja ---------------------------------------------
class GenerationTag(jinja2.ext.Extension):
    """{% generation %}...{% endgeneration %}: transformers uses it to find assistant text; here it just renders."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


@pytest.fixture(scope="module")
def jinja_render(templates_dir):
    compiled = {}
    for name, fname in TEMPLATE_FILES.items():
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[GenerationTag, jinja2.ext.loopcontrols])
        env.globals["raise_exception"] = _raise
        compiled[name] = env, env.from_string((templates_dir / fname).read_text(encoding="utf-8"))

    def run(messages, template, add_generation_prompt=False, enable_thinking=None, tools=None, today=DAY):
        env, tpl = compiled[template]
        env.globals["strftime_now"] = lambda fmt: today.strftime(fmt)
        kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        # transformers always passes tools (None when not given) and documents.
        return tpl.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
                          documents=None, **kwargs)
    return run


# ---- random conversations ------------------------------------------------------------------------
TEXTS = ["Hello!", "What is 2+2?", "4", "", " ", "\n", "\n\nleading newlines", "trailing newlines\n\n",
         "  spaces around  ", "héllo wörld", "日本語のテキスト", "emoji 🤗🚀", "tab\tseparated", "line1\nline2\n\nline4",
         "<think>\nreasoning here\n</think>\nanswer", "/think", "/no_think", "please /think about it",
         "/no_think be brief", "/system_override", "x /system_override y ", "a {{ jinja }} {% raw %} b",
         "quotes ' \" `", "back\\slash", "Ü" * 30, "ends with space ", "\r\nwindows\r\n", "<think>", "</think>"]
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
    {"name": "calc", "args": [1, 2.5, None, True, False], "note": "quote ' and \" and é\n"},
    {"name": "empty", "nested": {"a": {"b": ()}}},
]


def _text(rng):
    n = rng.choice([1, 1, 1, 2, 3])
    return "".join(rng.choice(TEXTS) for _ in range(n))


def random_case(rng, template):
    msgs = []
    if rng.random() < 0.5:
        msgs.append({"role": "system", "content": _text(rng)})
    for _ in range(rng.randint(0 if template != "smollm3" or msgs else 1, 7)):
        role = rng.choice(["user", "assistant", "user", "assistant", "tool", "system"])
        content = _text(rng)
        if template == "smollm3" and role != "system" and rng.random() < 0.1:
            content = rng.choice([None, [{"type": "text", "text": "part"}], 7])
        msgs.append({"role": role, "content": content})
    if template == "smollm3" and not msgs:
        msgs.append({"role": "user", "content": "hi"})
    kw = {"add_generation_prompt": rng.random() < 0.4,
          "enable_thinking": rng.choice([None, True, False]),
          "tools": rng.choice([None, None, [], TOOLS[:1], TOOLS, (TOOLS[1],)]),
          "today": datetime.date(rng.randint(1990, 2040), rng.randint(1, 12), rng.randint(1, 28))}
    return msgs, kw


@pytest.mark.parametrize("template", TEMPLATES)
def test_render_matches_jinja_on_random_conversations(jinja_render, template):
    rng = random.Random(1234 + TEMPLATES.index(template))
    for n in range(400):
        msgs, kw = random_case(rng, template)
        ours = render(msgs, template, **kw)
        ref = jinja_render(msgs, template, **kw)
        assert ours == ref, f"case {n}: {msgs!r} {kw!r}"
        assert ours == "".join(s.text for s in render_spans(msgs, template, **kw))


SMOLLM3_CASES = [
    ([{"role": "user", "content": "hi"}], {}),
    ([{"role": "user", "content": "hi"}], {"enable_thinking": False, "add_generation_prompt": True}),
    ([{"role": "system", "content": "Be nice. /no_think"}, {"role": "user", "content": "hi"},
      {"role": "assistant", "content": "\n\nhello"}], {"enable_thinking": True}),
    ([{"role": "system", "content": "/think"}, {"role": "user", "content": "hi"}], {"enable_thinking": False}),
    ([{"role": "system", "content": "/no_think /think"}], {}),
    ([{"role": "system", "content": "Custom header /system_override  \n"}, {"role": "user", "content": "x"}],
     {"tools": TOOLS}),
    ([{"role": "user", "content": "/system_override"}], {}),  # not a system message: no override
    ([{"role": "user", "content": "q"}, {"role": "system", "content": "late system"},
      {"role": "assistant", "content": "a"}], {"tools": TOOLS}),
    ([{"role": "user", "content": "q"}, {"role": "tool", "content": "{\"temp\": 3}"},
      {"role": "assistant", "content": None}], {"enable_thinking": False}),
    ([{"role": "system", "content": ""}, {"role": "assistant", "content": "   "}], {"tools": []}),
]


@pytest.mark.parametrize("msgs,kw", SMOLLM3_CASES)
def test_smollm3_quirks_match_jinja(jinja_render, msgs, kw):
    for today in (DAY, datetime.date(2031, 12, 31)):
        assert render(msgs, "smollm3", today=today, **kw) == jinja_render(msgs, "smollm3", today=today, **kw)


def test_quirks_spelled_out():
    late = [{"role": "user", "content": "q"}, {"role": "system", "content": "late"}]
    # smollm2: default system prompt first, the late system message is an ordinary turn.
    assert render(late, "smollm2") == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nq<|im_end|>\n<|im_start|>system\nlate<|im_end|>\n")
    assert render(late, "chatml") == "<|im_start|>user\nq<|im_end|>\n<|im_start|>system\nlate<|im_end|>\n"
    s3 = render(late, "smollm3", today=DAY)
    assert "late" not in s3 and "Today Date: 05 March 2025\n" in s3
    assert "the conclusion.\n\n<|im_start|>user\nq" in s3  # no tools: the system turn is never closed
    brief = render([{"role": "system", "content": "Be brief. /no_think "}], "smollm3", today=DAY)
    assert "Reasoning Mode: /no_think\n\n## Custom Instructions\n\nBe brief.\n\n" in brief
    no_think = render([{"role": "user", "content": "q"}, {"role": "assistant", "content": "\n\na"}],
                      "smollm3", enable_thinking=False, today=DAY)
    assert no_think.endswith("<|im_start|>assistant\n<think>\n\n</think>\na<|im_end|>\n")
    assert render([], "smollm2", add_generation_prompt=True) == "<|im_start|>assistant\n"


def test_errors_where_jinja_fails(jinja_render):
    bad = [([], "smollm3"),
           ([{"role": "system", "content": None}], "smollm3"),
           ([{"role": "user", "content": None}], "smollm2"),
           ([{"role": "user", "content": ["x"]}], "chatml")]
    for msgs, template in bad:
        with pytest.raises(ValueError):
            render(msgs, template)
        with pytest.raises(Exception):
            jinja_render(msgs, template)
    with pytest.raises(ValueError, match="message 1: role 'robot'"):
        render([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}])
    with pytest.raises(ValueError, match="unknown chat template 'llama3'"):
        render([{"role": "user", "content": "a"}], "llama3")
    with pytest.raises(ValueError, match="tools"):
        render([{"role": "user", "content": "a"}], "smollm3", tools={"name": "x"})


@pytest.mark.parametrize("template", TEMPLATES)
def test_missing_keys_and_odd_roles_are_named(jinja_render, template):
    user = {"role": "user", "content": "a"}
    cases = [([user, {"content": "b"}], r"^message 1: missing key 'role' \(expected"),
             ([user, {"role": "assistant"}], r"^message 1: missing key 'content' \(expected"),
             ([{"role": "assistant", "tool_calls": []}], r"^message 0: missing key 'content'"),
             ([user, {"role": "developer", "content": "b"}], r"^message 1: role 'developer' is not one of"),
             ([user, {"role": "User", "content": "b"}], r"^message 1: role 'User' is not one of"),
             ([user, {"role": None, "content": "b"}], r"^message 1: role None is not one of"),
             ([user, "hello"], r"^message 1: expected a dict with 'role' and 'content', got str")]
    for msgs, error in cases:
        with pytest.raises(ValueError, match=error) as e:
            render(msgs, template, today=DAY)
        assert "\n" not in str(e.value)
    if template == "smollm3":  # what the real template does instead: an empty answer, without a word
        assert "<|im_start|>assistant\n<|im_end|>" in jinja_render([{"role": "assistant"}], "smollm3")


# ---- against transformers itself -----------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(smollm2_dir))


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return Tokenizer.from_dir(smollm2_dir)


HF_CASES = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
    [{"role": "user", "content": " spaced \n"}, {"role": "assistant", "content": "\nok 🤗"},
     {"role": "tool", "content": "result"}, {"role": "system", "content": "late"}],
]


@pytest.mark.parametrize("messages", HF_CASES)
def test_render_matches_transformers_apply_chat_template(hf_tokenizer, templates_dir, messages):
    for gen in (False, True):
        assert render(messages, "smollm2", add_generation_prompt=gen) == hf_tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=gen)
        chatml = (templates_dir / TEMPLATE_FILES["chatml"]).read_text(encoding="utf-8")
        assert render(messages, "chatml", add_generation_prompt=gen) == hf_tokenizer.apply_chat_template(
            messages, chat_template=chatml, tokenize=False, add_generation_prompt=gen)
    smollm3 = (templates_dir / TEMPLATE_FILES["smollm3"]).read_text(encoding="utf-8")
    for think in (True, False):
        for tools in (None, TOOLS):
            today = datetime.date.today()  # transformers' strftime_now reads the clock
            ref = hf_tokenizer.apply_chat_template(messages, chat_template=smollm3, tokenize=False,
                                                   add_generation_prompt=True, enable_thinking=think, tools=tools)
            ours = render(messages, "smollm3", add_generation_prompt=True, enable_thinking=think, tools=tools,
                          today=today)
            if ours != ref and datetime.date.today() != today:  # the clock passed midnight mid-test
                ours = render(messages, "smollm3", add_generation_prompt=True, enable_thinking=think,
                              tools=tools)
            assert ours == ref


def test_smollm3_mask_vs_transformers_generation_mask(hf_tokenizer, tok, templates_dir):
    """transformers' {% generation %} mask = our train_headers mask + the "\\n" after each <|im_end|>."""
    smollm3 = (templates_dir / TEMPLATE_FILES["smollm3"]).read_text(encoding="utf-8")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello there."}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Bye now!"}]
    for think in (True, False):
        today = datetime.date.today()
        ref = hf_tokenizer.apply_chat_template(messages, chat_template=smollm3, tokenize=True, return_dict=True,
                                               return_assistant_tokens_mask=True, enable_thinking=think)
        ex = tokenize_conversation(tok, messages, "smollm3", train_headers=True, enable_thinking=think, today=today)
        assert ex["input_ids"] == list(ref["input_ids"])
        ours = [int(lab != IGNORE_INDEX) for lab in ex["labels"]]
        ids = ex["input_ids"]
        newline_after_end = [int(i > 0 and ids[i - 1] == tok.im_end_id and ours[i - 1] == 1) for i in range(len(ids))]
        assert [a | b for a, b in zip(ours, newline_after_end)] == list(ref["assistant_masks"])


# ---- masks on the real SmolLM2 tokenizer ---------------------------------------------------------
CHAT = [{"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Hello, who are you?"},
        {"role": "assistant", "content": "Arr, I be a pirate 🏴‍☠️ bot.\nAsk away!"},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "It be 4, matey."},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "Ye're welcome!"}]


def trained_runs(tok, ex):
    """Decoded text of each maximal run of trained tokens."""
    runs, cur = [], []
    for t, lab in zip(ex["input_ids"], ex["labels"]):
        if lab != IGNORE_INDEX:
            assert lab == t  # unshifted labels
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


def contents(messages):
    return [m["content"] for m in messages if m["role"] == "assistant"]


@pytest.mark.parametrize("template", TEMPLATES)
def test_assistant_mask_is_content_plus_im_end(tok, template):
    ex = tokenize_conversation(tok, CHAT, template, today=DAY)
    assert ex["input_ids"] == tok.encode(render(CHAT, template, today=DAY))
    assert len(ex["labels"]) == len(ex["input_ids"])
    assert trained_runs(tok, ex) == [c + "<|im_end|>" for c in contents(CHAT)]
    # every closing <|im_end|> of an assistant turn is a target (SmolLM2: pad == eos == <|im_end|>)
    assert sum(lab == tok.im_end_id for lab in ex["labels"]) == 3


def test_train_on_last_and_all(tok):
    last = tokenize_conversation(tok, CHAT, train_on="last")
    assert trained_runs(tok, last) == ["Ye're welcome!<|im_end|>"]
    everything = tokenize_conversation(tok, CHAT, train_on="all")
    assert everything["labels"] == everything["input_ids"]
    assert everything["input_ids"] == last["input_ids"]


def test_train_headers(tok):
    ex = tokenize_conversation(tok, CHAT, "smollm2", train_headers=True)
    assert trained_runs(tok, ex) == ["<|im_start|>assistant\n" + c + "<|im_end|>" for c in contents(CHAT)]
    ex = tokenize_conversation(tok, CHAT, "smollm3", train_headers=True, enable_thinking=False, today=DAY)
    assert trained_runs(tok, ex) == ["<|im_start|>assistant\n<think>\n\n</think>\n" + c + "<|im_end|>"
                                     for c in contents(CHAT)]
    ex = tokenize_conversation(tok, CHAT, "smollm3", train_on="last", train_headers=True, today=DAY)
    assert trained_runs(tok, ex) == ["<|im_start|>assistant\nYe're welcome!<|im_end|>"]


def test_smollm3_masks(tok):
    ex = tokenize_conversation(tok, CHAT, "smollm3", enable_thinking=False, today=DAY)
    assert ex["input_ids"] == tok.encode(render(CHAT, "smollm3", enable_thinking=False, today=DAY))
    assert trained_runs(tok, ex) == [c + "<|im_end|>" for c in contents(CHAT)]  # think block not trained
    think = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\n<think>\nhmm\n</think>\n\nA."},
             {"role": "tool", "content": "t"}, {"role": "assistant", "content": None}]
    ex = tokenize_conversation(tok, think, "smollm3", today=DAY)
    assert trained_runs(tok, ex) == ["<think>\nhmm\n</think>\n\nA.<|im_end|>", "<|im_end|>"]


def test_straddling_token_is_trained(tok):
    # "\n" ending the header + "\n\n" starting the content become one token: trained, so the answer stays whole.
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\n\nAnswer"}]
    ex = tokenize_conversation(tok, msgs, "chatml")
    ids, offsets = tok.encode_with_offsets(render(msgs, "chatml"))
    start = render(msgs, "chatml").index("\n\nAnswer")  # where the content begins
    straddling = [i for i, (a, b) in enumerate(offsets) if a < start < b]
    assert len(straddling) == 1, "the header's \\n and the content's \\n\\n should share a token"
    assert ex["labels"][straddling[0]] == ids[straddling[0]]
    # So the trained text starts with the header's newline too: one extra "\n", nothing lost.
    assert trained_runs(tok, ex) == ["\n\n\nAnswer<|im_end|>"]


def test_mask_covers_exactly_the_trained_spans_on_random_chats(tok):
    """Property check: every content/end character lies in a trained token, every trained token touches one."""
    rng = random.Random(7)
    for template in TEMPLATES:
        for _ in range(60):
            msgs, kw = random_case(rng, template)
            msgs = [m for m in msgs if template == "smollm3" or isinstance(m["content"], str)]
            kw.pop("add_generation_prompt")
            ex = tokenize_conversation(tok, msgs, template, **kw)
            spans = render_spans(msgs, template, **kw)
            text = "".join(s.text for s in spans)
            ids, offsets = tok.encode_with_offsets(text)
            assert ex["input_ids"] == ids == tok.encode(text)
            target = set()
            pos = 0
            for s in spans:
                if s.kind in ("content", "end"):
                    target.update(range(pos, pos + len(s.text)))
                pos += len(s.text)
            covered = set()
            for lab, (a, b) in zip(ex["labels"], offsets):
                if lab != IGNORE_INDEX:
                    assert target & set(range(a, b)), (text[a:b], msgs)
                    covered.update(range(a, b))
                else:
                    assert not target & set(range(a, b))
            assert target <= covered


def test_special_token_in_content_is_rejected(tok):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "bye<|im_end|> sneaky"}]
    with pytest.raises(ValueError, match=r"message 1 \(assistant\).*'<\|im_end\|>'"):
        tokenize_conversation(tok, msgs)
    msgs = [{"role": "system", "content": "<|endoftext|>"}, {"role": "user", "content": "x"}]
    with pytest.raises(ValueError, match=r"message 0 \(system\).*<\|endoftext\|>"):
        tokenize_conversation(tok, msgs, "smollm3", today=DAY)
    # Look-alikes are ordinary text.
    ex = tokenize_conversation(tok, [{"role": "assistant", "content": "<|im_end|"}])
    assert trained_runs(tok, ex) == ["<|im_end|<|im_end|>"]


def test_truncation_keeps_whole_turns(tok):
    lengths = [len(tok.encode(render(CHAT[:k + 1]))) for k in (2, 4, 6)]
    full = tokenize_conversation(tok, CHAT)
    assert len(full["input_ids"]) == lengths[2]
    for max_length, keep in [(lengths[2], 7), (lengths[2] - 1, 5), (lengths[1], 5), (lengths[1] - 1, 3),
                             (lengths[0], 3)]:
        ex = tokenize_conversation(tok, CHAT, max_length=max_length)
        assert ex["input_ids"] == tok.encode(render(CHAT[:keep])) and len(ex["input_ids"]) <= max_length
        assert trained_runs(tok, ex) == [c + "<|im_end|>" for c in contents(CHAT[:keep])]
        last = tokenize_conversation(tok, CHAT, train_on="last", max_length=max_length)
        assert trained_runs(tok, last) == [contents(CHAT[:keep])[-1] + "<|im_end|>"]
    # Not even the first assistant turn fits: cut inside it.
    ex = tokenize_conversation(tok, CHAT, max_length=lengths[0] - 3)
    assert ex["input_ids"] == tok.encode(render(CHAT[:3]))[:lengths[0] - 3]
    runs = trained_runs(tok, ex)
    assert len(runs) == 1 and CHAT[2]["content"].startswith(runs[0]) and runs[0]
    # Cut inside the prompt: nothing left to train (the caller drops such examples).
    ex = tokenize_conversation(tok, CHAT, max_length=5)
    assert len(ex["input_ids"]) == 5 and set(ex["labels"]) == {IGNORE_INDEX}


def test_bad_arguments(tok):
    with pytest.raises(ValueError, match="train_on='everything'"):
        tokenize_conversation(tok, CHAT, train_on="everything")
    with pytest.raises(ValueError, match="unknown chat template"):
        tokenize_conversation(tok, CHAT, "smollm4")
    with pytest.raises(ValueError, match="max_length"):
        tokenize_conversation(tok, CHAT, max_length=0)
    ex = tokenize_conversation(tok, [{"role": "user", "content": "no answer"}])
    assert set(ex["labels"]) == {IGNORE_INDEX}


def test_show_mask(tok):
    ex = tokenize_conversation(tok, CHAT[:3])
    plain = show_mask(tok, ex["input_ids"], ex["labels"], color=False)
    n = len(ex["input_ids"])
    m = sum(lab != IGNORE_INDEX for lab in ex["labels"])
    assert f"{n} tokens, {m} trained" in plain
    assert "[[Arr, I be a pirate 🏴‍☠️ bot.↵\nAsk away!<|im_end|>]]" in plain
    assert "<|im_start|>user↵\nHello, who are you?<|im_end|>↵\n" in plain and "\x1b[" not in plain
    coloured = show_mask(tok, ex["input_ids"], ex["labels"], color=True)
    assert "\x1b[32mArr, I be" in coloured and "[[" not in coloured
    assert show_mask(tok, ex["input_ids"], ex["labels"]).count("tokens,") == 1  # auto: not a tty under pytest
    with pytest.raises(ValueError):
        show_mask(tok, ex["input_ids"], ex["labels"][:-1])


def test_template_for(tok, templates_dir):
    assert template_for(tok) == "smollm2"
    for name, fname in TEMPLATE_FILES.items():
        assert template_for((templates_dir / fname).read_text(encoding="utf-8")) == name
    assert template_for(None) == "chatml"
    with pytest.raises(ValueError, match="pass the template name"):
        template_for("{{ bos_token }}{% for m in messages %}[INST]{{ m.content }}[/INST]{% endfor %}")


def test_jinja_strings_are_the_real_templates(templates_dir):
    # final/ of a run gets these strings; they must be the real templates, byte for byte.
    from minisft.jinja_templates import JINJA
    assert JINJA["smollm2"] == (templates_dir / "SmolLM2-135M-Instruct.jinja").read_text(encoding="utf-8")
    assert JINJA["chatml"] == (templates_dir / "SmolLM-135M-Instruct.jinja").read_text(encoding="utf-8")


def test_renderer_needs_no_torch():
    import subprocess, sys
    code = "import sys, minisft.chat_template; assert 'torch' not in sys.modules, 'chat_template imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parent.parent))


# ---- per-record template settings (smoltalk2's chat_template_kwargs) --------------------------------
# smoltalk2 ships xml_tools and python_tools as JSON strings; dicts and odd values show the |string rule.
XML_TOOLS = ['{"name": "get_weather", "description": "Weather for a city", "parameters": {"city": "string"}}',
             {"name": "calc", "args": [1, None, True]}]
PY_TOOLS = ['def search(query: str) -> list:\n    """Web search."""', "def add(a: int, b: int) -> int: ..."]
CHAT3 = [{"role": "user", "content": "What is the weather in Paris?"},
         {"role": "assistant", "content": "<tool_call>{\"name\": \"get_weather\"}</tool_call>"},
         {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "\nIt is sunny."}]
SYSTEMS = [None, "Answer in French.", "Be brief. /no_think", "/think Reason first.", "", "/system_override Just this."]
KWARG_CASES = [
    {"enable_thinking": True}, {"enable_thinking": False},
    {"xml_tools": XML_TOOLS}, {"python_tools": PY_TOOLS}, {"custom_instructions": "Always cite a source."},
    {"xml_tools": XML_TOOLS, "python_tools": PY_TOOLS},
    {"enable_thinking": False, "xml_tools": XML_TOOLS[:1], "python_tools": PY_TOOLS,
     "custom_instructions": "Use the tools.\n\n"},
    {"tools": TOOLS}, {"tools": TOOLS, "xml_tools": XML_TOOLS}, {"tools": [], "xml_tools": XML_TOOLS},
    {"tools": TOOLS, "python_tools": PY_TOOLS, "custom_instructions": "x", "enable_thinking": True},
    {"xml_tools": [], "python_tools": [], "custom_instructions": ""},
]


@pytest.fixture(scope="module")
def smollm3_jinja(templates_dir):
    """The real SmolLM3 template, given any template variables (as transformers passes **kwargs)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: DAY.strftime(fmt)
    tpl = env.from_string((templates_dir / TEMPLATE_FILES["smollm3"]).read_text(encoding="utf-8"))

    def run(messages, add_generation_prompt=False, tools=None, **kwargs):
        return tpl.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
                          documents=None, **kwargs)
    return run


def _with_system(system, messages):
    return messages if system is None else [{"role": "system", "content": system}] + messages


@pytest.mark.parametrize("kwargs", KWARG_CASES, ids=["-".join(sorted(k)) or "none" for k in KWARG_CASES])
@pytest.mark.parametrize("system", SYSTEMS, ids=[f"system{i}" for i in range(len(SYSTEMS))])
def test_smollm3_template_kwargs_match_jinja(smollm3_jinja, kwargs, system):
    messages = _with_system(system, CHAT3)
    for gen in (False, True):
        for msgs in (messages, messages[:-1]):
            ref = smollm3_jinja(msgs, add_generation_prompt=gen, **kwargs)
            assert render(msgs, "smollm3", add_generation_prompt=gen, today=DAY, **kwargs) == ref


def test_smollm3_template_kwargs_random_match_jinja(smollm3_jinja):
    rng = random.Random(7)
    for _ in range(300):
        msgs, _ = random_case(rng, "smollm3")
        kw = {}
        for key, choices in (("enable_thinking", [True, False]), ("xml_tools", [None, [], XML_TOOLS, XML_TOOLS[1:]]),
                             ("python_tools", [None, [], PY_TOOLS, PY_TOOLS[:1]]),
                             ("custom_instructions", [None, "", " pad \n", "/think not a flag here", "日本語"]),
                             ("tools", [None, [], TOOLS])):
            if rng.random() < 0.5:
                kw[key] = rng.choice(choices)
        gen = rng.random() < 0.5
        assert render(msgs, "smollm3", add_generation_prompt=gen, today=DAY, **kw) == smollm3_jinja(
            msgs, add_generation_prompt=gen, **kw), (msgs, kw)


def test_smollm3_template_kwargs_match_transformers(hf_tokenizer, templates_dir):
    smollm3 = (templates_dir / TEMPLATE_FILES["smollm3"]).read_text(encoding="utf-8")
    for kwargs in KWARG_CASES:
        for system in (None, "Answer in French."):
            msgs = _with_system(system, CHAT3)
            today = datetime.date.today()  # transformers' strftime_now reads the clock
            ref = hf_tokenizer.apply_chat_template(msgs, chat_template=smollm3, tokenize=False, **kwargs)
            ours = render(msgs, "smollm3", today=today, **kwargs)
            if ours != ref and datetime.date.today() != today:  # the clock passed midnight mid-test
                ours = render(msgs, "smollm3", **kwargs)
            assert ours == ref


def test_smollm2_and_chatml_ignore_smollm3_settings(jinja_render):
    kw = {"xml_tools": XML_TOOLS, "python_tools": PY_TOOLS, "custom_instructions": "x", "enable_thinking": False}
    for template in ("smollm2", "chatml"):
        assert render(CHAT3, template, **kw) == render(CHAT3, template) == jinja_render(CHAT3, template)


def test_bad_template_settings_are_named():
    with pytest.raises(ValueError, match=r"^xml_tools: expected a list"):
        render(CHAT3, "smollm3", xml_tools="a string")
    with pytest.raises(ValueError, match=r"^python_tools: expected a list"):
        render(CHAT3, "smollm3", python_tools={"a": 1})
    with pytest.raises(ValueError, match=r"^custom_instructions: expected a string"):
        render(CHAT3, "smollm3", custom_instructions=3)


def test_completion_start_trains_only_the_completion(tok):
    msgs = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}]
    full = tokenize_conversation(tok, msgs, "smollm2")
    part = tokenize_conversation(tok, msgs, "smollm2", completion_start=2)
    assert part["input_ids"] == full["input_ids"]
    trained = [t for t, y in zip(part["input_ids"], part["labels"]) if y != IGNORE_INDEX]
    assert tok.decode(trained) == "6<|im_end|>"
    assert tok.decode([t for t, y in zip(full["input_ids"], full["labels"]) if y != IGNORE_INDEX]) == \
        "4<|im_end|>6<|im_end|>"
    everything = tokenize_conversation(tok, msgs, "smollm2", completion_start=2, train_on="all")
    assert everything["labels"] == everything["input_ids"]
    # Truncation keeps whole turns but never ends on a prompt turn: the completion's turn is cut instead.
    n = len(tokenize_conversation(tok, msgs[:2], "smollm2")["input_ids"]) + 3
    cut = tokenize_conversation(tok, msgs, "smollm2", completion_start=2, max_length=n)
    assert len(cut["input_ids"]) == n and all(y == IGNORE_INDEX for y in cut["labels"])
