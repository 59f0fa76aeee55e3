"""Writing files so that a crash never leaves half of one, and hashing settings into fingerprints.

Every file mona_ray writes goes through :func:`atomic_path`: written to a unique temporary
name next to its destination, then renamed into place (``os.replace`` is atomic on POSIX),
so a reader sees the old file or the whole new one, and a retried task rewrites the same
name with the same bytes. A write that fails on the filesystem (disk full, permission
denied, read-only or vanished mount) raises an ``OSError`` that names the destination.

Files a later run trusts without rebuilding (store parts, prepared parts, staged copies) are
*recorded*: :func:`write_part` and :func:`recorded_path` write a sidecar ``<file>.ok`` with the
row count and byte size they were written with, and :func:`check_recorded` compares them cheaply (a ``stat`` and the
Parquet footer) before the file is reused. Rename is not atomic on every shared filesystem,
and disks and copies fail: a file that does not check is moved aside by :func:`quarantine`
and rebuilt, never read.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
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
    except OSError as e:
        code = os_errno(e)
        if code is None or getattr(e, "filename", None):
            raise
        raise OSError(code, os.strerror(code), str(dest)) from e  # pyarrow's write errors name no file
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

    try:
        with pq.ParquetFile(path, page_checksum_verification=True) as f:
            table = f.read(columns=columns)
    except Exception as e:  # noqa: BLE001 - pyarrow's errors for a damaged file have no common type
        if os_errno(e) in _CAUSES:
            raise  # the filesystem's failure (a missing file, a vanished mount): filesystem_failure's
        raise DamagedFile(str(path), str(e).splitlines()[0][:200] if str(e) else type(e).__name__) from e
    return table if rows is None else table.take(pa.array(rows, pa.int64()))


def write_parquet(table, path: str | Path, row_group_size: int = 1024, rows_record: bool = False,
                  encoding: dict | None = None) -> None:
    """Write ``table`` atomically; with ``rows_record``, also its record (:func:`write_part`).
    ``encoding``: more ``pq.write_table`` options (``column_encoding``, ``use_dictionary``...): how
    Parquet lays out the bytes, never what a reader gets back."""
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        # page checksums: read_parquet verifies them, so a damaged page fails loudly, never as other values
        pq.write_table(table, tmp, compression="zstd", row_group_size=row_group_size, write_page_checksum=True,
                       **(encoding or {}))
        if rows_record:
            _write_record(Path(path), tmp.stat().st_size, len(table))


class DamagedFile(Exception):
    """A file mona_ray wrote that no longer reads (cut short, a damaged page): ``path`` and why.
    The CLI moves it aside (:func:`quarantine`) so that the next run rebuilds it."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path} is damaged ({reason})")
        self.path, self.reason = path, reason

    def __reduce__(self):  # crosses Ray's task boundary intact
        return DamagedFile, (self.path, self.reason)


def os_errno(e: BaseException) -> int | None:
    """The errno of an OS-level failure: ``e.errno``, or the ``[errno N]`` pyarrow writes into its messages."""
    code = getattr(e, "errno", None)
    if isinstance(code, int):
        return code
    m = re.search(r"\[errno (\d+)\]", str(e), re.IGNORECASE)
    return int(m.group(1)) if m else None


# ----------------------------------------------------------------------------- recorded files

OK_SUFFIX = ".ok"


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + OK_SUFFIX)


def _write_record(path: Path, size: int, rows: int | None) -> None:
    write_text(json.dumps({"bytes": size, "rows": rows}) + "\n", _sidecar(path))


@contextmanager
def recorded_path(dest: str | Path):
    """:func:`atomic_path` for a file a later run reuses: its record (byte size) is written from
    the finished temporary file, before the rename, so a record never describes another writer's bytes."""
    with atomic_path(dest) as tmp:
        yield tmp
        _write_record(Path(dest), tmp.stat().st_size, None)


def write_part(table, path: str | Path, row_group_size: int = 1024, encoding: dict | None = None) -> None:
    """:func:`write_parquet` with its record: row count and byte size (a part a later run reuses)."""
    write_parquet(table, path, row_group_size, rows_record=True, encoding=encoding)


def check_recorded(path: str | Path) -> str | None:
    """Why a recorded file cannot be trusted, or None when it checks: its size and (Parquet)
    row count equal the sidecar's, and a Parquet file's footer reads. A file without a sidecar
    (written by an older version, or a writer stopped between the file and its sidecar) is
    trusted when its footer reads; a non-Parquet file without one is not."""
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    try:
        rec = json.loads(_sidecar(path).read_text())
    except FileNotFoundError:
        rec = None
    except (OSError, ValueError):
        rec = "unreadable"
    if rec is not None and not (isinstance(rec, dict) and isinstance(rec.get("bytes"), int)
                                and isinstance(rec.get("rows"), (int, type(None)))):
        return f"its record {_sidecar(path).name} cannot be read"
    if rec is not None and rec["bytes"] != size:
        return f"{size:,} bytes on disk, {rec['bytes']:,} written"
    if path.suffix != ".parquet":
        return None if rec is not None else "no record of its size (written by an older version)"
    try:
        with pq.ParquetFile(path) as f:
            rows = f.metadata.num_rows
    except Exception as e:  # noqa: BLE001 - any footer that does not read: pyarrow's ArrowInvalid, OSError
        if os_errno(e) in _CAUSES:
            raise  # the filesystem's failure (a vanished mount, EIO): the file may be fine, never quarantined
        return f"not a readable Parquet file ({str(e).splitlines()[0][:200]})"
    if rec is not None and rec.get("rows") is not None and rec["rows"] != rows:
        return f"{rows:,} rows on disk, {rec['rows']:,} written"
    return None


def quarantine(path: str | Path) -> Path | None:
    """Move a damaged file (and its sidecar) into ``quarantine/`` beside it, under a name that
    never collides; None if it was already gone (another run sharing the folder moved it first)."""
    path = Path(path)
    folder = path.parent / "quarantine"
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / f"{path.name}.{time.strftime('%Y%m%dT%H%M%S')}.{uuid.uuid4().hex[:6]}"
    try:
        os.replace(path, dest)
    except FileNotFoundError:
        return None
    try:
        os.replace(_sidecar(path), dest.with_name(dest.name + OK_SUFFIX))
    except FileNotFoundError:
        pass
    return dest


def set_aside(path: str | Path, problem: str, what: str, then: str, log: list | None = None) -> Path | None:
    """Quarantine a damaged file with a warning naming it, what it was, why and what happens
    ``then``; appended to ``log`` (the manifest's ``quarantined``)."""
    moved = quarantine(path)
    warn(f"{what} {path} is damaged ({problem})" + (f"; moved to {moved}" if moved else "") + f"; {then}")
    if log is not None:
        log.append({"part": str(path), "reason": problem, "moved_to": str(moved) if moved else None})
    return moved


def reusable(path: str | Path, what: str, log: list | None = None) -> bool:
    """True when the recorded file at ``path`` can be reused; a damaged one is set aside (the
    caller then rebuilds it), a missing one is simply not reusable."""
    problem = check_recorded(path)
    if problem is None:
        return True
    if problem != "missing":
        set_aside(path, problem, what, "it is rebuilt", log)
    return False


def warn(msg: str) -> None:
    import sys

    print(f"mona_ray: warning: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- operator-facing failures

_CAUSES = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
           errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
           errno.EROFS: "read-only file system", errno.ENOENT: "no such file or folder (a vanished mount?)",
           errno.ESTALE: "stale file handle (the shared filesystem went away)", errno.EIO: "input/output error",
           errno.ENOTCONN: "transport endpoint is not connected (the mount went away)"}
_FIXES = {errno.ENOSPC: "free space there, or point run.output_dir / embed.store_dir elsewhere",
          errno.EDQUOT: "free space there, or point run.output_dir / embed.store_dir elsewhere",
          errno.EACCES: "give this user access to it (read for inputs, write for run.output_dir and "
                        "embed.store_dir), or point the setting elsewhere",
          errno.EPERM: "give this user access to it (read for inputs, write for run.output_dir and "
                       "embed.store_dir), or point the setting elsewhere",
          errno.EROFS: "remount it read-write, or point run.output_dir / embed.store_dir elsewhere"}


def filesystem_failure(exc: BaseException) -> str | None:
    """One line for an operator if ``exc`` (or what caused it, across Ray's task and actor
    wrappers) is a filesystem failure: the path, the cause and what to do; else None."""
    for e in _chain(exc):
        code = os_errno(e) if isinstance(e, OSError) or "errno" in str(e).lower() else None
        if code in _CAUSES:
            path = getattr(e, "filename", None) or _path_in(str(e))
            where = f"{path}: " if path else ""
            fix = _FIXES.get(code, "check the mount and the path")
            return f"{where}{_CAUSES[code]}. {fix.capitalize()}, then run the same command again to resume."
    return None


def damaged_file(exc: BaseException) -> DamagedFile | None:
    """The :class:`DamagedFile` behind ``exc``, if any: in its chain, or named in the text of a Ray
    task's error (Ray Data passes a task's exception on as text inside its own)."""
    for e in _chain(exc):
        if isinstance(e, DamagedFile):
            return e
        m = re.search(r"DamagedFile: (.+?) is damaged \((.*)\)\s*$", str(e), re.MULTILINE)
        if m:
            return DamagedFile(m.group(1), m.group(2))
    return None


def _chain(exc: BaseException):
    seen, stack = set(), [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]


def _path_in(text: str) -> str | None:
    m = re.search(r"'(/[^']+)'", text)
    return m.group(1) if m else None
