"""Record formats, rendering spans and pooling masks."""

import json

import pytest

from mona_ray import records
from mona_ray.model import load_tokenizer


def test_three_formats_normalise_to_the_same_messages():
    alpaca = {"instruction": "Add 2 and 3", "input": "", "output": "5"}
    sharegpt = {"conversations": [{"from": "human", "value": "Add 2 and 3"}, {"from": "gpt", "value": "5"}]}
    chat = {"messages": [{"role": "user", "content": "Add 2 and 3"}, {"role": "assistant", "content": "5"}]}
    want = [{"role": "user", "content": "Add 2 and 3"}, {"role": "assistant", "content": "5"}]
    assert records.normalize_record(alpaca) == want
    assert records.normalize_record(sharegpt) == want
    assert records.normalize_record(chat) == want
    assert records.content_hash(records.normalize_record(alpaca)) == records.content_hash(want)


def test_alpaca_input_is_appended_to_the_prompt():
    m = records.normalize_record({"instruction": "Summarise", "input": "Long text", "output": "Short"})
    assert m[0]["content"] == "Summarise\n\nLong text"


@pytest.mark.parametrize("rec, reason", [
    ({"instruction": None, "input": None, "output": "x"}, "empty prompt"),
    ({"instruction": "q", "output": None}, "'output' is null"),
    ({"instruction": "q"}, "'output' is missing"),
    ({"instruction": 5, "output": "x"}, "type int"),
    ({"instruction": "", "input": "", "output": ""}, "empty"),
    ({"conversations": [{"from": "alien", "value": "hi"}]}, "unknown role"),
    ({"conversations": []}, "is empty"),
    ({"messages": "hello"}, "expected a list"),
    ({"text": "free text"}, "unknown record format"),
    (["a", "list"], "expected an object"),
])
def test_bad_records_say_why(rec, reason):
    with pytest.raises(records.RecordError, match=reason):
        records.normalize_record(rec)


def test_render_spans_cover_content_only(tiny_lm):
    tok = load_tokenizer(tiny_lm)
    msgs = [{"role": "user", "content": "add two and three"}, {"role": "assistant", "content": "five"}]
    r = records.render(msgs, tok)
    assert [r.text[a:b] for a, b in r.spans] == ["add two and three", "five"]
    p = records.render(msgs, mode="plain")
    assert p.text == "add two and three\n\nfive"
    assert [p.text[a:b] for a, b in p.spans] == ["add two and three", "five"]


def test_pool_masks(tiny_lm):
    tok = load_tokenizer(tiny_lm)
    msgs = [{"role": "user", "content": "add two"}, {"role": "assistant", "content": "five"}]
    r = records.render(msgs, tok)
    ids, none = records.tokenize(r, tok, 64, "none")
    _, special = records.tokenize(r, tok, 64, "special")
    _, template = records.tokenize(r, tok, 64, "template")
    toks = tok.convert_ids_to_tokens(ids)
    assert sum(none) == len(ids)
    assert [t for t, m in zip(toks, special) if not m] == ["<|im_start|>", "<|im_end|>"] * 2
    assert [t for t, m in zip(toks, template) if m] == ["add", "two", "five"]
    ids3, m3 = records.tokenize(r, tok, 3, "none")
    assert len(ids3) == 3 == len(m3)


def test_jsonl_reader_reports_rows(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_bytes(b'{"instruction": "a", "output": "b"}\n{not json\n\n\xff\xfe\n{"instruction": "c", "output": "d"}\n')
    got = list(records.read_unit(records.ReadUnit(str(f), 0, 5)))
    assert [r for r, _ in got] == [0, 1, 2, 3, 4]
    kinds = [type(x).__name__ if isinstance(x, records.RecordError) else "ok" for _, x in got]
    assert kinds == ["ok", "RecordError", "RecordError", "RecordError", "ok"]
    assert "malformed JSON" in str(got[1][1]) and "UTF-8" in str(got[3][1])


def test_units_split_files_deterministically(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text("".join(json.dumps({"instruction": str(i), "output": "o"}) + "\n" for i in range(10)))
    units = records.plan_units([tmp_path], 4)
    assert [(u.start, u.stop) for u in units] == [(0, 4), (4, 8), (8, 10)]
    with pytest.raises(records.InputError, match="does not exist"):
        records.plan_units([tmp_path / "missing.parquet"], 4)
