"""What every reader shares: the read unit, staged copies, and parsing one JSON row.

Planning splits every input into units of ``rows_per_unit`` rows in one streaming pass
whose cost is O(file size) and whose memory is bounded (a few MiB); reading one unit
costs O(unit size). Inputs that cannot be split where they are (gzip, Parquet with row
groups too large to split) are staged once, at plan time, into ``staging_dir``; the
units read that copy (``ReadUnit.read_path``).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .. import storage
from ..io import recorded_path, reusable
from ..records import InputError, RecordError

_CHUNK = 4 << 20  # bytes read per I/O call when scanning
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class ReadUnit:
    """Rows ``[start, stop)`` of one input file: the unit of reading, embedding and resume.

    ``path`` is always the user's file (it is what rejected/scores files report); rows are
    numbered in it from 0. ``offset``/``end`` are the byte range of the unit's rows in the
    file actually read (JSONL and JSON arrays; -1 = unknown: the reader scans from the start),
    ``read_path`` that file when it is a staged copy (decompressed gzip, re-chunked Parquet).
    ``stop == -1``: the number of rows is unknown (an unreadable file, or the rest of a JSON
    array after the point where it is malformed); reading it yields a single ``(-1, RecordError)``
    after any rows it can read. ``key`` depends on path/start/stop only.
    """

    path: str
    start: int
    stop: int
    offset: int = -1
    end: int = -1
    read_path: str | None = None

    @property
    def key(self) -> str:
        return hashlib.sha256(f"{self.path}:{self.start}:{self.stop}".encode()).hexdigest()[:16]


class _CorruptInput(Exception):
    """An input that cannot be staged because it cannot be read."""


def _need_staging(staging: Path | None, f: Path, why: str) -> Path:
    if staging is None:
        raise InputError(f"input {str(f)!r} must be staged before it can be split into units ({why}), but no "
                         "staging_dir was given: pass plan_units(..., staging_dir=<a writable folder>)")
    staging.mkdir(parents=True, exist_ok=True)
    return staging


def _staged_name(f: Path | str, *extra) -> str:
    """A staged copy's name: its input's path or URL and version (size and mtime or ETag), ``extra``."""
    v = storage.stat(f)
    return hashlib.sha256(":".join(map(str, (f, v.size, v.version, *extra))).encode()).hexdigest()[:32]


def _stage_once(dest: Path, write) -> Path:
    """``write(tmp)`` once into ``dest`` via a temporary file and an atomic rename, recorded
    (``io.record``); an existing ``dest`` is reused when it checks (it is named after its input,
    so it is never stale), and a damaged one is moved to ``quarantine/`` and written again."""
    if dest.exists() and dest.suffix != ".parquet" and not dest.with_name(dest.name + ".ok").exists():
        dest.unlink()  # staged by an older version, which kept no record: staged again, not quarantined
    if reusable(dest, "staged copy"):
        return dest
    with recorded_path(dest) as tmp:
        write(tmp)
    return dest


def _stage_gzip(f: Path, kind: str, staging: Path) -> Path:
    """Decompress ``f`` once (streaming) into ``staging/<sha>.<kind>``; reuse an existing copy."""
    def write(tmp: Path) -> None:
        with storage.open_stream(f) as raw, gzip.GzipFile(fileobj=raw, mode="rb") as src, open(tmp, "wb") as out:
            while True:
                try:
                    block = src.read(_CHUNK)
                except (OSError, EOFError, zlib.error) as e:  # not gzip, truncated, corrupt
                    raise _CorruptInput(f"{type(e).__name__}: {e}") from e
                if not block:
                    break
                out.write(block)

    return _stage_once(staging / f"{_staged_name(f)}.{kind}", write)


@contextmanager
def _open_lines(src, gz: bool):
    """``src`` read front to back, buffered (lines iterate), decompressed when ``gz``."""
    with storage.open_stream(src) as raw, (gzip.GzipFile(fileobj=raw, mode="rb") if gz
                                           else io.BufferedReader(raw, _CHUNK)) as fh:
        yield fh


def _loads(text: str, where):
    """``json.loads(text)``, or the row's RecordError (``where(e)`` places a syntax error)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return RecordError(f"malformed JSON: {e.msg} {where(e)}")
    except Exception as e:  # RecursionError (deep nesting) and anything else the decoder raises
        return RecordError(f"malformed JSON: {type(e).__name__}: {e}")
