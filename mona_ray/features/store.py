"""The feature store: pooled rows of one readout in Parquet parts, keyed by content hash.

One folder per embedding fingerprint (:func:`embedding_fingerprint`: the model, the
rendering, the compute dtype, the readout and its SAE) holds ``part-<key>.parquet`` files
of schema :data:`EMBEDDING_SCHEMA` (sparse readouts: ascending latent ``indices`` and their
mean-pooled ``values``; dense ones: ``values`` only, ``indices`` empty). The pipeline and
the evaluation write and read the same folders, so either reuses what the other embedded.

A part is written once, atomically, and named after the content it holds, so parts are
never rewritten with other rows; a content hash can still appear in two parts (two runs
sharing a store embedded the same new row at once), and then the part whose path sorts
first is the one used, everywhere.

The driver never converts the store to Python: :meth:`FeatureStore.index` is one Arrow table
``(content_hash, part)`` read once per run (``part`` numbers :attr:`FeatureStore.paths`, so
no path is repeated per row), and :meth:`FeatureStore.read` opens only the parts that hold
the requested rows and keeps only those rows, counting what it read in ``last_read``.

Every part is recorded when written (``core.io.write_part``: its row count and byte size in a
sidecar) and checked when the index is built: a part that does not check (cut short, damaged,
not Parquet) is moved to ``<store>/quarantine/`` with a warning naming it, and its rows are
simply missing from the index, so the run embeds them again (:attr:`FeatureStore.quarantined`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..core.io import DamagedFile, check_recorded, read_parquet, set_aside, sha, write_part

EMBEDDING_SCHEMA = pa.schema([
    ("content_hash", pa.string()), ("n_tokens", pa.int32()), ("n_pooled", pa.int32()),
    ("indices", pa.list_(pa.int32())), ("values", pa.list_(pa.float32())),
])
INDEX_SCHEMA = pa.schema([("content_hash", pa.string()), ("part", pa.int32())])
STORE_VERSION = 3
# How a part's columns are laid out in Parquet: the ascending latent indices as deltas, bit-packed
# (DELTA_BINARY_PACKED), the values' bytes split into streams (BYTE_STREAM_SPLIT: zstd then finds
# the exponents' redundancy), both then zstd-compressed: 34.5% fewer bytes than Parquet's default
# layout on rows of 15.6k non-zeros of 131,072 latents (docs/benchmarks.md, `width`). A layout, not a
# format: a reader gets the same arrays back bit for bit, every reader decodes both layouts, and
# parts written before (dictionary / plain) and after share a store, so the fingerprint (what the
# rows hold) and STORE_VERSION are unchanged by it.
PART_ENCODING = {"use_dictionary": ["content_hash", "n_tokens", "n_pooled"],
                 "column_encoding": {"indices.list.element": "DELTA_BINARY_PACKED",
                                     "values.list.element": "BYTE_STREAM_SPLIT"}}


def embedding_fingerprint(model_fp: str, dtype: str, render: dict, readout_spec: dict, sae_fp: str | None,
                          pad_multiple: int, sae_chunk_tokens: int, value_dtype: str) -> str:
    """The store folder of a readout's rows: everything that can change one stored bit."""
    return sha({"v": STORE_VERSION, "model": model_fp, "dtype": dtype, "render": render, "readout": readout_spec,
                "sae": sae_fp, "pad_multiple": int(pad_multiple), "sae_chunk_tokens": int(sae_chunk_tokens),
                "value_dtype": value_dtype})


def first_per_key(t: pa.Table, key: str, order: str) -> pa.Table:
    """One row per distinct ``key``: the one with the smallest ``order`` (Arrow only)."""
    if len(t) == 0:
        return t
    tmp = t.append_column("__i", pa.array(np.arange(len(t), dtype=np.int64)))
    tmp = tmp.sort_by([(order, "ascending"), ("__i", "ascending")])
    first = tmp.group_by(key, use_threads=False).aggregate([("__i", "first")])  # ordered: the smallest `order`
    keep = np.sort(first.column("__i_first").to_numpy())
    return t if len(keep) == len(t) else t.take(pa.array(keep))


def groups_of(keys, within=None) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """Positions grouped by key with one sort (linear after it, whatever the number of groups):
    ``(order, [(key, a, b)])``, where ``order[a:b]`` are the positions holding ``key``; keys
    ascending, positions in ``within`` order inside a group (else in their own order)."""
    keys = np.asarray(keys)
    order = np.argsort(keys, kind="stable") if within is None else np.lexsort((np.asarray(within), keys))
    k = keys[order]
    bounds = np.flatnonzero(np.r_[True, k[1:] != k[:-1], True]) if len(k) else np.zeros(1, np.int64)
    return order, [(int(k[a]), int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def read_wanted(paths, wanted: pa.Table, columns: list[str] | None = None):
    """The stored rows that ``wanted`` (``content_hash``, ``part`` numbering ``paths``) asks for:
    one table per part that holds any (parts ascending), each part's file read once. The
    wanted hashes are grouped by part with one sort, so the cost is linear in the rows asked for."""
    order, groups = groups_of(wanted.column("part").to_numpy())
    hashes = wanted.column("content_hash").take(pa.array(order)).combine_chunks()
    for part, a, b in groups:
        t = read_parquet(paths[part], columns)
        yield t.filter(pc.is_in(t.column("content_hash"), value_set=hashes.slice(a, b - a)))


def rows_table(hashes, n_tokens, n_pooled, outputs, value_dtype: str = "float32") -> pa.Table:
    """A part's table from per-row outputs: ``(indices, values)`` pairs (sparse) or vectors (dense)."""
    sparse = bool(outputs) and isinstance(outputs[0], tuple)
    # float16 values are handed to Arrow as float16 (pyarrow converts no float32 array into a float16 list)
    vdt, vtype = (np.float16, pa.float16()) if value_dtype == "float16" else (np.float32, pa.float32())
    if sparse:
        idx = [o[0] for o in outputs]
        vals = [np.asarray(o[1], dtype=vdt) for o in outputs]
    else:
        idx = [np.zeros(0, np.int32)] * len(outputs)
        vals = [np.asarray(o, dtype=vdt) for o in outputs]
    return pa.table({
        "content_hash": pa.array(list(hashes), pa.string()),
        "n_tokens": pa.array(list(n_tokens), pa.int32()),
        "n_pooled": pa.array(list(n_pooled), pa.int32()),
        "indices": pa.array(idx, pa.list_(pa.int32())),
        "values": pa.array(vals, pa.list_(vtype)),
    })


def write_store_part(table: pa.Table, path: str | Path, encoding: dict | None = None) -> None:
    """A store part as every writer writes it (the pipeline's actors, the local executor), in
    :data:`PART_ENCODING` unless ``encoding`` says otherwise (``bench width`` compares layouts)."""
    write_part(table, path, row_group_size=512, encoding=PART_ENCODING if encoding is None else encoding)


class FeatureStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self._index: pa.Table | None = None
        self.paths: list[str] = []
        self.last_read = {"parts": 0, "rows": 0}
        self.quarantined: list[dict] = []  # parts moved aside by this object: {part, reason, moved_to}

    def part_path(self, key: str) -> Path:
        return self.root / f"part-{key}.parquet"

    def parts(self) -> list[Path]:
        return sorted(self.root.glob("part-*.parquet"))

    def index(self) -> pa.Table:
        """``(content_hash, part)`` for every stored row, one row per hash (read once, then kept)."""
        if self._index is None:
            self._index = INDEX_SCHEMA.empty_table()
            self.paths = []
            self.add_parts(self.parts())
        return self._index

    def add_parts(self, paths) -> None:
        """Record parts (written this run) without re-reading the others."""
        old = self.index()  # the parts already in the folder are read first
        new_paths = sorted({str(p) for p in paths} - set(self.paths))
        hashes = {}
        for f in new_paths:
            problem = check_recorded(f)
            if problem is None:
                try:
                    hashes[f] = read_parquet(f, ["content_hash"]).column("content_hash")
                except DamagedFile as e:  # a footer that reads over a damaged column chunk (filesystem errors propagate)
                    problem = f"its rows cannot be read ({e.reason})"
            if problem is not None and problem != "missing":
                set_aside(f, problem, "feature store part", "its rows are embedded again", self.quarantined)
        new_paths = [f for f in new_paths if f in hashes]
        if not new_paths:
            return
        merged = sorted(self.paths + new_paths)
        pos = {p: i for i, p in enumerate(merged)}
        remap = np.asarray([pos[p] for p in self.paths], dtype=np.int32)
        tabs = [old.set_column(1, "part", pa.array(remap[old.column("part").to_numpy()], pa.int32()))] if len(old) else []
        for f in new_paths:
            h = hashes[f]
            tabs.append(pa.table({"content_hash": h, "part": pa.array(np.full(len(h), pos[f], np.int32))}))
        self.paths = merged
        self._index = first_per_key(pa.concat_tables(tabs), "content_hash", "part") if tabs else INDEX_SCHEMA.empty_table()

    def write(self, key: str, table: pa.Table) -> Path:
        """Write one part (atomically, recorded) and index it."""
        path = self.part_path(key)
        write_store_part(table, path)
        self.add_parts([path])
        return path

    def locate(self, hashes: pa.Array | pa.ChunkedArray) -> pa.Table:
        """The index rows of ``hashes`` (those that are stored)."""
        idx = self.index()
        return idx.filter(pc.is_in(idx.column("content_hash"), value_set=pa.array(pc.unique(hashes))))

    def missing(self, hashes) -> list[str]:
        """Which of ``hashes`` are not stored yet (in the given order, each once)."""
        arr = pa.array(list(dict.fromkeys(hashes)), pa.string())
        have = pc.is_in(arr, value_set=self.index().column("content_hash").combine_chunks())
        return arr.filter(pc.invert(have)).to_pylist()

    def iter_read(self, hashes, columns: list[str] | None = None):
        """The stored rows of ``hashes``, one table per store part that holds any of them (in
        store order): memory bounded by one part, whatever the number of rows (:func:`read_wanted`)."""
        if not isinstance(hashes, (pa.Array, pa.ChunkedArray)):
            hashes = pa.array(list(hashes), pa.string())
        cols = None if columns is None else list(dict.fromkeys(["content_hash", *columns]))
        self.last_read = {"parts": 0, "rows": 0}
        wanted = self.locate(hashes)  # loads the index (and self.paths) on a store's first read
        for t in read_wanted(self.paths, wanted, cols):
            self.last_read["parts"] += 1
            self.last_read["rows"] += len(t)
            yield t

    def read(self, hashes, columns: list[str] | None = None) -> pa.Table:
        """The stored rows of ``hashes`` (one per hash, in store order), reading only the parts
        that hold them."""
        cols = None if columns is None else list(dict.fromkeys(["content_hash", *columns]))
        out = list(self.iter_read(hashes, columns))
        schema = EMBEDDING_SCHEMA if cols is None else pa.schema([EMBEDDING_SCHEMA.field(c) for c in cols])
        t = pa.concat_tables(out, promote_options="permissive") if out else schema.empty_table()
        t = first_per_key(t, "content_hash", "content_hash")
        self.last_read["rows"] = len(t)
        return t

    def read_ordered(self, hashes: list[str], columns: list[str]) -> pa.Table:
        """The stored rows of ``hashes`` in that order (a hash may repeat); every hash must be stored."""
        t = self.read(pa.array(list(dict.fromkeys(hashes)), pa.string()), columns)
        at = pc.index_in(pa.array(list(hashes), pa.string()), value_set=t.column("content_hash").combine_chunks())
        if pc.any(pc.is_null(at)).as_py():
            raise KeyError(f"rows missing from the feature store {self.root}")
        return t.take(at)
