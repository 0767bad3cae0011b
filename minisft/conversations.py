"""Record formats -> conversations: what a training record may look like, checked record by record.

Lesson 2 loads data/sft_train.jsonl through `load_conversations`; `train.py` loads every dataset
through it. records.py reads the records (a .jsonl / .json / .parquet file, a folder of shards or a
Hub dataset); this module checks each one and turns it into a conversation. data.py then turns
conversations into examples and batches.

Record formats (the ones the smol course and TRL's SFTTrainer read, unedited). The first record of
a dataset that has one of these keys sets the format of the whole dataset, as TRL decides from its
first example; a later record in another format is a bad record.

    {"messages": [{"role", "content"}, ...]}               chat; loss on the assistant turns
    {"conversations": [{"from", "value"}, ...]}            ShareGPT chat (human -> user, gpt -> assistant)
    {"prompt": [messages], "completion": [messages]}       loss on the completion's assistant turns only;
                                                           the prompt's are context, never targets
    {"prompt": "text", "completion": "text"}               plain: no chat template (data._plain_example)
    {"text": "..."}                                        language modelling: loss on every token

Chat records (the first three) may carry the settings smoltalk2 ships per record and TRL passes to
the chat template: "chat_template_kwargs" (enable_thinking, xml_tools, python_tools,
custom_instructions) and "tools" (a list of dicts, or that list as a JSON string). They apply to
that conversation's render only and win over build_examples' enable_thinking. A null
enable_thinking means off: the real template sees a defined, falsy value. An unknown key is an
error (a typo would otherwise be ignored in silence). Only SmolLM3's template renders them: with
smollm2 or chatml, enable_thinking is ignored (no reasoning mode to switch) and tools or
instructions make that conversation an error (RENDERED_ONLY_BY_SMOLLM3), as on plain records.

In memory a conversation is one of:
    [{"role", "content"}, ...]                             a chat with no settings (the common case)
    {"messages": [...], "settings": {...}, "completion_start": k}
                                                           a chat with template settings (keyword
                                                           arguments of chat_template.render) and/or a
                                                           prompt/completion split: messages[k:] are the
                                                           completion (k = 0: all of it)
    {"prompt": str, "completion": str} or {"text": str}    the plain formats

split_train_val then holds out a validation set, chosen by seed.

Every problem is reported as "location: what is wrong (expected ...)", the location being
"file:line" ("file:row N" for parquet), so a bad record can be found and fixed in an editor.
"""
import json
import random

from .records import BadRecord as _Bad
from .records import read_records

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "tool": "tool",
                  "user": "user", "assistant": "assistant"}
TEMPLATE_KWARGS = ("enable_thinking", "xml_tools", "python_tools", "custom_instructions")
# Settings that put text into the render. A template that does not render them (smollm2, chatml, or
# no template at all) would drop tool descriptions or instructions the answers depend on: an error.
RENDERED_ONLY_BY_SMOLLM3 = ("tools", "xml_tools", "python_tools", "custom_instructions")
FORMATS = {"messages": "chat", "conversations": "chat", "prompt": "prompt/completion", "text": "text"}
MAX_PROBLEMS = 50  # how many skipped-record messages the stats keep (the counts are always complete)


def load_conversations(spec, skip_bad=False, subset=None, split=None):
    """Read a dataset of conversations: a .jsonl/.json/.parquet file, a folder of shards, or a Hub
    dataset id with an optional subset (config) and split (default "train"); see records.py.

    Every record is checked: it decodes, has the dataset's format (module docstring), known
    roles, string contents, at least one message and an assistant turn to train on (in the
    completion, for prompt/completion records), valid settings. A problem raises
    ValueError("location: what is wrong (expected ...)"). With skip_bad=True the bad record is
    skipped and counted instead. Loading nothing at all is always an error.

    Returns (convs, stats):
      convs: list of conversations (module docstring: a list of messages for a plain chat)
      stats: {"records": records seen, "loaded": int, "skipped": int, "format": "chat" |
              "prompt/completion" | "plain prompt/completion" | "text", "skipped_by_reason": {reason: count},
              "problems": first MAX_PROBLEMS messages,
              "sources": ["path:line" (or "path:row N") of each loaded conversation, parallel to convs]}
    """
    stats = {"records": 0, "loaded": 0, "skipped": 0, "format": None, "skipped_by_reason": {}, "problems": [],
             "sources": []}
    convs, first = [], None  # first: (format, key, location) of the record that set the format
    for where, parse in read_records(spec, subset, split):
        stats["records"] += 1
        try:
            rec = parse()
            if first is None and isinstance(rec, dict):
                key = next((k for k in FORMATS if k in rec), None)
                first = (_format_of(rec, key), key, where) if key else None
            convs.append(_conversation(rec, first))
            stats["sources"].append(where)
        except _Bad as bad:
            message = f"{where}: {bad}"
            if not skip_bad:
                raise ValueError(message) from None
            stats["skipped"] += 1
            stats["skipped_by_reason"][bad.reason] = stats["skipped_by_reason"].get(bad.reason, 0) + 1
            if len(stats["problems"]) < MAX_PROBLEMS:
                stats["problems"].append(message)
    stats["loaded"] = len(convs)
    stats["format"] = first[0] if first else None
    if not convs:
        raise ValueError(f"{spec}: no conversation loaded ({stats['records']} records, {stats['skipped']} skipped) "
                         f"(expected at least one valid record)")
    return convs, stats


def _format_of(rec, key):
    if key == "prompt":  # TRL: a list of messages is conversational, a string is plain text
        return "prompt/completion" if isinstance(rec["prompt"], list) else "plain prompt/completion"
    return FORMATS[key]


def _conversation(rec, first):
    """One decoded record -> a conversation (module docstring), or raise _Bad saying what is wrong.

    first: (format, key, location) of the record that set the dataset's format, or None when none has yet.
    """
    if not isinstance(rec, dict):
        raise _Bad("not_object", f"the record is a JSON {type(rec).__name__} "
                                 f"(expected an object with 'messages' or 'conversations')")
    fmt, key, origin = first or (None, None, None)
    like_first = f", as in the dataset's first record, {origin}" if origin else ""
    if fmt in (None, "chat") and ("messages" in rec or "conversations" in rec):
        sharegpt = "messages" not in rec
        messages = _messages(rec, "conversations" if sharegpt else "messages", sharegpt)
        if not any(m["role"] == "assistant" for m in messages):
            raise _Bad("no_assistant", "no assistant turn (expected at least one message from the assistant "
                                       "to train on)")
        settings = _settings(rec)
        return {"messages": messages, "settings": settings, "completion_start": 0} if settings else messages
    if fmt in ("prompt/completion", "plain prompt/completion") and "prompt" in rec:
        if "completion" not in rec:
            raise _Bad("missing_key", "missing key 'completion' (expected 'prompt' and 'completion')")
        if fmt == "plain prompt/completion":
            for k in ("prompt", "completion"):
                if not isinstance(rec[k], str):
                    raise _Bad("bad_content", f"'{k}' is {_json_type(rec[k])} (expected a string{like_first})")
            _no_rendered_settings(rec)
            return {"prompt": rec["prompt"], "completion": rec["completion"]}
        prompt, completion = _messages(rec, "prompt"), _messages(rec, "completion")
        if not any(m["role"] == "assistant" for m in completion):
            raise _Bad("no_assistant", "no assistant turn in 'completion' (expected at least one message from "
                                       "the assistant to train on)")
        return {"messages": prompt + completion, "settings": _settings(rec), "completion_start": len(prompt)}
    if fmt == "text" and "text" in rec:
        if not isinstance(rec["text"], str):
            raise _Bad("bad_content", f"'text' is {_json_type(rec['text'])} (expected a string)")
        _no_rendered_settings(rec)
        return {"text": rec["text"]}
    if fmt in (None, "chat"):
        raise _Bad("missing_key", "missing key 'messages' (expected 'messages': [{role, content}, ...] or ShareGPT "
                                  "'conversations': [{from, value}, ...]" +
                   (f"{like_first})" if origin else "; or 'prompt' and 'completion'; or 'text')"))
    raise _Bad("missing_key", f"missing key {key!r} (expected a {fmt} record{like_first})")


def _json_type(value):
    return "null" if value is None else f"a JSON {type(value).__name__}"


def _messages(rec, key, sharegpt=False):
    """rec[key] -> list of {"role", "content"}, checked."""
    role_key, text_key = ("from", "value") if sharegpt else ("role", "content")
    roles = SHAREGPT_ROLES if sharegpt else {r: r for r in ROLES}
    turns = rec[key]
    if not isinstance(turns, list):
        raise _Bad("bad_messages", f"'{key}' is a JSON {type(turns).__name__} (expected a list of messages)")
    if not turns:
        raise _Bad("empty", f"empty conversation: '{key}' is [] (expected at least one message)")
    out = []
    for j, m in enumerate(turns):
        where = f"message {j}" if key in ("messages", "conversations") else f"{key} message {j}"
        if not isinstance(m, dict):
            raise _Bad("bad_messages", f"{where} is a JSON {type(m).__name__} "
                                       f"(expected an object with '{role_key}' and '{text_key}')")
        for k in (role_key, text_key):
            if k not in m:
                raise _Bad("missing_key", f"{where}: missing key '{k}' (expected '{role_key}' and '{text_key}')")
        role, content = m[role_key], m[text_key]
        if not isinstance(role, str) or role not in roles:
            raise _Bad("unknown_role", f"{where}: unknown {role_key} {role!r} (expected one of {', '.join(roles)})")
        if not isinstance(content, str):
            raise _Bad("bad_content", f"{where}: '{text_key}' is {_json_type(content)} (expected a string)")
        out.append({"role": roles[role], "content": content})
    return out


def _settings(rec):
    """A chat record's "chat_template_kwargs" and "tools" -> keyword arguments for chat_template.render."""
    kwargs = rec.get("chat_template_kwargs")
    kwargs = {} if kwargs is None else kwargs  # parquet gives null for a record without settings
    if not isinstance(kwargs, dict):
        raise _Bad("bad_settings", f"'chat_template_kwargs' is {_json_type(kwargs)} "
                                   f"(expected an object such as {{\"enable_thinking\": false}})")
    settings = {}
    for key, value in kwargs.items():
        if key not in TEMPLATE_KWARGS:
            raise _Bad("bad_settings", f"chat_template_kwargs: unknown key {key!r} (expected "
                                       f"{', '.join(TEMPLATE_KWARGS)}: the settings SmolLM3's template reads)")
        expected = {"enable_thinking": (bool, "true, false or null"), "custom_instructions": (str, "a string or null"),
                    }.get(key, (list, "a list or null"))
        if value is not None and not isinstance(value, expected[0]):
            raise _Bad("bad_settings", f"chat_template_kwargs: {key!r} is {_json_type(value)} "
                                       f"(expected {expected[1]})")
        if key == "enable_thinking":
            settings[key] = bool(value)  # null counts as off: the template sees a defined, falsy value
        elif value is not None:
            settings[key] = value
    tools = rec.get("tools")
    if isinstance(tools, str):  # TRL decodes a tools column stored as a JSON string
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise _Bad("bad_settings", f"'tools' is a string but not valid JSON ({e.msg} at column {e.colno}) "
                                       f"(expected a list of tool descriptions)") from None
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise _Bad("bad_settings", f"'tools' is {_json_type(tools)}"
                                       f"{'' if not isinstance(tools, list) else ' holding a non-object'} "
                                       f"(expected a list of tool descriptions, JSON objects)")
        settings["tools"] = tools
    return settings


def _no_rendered_settings(rec):
    """Plain records have no chat template, so their settings would be dropped: refuse the ones with text."""
    settings = _settings(rec)
    dropped = [k for k in RENDERED_ONLY_BY_SMOLLM3 if settings.get(k)]
    if dropped:
        raise _Bad("bad_settings", f"{' and '.join(dropped)} given, but a plain-text record is not rendered with a "
                                   f"chat template (expected chat records to carry tools or instructions)")


# ---- train / validation split ---------------------------------------------------------------------
def split_train_val(convs, val_fraction=0.05, seed=0):
    """Hold out round(len * val_fraction) items (at least 1 when val_fraction > 0) chosen by `seed`.

    Works on any list (conversations, examples, or zip(convs, sources) to keep them together).
    Both halves keep the original order; they are disjoint and together are the input.
    Returns (train, val).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} (expected 0 <= val_fraction < 1)")
    n = len(convs)
    n_val = 0 if val_fraction == 0 else max(1, round(n * val_fraction))
    if n_val >= n:
        raise ValueError(f"cannot hold out {n_val} of {n} conversations for validation and still train "
                         f"(expected more data or a smaller val_fraction)")
    order = list(range(n))
    random.Random(f"split-{seed}").shuffle(order)
    val_idx = set(order[:n_val])
    train = [c for i, c in enumerate(convs) if i not in val_idx]
    val = [c for i, c in enumerate(convs) if i in val_idx]
    return train, val

