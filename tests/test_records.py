"""Record formats, rendering spans and pooling masks, and the JSONL / JSON-array / Parquet / gzip readers."""

import json

import pytest

from mona_ray.core import readers, records, render
from mona_ray.core.readers import json_array, jsonl
from mona_ray.core.model import load_tokenizer


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
    r = render.render(msgs, tok)
    assert [r.text[a:b] for a, b in r.spans] == ["add two and three", "five"]
    p = render.render(msgs, mode="plain")
    assert p.text == "add two and three\n\nfive"
    assert [p.text[a:b] for a, b in p.spans] == ["add two and three", "five"]


def test_pool_masks(tiny_lm):
    tok = load_tokenizer(tiny_lm)
    msgs = [{"role": "user", "content": "add two"}, {"role": "assistant", "content": "five"}]
    r = render.render(msgs, tok)
    ids, none = render.tokenize(r, tok, 64, "none")
    _, special = render.tokenize(r, tok, 64, "special")
    _, template = render.tokenize(r, tok, 64, "template")
    toks = tok.convert_ids_to_tokens(ids)
    assert sum(none) == len(ids)
    assert [t for t, m in zip(toks, special) if not m] == ["<|im_start|>", "<|im_end|>"] * 2
    assert [t for t, m in zip(toks, template) if m] == ["add", "two", "five"]
    ids3, m3 = render.tokenize(r, tok, 3, "none")
    assert len(ids3) == 3 == len(m3)


def test_jsonl_reader_reports_rows(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_bytes(b'{"instruction": "a", "output": "b"}\n{not json\n\n\xff\xfe\n{"instruction": "c", "output": "d"}\n')
    got = list(readers.read_unit(readers.ReadUnit(str(f), 0, 5)))
    assert [r for r, _ in got] == [0, 1, 2, 3, 4]
    kinds = [type(x).__name__ if isinstance(x, records.RecordError) else "ok" for _, x in got]
    assert kinds == ["ok", "RecordError", "RecordError", "RecordError", "ok"]
    assert "malformed JSON" in str(got[1][1]) and "UTF-8" in str(got[3][1])


def test_units_split_files_deterministically(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text("".join(json.dumps({"instruction": str(i), "output": "o"}) + "\n" for i in range(10)))
    units = readers.plan_units([tmp_path], 4)
    assert [(u.start, u.stop) for u in units] == [(0, 4), (4, 8), (8, 10)]
    with pytest.raises(records.InputError, match="does not exist"):
        readers.plan_units([tmp_path / "missing.parquet"], 4)


# ----------------------------------------------------------------------------- splitting inputs

import dataclasses
import gzip
import os

import pyarrow as pa
import pyarrow.parquet as pq

TRICKY = 'a ] b , c \\"quoted\\" } { [ \\\\ \\"'  # a JSON string body: brackets, commas, escaped quotes


def _rows(n):
    out = []
    for i in range(n):
        r = {"conversations": [{"from": "human", "value": f"frage {i}: grüße, 日本語 🙂 " + "x" * (i % 5)},
                               {"from": "gpt", "value": f"antwort {i} ] , \" {{ \\ [" + "\n" * (i % 3)}],
             "source": "s", "category": None if i % 4 else "c"}
        if i % 6 == 0:
            r["n"], r["flag"], r["meta"] = [float(i), i / 3, -1e-3], True, {"deep": [[[i]]]}
        out.append(r)
    return out


def _stdlib_rows(path):
    """Read a whole file at once with the standard library: the reference."""
    if path.name.endswith(".parquet"):
        return list(enumerate(pq.read_table(path).to_pylist()))
    raw = path.read_bytes()
    if path.name.endswith(".gz"):
        raw = gzip.decompress(raw)
    text = raw.decode("utf-8-sig")
    if ".jsonl" in path.name:
        lines = text.split("\n")
        return list(enumerate(json.loads(line) for line in (lines[:-1] if lines[-1] == "" else lines)))
    return list(enumerate(json.loads(text)))


def _json_array_bytes(rows):
    """A BOM, whitespace, pretty and compact elements, and one element holding a tricky string."""
    parts = [json.dumps(r, ensure_ascii=False, indent=1 if i % 2 else None) for i, r in enumerate(rows)]
    parts[3] = '{"instruction": "' + TRICKY + '", "output": "o ] , \\" "}'
    return b"\xef\xbb\xbf \n[\n  " + ",\n  ".join(parts).encode() + b"\n]\n "


def _write(tmp_path, kind, rows):
    if kind == "json":
        f = tmp_path / "data.json"
        f.write_bytes(_json_array_bytes(rows))
    elif kind == "json.gz":
        f = tmp_path / "data.json.gz"
        f.write_bytes(gzip.compress(_json_array_bytes(rows)))
    elif kind in ("jsonl", "jsonl.gz"):
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
        f = tmp_path / f"data.{kind}"
        f.write_bytes(gzip.compress(body) if kind.endswith(".gz") else body)
    else:  # parquet: one row group of all rows (pyarrow's default), or row groups of 10
        f = tmp_path / f"data_{kind}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), f, row_group_size=10 if kind == "parquet_rg10" else None)
    return f


@pytest.mark.parametrize("kind", ["json", "jsonl", "parquet", "parquet_rg10", "jsonl.gz", "json.gz"])
def test_units_read_back_exactly_the_whole_file(tmp_path, kind):
    f = _write(tmp_path, kind, _rows(31))
    staging = tmp_path / "staged"
    units = readers.plan_units([f], rows_per_unit=7, staging_dir=staging)
    assert [(u.start, u.stop) for u in units] == [(0, 7), (7, 14), (14, 21), (21, 28), (28, 31)]
    assert all(u.path == str(f.resolve()) for u in units)  # reports name the user's file
    got = [item for u in units for item in readers.read_unit(u)]
    want = _stdlib_rows(f)
    assert len(want) == 31 and got == want
    assert not any(isinstance(x, records.RecordError) for _, x in got)
    if kind in ("json", "jsonl", "json.gz", "jsonl.gz"):  # byte ranges that tile the rows
        assert all(0 <= u.offset < u.end for u in units)
        assert units[0].offset == (0 if ".jsonl" in f.name else len(b"\xef\xbb\xbf \n[\n  "))  # the first row
        assert all(a.end == b.offset if ".jsonl" in f.name else a.end < b.offset for a, b in zip(units, units[1:]))
    staged = {u.read_path for u in units}
    if kind in ("parquet", "jsonl.gz", "json.gz"):
        (read_path,) = staged
        assert read_path and os.path.dirname(read_path) == str(staging) and os.path.exists(read_path)
    else:
        assert staged == {None} and not staging.exists()
    if kind == "parquet":  # re-chunked once into row groups of rows_per_unit
        md = pq.ParquetFile(read_path).metadata
        assert [md.row_group(i).num_rows for i in range(md.num_row_groups)] == [7, 7, 7, 7, 3]
    for u in units:  # units travel as dicts
        assert readers.ReadUnit(**dataclasses.asdict(u)) == u
        assert u.key == readers.ReadUnit(u.path, u.start, u.stop).key


@pytest.mark.parametrize("kind", ["json", "jsonl"])
def test_small_scan_buffers_give_the_same_boundaries(tmp_path, monkeypatch, kind):
    """Elements and lines cut by every possible chunk boundary (numbers too): the same units."""
    f = _write(tmp_path, kind, _rows(23))
    want = readers.plan_units([f], 5)
    if kind == "json":
        g = tmp_path / "numbers.json"
        g.write_text("[" + ", ".join(str(10 ** (i % 9) + i) for i in range(40)) + ",1e5 , -0.25,true,null]")
        want_g = readers.plan_units([g], 5)
    for chunk in (1, 2, 3, 7, 64):
        monkeypatch.setattr(jsonl, "_CHUNK", chunk)
        monkeypatch.setattr(json_array, "_CHUNK", chunk)
        monkeypatch.setattr(json_array, "_AHEAD", max(1, chunk // 2))
        assert readers.plan_units([f], 5) == want
        if kind == "json":
            assert readers.plan_units([g], 5) == want_g
            assert [x for u in want_g for _, x in readers.read_unit(u)] == json.loads(g.read_text())
    monkeypatch.undo()
    assert [x for u in want for x in readers.read_unit(u)] == _stdlib_rows(f)


@pytest.mark.parametrize("kind", ["jsonl", "json"])
def test_a_unit_reads_only_its_byte_range(tmp_path, kind):
    f = _write(tmp_path, kind, _rows(21))
    units = readers.plan_units([f], 7)
    mid = units[1]
    data = f.read_bytes()
    if kind == "jsonl":
        lines = data.split(b"\n")
        assert mid.offset == sum(len(line) + 1 for line in lines[:7])
        assert mid.end == sum(len(line) + 1 for line in lines[:14])
    else:
        assert data[mid.offset:mid.offset + 1] == b"{" and data[mid.end - 1:mid.end] == b"}"
        assert json.loads(b"[" + data[mid.offset:mid.end] + b"]") == [r for _, r in _stdlib_rows(f)[7:14]]
    # everything outside [offset, end) turned to garbage of the same length: the unit still reads
    garbage = tmp_path / ("garbage." + kind)
    garbage.write_bytes(b"\xff" * mid.offset + data[mid.offset:mid.end] + b"\xff" * (len(data) - mid.end))
    got = list(readers.read_unit(dataclasses.replace(mid, path=str(garbage))))
    assert got == _stdlib_rows(f)[7:14]


def test_parquet_units_decode_only_their_row_groups(tmp_path, monkeypatch):
    f = _write(tmp_path, "parquet_rg10", _rows(40))
    units = readers.plan_units([f], 7)
    assert {u.read_path for u in units} == {None}  # row groups of 10 <= 4 x 7: no staging
    seen = []
    orig = pq.ParquetFile.iter_batches

    def spy(self, *a, **kw):
        seen.append(kw.get("row_groups"))
        return orig(self, *a, **kw)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    u = next(u for u in units if (u.start, u.stop) == (7, 14))
    assert [r for r, _ in readers.read_unit(u)] == list(range(7, 14))
    assert seen == [[0, 1]]


def test_deep_nesting_and_bom_become_reasons_not_crashes(tmp_path):
    deep = '{"instruction": ' + "[" * 100000 + "]" * 100000 + ', "output": "x"}'
    good = [json.dumps({"instruction": f"q{i}", "output": "a"}) for i in range(3)]
    f = tmp_path / "deep.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + "\n".join([good[0], deep, good[1], good[2]]).encode())  # no final newline
    for units in (readers.plan_units([f], 2), [readers.ReadUnit(str(f), 0, 4)]):  # planned, and scanned from 0
        got = [item for u in units for item in readers.read_unit(u)]
        assert [r for r, _ in got] == [0, 1, 2, 3]
        assert got[0][1] == {"instruction": "q0", "output": "a"}  # the BOM is not part of the row
        assert isinstance(got[1][1], records.RecordError) and "malformed JSON: RecursionError" in str(got[1][1])
        assert [x["instruction"] for _, x in (got[2], got[3])] == ["q1", "q2"]
    g = tmp_path / "deep.json"
    g.write_text("\ufeff[" + ",".join([good[0], deep, good[1], good[2]]) + "]", encoding="utf-8")
    for units in (readers.plan_units([g], 3), [readers.ReadUnit(str(g), 0, -1)]):
        got = [item for u in units for item in readers.read_unit(u)]
        assert [r for r, _ in got] == [0, 1, 2, 3]
        assert isinstance(got[1][1], records.RecordError) and "malformed JSON: RecursionError" in str(got[1][1])
        assert [x["instruction"] for _, x in (got[0], got[2], got[3])] == ["q0", "q1", "q2"]


def test_malformed_json_array_reads_up_to_the_break(tmp_path):
    good = [json.dumps({"instruction": f"q{i}", "output": "a"}) for i in range(10)]
    head = ("[" + ", ".join(good) + ", ").encode()
    f = tmp_path / "broken.json"
    f.write_bytes(head + b'garbage {"instruction": "q10", "output": "a"}]')
    units = readers.plan_units([f], 4)
    assert [(u.start, u.stop) for u in units] == [(0, 4), (4, 8), (8, 10), (10, -1)]
    got = [item for u in units for item in readers.read_unit(u)]
    assert [r for r, _ in got] == list(range(10)) + [-1]
    assert [x["instruction"] for _, x in got[:10]] == [f"q{i}" for i in range(10)]
    assert isinstance(got[10][1], records.RecordError)
    assert f"malformed JSON array at byte {len(head)}" in str(got[10][1]) and "garbage" in str(got[10][1])
    whole = list(readers.read_unit(readers.ReadUnit(str(f), 0, -1)))  # the same when scanned whole
    assert [(r, str(x)) for r, x in whole] == [(r, str(x)) for r, x in got]
    # truncated: no closing bracket
    t = tmp_path / "truncated.json"
    t.write_bytes(("[" + ", ".join(good)).encode())
    got = [item for u in readers.plan_units([t], 4) for item in readers.read_unit(u)]
    assert [r for r, _ in got] == list(range(10)) + [-1] and "unexpected end of file" in str(got[-1][1])
    # an unclosed element
    u = tmp_path / "unclosed.json"
    u.write_bytes(("[" + ", ".join(good[:2]) + ', {"instruction": "q').encode())
    got = [item for un in readers.plan_units([u], 4) for item in readers.read_unit(un)]
    assert [r for r, _ in got] == [0, 1, -1] and "at byte" in str(got[-1][1])


def test_one_bad_element_is_one_bad_row(tmp_path):
    elems = [json.dumps({"instruction": "q0", "output": "a"}),
             '{"instruction": "missing comma" "output": "a"}',
             b'{"instruction": "caf\xe9", "output": "a"}'.decode("latin-1"),
             '{"instruction": "\\ud800 lone surrogate", "output": "a"}',
             '"a string"', "12.5", json.dumps({"instruction": "q6", "output": "a"})]
    f = tmp_path / "mixed.json"
    f.write_bytes(("[" + ",".join(elems) + "]").encode("latin-1"))
    got = [item for u in readers.plan_units([f], 3) for item in readers.read_unit(u)]
    assert [r for r, _ in got] == list(range(7))
    assert got[0][1]["instruction"] == "q0" and got[6][1]["instruction"] == "q6"
    assert "malformed JSON" in str(got[1][1])
    assert "not valid UTF-8 at byte" in str(got[2][1])
    assert got[3][1]["instruction"] == "\ud800 lone surrogate"  # valid JSON, returned as-is
    assert got[4][1] == "a string" and got[5][1] == 12.5  # not records: rejected later, with the row
    with pytest.raises(records.RecordError, match="expected an object"):
        records.normalize_record(got[4][1])
    j = tmp_path / "surrogate.jsonl"
    j.write_text('{"instruction": "\\udfff", "output": "a"}\n')
    assert [x for u in readers.plan_units([j], 3) for _, x in readers.read_unit(u)] == [
        {"instruction": "\udfff", "output": "a"}]


def test_json_edge_shapes(tmp_path):
    (tmp_path / "empty.json").write_text(" \n")
    (tmp_path / "empty_array.json").write_text("\ufeff [ \n ] \n")
    (tmp_path / "empty.jsonl").write_text("")
    assert readers.plan_units([tmp_path], 4) == []
    one = tmp_path / "one.json"
    one.write_text('  {"instruction": "q", "output": "a"}\n')
    (u,) = readers.plan_units([one], 4)
    assert (u.start, u.stop) == (0, 1) and list(readers.read_unit(u)) == [(0, {"instruction": "q", "output": "a"})]
    scalar = tmp_path / "scalar.json"
    scalar.write_text('"just text"')
    (u,) = readers.plan_units([scalar], 4)
    ((row, err),) = list(readers.read_unit(u))
    assert row == -1 and "cannot read file" in str(err) and "list of records" in str(err)
    after = tmp_path / "after.json"
    after.write_text('[{"instruction": "q", "output": "a"}] trailing')
    got = [item for u in readers.plan_units([after], 4) for item in readers.read_unit(u)]
    assert got[0] == (0, {"instruction": "q", "output": "a"}) and got[1][0] == -1 and "trailing" in str(got[1][1])


def test_gzip_inputs_are_found_staged_once_and_reused(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    a = _write(d, "jsonl.gz", _rows(9))
    b = _write(d, "json.gz", _rows(5))
    (d / "notes.txt").write_text("ignored")
    (d / "table.csv.gz").write_bytes(gzip.compress(b"a,b\n"))
    assert readers.input_files([d]) == sorted([a.resolve(), b.resolve()])
    assert readers.input_files([str(d / "*.gz")]) == sorted([a.resolve(), b.resolve(), (d / "table.csv.gz").resolve()])
    with pytest.raises(records.InputError, match="staging_dir"):
        readers.plan_units([d], 4)
    staging = tmp_path / "staged"
    first = readers.plan_units([d], 4, staging_dir=staging)
    staged = sorted(p for p in staging.iterdir() if p.suffix != ".ok")
    assert len(staged) == 2 and {p.suffix for p in staged} == {".json", ".jsonl"}
    assert sorted(p.name for p in staging.iterdir() if p.suffix == ".ok") == sorted(p.name + ".ok" for p in staged)
    mtimes = [p.stat().st_mtime_ns for p in staged]
    again = readers.plan_units([d], 4, staging_dir=staging)
    assert again == first and [p.stat().st_mtime_ns for p in staged] == mtimes
    assert [(u.path, u.start, u.stop) for u in first] == [(str(b.resolve()), 0, 4), (str(b.resolve()), 4, 5),
                                                         (str(a.resolve()), 0, 4), (str(a.resolve()), 4, 8),
                                                         (str(a.resolve()), 8, 9)]
    # the same file content read without staging (scanned from the start) gives the same rows
    for u in first:
        assert list(readers.read_unit(dataclasses.replace(u, offset=-1, end=-1, read_path=None))) == list(
            readers.read_unit(u))


def test_plans_are_deterministic(tmp_path):
    (tmp_path / "in").mkdir()
    for kind in ("json", "jsonl", "parquet", "jsonl.gz"):
        _write(tmp_path / "in", kind, _rows(30))
    one = readers.plan_units([tmp_path / "in"], 6, staging_dir=tmp_path / "s1")
    two = readers.plan_units([tmp_path / "in"], 6, staging_dir=tmp_path / "s1")
    other = readers.plan_units([tmp_path / "in"], 6, staging_dir=tmp_path / "s2")
    assert one == two and len(one) == 20
    assert [dataclasses.replace(u, read_path=None) for u in one] == [
        dataclasses.replace(u, read_path=None) for u in other]
    assert [u.key for u in one] == [u.key for u in other]


def test_corrupt_and_changed_files_report_every_row(tmp_path):
    bad_gz = tmp_path / "bad.jsonl.gz"
    bad_gz.write_bytes(b"\x1f\x8b not really gzip")
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(gzip.compress(b"".join(json.dumps({"instruction": f"q{i}", "output": "a"}).encode() + b"\n"
                                                 for i in range(2000)))[:-40])
    bad_pq = tmp_path / "bad.parquet"
    bad_pq.write_bytes(b"PAR1 this is not a parquet file")
    staging = tmp_path / "staged"
    units = readers.plan_units([bad_gz, truncated, bad_pq], 100, staging_dir=staging)
    assert [(u.start, u.stop, u.read_path) for u in units] == [(0, -1, None)] * 3
    assert list(staging.iterdir()) == []  # no half-written copies
    for u in (units[0], units[2]):
        ((row, err),) = list(readers.read_unit(u))
        assert row == -1 and "cannot read file" in str(err)
    got = list(readers.read_unit(units[1]))  # what can be read, then why the rest cannot
    assert got[-1][0] == -1 and "cannot read file" in str(got[-1][1])
    assert [r for r, _ in got[:-1]] == list(range(len(got) - 1)) and len(got) > 1
    # files that change after planning: every planned row still yields one item, with the reason
    f = _write(tmp_path, "jsonl", _rows(10))
    (u,) = [u for u in readers.plan_units([f], 4) if u.start == 4]
    f.write_bytes(b"\n".join(f.read_bytes().split(b"\n")[:6]))
    got = list(readers.read_unit(u))
    assert [r for r, _ in got] == [4, 5, 6, 7] and got[1][1]["conversations"][0]["value"].startswith("frage 5")
    assert all(isinstance(x, records.RecordError) and "fewer rows" in str(x) for _, x in got[2:])
    p = _write(tmp_path, "parquet_rg10", _rows(10))
    (u,) = [u for u in readers.plan_units([p], 4) if u.start == 4]
    p.write_bytes(b"PAR1 garbage")
    got = list(readers.read_unit(u))
    assert [r for r, _ in got] == [4, 5, 6, 7] and all("cannot read file" in str(x) for _, x in got)


@pytest.mark.parametrize("kind", ["parquet", "jsonl.gz", "json.gz"])
def test_a_unit_whose_staged_copy_is_gone_reads_the_original(tmp_path, kind):
    f = _write(tmp_path, kind, _rows(20))
    units = readers.plan_units([f], 4, staging_dir=tmp_path / "staged")
    want = [item for u in units for item in readers.read_unit(u)]
    os.remove(units[0].read_path)
    assert [item for u in units for item in readers.read_unit(u)] == want == _stdlib_rows(f)
