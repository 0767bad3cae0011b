"""Tests for minisft/data.py: loading and validation, examples, split, sample order, padding, packing."""
import json
import random

import pytest
import torch
import torch.nn.functional as F

from minisft import conversations, data
from minisft.data import IGNORE
from minisft.model import ModelConfig, SmolLM

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
PAD = 2  # as in SmolLM2: the pad id is also <|im_end|>, a real target


def tiny_model(vocab=64, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    return SmolLM(cfg).double()


def summed_ce(logits, labels):
    """Summed masked cross-entropy on shifted logits: position t predicts labels[t + 1]."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           reduction="sum", ignore_index=IGNORE)


def random_examples(lengths, vocab=64, seed=0):
    """Examples with random ids; labels: ids with a random part masked, labels[0] NOT masked (so
    packing must mask each conversation's first label itself), and PAD as the last target."""
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(3, vocab) for _ in range(n - 1)] + [PAD]
        labels = [x if rng.random() < 0.6 else IGNORE for x in ids]
        labels[0], labels[-1] = ids[0], PAD
        out.append({"input_ids": ids, "labels": labels})
    return out


def loss_and_grads(model, batch):
    model.zero_grad()
    logits = model(batch["input_ids"], position_ids=batch.get("position_ids"), attention_mask=batch.get("attention_mask"))
    loss = summed_ce(logits, batch["labels"])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def separate_loss_and_grads(model, examples):
    """The reference: every conversation alone, no mask, no padding; losses and grads summed."""
    model.zero_grad()
    total = 0.0
    for ex in examples:
        ids, labels = torch.tensor([ex["input_ids"]]), torch.tensor([ex["labels"]])
        loss = summed_ce(model(ids), labels)
        loss.backward()
        total = total + loss.detach()
    return total, {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(a, b, tol=1e-5):
    assert torch.allclose(a[0], b[0], atol=tol, rtol=0), (a[0], b[0])
    for name in a[1]:
        assert torch.allclose(a[1][name], b[1][name], atol=tol, rtol=0), name


def write(tmp_path, name, lines):
    p = tmp_path / name
    p.write_bytes(b"\n".join(l if isinstance(l, bytes) else l.encode() for l in lines) + b"\n")
    return p


GOOD = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from minisft.tokenizer import Tokenizer
    return Tokenizer.from_dir(smollm2_dir)


# ---------------------------------------------------------------------------------------------
# packing
# ---------------------------------------------------------------------------------------------
def packed_rows(examples, max_length):
    """The trainer's packer with rows no longer than max_length (as lesson 2 packs): the rows, in order."""
    return [row for mb in data.pack_to_budget(examples, max_length, max_length) for row in mb]


def test_packed_row_equals_separate_conversations():
    model = tiny_model()
    examples = random_examples([9, 14, 5, 7])
    rows = packed_rows(examples, max_length=40)
    assert len(rows) == 1 and rows[0]["seq_ids"][-1] == 4 and len(rows[0]["input_ids"]) == 35
    packed = loss_and_grads(model, data.collate(rows, PAD))
    assert_same(packed, separate_loss_and_grads(model, examples))
    # Without restarting the mask, the same row gives a different loss: the test can fail.
    plain = data.collate([{"input_ids": rows[0]["input_ids"], "labels": rows[0]["labels"]}], PAD)
    assert not torch.allclose(loss_and_grads(model, plain)[0], packed[0], atol=1e-3)


def test_packed_rows_with_padding_equal_separate():
    model = tiny_model(seed=1)
    examples = random_examples([9, 14, 5, 7, 3, 12, 6], seed=1)
    rows = packed_rows(examples, max_length=20)
    assert len(rows) > 1 and all(len(r["input_ids"]) <= 20 for r in rows)
    batch = data.collate(rows, PAD)
    assert (batch["attention_mask"] == 0).any()  # rows of unequal length: padding present
    assert_same(loss_and_grads(model, batch), separate_loss_and_grads(model, examples))
    assert data.count_targets(batch["labels"]) == sum(data.count_targets(e["labels"]) for e in examples)


def test_best_fit_decreasing_layout():
    examples = [{"input_ids": [10 + i] * n, "labels": [10 + i] * n} for i, n in enumerate([3, 6, 2, 5, 4])]
    rows = packed_rows(examples, max_length=10)
    # longest first: 6 -> row 0, 5 -> row 1 (row 0 has 4 left), 4 -> row 0 (the fullest that fits: full),
    # 3 -> row 1, 2 -> row 1 (full)
    assert [r["input_ids"] for r in rows] == [[11] * 6 + [14] * 4, [13] * 5 + [10] * 3 + [12] * 2]
    assert rows[1]["seq_ids"] == [1] * 5 + [2] * 3 + [3] * 2
    assert rows[1]["position_ids"] == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1]
    assert rows[1]["labels"] == [IGNORE] + [13] * 4 + [IGNORE] + [10] * 2 + [IGNORE, 12]
    assert packed_rows(examples, 10) == rows  # deterministic
    with pytest.raises(ValueError, match="example 1 has 6 tokens, more than max_length=5"):
        data.pack_to_budget(examples, 10, max_length=5)
    # Best fit, not first fit: the last example goes to the row with the least room left (row 1, 2 left),
    # not to the first row with room (row 0, 3 left).
    mixed = [{"input_ids": [20 + i] * n, "labels": [20 + i] * n} for i, n in enumerate([7, 4, 4, 1])]
    assert [r["input_ids"] for r in packed_rows(mixed, 10)] == [[20] * 7, [21] * 4 + [22] * 4 + [23]]


def test_pack_real_examples_keeps_targets(tok):
    convs = [[{"role": "user", "content": f"question {i} " * (i + 1)},
              {"role": "assistant", "content": f"answer {i} " * (2 * i + 1)}] for i in range(8)]
    examples, _ = data.build_examples(tok, convs, max_length=128)
    rows = packed_rows(examples, 128)
    assert len(rows) < len(examples)
    assert sorted(len(e["input_ids"]) for e in examples) == sorted(
        r["seq_ids"].count(s) for r in rows for s in set(r["seq_ids"]))
    assert data.count_targets([r["labels"] for r in rows]) == sum(data.count_targets(e["labels"]) for e in examples)


# ---------------------------------------------------------------------------------------------
# padding
# ---------------------------------------------------------------------------------------------
def test_padding_matches_unpadded_logits():
    model = tiny_model(seed=2)
    examples = random_examples([11, 4, 8], seed=2)
    batch = data.collate(examples, PAD)
    assert batch["input_ids"].shape == (3, 11)
    with torch.no_grad():
        logits = model(batch["input_ids"], position_ids=batch["position_ids"], attention_mask=batch["attention_mask"])
        for b, ex in enumerate(examples):
            n = len(ex["input_ids"])
            alone = model(torch.tensor([ex["input_ids"]]))[0]
            assert torch.allclose(logits[b, :n], alone, atol=1e-10)
            assert (batch["labels"][b, n:] == IGNORE).all() and (batch["attention_mask"][b, n:] == 0).all()
            assert batch["labels"][b, n - 1] == PAD  # a real target equal to pad_id stays a target
            assert batch["labels"][b, :n].tolist() == ex["labels"]
    assert_same(loss_and_grads(model, batch), separate_loss_and_grads(model, examples))


def test_im_end_targets_survive_padding(tok):
    assert tok.pad_id == tok.im_end_id  # the trap this guards against
    convs = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there, friend"}],
             [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
              {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}]]
    examples, stats = data.build_examples(tok, convs)
    batch = data.collate(examples, tok.pad_id)
    for b, ex in enumerate(examples):
        im_end_targets = [t for t, y in enumerate(ex["labels"]) if y == tok.im_end_id]
        assert len(im_end_targets) == sum(m["role"] == "assistant" for m in convs[b])
        assert all(batch["labels"][b, t] == tok.im_end_id for t in im_end_targets)
    assert (batch["labels"][0, len(examples[0]["input_ids"]):] == IGNORE).all()
    assert data.count_targets(batch["labels"]) == stats["target_tokens"]
    assert data.padding_efficiency(batch) == pytest.approx(
        sum(len(e["input_ids"]) for e in examples) / batch["input_ids"].numel())


# ---------------------------------------------------------------------------------------------
# loading and validation
# ---------------------------------------------------------------------------------------------
BAD_RECORDS = [
    ("{not json", r"x\.jsonl:2: not valid JSON .*expected one JSON object per line", "bad_json"),
    ('{"text": "hi"}', r"x\.jsonl:2: missing key 'messages' \(expected", "missing_key"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}',
     r"x\.jsonl:2: message 0: missing key 'content'", "missing_key"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}',
     r"x\.jsonl:2: message 0: unknown role 'bot' \(expected one of system, user, assistant, tool\)", "unknown_role"),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}',
     r"x\.jsonl:2: message 0: 'content' is a JSON int \(expected a string\)", "bad_content"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": null}]}',
     r"x\.jsonl:2: message 1: 'content' is null \(expected a string\)", "bad_content"),
    ('{"messages": []}', r"x\.jsonl:2: empty conversation", "empty"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', r"x\.jsonl:2: no assistant turn", "no_assistant"),
    ('[1, 2]', r"x\.jsonl:2: the record is a JSON list \(expected an object", "not_object"),
    ('{"messages": "hi"}', r"x\.jsonl:2: 'messages' is a JSON str \(expected a list", "bad_messages"),
    (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}',
     r"x\.jsonl:2: bytes are not UTF-8 \(byte 0xe9 .*expected UTF-8 text", "not_utf8"),
]


@pytest.mark.parametrize("line,error,reason", BAD_RECORDS, ids=[r for _, _, r in BAD_RECORDS])
def test_bad_record_named_error(tmp_path, line, error, reason):
    path = write(tmp_path, "x.jsonl", [GOOD, line, GOOD])
    with pytest.raises(ValueError, match=error):
        conversations.load_conversations(path)
    convs, stats = conversations.load_conversations(path, skip_bad=True)
    assert len(convs) == 2 and stats["skipped"] == 1 and stats["skipped_by_reason"] == {reason: 1}
    assert stats["sources"] == [f"{path}:1", f"{path}:3"]


def test_skip_bad_counts_by_reason(tmp_path):
    lines = [GOOD] + [l for l, _, _ in BAD_RECORDS] + ["", GOOD]
    convs, stats = conversations.load_conversations(write(tmp_path, "x.jsonl", lines), skip_bad=True)
    assert len(convs) == stats["loaded"] == 2
    assert stats["records"] == 2 + len(BAD_RECORDS)  # the blank line is not a record
    assert stats["skipped"] == len(BAD_RECORDS) == len(stats["problems"])
    expected = {}
    for _, _, reason in BAD_RECORDS:
        expected[reason] = expected.get(reason, 0) + 1
    assert stats["skipped_by_reason"] == expected
    assert stats["problems"][0].endswith("x.jsonl:2: not valid JSON (Expecting property name enclosed in double "
                                         "quotes at column 2) (expected one JSON object per line)")


def test_empty_dataset_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"empty\.jsonl: no conversation loaded \(0 records"):
        conversations.load_conversations(write(tmp_path, "empty.jsonl", ["", "  "]))
    all_bad = write(tmp_path, "bad.jsonl", ["{", '{"messages": []}'])
    with pytest.raises(ValueError, match=r"bad\.jsonl: no conversation loaded \(2 records, 2 skipped\)"):
        conversations.load_conversations(all_bad, skip_bad=True)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        conversations.load_conversations(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match=r"expected \.jsonl or \.json"):
        conversations.load_conversations(write(tmp_path, "x.csv", ["a,b"]))


def test_sharegpt_is_converted(tmp_path):
    rec = {"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hi"},
                             {"from": "gpt", "value": "hello"}, {"from": "tool", "value": "{}"}]}
    convs, _ = conversations.load_conversations(write(tmp_path, "s.jsonl", [json.dumps(rec)]))
    assert convs == [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}, {"role": "tool", "content": "{}"}]]
    bad = {"conversations": [{"from": "robot", "value": "hi"}]}
    with pytest.raises(ValueError, match=r"s2\.jsonl:1: message 0: unknown from 'robot' \(expected one of human, gpt"):
        conversations.load_conversations(write(tmp_path, "s2.jsonl", [json.dumps(bad)]))
    with pytest.raises(ValueError, match=r"s3\.jsonl:1: message 0: missing key 'value'"):
        conversations.load_conversations(write(tmp_path, "s3.jsonl", ['{"conversations": [{"from": "gpt"}]}']))


def test_json_list_input(tmp_path):
    good = json.loads(GOOD)
    p = tmp_path / "d.json"
    text = json.dumps([good, {"messages": [{"role": "user", "content": "x"}]}, good], indent=1)
    p.write_text(text)
    # Each record is located by the line where it starts (counted here the slow, obvious way).
    starts = [i + 1 for i, l in enumerate(text.split("\n")) if l == " {"]
    assert len(starts) == 3 and starts[0] == 2
    with pytest.raises(ValueError, match=rf"d\.json:{starts[1]} \(record 1\): no assistant turn"):
        conversations.load_conversations(p)
    convs, stats = conversations.load_conversations(p, skip_bad=True)
    assert convs == [good["messages"]] * 2 and stats["sources"] == [f"{p}:{starts[0]} (record 0)",
                                                                 f"{p}:{starts[2]} (record 2)"]
    # Compact and odd layouts: several records on a line, blank lines, strings holding brackets and commas.
    odd = ['[' + GOOD + ',' + GOOD + ' ,', '', '  ' + json.dumps({"messages": [{"role": "user", "content": "[,\n]"}]}),
           ', {"messages": [{"role": "user", "content": "]"}, {"role": "bot", "content": "x"}]}]']
    p.write_text("\n".join(odd))
    _, stats = conversations.load_conversations(p, skip_bad=True)
    assert stats["sources"] == [f"{p}:1 (record 0)", f"{p}:1 (record 1)"]
    assert [m.split(": ")[0] for m in stats["problems"]] == [f"{p}:3 (record 2)", f"{p}:4 (record 3)"]
    p.write_text('[\n{"messages": []},\n{oops}\n]')
    with pytest.raises(ValueError, match=r"d\.json:3: not valid JSON"):
        conversations.load_conversations(p, skip_bad=True)  # a broken file cannot be skipped record by record
    p.write_text('{"messages": []}')
    with pytest.raises(ValueError, match=r"d\.json: the top level is a JSON dict \(expected a JSON list"):
        conversations.load_conversations(p)
    p.write_text(GOOD + "\n" + GOOD)
    with pytest.raises(ValueError, match=r"d\.json:2: .*one record per line needs the \.jsonl extension"):
        conversations.load_conversations(p)
    p.write_bytes(b'[\n' + GOOD.encode() + b',\n{"messages": "\xff"}]')
    with pytest.raises(ValueError, match=r"d\.json:3: bytes are not UTF-8 \(byte 0xff\)"):
        conversations.load_conversations(p)


def test_jsonl_bom_and_crlf(tmp_path):
    p = tmp_path / "w.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + GOOD.encode() + b"\r\n" + GOOD.encode() + b"\r\n")
    assert len(conversations.load_conversations(p)[0]) == 2


# ---------------------------------------------------------------------------------------------
# examples and truncation
# ---------------------------------------------------------------------------------------------
def test_truncation_drops_examples_without_target(tok):
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    long_prompt = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    long_answer = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 200}]
    examples, stats = data.build_examples(tok, [short, long_prompt, long_answer], max_length=64)
    assert stats["kept"] == 2 and stats["dropped_no_target"] == 1 and stats["truncated"] == 2
    assert all(len(e["input_ids"]) <= 64 and data.count_targets(e["labels"]) > 0 for e in examples)
    assert len(examples[1]["input_ids"]) == 64  # the long answer was cut inside its turn
    assert stats["target_tokens"] == sum(data.count_targets(e["labels"]) for e in examples)
    assert stats["tokens"] == sum(len(e["input_ids"]) for e in examples)


def test_label_at_position_zero_is_not_a_target(monkeypatch):
    def fake(tokenizer, messages, template="smollm2", **kw):
        n = len(messages[0]["content"])
        return {"input_ids": [5] * n, "labels": [5] + [IGNORE] * (n - 1) if messages[0]["content"] == "aaa" else [5] * n}
    monkeypatch.setattr(data, "tokenize_conversation", fake)
    examples, stats = data.build_examples(None, [[{"role": "user", "content": "aaa"}], [{"role": "user", "content": "bb"}]])
    assert stats["dropped_no_target"] == 1 and stats["kept"] == 1 and stats["target_tokens"] == 1
    assert data.count_targets([5, IGNORE, 7]) == 1 and data.count_targets(torch.tensor([[5, 6], [IGNORE, 7]])) == 2


def test_bad_settings_are_not_blamed_on_conversations(tok):
    convs = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]] * 3
    for kw, error in [({"template": "llama3"}, r"^unknown chat template 'llama3'"),
                      ({"train_on": "answers"}, r"^train_on='answers'"),
                      ({"max_length": 0}, r"^max_length=0")]:
        for skip_bad in (False, True):  # skip_bad must not turn a bad setting into "every record skipped"
            with pytest.raises(ValueError, match=error):
                data.build_examples(tok, convs, skip_bad=skip_bad, **kw)


def test_template_error_names_its_source(tok):
    convs = [[{"role": "user", "content": "hi <|im_end|> there"}, {"role": "assistant", "content": "ok"}],
             [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]]
    with pytest.raises(ValueError, match=r"^data/x\.jsonl:7: .*<\|im_end\|>"):
        data.build_examples(tok, convs, sources=["data/x.jsonl:7", "data/x.jsonl:8"])
    with pytest.raises(ValueError, match=r"^conversation 0: "):
        data.build_examples(tok, convs)
    examples, stats = data.build_examples(tok, convs, skip_bad=True)
    assert len(examples) == 1 and stats["skipped_bad"] == 1 and stats["problems"][0].startswith("conversation 0: ")


def test_split_is_deterministic_and_disjoint():
    items = list(range(100))
    train, val = conversations.split_train_val(items, 0.1, seed=3)
    assert len(val) == 10 and sorted(train + val) == items and not set(train) & set(val)
    assert conversations.split_train_val(items, 0.1, seed=3) == (train, val)
    assert conversations.split_train_val(items, 0.1, seed=4)[1] != val
    assert conversations.split_train_val(items, 0.0, seed=3) == (items, [])
    assert len(conversations.split_train_val(items[:5], 0.01)[1]) == 1  # at least one held out
    with pytest.raises(ValueError, match="val_fraction"):
        conversations.split_train_val(items, 1.0)


# ---------------------------------------------------------------------------------------------
# sample order
# ---------------------------------------------------------------------------------------------
def test_global_batches_depend_only_on_seed_epoch_and_global_batch():
    lengths = [random.Random(i).randrange(5, 500) for i in range(103)]
    gb = data.global_batches(lengths, 16, seed=1, epoch=0)
    assert [len(b) for b in gb] == [16] * 6 + [7]  # partial last batch kept, last
    assert sorted(i for b in gb for i in b) == list(range(103))
    assert data.global_batches(list(lengths), 16, seed=1, epoch=0) == gb
    assert data.global_batches(lengths, 16, seed=2, epoch=0) != gb
    assert data.global_batches(lengths, 16, seed=1, epoch=1) != gb
    for micro in (1, 3, 5, 16):  # any micro-batch split concatenates back to the same step
        for b in gb:
            mbs = data.micro_batches(b, micro)
            assert all(len(m) <= micro for m in mbs) and sum(mbs, []) == b
    batches = data.step_batches([{"input_ids": [1] * n, "labels": [1] * n} for n in lengths], 16, 5, 1, PAD)
    steps = [batches(s) for s in range(batches.steps_per_epoch)]
    assert [sum(mb["input_ids"].shape[0] for mb in step) for step in steps] == [len(b) for b in gb]


def test_group_by_length_is_homogeneous_and_a_permutation():
    lengths = [random.Random(i).randrange(5, 500) for i in range(1000)]
    gb = data.global_batches(lengths, 8, seed=0, epoch=0, group_by_length=True)
    assert sorted(i for b in gb for i in b) == list(range(1000))
    assert data.global_batches(lengths, 8, seed=0, epoch=0, group_by_length=True) == gb
    assert data.global_batches(lengths, 8, seed=1, epoch=0, group_by_length=True) != gb
    plain = data.epoch_padding_efficiency(lengths, 8, 8, seed=0)
    grouped = data.epoch_padding_efficiency(lengths, 8, 8, seed=0, group_by_length=True)
    assert grouped > 0.9 > 0.7 > plain
    # batch order is shuffled: not sorted by length across the epoch
    maxes = [max(lengths[i] for i in b) for b in gb]
    assert maxes != sorted(maxes) and maxes != sorted(maxes, reverse=True)
