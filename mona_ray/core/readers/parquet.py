"""Parquet: units are row ranges, read by decoding only the row groups they overlap.

A file whose row groups hold more than ``4 * rows_per_unit`` rows is staged once as a copy
re-chunked into row groups of ``rows_per_unit`` rows, so that reading a unit never
decodes far more than the unit.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from .common import ReadUnit, _CorruptInput, _need_staging, _stage_once, _staged_name


def _parquet_file(src) -> pq.ParquetFile:
    # buffered, not pre-buffered reads: a column chunk is streamed page by page instead of
    # being read whole, so one huge row group does not mean the whole file in memory
    return pq.ParquetFile(storage.arrow_source(src), pre_buffer=False, buffer_size=1 << 20)


def _plan_parquet(f: Path | str, rpu: int, staging: Path | None) -> list[ReadUnit]:
    try:
        md = pq.read_metadata(storage.arrow_source(f))
    except Exception:  # corrupt or not Parquet: one unit whose reading reports the error
        return [ReadUnit(str(f), 0, -1)]
    n = md.num_rows
    read_path = None
    if max((md.row_group(i).num_rows for i in range(md.num_row_groups)), default=0) > 4 * rpu:
        try:
            read_path = str(_stage_parquet(f, rpu, _need_staging(staging, f, f"a row group holds more than "
                                                                 f"4 x rows_per_unit = {4 * rpu} rows")))
        except _CorruptInput:
            return [ReadUnit(str(f), 0, -1)]
    return [ReadUnit(str(f), s, min(n, s + rpu), read_path=read_path) for s in range(0, n, rpu)]


def _stage_parquet(f: Path | str, rpu: int, staging: Path) -> Path:
    """Copy ``f`` once into ``staging/<sha>.parquet`` with row groups of ``rpu`` rows, streaming."""
    def write(tmp: Path) -> None:
        with _parquet_file(f) as pf, pq.ParquetWriter(tmp, schema := pf.schema_arrow) as w:
            pending, have = [], 0
            batches = pf.iter_batches(batch_size=rpu, use_threads=False)
            while True:
                try:
                    batch = next(batches, None)
                except (OSError, pa.ArrowException) as e:  # a corrupt page: reading reports it
                    raise _CorruptInput(f"{type(e).__name__}: {e}") from e
                if batch is None:
                    break
                pending.append(batch)
                have += len(batch)
                while have >= rpu:
                    t = pa.Table.from_batches(pending, schema)
                    w.write_table(t.slice(0, rpu), row_group_size=rpu)
                    rest = t.slice(rpu)
                    pending, have = rest.to_batches(), len(rest)
            if have:
                w.write_table(pa.Table.from_batches(pending, schema), row_group_size=rpu)

    return _stage_once(staging / f"{_staged_name(f, rpu)}.parquet", write)


def _read_parquet(src: str, unit: ReadUnit):
    with _parquet_file(src) as pf:
        md = pf.metadata
        stop = md.num_rows if unit.stop < 0 else unit.stop
        rgs, first, row = [], None, 0
        for rg in range(md.num_row_groups):  # only the row groups that overlap the unit are decoded
            n = md.row_group(rg).num_rows
            if row < stop and row + n > unit.start:
                rgs.append(rg)
                first = row if first is None else first
            row += n
        if not rgs:
            return
        r = first
        for batch in pf.iter_batches(batch_size=max(1, min(stop - unit.start, 4096)), row_groups=rgs,
                                     use_threads=False):
            lo, hi = max(unit.start - r, 0), min(stop - r, len(batch))
            if hi > lo:  # slice before converting: only the unit's rows become Python objects
                yield from enumerate(batch.slice(lo, hi - lo).to_pylist(), r + lo)
            r += len(batch)
            if r >= stop:
                return
