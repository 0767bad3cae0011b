"""From a dataset of conversations to the batches a training step eats.

Lesson 2 walks through this file; `train.py` uses it. The way through:

    load_conversations   a .jsonl / .json / .parquet file, a folder of shards or a Hub dataset
                         (records.py reads them) -> list of conversations, every record validated;
                         errors name "file:line: what is wrong" ("file:row N" for parquet)
    split_train_val      a held-out validation set, chosen by seed
    build_examples       conversation -> {"input_ids", "labels"} via chat_template.tokenize_conversation;
                         examples with nothing left to train on are dropped and counted
    sample_prompt        the prompt a conversation gives for generating a sample answer
    pack_examples        (optional) several conversations in one row, attention kept apart
    pack_to_budget       (optional) micro-batches of one packed row each, up to a token budget (token_budget)
    global_batches       one epoch's sample order, cut into the batches of each optimizer step
    micro_batches        a global batch split into the pieces that fit in memory
    collate              a list of examples -> padded tensors [B, T]

Record formats (the ones the smol course and TRL's SFTTrainer read, unedited). The first record of
a dataset that has one of these keys sets the format of the whole dataset, as TRL decides from its
first example; a later record in another format is a bad record.

    {"messages": [{"role", "content"}, ...]}               chat; loss on the assistant turns
    {"conversations": [{"from", "value"}, ...]}            ShareGPT chat (human -> user, gpt -> assistant)
    {"prompt": [messages], "completion": [messages]}       loss on the completion's assistant turns only;
                                                           the prompt's are context, never targets
    {"prompt": "text", "completion": "text"}               plain: no chat template (see _plain_example)
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

Two rules matter more than the rest:

1. Padding is masked by POSITION, never by token id. SmolLM2 pads with `<|im_end|>`, the very
   token that ends every assistant turn and that the model must learn to emit. Masking "labels
   == pad_id" would silently stop it learning when to stop talking.
2. The sample order is a function of (seed, epoch, global batch size) only. How a global batch is
   split into micro-batches (or across processes) decides who computes a sample, never which
   optimizer step sees it, so changing the micro-batch size does not change training.

Labels are unshifted everywhere: labels[t] is the token the model should predict at position t-1.
The shift happens inside the loss, so labels[0] can never be a target.
"""
import bisect
import datetime
import json
import math
import random

import torch

from .chat_template import check_options, render, tokenize_conversation
from .records import BadRecord as _Bad
from .records import read_records

IGNORE = -100  # label of a position that carries no loss (torch's cross_entropy ignore_index)
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "tool": "tool",
                  "user": "user", "assistant": "assistant"}
TEMPLATE_KWARGS = ("enable_thinking", "xml_tools", "python_tools", "custom_instructions")
# Settings that put text into the render. A template that does not render them (smollm2, chatml, or
# no template at all) would drop tool descriptions or instructions the answers depend on: an error.
RENDERED_ONLY_BY_SMOLLM3 = ("tools", "xml_tools", "python_tools", "custom_instructions")
FORMATS = {"messages": "chat", "conversations": "chat", "prompt": "prompt/completion", "text": "text"}
MAX_PROBLEMS = 50  # how many skipped-record messages the stats keep (the counts are always complete)


# ---------------------------------------------------------------------------------------------
# Loading and validation
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Train / validation split
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Tokenized examples
# ---------------------------------------------------------------------------------------------
def count_targets(labels):
    """Positions that carry loss after the shift: labels[..., 1:] != -100.

    labels: list[int], list[list[int]], or a tensor [T] / [B, T]. labels[0] never counts: no
    position before it can predict it.
    """
    if isinstance(labels, torch.Tensor):
        return int((labels[..., 1:] != IGNORE).sum())
    if labels and isinstance(labels[0], (list, tuple)):
        return sum(count_targets(row) for row in labels)
    return sum(1 for x in labels[1:] if x != IGNORE)


def build_examples(tokenizer, convs, template="smollm2", train_on="assistant", max_length=None,
                   train_headers=False, *, enable_thinking=None, today=None, sources=None, skip_bad=False):
    """Tokenize conversations into training examples.

    Each chat goes through chat_template.tokenize_conversation with its own settings (which win
    over enable_thinking here); prompt/completion chats train only their completion's assistant
    turns (train_on "last" = the final one; "all" still trains every token, prompt included, as
    TRL's completion_only_loss=False). Chats are truncated to max_length keeping whole turns where
    they can; plain records are cut at max_length (TRL's default "keep_start"). An example left
    with no target token (after the shift) is dropped and counted: an all -100 row would cost
    compute and teach nothing. A conversation the template cannot render as asked -- text spelling
    a special token, or tools/instructions that smollm2/chatml would drop (see
    RENDERED_ONLY_BY_SMOLLM3; their enable_thinking is ignored, as their templates have no
    reasoning mode) -- raises ValueError naming it: sources[i] ("path:line", see
    load_conversations' stats) when given, else "conversation i"; with skip_bad it is skipped and
    counted instead.

    Returns (examples, stats):
      examples: list of {"input_ids": list[int], "labels": list[int]} (same length, labels unshifted)
      stats: {"kept", "dropped_no_target", "truncated", "skipped_bad", "problems",
              "tokens" (sum of lengths kept), "target_tokens" (loss positions after the shift)}
    """
    # A bad setting is no fault of any conversation: fail before blaming (or, with skip_bad, skipping) them all.
    check_options(template, train_on, max_length)
    # One date for the whole dataset (the smollm3 system prompt shows it): a build that runs past
    # midnight must not render two different system prompts.
    today = today or datetime.date.today()
    options = dict(train_on=train_on, train_headers=train_headers, enable_thinking=enable_thinking, today=today)
    examples = []
    stats = {"kept": 0, "dropped_no_target": 0, "truncated": 0, "skipped_bad": 0, "problems": [],
             "tokens": 0, "target_tokens": 0}
    for i, conv in enumerate(convs):
        try:
            if isinstance(conv, dict) and "messages" not in conv:
                ex, cut = _plain_example(tokenizer, conv.get("prompt", ""), conv.get("completion", conv.get("text")),
                                         max_length)
            else:
                messages, kw = _chat_options(conv, template, options)
                ex = tokenize_conversation(tokenizer, messages, template, **kw)
                cut = max_length is not None and len(ex["input_ids"]) > max_length
                if cut:  # tokenize again with the limit: only the long ones pay twice, and we know it was cut
                    ex = tokenize_conversation(tokenizer, messages, template, max_length=max_length, **kw)
            stats["truncated"] += cut
        except ValueError as e:
            message = f"{sources[i] if sources is not None else f'conversation {i}'}: {e}"
            if not skip_bad:
                raise ValueError(message) from None
            stats["skipped_bad"] += 1
            if len(stats["problems"]) < MAX_PROBLEMS:
                stats["problems"].append(message)
            continue
        n_targets = count_targets(ex["labels"])
        if n_targets == 0:
            stats["dropped_no_target"] += 1
            continue
        examples.append({"input_ids": list(ex["input_ids"]), "labels": list(ex["labels"])})
        stats["tokens"] += len(ex["input_ids"])
        stats["target_tokens"] += n_targets
    stats["kept"] = len(examples)
    return examples, stats


def _chat_options(conv, template, options):
    """A chat conversation -> (messages, keyword arguments for tokenize_conversation)."""
    if not isinstance(conv, dict):
        return conv, options
    settings = conv.get("settings", {})
    if template != "smollm3":
        dropped = [k for k in RENDERED_ONLY_BY_SMOLLM3 if settings.get(k)]
        if dropped:
            raise ValueError(f"{' and '.join(dropped)} given, but the {template} template does not render them "
                             f"(expected the smollm3 template, or the text moved into the messages)")
        settings = {}
    return conv["messages"], {**options, **settings, "completion_start": conv.get("completion_start", 0)}


def _plain_example(tokenizer, prompt, completion, max_length):
    """A plain record, tokenized the way TRL 1.16's SFTTrainer does it -> (example, truncated).

    TRL appends the tokenizer's EOS to the completion (to the text, for {"text"}) unless it already
    ends with it, tokenizes prompt + completion as one string with no chat template, and masks the
    prompt: the completion starts where the tokens of the prompt alone and of prompt + completion
    stop agreeing (a token merged across the boundary counts as completion). A {"text"} record is
    all completion: every token is a target. Special-token strings in the text become their
    control tokens, as the tokenizer reads them: plain text is taken as written. SmolLM tokenizers
    add no BOS, so tokenizer.encode gives the ids TRL's tokenizer(text) gives. Over max_length the
    tokens are cut at the end (TRL's truncation_mode="keep_start").
    """
    eos = tokenizer.eos_token
    if not eos:
        raise ValueError("the tokenizer has no EOS token, which plain-text records end with "
                         "(expected an eos_token in tokenizer_config.json)")
    if not completion.endswith(eos):
        completion += eos
    ids = list(tokenizer.encode(prompt + completion))
    start = 0
    if prompt:
        for a, b in zip(tokenizer.encode(prompt), ids):
            if a != b:
                break
            start += 1
    labels = [IGNORE] * start + ids[start:]
    cut = max_length is not None and len(ids) > max_length
    if cut:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels}, cut


def sample_prompt(conv, template, *, enable_thinking=None, today=None):
    """The prompt a conversation gives for a sample answer -> (question_text, prompt_text), or None.

    Chats: prompt_text is the render of everything before the last assistant turn, with the
    generation prompt and the conversation's own settings (which win over enable_thinking);
    question_text is the last user message before it. Plain prompt/completion: both are the prompt
    string (no template). None when there is nothing to prompt with: a {"text"} record, an empty
    plain prompt, or no user message before the last assistant turn. Raises ValueError like
    build_examples for settings the template would drop.
    """
    if isinstance(conv, dict) and "messages" not in conv:
        prompt = conv.get("prompt")
        return (prompt, prompt) if prompt else None
    messages, kw = _chat_options(conv, template, {"enable_thinking": enable_thinking, "today": today})
    kw.pop("completion_start", None)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    users = [m["content"] for m in messages[:last] if m["role"] == "user"]
    if not users:
        return None
    return users[-1], render(messages[:last], template, add_generation_prompt=True, **kw)


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------
def pack_examples(examples, max_length):
    """Pack several examples into rows of at most max_length tokens (done once, before batching).

    Greedy first-fit decreasing: take examples longest first (ties by index, so the result is
    deterministic) and put each into the first row that still has room. Each packed row is
      {"input_ids", "labels", "position_ids", "seq_ids"}: lists of equal length, where
    position_ids restart at 0 for every conversation (each one sees the positions it would see
    alone), seq_ids number the conversations 1..k (collate turns them into the attention_mask, a
    block-diagonal causal mask in the model), and the label of each conversation's first token is
    -100: after the shift it would be "predicted" from the end of the previous conversation.
    """
    lengths = [len(ex["input_ids"]) for ex in examples]
    for i, n in enumerate(lengths):
        if n > max_length:
            raise ValueError(f"example {i} has {n} tokens, more than max_length={max_length} "
                             f"(expected build_examples(..., max_length={max_length}) before packing)")
    order = sorted(range(len(examples)), key=lambda i: -lengths[i])  # stable: ties keep index order
    rows = []
    for row, i in zip(_first_fit(order, lengths, max_length), order):
        if row == len(rows):
            rows.append({"input_ids": [], "labels": [], "position_ids": [], "seq_ids": []})
        r, ex, n = rows[row], examples[i], lengths[i]
        r["input_ids"] += ex["input_ids"]
        r["labels"] += [IGNORE] + list(ex["labels"][1:])
        r["position_ids"] += list(range(n))
        r["seq_ids"] += [(r["seq_ids"][-1] if r["seq_ids"] else 0) + 1] * n
    return rows


def _first_fit(order, lengths, capacity):
    """Row index for each item of `order`: the lowest-numbered row with room left.

    free[] is a binary tree of maxima over the rows' free space (leaves = rows, all starting
    empty), so finding the first row with room is a walk down the tree: O(log n) per item
    instead of scanning every row. Rows never used have full capacity, so a new row is opened
    exactly when no earlier one fits.
    """
    size = 1
    while size < max(len(order), 1):
        size *= 2
    free = [0] * size + [capacity] * size  # free[size + r] = room left in row r; free[k] = max of children
    for k in range(size - 1, 0, -1):
        free[k] = max(free[2 * k], free[2 * k + 1])
    rows = []
    for i in order:
        k = 1
        while k < size:  # go left whenever the left subtree has a row with room
            k = 2 * k if free[2 * k] >= lengths[i] else 2 * k + 1
        rows.append(k - size)
        free[k] -= lengths[i]
        while k > 1:
            k //= 2
            free[k] = max(free[2 * k], free[2 * k + 1])
    return rows


def token_budget(lengths, batch_size, max_tokens=None):
    """Tokens one packed micro-batch may hold: max_tokens when given, else batch_size * mean length.

    Why tokens and not rows: a padded micro-batch of batch_size examples holds batch_size * (mean
    length) real tokens; a packed row of max_length holds several conversations, so batch_size
    PACKED rows would be several times more data per step than the recipe was tuned for. A budget
    of batch_size * mean length keeps about batch_size conversations per micro-batch, packed or not:
    the same learning rate and number of steps still fit, and the time no longer goes on padding.
    """
    if max_tokens is not None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens} (expected >= 1)")
        return max_tokens
    if batch_size < 1:
        raise ValueError(f"micro batch_size={batch_size} (expected >= 1)")
    return batch_size * max(1, -(-sum(lengths) // max(len(lengths), 1)))  # ceil of the mean


def pack_to_budget(examples, max_tokens, max_length):
    """Pack examples into micro-batches of at most max_tokens real tokens (done once, before batching).

    Best-fit decreasing, from the longest example down (ties by index: the result is deterministic):
    each example goes into the FULLEST micro-batch that still has room for it, which fills nearly
    every micro-batch to the budget. A micro-batch is ONE row holding all its conversations, up to
    max_tokens long: on a CPU the model attends per conversation (Attention.per_conversation), so a
    long row costs no more attention than short ones, and one row has no padding at all. (Rows of
    max_length would pad: 3 conversations of 700-1000 tokens need 3 rows of 1024, a quarter of them
    padding that every matmul of the step computes; measured on SmolLM2-135M, one row ran 1.3-1.4x the
    tokens/s.)
    No example may be longer than max_length (build_examples cuts them) or than the budget.

    Returns a list of micro-batches; each is a list of one packed row in the format of pack_examples
    ({"input_ids", "labels", "position_ids", "seq_ids"}), ready for collate.
    """
    lengths = [len(ex["input_ids"]) for ex in examples]
    for i, n in enumerate(lengths):
        if n > min(max_length, max_tokens):
            what = f"max_length={max_length}" if max_length <= max_tokens else f"the token budget max_tokens={max_tokens}"
            raise ValueError(f"example {i} has {n} tokens, more than {what} "
                             f"(expected a budget >= the longest example, and build_examples(..., max_length=...) first)")
    order = sorted(range(len(examples)), key=lambda i: -lengths[i])
    rows = []
    for b, i in zip(_best_fit(order, lengths, max_tokens), order):
        if b == len(rows):
            rows.append({"input_ids": [], "labels": [], "position_ids": [], "seq_ids": []})
        _append(rows[b], examples[i])  # each row keeps the longest-first order
    return [[row] for row in rows]


def _append(row, ex):
    """Add one conversation to a packed row: positions restart, a new sequence id, first label -100."""
    n = len(ex["input_ids"])
    row["input_ids"] += ex["input_ids"]
    row["labels"] += [IGNORE] + list(ex["labels"][1:])
    row["position_ids"] += list(range(n))
    row["seq_ids"] += [(row["seq_ids"][-1] if row["seq_ids"] else 0) + 1] * n


def _best_fit(order, lengths, capacity):
    """Row index for each item of `order`: the row with the LEAST room that still fits it (a new row
    when none does). `free` is kept sorted as (room left, row) pairs, so the best row is one
    bisect away."""
    free, rows, opened = [], [], 0
    for i in order:
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k == len(free):
            row, room, opened = opened, capacity, opened + 1
        else:
            room, row = free.pop(k)
        rows.append(row)
        if room - lengths[i] > 0:
            bisect.insort(free, (room - lengths[i], row))
    return rows


# ---------------------------------------------------------------------------------------------
# Sample order
# ---------------------------------------------------------------------------------------------
def global_batches(lengths, global_batch_size, seed, epoch, group_by_length=False, group_batches=50):
    """One epoch's sample order, cut into global batches (one optimizer step each).

    lengths: the length of each example (only its size matters unless group_by_length).
    The order is a function of (seed, epoch, global_batch_size) [and the lengths when grouping]:
    nothing about micro-batches or processes enters, so they cannot change what a step sees.

    group_by_length: after the shuffle, sort each chunk of `group_batches` global batches by
    length, cut it into batches (similar lengths -> little padding), then shuffle the order of
    the batches so the model does not see all long batches together.

    Returns a list of global batches (lists of example indices); a partial last batch is kept last.
    """
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size={global_batch_size} (expected >= 1)")
    rng = random.Random(f"order-{seed}-{epoch}")  # a string seed: no collisions between (seed, epoch) pairs
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        chunk = global_batch_size * group_batches
        order = [i for s in range(0, len(order), chunk)
                 for i in sorted(order[s:s + chunk], key=lambda i: -lengths[i])]
    batches = [order[s:s + global_batch_size] for s in range(0, len(order), global_batch_size)]
    if group_by_length:
        full = [b for b in batches if len(b) == global_batch_size]
        rng.shuffle(full)
        batches = full + [b for b in batches if len(b) < global_batch_size]
    return batches


def micro_batches(indices, batch_size):
    """Split one global batch into consecutive micro-batches of at most batch_size (order kept).

    Their concatenation is the global batch, so gradient accumulation over them (or processes
    each taking some of them) trains on exactly the samples of that step.
    """
    if batch_size < 1:
        raise ValueError(f"micro batch_size={batch_size} (expected >= 1)")
    return [list(indices[s:s + batch_size]) for s in range(0, len(indices), batch_size)]


# ---------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------
def collate(examples, pad_id):
    """A list of examples (plain or packed) -> a batch of tensors, right-padded to the longest.

    Returns a dict of long tensors, all [B, T] with T = the longest example:
      input_ids       pad_id in the padding (any id would do: padding is masked by position)
      labels          -100 in the padding; real labels untouched, INCLUDING targets equal to pad_id
      attention_mask  sequence id per position: 1 for a plain example, 1..k in a packed row, 0 = padding
      position_ids    0..n-1 per conversation (restarting inside packed rows), 0 in the padding
    """
    T = max(len(ex["input_ids"]) for ex in examples)
    batch = {k: torch.full((len(examples), T), fill, dtype=torch.long)
             for k, fill in (("input_ids", pad_id), ("labels", IGNORE), ("attention_mask", 0), ("position_ids", 0))}
    for b, ex in enumerate(examples):
        n = len(ex["input_ids"])
        if len(ex["labels"]) != n:
            raise ValueError(f"example {b}: {len(ex['labels'])} labels for {n} input_ids (expected equal lengths)")
        batch["input_ids"][b, :n] = torch.tensor(ex["input_ids"])
        batch["labels"][b, :n] = torch.tensor(ex["labels"])
        batch["attention_mask"][b, :n] = torch.tensor(ex["seq_ids"]) if "seq_ids" in ex else 1
        batch["position_ids"][b, :n] = torch.tensor(ex["position_ids"]) if "position_ids" in ex else torch.arange(n)
    return batch


def step_batches(examples, global_batch_size, micro_batch_size, seed, pad_id, group_by_length=False, rank=0, world=1,
                 packed=False):
    """-> batches(step): the collated micro-batches of optimizer step `step` for process `rank`.

    Step s is global batch s % steps_per_epoch of epoch s // steps_per_epoch (global_batches), so
    any step can be rebuilt on its own: a resumed run sees exactly the batches it would have seen.
    Process `rank` takes rows rank, rank + world, ... of the global batch. batches.steps_per_epoch
    tells the epoch length. packed=True: each example is a whole micro-batch, the list of rows
    pack_to_budget makes, so micro_batch_size must be 1."""
    unit = (lambda i: examples[i]) if packed else (lambda i: [examples[i]])  # index -> list of rows
    lengths = [sum(len(r["input_ids"]) for r in unit(i)) for i in range(len(examples))]
    orders = {}  # the current epoch's global batches (one epoch kept at a time)

    def batches(step):
        epoch, b = divmod(step, batches.steps_per_epoch)
        if epoch not in orders:
            orders.clear()
            orders[epoch] = global_batches(lengths, global_batch_size, seed, epoch, group_by_length)
        gb = orders[epoch][b]
        mine = micro_batches(gb[rank::world], micro_batch_size)
        if not mine:  # fewer examples than processes in a last partial batch: a no-target stand-in
            stand_in = collate(unit(gb[0]), pad_id)
            stand_in["labels"].fill_(IGNORE)
            return [stand_in]
        return [collate([row for i in mb for row in unit(i)], pad_id) for mb in mine]

    batches.steps_per_epoch = math.ceil(len(examples) / global_batch_size)
    return batches


def to_device(batch, device):
    """Move a collated batch to `device`. An attention mask of all ones (no padding, no packing)
    is dropped: the model then uses the plain causal mask, which is faster."""
    plain = bool((batch["attention_mask"] == 1).all())  # checked before the copy: no GPU sync
    if torch.device(device).type == "cuda":
        # Page-locked host memory lets the copy run by DMA while the GPU still works on the last
        # micro-batch (non_blocking); from ordinary memory CUDA first stages it through a pinned buffer.
        batch = {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    else:
        batch = {k: v.to(device) for k, v in batch.items()}
    if plain:
        batch["attention_mask"] = None
    return batch


def iter_steps(examples, global_batch_size, micro_batch_size, seed, epoch, pad_id, group_by_length=False):
    """Yield, for each optimizer step of one epoch, the list of its collated micro-batches."""
    lengths = [len(ex["input_ids"]) for ex in examples]
    for gb in global_batches(lengths, global_batch_size, seed, epoch, group_by_length):
        yield [collate([examples[i] for i in mb], pad_id) for mb in micro_batches(gb, micro_batch_size)]


def padding_efficiency(batch):
    """Real tokens / slots of a collated batch: 1.0 means no compute spent on padding."""
    mask = batch["attention_mask"]
    return float((mask != 0).sum()) / mask.numel()


def epoch_padding_efficiency(lengths, global_batch_size, micro_batch_size, seed=0, epoch=0, group_by_length=False):
    """padding_efficiency over a whole epoch's micro-batches, from the lengths alone (no tensors)."""
    real = slots = 0
    for gb in global_batches(lengths, global_batch_size, seed, epoch, group_by_length):
        for mb in micro_batches(gb, micro_batch_size):
            real += sum(lengths[i] for i in mb)
            slots += len(mb) * max(lengths[i] for i in mb)
    return real / slots if slots else 1.0
