"""Chat templates by hand: a conversation -> the exact text the model sees -> token ids + labels.

Lesson 1 reads `render` (what a chat model is trained on: one string with role markers); lesson 2
reads `tokenize_conversation` and `show_mask` (which tokens carry loss).

A chat model never sees "messages". It sees one string such as

    <|im_start|>system\\nYou are ...<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello!<|im_end|>\\n

Hugging Face ships that format as a Jinja program in tokenizer_config.json. minisft writes the
three formats it supports as plain Python instead, byte for byte equal to the real templates
(tests/test_chat_template.py checks hundreds of conversations against Jinja and transformers):

    "smollm2"  SmolLM2-Instruct: ChatML, plus a default system prompt when the chat has none.
    "smollm3"  SmolLM3-3B: a "## Metadata" system block, /think and /no_think, tools, and an
               empty <think>\\n\\n</think>\\n before every answer in no-think mode.
    "chatml"   plain ChatML (SmolLM v1 Instruct): no default system prompt.

Spans, not strings. The renderer returns a list of `Span(text, kind, index)`; `render` just joins
the texts. The mask comes from the very same spans, so text and labels can never disagree.
Kinds:  "prompt"   text the model only reads: system block, user/tool turns, the "\\n" after an
                   assistant turn, the generation prompt
        "header"   "<|im_start|>assistant\\n" opening an assistant turn
        "think"    SmolLM3's empty "<think>\\n\\n</think>\\n" in no-think mode
        "content"  what the assistant said
        "end"      the "<|im_end|>" closing an assistant turn (the model must learn to stop)
`index` is the message the span came from (None: text the template adds on its own).

Labels (unshifted, Hugging Face convention): labels[i] = input_ids[i] where the token is a
training target, -100 elsewhere; the loss shifts. The string is tokenized in one go and each
token's character offsets say which spans it covers -- token ids are never searched.
Rules this module chooses (and documents):
  * A token that straddles a span boundary is trained if ANY of its characters is trained.
    The one case that occurs: content starting with whitespace merges with the header's "\\n" into
    one token ("\\n\\n"); dropping it would lose the answer's start. (An empty offset range stays masked.)
  * We train content + "<|im_end|>", not the "\\n" after it. (Hugging Face's {% generation %}
    masks of SmolLM3 include that "\\n" and the header; at generation time we stop at <|im_end|>,
    so the "\\n" is never produced.) train_headers=True also trains the header and the empty
    think block.
  * Message text that spells a special token (a literal "<|im_end|>", "<|endoftext|>", ...) is
    rejected with a ValueError naming the message: the tokenizer would turn it into a control
    token, silently teaching the model to end turns mid-sentence.
  * Quirks of the real templates are kept on purpose, because the model was trained on them:
    smollm2/chatml render a system message anywhere as a normal turn; smollm3 uses only
    messages[0] as the system prompt and drops any later system message, renders tool messages
    as user turns and non-string content (None, a list of parts) as "".
  * Where the real templates are lenient, minisft is not: a message without "role" or "content", or
    with another role than system/user/assistant/tool, is a ValueError naming it (Jinja says nothing).
"""
import datetime
import sys
from typing import NamedTuple

TEMPLATES = ("smollm2", "smollm3", "chatml")
TRAIN_ON = ("assistant", "last", "all")
ROLES = ("system", "user", "assistant", "tool")
IGNORE_INDEX = -100  # label of a position that carries no loss (PyTorch cross_entropy's default)

SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
SMOLLM3_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face."
SMOLLM3_THINK_SYSTEM = (
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face. Your role as an assistant "
    "involves thoroughly exploring questions through a systematic thinking process before providing the "
    "final precise and accurate solutions. This requires engaging in a comprehensive cycle of analysis, "
    "summarizing, exploration, reassessment, reflection, backtracking, and iteration to develop "
    "well-considered thinking process. Please structure your response into two main sections: Thought and "
    "Solution using the specified format: <think> Thought section </think> Solution section. In the Thought "
    "section, detail your reasoning process in steps. Each step should include detailed considerations such "
    "as analysing questions, summarizing relevant findings, brainstorming new ideas, verifying the accuracy "
    "of the current steps, refining any errors, and revisiting previous steps. In the Solution section, based "
    "on various attempts, explorations, and reflections from the Thought section, systematically present the "
    "final solution that you deem correct. The Solution section should be logical, accurate, and concise and "
    "detail necessary steps needed to reach the conclusion."
)
SMOLLM3_TOOLS_INTRO = (
    "You may call one or more functions to assist with the user query.\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n\n<tools>\n"
)
SMOLLM3_TOOLS_OUTRO = (
    "</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)
SMOLLM3_PYTHON_INTRO = (
    "When you send a message containing Python code between '<code>' and '</code>' tags, it will be executed "
    "in a stateful Jupyter notebook environment, and you will then be given the output to continued reasoning "
    "in an agentic loop.\n\nYou can use the following tools in your python code like regular functions:\n<tools>\n"
)
SMOLLM3_PYTHON_OUTRO = (
    "</tools>\n\nThe state persists between code executions: so variables that you define in one step are "
    "still available thereafter."
)
EMPTY_THINK = "<think>\n\n</think>\n"


class Span(NamedTuple):
    text: str
    kind: str          # "prompt" | "header" | "think" | "content" | "end"
    index: int | None  # message index it came from; None = added by the template itself


# ---- rendering ---------------------------------------------------------------------------------
def render(messages, template="smollm2", *, add_generation_prompt=False, enable_thinking=None,
           tools=None, today=None, xml_tools=None, python_tools=None, custom_instructions=None):
    """messages (list of {"role", "content"}) -> the exact string the model sees.

    add_generation_prompt appends the header of the next assistant turn (for generation).
    The other settings are used by "smollm3" only; smollm2 and chatml ignore them, as their real
    templates do. enable_thinking (None = the template's default: on); today (a datetime.date;
    None = today); tools (list of dicts, as transformers' apply_chat_template takes them);
    xml_tools and python_tools (lists, each item written with Python's str(): smoltalk2 ships
    them as JSON strings); custom_instructions (str: the "## Custom Instructions" text of a chat
    without a system message -- a system message replaces it). These are the template variables
    SmolLM3's template reads; smoltalk2 stores them per record in "chat_template_kwargs".
    """
    return "".join(s.text for s in render_spans(
        messages, template, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking,
        tools=tools, today=today, xml_tools=xml_tools, python_tools=python_tools,
        custom_instructions=custom_instructions))


def render_spans(messages, template="smollm2", *, add_generation_prompt=False, enable_thinking=None,
                 tools=None, today=None, xml_tools=None, python_tools=None, custom_instructions=None):
    """Like `render`, but returns the pieces: list[Span(text, kind, index)] (see module docstring)."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}: expected one of {', '.join(TEMPLATES)}")
    _check_messages(messages, template)
    if template == "smollm3":
        return _smollm3_spans(messages, add_generation_prompt, enable_thinking, today,
                              _tools_block(tools, xml_tools, python_tools), custom_instructions)
    default_system = SMOLLM2_SYSTEM if template == "smollm2" else None
    return _chatml_spans(messages, add_generation_prompt, default_system)


def _turn(role, content, i):
    # A turn the model only reads: user, tool, system.
    return [Span(f"<|im_start|>{role}\n{content}<|im_end|>\n", "prompt", i)]


def _assistant_turn(content, i, think=""):
    spans = [Span("<|im_start|>assistant\n", "header", i)]
    if think:
        spans.append(Span(think, "think", i))
    return spans + [Span(content, "content", i), Span("<|im_end|>", "end", i), Span("\n", "prompt", i)]


def _chatml_spans(messages, add_generation_prompt, default_system):
    spans = []
    # SmolLM2 adds its default system prompt only when messages[0] is not a system message
    # (and only if there is a message at all); a system message elsewhere is a normal turn.
    if default_system is not None and messages and messages[0]["role"] != "system":
        spans += _turn("system", default_system, None)
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            spans += _assistant_turn(m["content"], i)
        else:
            spans += _turn(m["role"], m["content"], i)
    if add_generation_prompt:
        spans.append(Span("<|im_start|>assistant\n", "prompt", None))
    return spans


def _tools_block(tools, xml_tools, python_tools):
    """The "### Tools" section of SmolLM3's system turn ("" when there are no tools).

    `tools` (what transformers passes) replaces xml_tools when it is non-empty. Both lists can be
    present: the XML block comes first, the Python block right after it, with no separator.
    """
    for name, value in (("tools", tools), ("xml_tools", xml_tools), ("python_tools", python_tools)):
        if value is not None and not isinstance(value, (list, tuple)):
            raise ValueError(f"{name}: expected a list of tool descriptions, got {type(value).__name__}")
    xml = tools or xml_tools
    if not (xml or python_tools):
        return ""
    # Each tool is written with Python's str() (Jinja's `|string` filter), not as JSON.
    block = "### Tools\n\n"
    if xml:
        block += SMOLLM3_TOOLS_INTRO + "".join(str(t) + "\n" for t in xml) + SMOLLM3_TOOLS_OUTRO
    if python_tools:
        block += SMOLLM3_PYTHON_INTRO + "".join(str(t) + "\n" for t in python_tools) + SMOLLM3_PYTHON_OUTRO
    return block + "\n\n<|im_end|>\n"


def _smollm3_spans(messages, add_generation_prompt, enable_thinking, today, tools_block, custom_instructions):
    if custom_instructions is not None and not isinstance(custom_instructions, str):
        raise ValueError(f"custom_instructions: expected a string, got {type(custom_instructions).__name__}")
    if today is None:
        today = datetime.date.today()
    if not isinstance(today, datetime.date):
        raise ValueError(f"today: expected a datetime.date, got {today!r}")

    # Reasoning mode: the enable_thinking flag (default on), overridden by /think or /no_think
    # in the system message, which are then cut out of it.
    think = True if enable_thinking is None else bool(enable_thinking)
    has_system = messages[0]["role"] == "system"
    # Without a system message the custom_instructions setting is used verbatim; a system message
    # replaces it (even an empty one, which then leaves the default prompt).
    instructions = custom_instructions or ""
    if has_system:
        system = messages[0]["content"]
        if "/no_think" in system:
            think = False
        elif "/think" in system:
            think = True
        instructions = system.replace("/no_think", "").replace("/think", "").rstrip()

    head = "<|im_start|>system\n"
    if has_system and "/system_override" in system:
        # The user's text replaces the whole metadata block (and the tools).
        head += instructions.replace("/system_override", "").rstrip() + "<|im_end|>\n"
    else:
        head += ("## Metadata\n\nKnowledge Cutoff Date: June 2025\n"
                 # == transformers' strftime_now("%d %B %Y"), e.g. "05 March 2025"
                 f"Today Date: {today.strftime('%d %B %Y')}\n"
                 f"Reasoning Mode: {'/think' if think else '/no_think'}\n\n"
                 "## Custom Instructions\n\n")
        if instructions:
            head += instructions + "\n\n"
        else:
            head += (SMOLLM3_THINK_SYSTEM if think else SMOLLM3_SYSTEM) + "\n\n"
        # Quirk of the real template: without tools the system turn is never closed by <|im_end|>.
        head += tools_block
    spans = [Span(head, "prompt", 0 if has_system else None)]

    empty_think = "" if think else EMPTY_THINK
    for i, m in enumerate(messages):
        content = m.get("content")
        if not isinstance(content, str):
            content = ""  # the template renders non-string content (None, lists of parts) as ""
        if m["role"] == "user" or m["role"] == "tool":
            spans += _turn("user", content, i)  # tool results are shown as user turns
        elif m["role"] == "assistant":
            spans += _assistant_turn(content.lstrip("\n"), i, empty_think)
        # role "system": messages[0] went into the header; a later one is dropped, as the template does.
    if add_generation_prompt:
        spans.append(Span("<|im_start|>assistant\n" + empty_think, "prompt", None))
    return spans


def _check_messages(messages, template):
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages: expected a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"message {i}: expected a dict with 'role' and 'content', got {type(m).__name__}")
        for key in ("role", "content"):
            # The templates would quietly render a missing key as "" or drop the message: say so instead.
            if key not in m:
                raise ValueError(f"message {i}: missing key {key!r} (expected a dict with 'role' and 'content')")
        role = m["role"]
        if role not in ROLES:
            raise ValueError(f"message {i}: role {role!r} is not one of {', '.join(ROLES)}")
        content = m["content"]
        # smollm2/chatml concatenate strings (Jinja fails on anything else); smollm3 shows non-strings
        # as "", except the system prompt, which it edits with string methods.
        needs_str = template != "smollm3" or (i == 0 and role == "system")
        if needs_str and not isinstance(content, str):
            raise ValueError(f"message {i} ({role}): content must be a string for template {template!r}, "
                             f"got {type(content).__name__}")
    if template == "smollm3" and not messages:
        raise ValueError("messages: the smollm3 template needs at least one message")


# ---- tokenizing and masking --------------------------------------------------------------------
def tokenize_conversation(tokenizer, messages, template="smollm2", *, train_on="assistant", max_length=None,
                          train_headers=False, enable_thinking=None, tools=None, today=None, xml_tools=None,
                          python_tools=None, custom_instructions=None, completion_start=0):
    """One conversation -> {"input_ids": list[int], "labels": list[int]} (same length, unshifted).

    train_on: "assistant" = every assistant turn (content + its <|im_end|>), "last" = only the final
    assistant turn, "all" = every token. train_headers also trains "<|im_start|>assistant\\n" and the
    empty think block. completion_start: messages before this index are prompt (a prompt/completion
    record): their assistant turns are never trained, except with train_on="all". max_length: drop
    trailing messages back to the last trainable assistant turn that fits ("last" then means the last
    turn kept); if not even the first one fits, keep the chat up to it and cut the tokens at
    max_length. The labels may then be all -100: the caller decides what to do with such an example.
    The template settings (enable_thinking, tools, ...) are those of `render`. Raises ValueError
    when a message spells a special token.
    """
    check_options(template, train_on, max_length)
    _check_messages(messages, template)
    _reject_special_tokens(tokenizer, messages)
    # Fix the date once, so that a re-render while truncating cannot cross midnight.
    opts = dict(template=template, train_on=train_on, train_headers=train_headers, completion_start=completion_start,
                settings=dict(enable_thinking=enable_thinking, tools=tools, today=today or datetime.date.today(),
                              xml_tools=xml_tools, python_tools=python_tools, custom_instructions=custom_instructions))

    ids, labels = _tokenize(tokenizer, messages, **opts)
    if max_length is None or len(ids) <= max_length:
        return {"input_ids": ids, "labels": labels}

    # Too long: keep whole turns, ending on the latest trainable assistant turn that fits.
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= completion_start]
    for k in reversed(assistant_turns):
        ids, labels = _tokenize(tokenizer, messages[:k + 1], **opts)
        if len(ids) <= max_length:
            return {"input_ids": ids, "labels": labels}
    # Not even the first one fits: keep the chat up to it and cut inside it.
    if assistant_turns:
        ids, labels = _tokenize(tokenizer, messages[:assistant_turns[0] + 1], **opts)
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def check_options(template, train_on, max_length=None):
    """The settings of tokenize_conversation, checked once (data.py checks them before a whole dataset)."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}: expected one of {', '.join(TEMPLATES)}")
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on={train_on!r}: expected one of {', '.join(TRAIN_ON)}")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length={max_length!r}: expected a positive integer or None")


def _tokenize(tokenizer, messages, template, train_on, train_headers, completion_start, settings):
    spans = render_spans(messages, template, **settings)
    text = "".join(s.text for s in spans)
    ids, offsets = tokenizer.encode_with_offsets(text)

    # Mark the trained characters, then train every token that covers at least one of them.
    kinds = {"content", "end"} | ({"header", "think"} if train_headers else set())
    last = max((s.index for s in spans if s.kind == "content"), default=None)
    trained = bytearray(len(text))  # 1 = this character is part of a training target
    pos = 0
    for s in spans:
        in_completion = s.index is not None and s.index >= completion_start
        if train_on == "all" or (s.kind in kinds and in_completion and (train_on == "assistant" or s.index == last)):
            trained[pos:pos + len(s.text)] = b"\x01" * len(s.text)
        pos += len(s.text)
    labels = [t if 1 in trained[a:b] else IGNORE_INDEX for t, (a, b) in zip(ids, offsets)]
    return list(ids), labels


def _reject_special_tokens(tokenizer, messages):
    specials = sorted(tokenizer.special_tokens)
    for i, m in enumerate(messages):
        content = m.get("content")
        if not isinstance(content, str):
            continue
        for tok in specials:
            if tok in content:
                raise ValueError(f"message {i} ({m['role']}): content contains the special token {tok!r}, which "
                                 "the tokenizer would turn into a control token; remove or rewrite it")


# ---- looking at a mask -------------------------------------------------------------------------
GREEN, GREY, RESET = "\033[32m", "\033[90m", "\033[0m"


def show_mask(tokenizer, input_ids, labels, color=None):
    """A printable view of which tokens are trained: green (or [[like this]]) = trained, grey = masked.

    color=None: colours when stdout is a terminal, plain [[ ]] markers otherwise.
    Newlines show as ↵ (and still break the line). The last line counts tokens.
    """
    if len(input_ids) != len(labels):
        raise ValueError(f"show_mask: {len(input_ids)} input_ids but {len(labels)} labels")
    if color is None:
        color = sys.stdout.isatty()
    # Decode runs of tokens with the same status together, so characters split over
    # several byte-level tokens come out whole.
    runs = []
    for t, lab in zip(input_ids, labels):
        on = lab != IGNORE_INDEX
        if runs and runs[-1][0] == on:
            runs[-1][1].append(t)
        else:
            runs.append((on, [t]))
    out = []
    for on, ids in runs:
        text = tokenizer.decode(ids).replace("\n", "↵\n")
        if color:
            out.append((GREEN if on else GREY) + text + RESET)
        else:
            out.append(f"[[{text}]]" if on else text)
    n_trained = sum(lab != IGNORE_INDEX for lab in labels)
    key = "green = trained, grey = masked" if color else "[[...]] = trained, rest masked"
    pct = 100.0 * n_trained / max(1, len(labels))
    return "".join(out) + f"\n-- {len(labels)} tokens, {n_trained} trained ({pct:.1f}%); {key}"


def template_for(tokenizer_or_template):
    """Guess the template name from a tokenizer's chat template (or the template string itself).

    "/no_think" or "/system_override" in it -> "smollm3"; SmolLM2's default system prompt ->
    "smollm2"; other ChatML (<|im_start|>) -> "chatml"; no template at all (a base model) ->
    "chatml". Anything else is not a format minisft can render: ValueError.
    """
    source = getattr(tokenizer_or_template, "chat_template", tokenizer_or_template)
    if source is None:
        return "chatml"
    if not isinstance(source, str):
        raise ValueError(f"chat template: expected a string, got {type(source).__name__}")
    if "/no_think" in source or "/system_override" in source:
        return "smollm3"
    if "SmolLM, trained by Hugging Face" in source:
        return "smollm2"
    if "<|im_start|>" in source:
        return "chatml"
    raise ValueError("chat template is not SmolLM2, SmolLM3 or ChatML; pass the template name "
                     f"explicitly (one of {', '.join(TEMPLATES)})")
