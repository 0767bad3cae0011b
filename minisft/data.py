"""From conversations to the batches a training step eats.

Lesson 2 walks through this file; `train.py` uses it. The conversations come from
conversations.load_conversations (record formats, validation) and conversations.split_train_val.
The way through:

    build_examples       conversation -> {"input_ids", "labels"} via chat_template.tokenize_conversation;
                         examples with nothing left to train on are dropped and counted
    sample_prompt        the prompt a conversation gives for generating a sample answer
    token_budget         how many tokens one packed micro-batch may hold
    pack_to_budget       (optional) packing: micro-batches of one row each, several conversations
                         in a row up to the token budget, attention kept apart
    global_batches       one epoch's sample order, cut into the batches of each optimizer step
    micro_batches        a global batch split into the pieces that fit in memory
    collate              a list of examples -> padded tensors [B, T]
    step_batches         step -> its collated micro-batches (what the trainer calls)

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
import math
import random

import torch

from .chat_template import check_options, render, tokenize_conversation
from .conversations import MAX_PROBLEMS, RENDERED_ONLY_BY_SMOLLM3
from .model import right_padded

IGNORE = -100  # label of a position that carries no loss (torch's cross_entropy ignore_index)


# ---- tokenized examples ---------------------------------------------------------------------------
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


# ---- packing --------------------------------------------------------------------------------------
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
    max_tokens long: one row has no padding at all, and attention per conversation makes a long row
    cost no more attention than short ones (docs/speed.md measures what that saves). Lesson 2 packs
    with max_tokens = max_length: rows no longer than one example may be.
    No example may be longer than max_length (build_examples cuts them) or than the budget.

    Returns a list of micro-batches; each is a list of ONE packed row, ready for collate:
      {"input_ids", "labels", "position_ids", "seq_ids"}: lists of equal length, where
    position_ids restart at 0 for every conversation (each one sees the positions it would see
    alone), seq_ids number the conversations 1..k (collate turns them into the attention_mask: a
    block-diagonal causal mask), and the label of each conversation's first token is -100: after
    the shift it would be "predicted" from the end of the previous conversation.
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


# ---- sample order ---------------------------------------------------------------------------------
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


# ---- batching -------------------------------------------------------------------------------------
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
    """Move a collated batch to `device` -> the batch there, plus "n_targets" (an int: the loss then
    finds its N target rows without asking the device how many). A mask of all ones or of right
    padding only is dropped: the plain causal mask does the same, faster. Both are decided here, on
    the host: asked of a GPU tensor, each would make the CPU wait for the GPU (a host sync)."""
    mask = batch["attention_mask"]
    plain = bool((mask == 1).all()) or right_padded(mask)
    n_targets = count_targets(batch["labels"])
    if torch.device(device).type == "cuda":
        # Page-locked host memory lets the copy run by DMA while the GPU still works on the last
        # micro-batch (non_blocking); from ordinary memory CUDA first stages it through a pinned buffer.
        batch = {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    else:
        batch = {k: v.to(device) for k, v in batch.items()}
    if plain:
        batch["attention_mask"] = None
    batch["n_targets"] = n_targets
    return batch


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
