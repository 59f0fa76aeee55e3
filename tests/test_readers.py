"""Arrow inputs: plain ``.arrow`` files (IPC stream and file formats) and folders written by
Hugging Face ``datasets``' ``save_to_disk``, read with pyarrow alone.

``datasets`` is not installed here, so its layout is written by hand with pyarrow, as
``datasets`` writes it (``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``): IPC *stream*
files ``data-0000i-of-0000N.arrow`` in record batches (``writer_batch_size``), the features in
the schema's ``huggingface`` metadata, ``state.json`` listing the files, ``dataset_info.json``;
a DatasetDict adds ``dataset_dict.json`` and one such folder per split.
"""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import tiny_overrides
from mona_ray.config import load_config
from mona_ray.core.readers import input_files, plan_units, read_unit
from mona_ray.core.records import InputError, RecordError
from mona_ray.pipeline.cli import run

FEATURES = {"id": {"dtype": "string", "_type": "Value"}, "instruction": {"dtype": "string", "_type": "Value"},
            "input": {"dtype": "string", "_type": "Value"}, "output": {"dtype": "string", "_type": "Value"}}


def _rows(n, prefix="r"):
    return [{"id": f"{prefix}{i}", "instruction": f"add {i} and {i + 1}", "input": "", "output": f"{2 * i + 1}"}
            for i in range(n)]


def _table(rows):
    schema = pa.schema([(k, pa.string()) for k in FEATURES],
                       metadata={"huggingface": json.dumps({"info": {"features": FEATURES}})})
    return pa.Table.from_pylist(rows, schema=schema)


def save_to_disk(folder, rows, shards=2, batch=4, split=None):
    """A ``Dataset.save_to_disk(folder, num_shards=shards)`` folder, ``writer_batch_size=batch``."""
    folder.mkdir(parents=True)
    names, per = [], -(-len(rows) // shards)
    for s in range(shards):
        name = f"data-{s:05d}-of-{shards:05d}.arrow"
        t = _table(rows[s * per:(s + 1) * per])
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, t.schema) as w:
            for b in t.to_batches(max_chunksize=batch):
                w.write_batch(b)
        names.append(name)
    (folder / "state.json").write_text(json.dumps({
        "_data_files": [{"filename": n} for n in names], "_fingerprint": "0123456789abcdef", "_format_columns": None,
        "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": split}, indent=2))
    (folder / "dataset_info.json").write_text(json.dumps({
        "citation": "", "description": "", "features": FEATURES, "homepage": "", "license": ""}, indent=2))
    return folder


def save_dict_to_disk(folder, splits: dict, **kw):
    """A ``DatasetDict.save_to_disk(folder)`` folder."""
    folder.mkdir(parents=True)
    (folder / "dataset_dict.json").write_text(json.dumps({"splits": list(splits)}))
    for name, rows in splits.items():
        save_to_disk(folder / name, rows, split=name, **kw)
    return folder


def _read(paths, rpu):
    units = plan_units(paths, rpu)
    return units, [(u.path.rsplit("/", 1)[-1], r, rec) for u in units for r, rec in read_unit(u)]


def test_a_saved_dataset_reads_back_every_row_in_order(tmp_path):
    rows = _rows(23)
    d = save_to_disk(tmp_path / "ds", rows, shards=2, batch=4)
    (d / "cache-3f2a.arrow").write_bytes(b"not listed in state.json: never read")  # what .map() leaves behind
    assert [f.name for f in input_files([d])] == ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    units, got = _read([d], 5)  # units cut across record batches (4 rows) and end at each file's end
    assert [(u.path.rsplit("/", 1)[-1][:10], u.start, u.stop) for u in units] == [
        ("data-00000", 0, 5), ("data-00000", 5, 10), ("data-00000", 10, 12),
        ("data-00001", 0, 5), ("data-00001", 5, 10), ("data-00001", 10, 11)]
    assert [rec for _, _, rec in got] == rows
    assert [(f[:10], r) for f, r, _ in got] == [("data-00000", r) for r in range(12)] + [("data-00001", r) for r in range(11)]
    assert plan_units([d], 5) == units  # a pure function of the files


def test_plain_arrow_files_stream_and_file_format_alike(tmp_path):
    rows = _rows(10)
    t = _table(rows)
    with pa.OSFile(str(tmp_path / "a_stream.arrow"), "wb") as sink, pa.ipc.new_stream(sink, t.schema) as w:
        for b in t.to_batches(max_chunksize=3):
            w.write_batch(b)
    with pa.OSFile(str(tmp_path / "b_file.arrow"), "wb") as sink, pa.ipc.new_file(sink, t.schema) as w:
        for b in t.to_batches(max_chunksize=3):
            w.write_batch(b)
    assert [f.name for f in input_files([tmp_path])] == ["a_stream.arrow", "b_file.arrow"]
    units, got = _read([tmp_path], 4)
    assert [(u.start, u.stop) for u in units] == [(0, 4), (4, 8), (8, 10)] * 2
    assert [rec for f, _, rec in got if f == "a_stream.arrow"] == rows
    assert [rec for f, _, rec in got if f == "b_file.arrow"] == rows
    mid = units[4]  # rows 4..7 of the file-format file only
    assert [(r, rec["id"]) for r, rec in read_unit(mid)] == [(r, f"r{r}") for r in range(4, 8)]


def test_a_dataset_dict_names_its_splits(tmp_path):
    dd = save_dict_to_disk(tmp_path / "dd", {"train": _rows(6), "test": _rows(3, "t")})
    with pytest.raises(InputError, match=r"DatasetDict with splits train, test: name the one to read, e\.g\. "
                                         r"'.*/dd/train'") as e:
        input_files([dd])
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match=r"splits train, test"):  # also when found inside a folder named as input
        input_files([tmp_path])
    _, got = _read([dd / "test"], 2)
    assert [rec["id"] for *_, rec in got] == ["t0", "t1", "t2"]
    one = save_dict_to_disk(tmp_path / "one" / "dd1", {"train": _rows(5)})
    assert [f.parent.name for f in input_files([one])] == ["train", "train"]  # one split: read as that split
    assert [rec for *_, rec in _read([one], 3)[1]] == _rows(5)


def test_a_broken_saved_dataset_says_what_is_wrong(tmp_path):
    d = save_to_disk(tmp_path / "ds", _rows(4))
    (d / "data-00001-of-00002.arrow").unlink()
    with pytest.raises(InputError, match=r"'data-00001-of-00002.arrow', listed in its state.json, is missing"):
        input_files([d])
    (d / "state.json").write_text("{not json")
    with pytest.raises(InputError, match=r"state.json.* cannot be read as a datasets save_to_disk state"):
        input_files([d])


def test_a_truncated_or_corrupt_arrow_file_reports_the_rest(tmp_path):
    rows = _rows(12)
    d = save_to_disk(tmp_path / "ds", rows, shards=1, batch=4)
    f = d / "data-00000-of-00001.arrow"
    with pa.OSFile(str(f)) as fh:  # where each IPC message (schema, three record batches) ends
        msgs = pa.ipc.MessageReader.open_stream(fh)
        ends = [(msgs.read_next_message(), fh.tell())[1] for _ in range(4)]
    f.write_bytes(f.read_bytes()[:ends[2] + 40])  # cut inside the third batch
    units, got = _read([d], 3)
    good = [(r, rec) for _, r, rec in got if not isinstance(rec, RecordError)]
    assert good == list(enumerate(rows[:8]))  # the two whole batches
    bad = [(r, str(rec)) for _, r, rec in got if isinstance(rec, RecordError)]
    assert len(bad) == 1 and bad[0][0] == -1 and bad[0][1].startswith("cannot read file")
    assert (units[-1].start, units[-1].stop) == (8, -1)
    g = tmp_path / "garbage.arrow"
    g.write_bytes(b"ARROW1 but nothing after it")
    assert [(r, type(rec)) for r, rec in read_unit(plan_units([g], 5)[0])] == [(-1, RecordError)]


def test_a_saved_dataset_runs_through_the_pipeline_with_bad_rows_rejected(ray_local, tiny_lm, tiny_sae, tiny_data,
                                                                          tmp_path):
    """source: a save_to_disk folder (the tiny pool's rows plus two bad rows); target: a DatasetDict's
    split. Bad rows are rejected naming file and row; every other row scores as it does from Parquet."""
    pool = pq.read_table(tiny_data["source"]).to_pylist()
    rows = [{k: r.get(k) for k in FEATURES} for r in pool]
    rows.insert(50, {"id": "bad_null", "instruction": "q", "input": "", "output": None})
    rows.insert(70, {"id": "bad_empty", "instruction": "", "input": "", "output": ""})
    src = save_to_disk(tmp_path / "pool", rows, shards=2, batch=16)  # 46 rows a file: bad rows at 50 -> 4, 70 -> 24
    tgt_rows = [json.loads(x) for x in tiny_data["target"].read_text().splitlines()]
    tgt = save_dict_to_disk(tmp_path / "target", {"train": tgt_rows[:8], "test": tgt_rows[8:]}, shards=1)
    out = tmp_path / "out"
    m = run(load_config(tiny_overrides(tiny_lm, tiny_sae, {"source": src, "target": tgt / "train"}, out)), quiet=True)
    rej = {(r["file"].rsplit("/", 1)[-1], r["row"]): r for r in pq.read_table(out / "rejected.parquet").to_pylist()}
    assert set(rej) == {("data-00001-of-00002.arrow", 4), ("data-00001-of-00002.arrow", 24)}
    assert "'output' is null" in rej[("data-00001-of-00002.arrow", 4)]["reason"]
    assert "empty" in rej[("data-00001-of-00002.arrow", 24)]["reason"]
    assert m["counts"]["source"]["rows_in"] == 92 and m["counts"]["source"]["rows_scored"] == 90
    assert m["counts"]["target"]["rows_usable"] == 8

    ref = tmp_path / "ref"  # the same usable rows from Parquet, the same target from JSONL
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tgt_rows[:8]))
    run(load_config(tiny_overrides(tiny_lm, tiny_sae, {"source": tiny_data["source"], "target": tmp_path / "t.jsonl"},
                                   ref)), quiet=True)
    got = pq.read_table(out / "scores.parquet").select(["id", "score"]).sort_by("id")
    want = pq.read_table(ref / "scores.parquet").select(["id", "score"]).sort_by("id")
    assert got.equals(want)
    assert pq.read_table(out / "selected.parquet").column("id").to_pylist() == \
        pq.read_table(ref / "selected.parquet").column("id").to_pylist()
