"""From a file of conversations to the batches a training step eats.

Lesson 2 walks through this file; `train.py` uses it. The way through:

    load_conversations   .jsonl / .json -> list of conversations (list of {"role", "content"}),
                         every record validated; errors name "file:line: what is wrong"
    split_train_val      a held-out validation set, chosen by seed
    build_examples       conversation -> {"input_ids", "labels"} via chat_template.tokenize_conversation;
                         examples with nothing left to train on are dropped and counted
    pack_examples        (optional) several conversations in one row, attention kept apart
    pack_to_budget       (optional) the same, grouped into micro-batches of a token budget (token_budget)
    global_batches       one epoch's sample order, cut into the batches of each optimizer step
    micro_batches        a global batch split into the pieces that fit in memory
    collate              a list of examples -> padded tensors [B, T]

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
import os
import random
import re

import torch

from .chat_template import check_options, tokenize_conversation

IGNORE = -100  # label of a position that carries no loss (torch's cross_entropy ignore_index)
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "tool": "tool",
                  "user": "user", "assistant": "assistant"}
MAX_PROBLEMS = 50  # how many skipped-record messages the stats keep (the counts are always complete)


# ---------------------------------------------------------------------------------------------
# Loading and validation
# ---------------------------------------------------------------------------------------------
class _Bad(Exception):
    """One malformed record: `reason` is a short key for the stats, the message says what is wrong."""

    def __init__(self, reason, message):
        super().__init__(message)
        self.reason = reason


def load_conversations(path, skip_bad=False):
    """Read a dataset of chat conversations.

    Formats (per record):
      {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}, ...]}
      {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", ...}]}   (ShareGPT;
          human -> user, gpt -> assistant, system and tool keep their names)
    Files: `.jsonl` holds one record per line (blank lines are ignored); `.json` holds one JSON
    list of records. Locations in messages are "path:LINE" (1-based) for .jsonl and
    "path:LINE (record N)" for .json (the line where record N, 0-based, starts); message indices
    are 0-based.

    Every record is checked: valid UTF-8 and JSON, a known key, known roles, string contents, at
    least one message and at least one assistant turn. A problem raises
    ValueError("path:line: what is wrong (expected ...)"). With skip_bad=True the bad record is
    skipped and counted instead. Loading nothing at all is always an error.

    Returns (convs, stats):
      convs: list of conversations, each a list of {"role": str, "content": str}
      stats: {"records": records seen, "loaded": int, "skipped": int,
              "skipped_by_reason": {reason: count}, "problems": first MAX_PROBLEMS messages,
              "sources": ["path:line" of each loaded conversation, parallel to convs]}
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such dataset file")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".jsonl", ".json"):
        raise ValueError(f"{path}: unsupported dataset file type {ext or '(none)'!r} (expected .jsonl or .json)")
    with open(path, "rb") as f:
        raw = f.read()

    stats = {"records": 0, "loaded": 0, "skipped": 0, "skipped_by_reason": {}, "problems": [], "sources": []}
    convs = []
    records = _jsonl_records(path, raw) if ext == ".jsonl" else _json_records(path, raw)
    for where, parse in records:
        stats["records"] += 1
        try:
            convs.append(_conversation(parse()))
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
    if not convs:
        raise ValueError(f"{path}: no conversation loaded ({stats['records']} records, {stats['skipped']} skipped) "
                         f"(expected at least one valid record)")
    return convs, stats


def _jsonl_records(path, raw):
    """Yield (location, parse) per non-blank line. Each line is decoded on its own, so a bad byte
    is reported on its line and, with skip_bad, costs only that line."""
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]  # a UTF-8 byte-order mark some editors write
        if not line.strip():
            continue

        def parse(line=line):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _Bad("not_utf8", f"bytes are not UTF-8 (byte 0x{line[e.start]:02x} at byte {e.start + 1} "
                                       f"of the line) (expected UTF-8 text)") from None
            try:
                return json.loads(text)
            except json.JSONDecodeError as e:
                raise _Bad("bad_json", f"not valid JSON ({e.msg} at column {e.colno}) "
                                       f"(expected one JSON object per line)") from None

        yield f"{path}:{lineno}", parse


def _json_records(path, raw):
    """Yield (location, parse) per element of a .json file's top-level list. A file that is not
    UTF-8 or not JSON at all is one error for the whole file, even with skip_bad."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: bytes are not UTF-8 (byte 0x{raw[e.start]:02x}) (expected UTF-8 text)") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        hint = "; one record per line needs the .jsonl extension" if e.msg == "Extra data" else ""
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}) "
                         f"(expected a JSON list of records{hint})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: the top level is a JSON {type(data).__name__} (expected a JSON list of records)")
    for i, (rec, line) in enumerate(zip(data, _element_lines(text), strict=True)):
        yield f"{path}:{line} (record {i})", (lambda rec=rec: rec)


def _element_lines(text):
    """The 1-based line on which each element of a (valid) top-level JSON list starts.

    json.loads forgets where things were; walking the list once more with raw_decode recovers it,
    so a bad record in a pretty-printed file is reported at a line an editor can jump to.
    """
    decoder, lines, line, seen = json.JSONDecoder(), [], 1, 0
    skip = re.compile(r"[\s,]*")  # whitespace and the commas between elements (the text is valid JSON)
    pos = skip.match(text, text.index("[") + 1).end()
    while text[pos] != "]":
        line, seen = line + text.count("\n", seen, pos), pos
        lines.append(line)
        pos = skip.match(text, decoder.raw_decode(text, pos)[1]).end()
    return lines


def _conversation(rec):
    """One parsed JSON record -> list of {"role", "content"}, or raise _Bad saying what is wrong."""
    if not isinstance(rec, dict):
        raise _Bad("not_object", f"the record is a JSON {type(rec).__name__} "
                                 f"(expected an object with 'messages' or 'conversations')")
    if "messages" in rec:
        key, role_key, text_key, roles = "messages", "role", "content", {r: r for r in ROLES}
    elif "conversations" in rec:
        key, role_key, text_key, roles = "conversations", "from", "value", SHAREGPT_ROLES
    else:
        raise _Bad("missing_key", f"missing key 'messages' (expected 'messages': [{{role, content}}, ...] "
                                  f"or ShareGPT 'conversations': [{{from, value}}, ...])")
    turns = rec[key]
    if not isinstance(turns, list):
        raise _Bad("bad_messages", f"'{key}' is a JSON {type(turns).__name__} (expected a list of messages)")
    if not turns:
        raise _Bad("empty", f"empty conversation: '{key}' is [] (expected at least one message)")
    out = []
    for j, m in enumerate(turns):
        if not isinstance(m, dict):
            raise _Bad("bad_messages", f"message {j} is a JSON {type(m).__name__} "
                                       f"(expected an object with '{role_key}' and '{text_key}')")
        for k in (role_key, text_key):
            if k not in m:
                raise _Bad("missing_key", f"message {j}: missing key '{k}' (expected '{role_key}' and '{text_key}')")
        role, content = m[role_key], m[text_key]
        if not isinstance(role, str) or role not in roles:
            raise _Bad("unknown_role", f"message {j}: unknown {role_key} {role!r} (expected one of {', '.join(roles)})")
        if not isinstance(content, str):
            got = "null" if content is None else f"a JSON {type(content).__name__}"
            raise _Bad("bad_content", f"message {j}: '{text_key}' is {got} (expected a string)")
        out.append({"role": roles[role], "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise _Bad("no_assistant", "no assistant turn (expected at least one message from the assistant to train on)")
    return out


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

    Each conversation goes through chat_template.tokenize_conversation, which also truncates to
    max_length keeping whole turns where it can. An example left with no target token (after the
    shift) is dropped and counted: an all -100 row would cost compute and teach nothing.
    Content that the template refuses (e.g. text spelling a special token) raises ValueError
    naming the conversation: sources[i] ("path:line", see load_conversations' stats) when given,
    else "conversation i"; with skip_bad it is skipped and counted instead.

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
            ex = tokenize_conversation(tokenizer, conv, template, **options)
            if max_length is not None and len(ex["input_ids"]) > max_length:
                # Tokenize again with the limit: only the long ones pay twice, and we know it was cut.
                ex = tokenize_conversation(tokenizer, conv, template, max_length=max_length, **options)
                stats["truncated"] += 1
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

    Two levels, both from the longest example down (ties by index: the result is deterministic):
    1. micro-batches: best-fit decreasing -- each example goes into the FULLEST micro-batch that
       still has room for it -- fills nearly every micro-batch to the budget;
    2. rows: inside one micro-batch, first-fit decreasing into rows of at most max_length tokens.
       Rows stay short because attention costs grow with the square of the row length; the
       micro-batch's [rows, longest row] tensor is then almost all real tokens.
    Every example lands in exactly one row of one micro-batch; no micro-batch holds more than
    max_tokens tokens and no row more than max_length.

    Returns a list of micro-batches; each is a list of packed rows in the format of pack_examples
    ({"input_ids", "labels", "position_ids", "seq_ids"}), ready for collate.
    """
    lengths = [len(ex["input_ids"]) for ex in examples]
    for i, n in enumerate(lengths):
        if n > min(max_length, max_tokens):
            what = f"max_length={max_length}" if max_length <= max_tokens else f"the token budget max_tokens={max_tokens}"
            raise ValueError(f"example {i} has {n} tokens, more than {what} "
                             f"(expected a budget >= the longest example, and build_examples(..., max_length=...) first)")
    order = sorted(range(len(examples)), key=lambda i: -lengths[i])
    bins = []
    for b, i in zip(_best_fit(order, lengths, max_tokens), order):
        if b == len(bins):
            bins.append([])
        bins[b].append(i)  # each bin keeps the longest-first order
    batches = []
    for members in bins:
        rows = []
        for r, i in zip(_first_fit(members, lengths, max_length), members):
            if r == len(rows):
                rows.append({"input_ids": [], "labels": [], "position_ids": [], "seq_ids": []})
            _append(rows[r], examples[i])
        batches.append(rows)
    return batches


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
