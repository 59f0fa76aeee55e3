"""Reading inputs: files, folders and globs -> read units -> ``(row, record | RecordError)``.

One module per input format, this module the dispatch:

=================  ============================================================
``jsonl.py``       ``.jsonl`` (and ``.jsonl.gz`` / other ``.gz``, staged)
``json_array.py``  ``.json``: a JSON array of records (streamed) or one record
``parquet.py``     ``.parquet``
``arrow.py``       ``.arrow`` (Arrow IPC, stream or file format) and folders
                   written by Hugging Face ``datasets``' ``save_to_disk``
``common.py``      :class:`ReadUnit`, staged copies, parsing one JSON row
=================  ============================================================

Planning (:func:`plan_units`) splits every input into units of ``rows_per_unit`` rows in
one streaming pass whose cost is O(file size) and whose memory is bounded (a few MiB);
reading one unit (:func:`read_unit`) costs O(unit size). A record that cannot be used is
yielded as a :class:`~mona_ray.core.records.RecordError` with its row, so nothing is
dropped silently.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from .. import storage
from ..records import InputError, RecordError
from .arrow import _plan_arrow, _read_arrow, saved_dataset_files
from .common import ReadUnit, _CorruptInput, _need_staging, _stage_gzip
from .json_array import _plan_json, _read_json
from .jsonl import _plan_jsonl, _read_jsonl
from .parquet import _plan_parquet, _read_parquet

_KINDS = ((".jsonl.gz", "jsonl.gz"), (".json.gz", "json.gz"), (".parquet", "parquet"), (".jsonl", "jsonl"),
          (".json", "json"), (".arrow", "arrow"))


def _kind(path, strict: bool = False) -> str | None:
    """``parquet | arrow | jsonl | json | jsonl.gz | json.gz`` from the file name; unknown names
    are JSONL (gzip'd JSONL for ``*.gz``) unless ``strict``, then None."""
    name = str(path)
    for suffix, kind in _KINDS:
        if name.endswith(suffix):
            return kind
    if strict:
        return None
    return "jsonl.gz" if name.endswith(".gz") else "jsonl"


def _folder_files(top: Path) -> list[Path]:
    """The input files under folder ``top``: of a ``save_to_disk`` folder (``top`` or one below
    it) the data files its ``state.json`` lists, elsewhere every file of a known kind."""
    out: list[Path] = []
    for d, subdirs, names in os.walk(top):
        saved = saved_dataset_files(Path(d))
        if saved is not None:
            out += saved
            subdirs[:] = []
            continue
        out += [Path(d, n) for n in names if _kind(n, strict=True) and Path(d, n).is_file()]
    return sorted(out)


def input_files(paths) -> list[Path | str]:
    """Expand files, folders and globs into a sorted list of input files.

    Folders contribute their ``.parquet``, ``.arrow``, ``.jsonl``, ``.json``, ``.jsonl.gz`` and
    ``.json.gz`` files (anything else in them is ignored; a ``datasets`` ``save_to_disk`` folder
    its listed data files, see ``arrow.py``); globs and named files are taken as they are.
    A URL (``s3://bucket/prefix/``, a glob of objects) gives its objects' URLs, as strings
    (``core/storage.py``); a local file is a ``Path``.
    """
    import glob

    out: list[Path | str] = []
    for p in [paths] if isinstance(paths, (str, Path)) else list(paths):
        if storage.is_url(p):
            out += storage.list_files(p.strip(), lambda name: _kind(name, strict=True) is not None)
            continue
        p = Path(str(p)).expanduser()
        if p.is_dir():
            out += _folder_files(p)
        elif any(ch in str(p) for ch in "*?["):
            out += sorted(Path(q) for q in glob.glob(str(p), recursive=True))
        elif p.exists():
            out.append(p)
        else:
            raise InputError(f"input {str(p)!r} does not exist")
    # absolute, not resolved: a file in the hub cache is a link to a blob named by its hash, without the
    # extension that says how to read it
    return [f if storage.is_url(f) else Path(os.path.abspath(f)) for f in out]


def plan_units(paths, rows_per_unit: int, staging_dir: str | Path | None = None) -> list[ReadUnit]:
    """Split inputs into units of ``rows_per_unit`` rows (the last unit of a file may be shorter).

    A pure function of the files: the same files give the same units, whatever the cluster.
    One streaming pass per file, memory bounded. ``staging_dir`` receives the staged copies
    (gzip inputs; Parquet files with a row group over ``4 * rows_per_unit`` rows), reused
    when already there; without it such a file raises :class:`InputError`.
    """
    if int(rows_per_unit) < 1:
        raise ValueError(f"rows_per_unit={rows_per_unit!r}: must be at least 1")
    rows_per_unit = int(rows_per_unit)
    staging = None if staging_dir is None else Path(str(staging_dir)).expanduser()  # always local
    units: list[ReadUnit] = []
    for f in input_files(paths):
        kind = _kind(f)
        if kind == "parquet":
            units += _plan_parquet(f, rows_per_unit, staging)
            continue
        if kind == "arrow":
            units += _plan_arrow(f, rows_per_unit)
            continue
        read_path = None
        if kind.endswith(".gz"):
            kind = kind[:-3]
            try:
                read_path = str(_stage_gzip(f, kind, _need_staging(staging, f, "gzip cannot seek")))
            except _CorruptInput:  # reading it again reports the rows it can and then the error
                units.append(ReadUnit(str(f), 0, -1))
                continue
        units += (_plan_json if kind == "json" else _plan_jsonl)(f, read_path, rows_per_unit)
    return units


def read_unit(unit: ReadUnit) -> Iterator[tuple[int, dict | RecordError]]:
    """Yield ``(row, record)`` or ``(row, RecordError)`` for each of the unit's rows, in order.

    Rows are 0-based in the original file; every row in ``[start, stop)`` yields exactly one
    item. A file that fails part-way yields a RecordError for each remaining row, or, when the
    unit's size is unknown (``stop == -1``), a single ``(-1, RecordError)``.
    """
    if unit.read_path and not os.path.exists(unit.read_path):  # staged copy gone: scan the original
        unit = ReadUnit(unit.path, unit.start, unit.stop)
    src = unit.read_path or unit.path
    kind = _kind(src)
    if kind == "parquet":
        rows = _read_parquet(src, unit)
    elif kind == "arrow":
        rows = _read_arrow(src, unit)
    elif kind in ("json", "json.gz"):
        rows = _read_json(src, kind, unit)
    else:
        rows = _read_jsonl(src, kind, unit)
    nxt = unit.start
    try:
        for r, rec in rows:
            yield r, rec
            nxt = max(nxt, r + 1)
    except Exception as e:  # I/O error, truncated gzip, Arrow error, not a list...
        err = RecordError(f"cannot read file: {type(e).__name__}: {e}")
        if unit.stop < 0:
            yield -1, err
        for r in range(nxt, unit.stop):
            yield r, err
        return
    if nxt < unit.stop:
        err = RecordError(f"cannot read file: row missing, {src} has fewer rows than when it was planned "
                          "(did it change?)")
        for r in range(nxt, unit.stop):
            yield r, err


__all__ = ["InputError", "ReadUnit", "RecordError", "input_files", "plan_units", "read_unit"]
