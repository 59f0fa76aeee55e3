"""The feature store's Parquet layout: parts are written delta/byte-stream-split encoded, read back
bit for bit, and parts written in the previous (Parquet default) layout still read the same."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mona_ray.core.io import write_part
from mona_ray.features.store import (PART_ENCODING, FeatureStore, embedding_fingerprint, rows_table,
                                     write_store_part)


def _rows(n, latents, seed, value_dtype="float32"):
    rng = np.random.default_rng(seed)
    hashes = [f"{seed:02d}{i:014x}" for i in range(n)]
    outs = []
    for i in range(n):
        idx = np.sort(rng.choice(latents, rng.integers(0, 60), replace=False)).astype(np.int32)
        outs.append((idx, rng.lognormal(-1, 1, len(idx)).astype(np.float16 if value_dtype == "float16" else np.float32)))
    return rows_table(hashes, [7] * n, [6] * n, outs, value_dtype)


def _encodings(path):
    md = pq.ParquetFile(path).metadata.row_group(0)
    return {md.column(c).path_in_schema: set(md.column(c).encodings) for c in range(md.num_columns)}


@pytest.mark.parametrize("value_dtype", ["float32", "float16"])
def test_parts_are_written_delta_and_byte_stream_split_and_read_back_bit_for_bit(tmp_path, value_dtype):
    t = _rows(40, 131072, 1, value_dtype)
    write_store_part(t, tmp_path / "part-a.parquet")
    enc = _encodings(tmp_path / "part-a.parquet")
    assert "DELTA_BINARY_PACKED" in enc["indices.list.element"] and "PLAIN" not in enc["indices.list.element"]
    assert "BYTE_STREAM_SPLIT" in enc["values.list.element"]
    back = FeatureStore(tmp_path).read(t.column("content_hash"))
    assert back.schema.field("values").type == t.schema.field("values").type
    for c in ("content_hash", "n_tokens", "n_pooled", "indices"):
        assert back.column(c).equals(t.column(c))
    a = np.concatenate(back.column("values").to_numpy(zero_copy_only=False))
    b = np.concatenate(t.column("values").to_numpy(zero_copy_only=False))
    assert a.dtype == b.dtype and a.tobytes() == b.tobytes()  # the bits, not just equal values


def test_a_store_written_in_the_previous_layout_reads_the_same_beside_new_parts(tmp_path):
    """Parts written before the layout changed (Parquet's defaults: dictionary / plain) and after
    share a store folder and its fingerprint, and every row reads as it was written."""
    old, new = _rows(30, 9216, 2), _rows(30, 9216, 3)
    write_part(old, tmp_path / "part-old.parquet", row_group_size=512)  # the writer as it was: no layout options
    write_store_part(new, tmp_path / "part-new.parquet")
    assert "DELTA_BINARY_PACKED" not in _encodings(tmp_path / "part-old.parquet")["indices.list.element"]
    store = FeatureStore(tmp_path)
    want = pa.concat_tables([old, new])
    got = store.read_ordered(want.column("content_hash").to_pylist(), ["n_pooled", "indices", "values"])
    for c in ("content_hash", "n_pooled", "indices", "values"):
        assert got.column(c).equals(want.column(c))
    assert store.quarantined == []


def test_the_layout_leaves_the_fingerprint_alone():
    """The fingerprint names what the rows hold: a layout change must not send every existing
    store to be embedded again (STORE_VERSION 3, the value of the stores written before it)."""
    fp = embedding_fingerprint("m", "float32", {"mode": "chat_template"}, {"kind": "sae"}, "s", 16, 4096, "float32")
    assert fp == "8068915b9927a057"
    assert set(PART_ENCODING["column_encoding"]) == {"indices.list.element", "values.list.element"}


def test_float16_values_are_stored_as_float16():
    """embed.value_dtype=float16: the engine hands float16 (or float32) arrays; both are stored as float16."""
    outs = [(np.array([3, 9], np.int32), np.array([0.5, 0.25], np.float32)),
            (np.array([1], np.int32), np.array([1.5], np.float16))]
    t = rows_table(["a", "b"], [2, 1], [2, 1], outs, "float16")
    assert t.schema.field("values").type == pa.list_(pa.float16())
    assert [list(map(float, v)) for v in t.column("values").to_pylist()] == [[0.5, 0.25], [1.5]]
