"""JSONL (and gzip'd JSONL, through its staged copy): one record per line.

A unit is a byte range of whole lines, found at plan time in one pass that only counts
newlines (NumPy over 4 MiB blocks); reading a unit seeks to its range. A line that is not
a JSON value (or not UTF-8, or empty) is one bad row, never the end of the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import storage
from ..records import RecordError
from .common import _BOM, _CHUNK, ReadUnit, _loads, _open_lines


def _plan_jsonl(f: Path | str, read_path: str | None, rpu: int) -> list[ReadUnit]:
    src = read_path or str(f)
    starts, n_nl, pos, last = [0], 0, 0, 10
    buf = bytearray(_CHUNK)
    with storage.open_stream(src) as fh:
        while True:
            k = fh.readinto(buf)
            if not k:
                break
            nl = np.flatnonzero(np.frombuffer(buf, np.uint8, k) == 10)
            if len(nl):
                # newline number g (0-based, whole file) ends row g; row g+1 starts a unit when (g+1) % rpu == 0
                starts += (nl[(-(n_nl + 1)) % rpu::rpu] + (pos + 1)).tolist()
                n_nl += len(nl)
            last = buf[k - 1]
            pos += k
    n = n_nl + (last != 10)  # a last line without a trailing newline is a row
    units = []
    for j, s in enumerate(range(0, n, rpu)):
        e = min(n, s + rpu)
        units.append(ReadUnit(str(f), s, e, starts[j], starts[j + 1] if e < n else pos, read_path))
    return units


def _read_jsonl(src: str, kind: str, unit: ReadUnit):
    if unit.offset >= 0 and unit.stop >= 0:
        with storage.open_input(src) as fh:
            fh.seek(unit.offset)
            data = fh.read(unit.end - unit.offset) if unit.end >= 0 else b"".join(
                fh.readline() for _ in range(unit.stop - unit.start))
        lines = data.split(b"\n")
        if lines[-1] == b"":
            lines.pop()
        for r, raw in zip(range(unit.start, unit.stop), lines):
            yield r, _parse_line(raw[3:] if r == 0 and raw.startswith(_BOM) else raw)
        return  # rows missing (the file changed since planning) are reported by read_unit
    with _open_lines(src, kind == "jsonl.gz") as fh:  # no byte range: scan from the start
        for r, raw in enumerate(fh):
            if r < unit.start:
                continue
            if unit.stop >= 0 and r >= unit.stop:
                break
            yield r, _parse_line(raw[3:] if r == 0 and raw.startswith(_BOM) else raw)


def _parse_line(raw: bytes):
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return RecordError(f"not valid UTF-8 at byte {e.start}")
    if not line.strip():
        return RecordError("empty line")
    return _loads(line, lambda e: f"at column {e.colno}")
