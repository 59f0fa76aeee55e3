"""Writing files so that a crash never leaves half of one, and hashing settings into fingerprints.

Every file mona_ray writes goes through :func:`atomic_path`: written to a unique temporary
name next to its destination, then renamed into place (``os.replace`` is atomic on POSIX),
so a reader sees the old file or the whole new one, and a retried task rewrites the same
name with the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path


def sha(obj, n: int = 16) -> str:
    """A stable hex fingerprint of a JSON-able object (keys sorted; the first ``n`` hex digits)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


@contextmanager
def atomic_path(dest: str | Path):
    """``with atomic_path(p) as tmp: write(tmp)``: ``tmp`` replaces ``p`` only if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink()


def write_text(text: str, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(obj, path: str | Path) -> None:
    write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n", path)


def write_jsonl(rows, path: str | Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_parquet(path: str | Path, columns: list[str] | None = None, rows=None):
    """One Parquet file (a part) as an Arrow table: ``columns`` (all if None), and only the rows
    at positions ``rows`` if given.

    ``pq.ParquetFile``, not ``pq.read_table``: read_table builds a dataset per call, ~4x the
    cost on a 256-row part (2.7 vs 0.7 ms, measured), and a 1M-row run reads every one of its
    thousands of parts in several stages."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as f:
        table = f.read(columns=columns)
    return table if rows is None else table.take(pa.array(rows, pa.int64()))


def write_parquet(table, path: str | Path, row_group_size: int = 1024) -> None:
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=row_group_size)
