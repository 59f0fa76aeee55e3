"""The embedding store: pooled sparse rows in Parquet parts, keyed by content hash.

One folder per embedding fingerprint holds ``part-<key>.parquet`` files (schema
``stages.EMBEDDING_SCHEMA``). A part is written once, atomically, and named after the
content it holds, so parts are never rewritten with other rows; a content hash can still
appear in two parts (two runs sharing a store embedded the same new row at once), and then
the part whose path sorts first is the one used, everywhere.

The driver never converts the store to Python: :meth:`EmbeddingStore.index` is one Arrow
table ``(content_hash, part)`` read once per run (only the ``content_hash`` column of each
part), and :meth:`EmbeddingStore.read` opens only the parts that hold the requested rows
and keeps only those rows, counting what it read in ``last_read``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

INDEX_SCHEMA = pa.schema([("content_hash", pa.string()), ("part", pa.string())])


def first_per_key(t: pa.Table, key: str, order: str) -> pa.Table:
    """One row per distinct ``key``: the one with the smallest ``order`` (Arrow only)."""
    if len(t) == 0:
        return t
    tmp = t.append_column("__i", pa.array(np.arange(len(t), dtype=np.int64)))
    tmp = tmp.sort_by([(order, "ascending"), ("__i", "ascending")])
    first = tmp.group_by(key, use_threads=False).aggregate([("__i", "first")])  # ordered: the smallest `order`
    keep = np.sort(first.column("__i_first").to_numpy())
    return t if len(keep) == len(t) else t.take(pa.array(keep))


class EmbeddingStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self._index: pa.Table | None = None
        self.last_read = {"parts": 0, "rows": 0}

    def part_path(self, key: str) -> Path:
        return self.root / f"part-{key}.parquet"

    def parts(self) -> list[Path]:
        return sorted(self.root.glob("part-*.parquet"))

    def index(self) -> pa.Table:
        """``(content_hash, part)`` for every stored row, one row per hash (read once, then kept)."""
        if self._index is None:
            self._index = self._read_index(self.parts())
        return self._index

    def add_parts(self, paths) -> None:
        """Record parts written this run without re-reading the others."""
        new = self._read_index(sorted(Path(p) for p in paths))
        self._index = first_per_key(pa.concat_tables([self.index(), new]), "content_hash", "part")

    @staticmethod
    def _read_index(paths: list[Path]) -> pa.Table:
        tabs = []
        for f in paths:
            h = pq.read_table(f, columns=["content_hash"]).column("content_hash")
            tabs.append(pa.table({"content_hash": h, "part": pa.array([str(f)] * len(h), pa.string())}))
        if not tabs:
            return INDEX_SCHEMA.empty_table()
        return first_per_key(pa.concat_tables(tabs), "content_hash", "part")

    def locate(self, hashes: pa.Array | pa.ChunkedArray) -> pa.Table:
        """The index rows of ``hashes`` (those that are stored)."""
        idx = self.index()
        return idx.filter(pc.is_in(idx.column("content_hash"), value_set=pa.array(pc.unique(hashes))))

    def read(self, hashes, columns: list[str] | None = None) -> pa.Table:
        """The stored rows of ``hashes`` (one per hash), reading only the parts that hold them."""
        if not isinstance(hashes, (pa.Array, pa.ChunkedArray)):
            hashes = pa.array(list(hashes), pa.string())
        where = self.locate(hashes)
        cols = None if columns is None else list(dict.fromkeys(["content_hash", *columns]))
        out, n_parts = [], 0
        for part in pc.unique(where.column("part")).to_pylist():
            want = where.filter(pc.equal(where.column("part"), part)).column("content_hash")
            t = pq.read_table(part, columns=cols)
            out.append(t.filter(pc.is_in(t.column("content_hash"), value_set=want.combine_chunks())))
            n_parts += 1
        from ..pipeline.stages import EMBEDDING_SCHEMA

        schema = EMBEDDING_SCHEMA if cols is None else pa.schema([EMBEDDING_SCHEMA.field(c) for c in cols])
        t = pa.concat_tables(out, promote_options="permissive") if out else schema.empty_table()
        t = first_per_key(t, "content_hash", "content_hash")
        self.last_read = {"parts": n_parts, "rows": len(t)}
        return t
