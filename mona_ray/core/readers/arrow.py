"""Arrow IPC: plain ``.arrow`` files and the folders Hugging Face ``datasets`` writes with ``save_to_disk``.

Read with pyarrow alone (``datasets`` is never imported). Both of Arrow's IPC formats are
accepted: the stream format, which ``datasets`` writes, and the file format (``ARROW1``
magic, record batches addressable by index). Units are row ranges, as for Parquet; the
file is memory-mapped, so the record batches before a unit are skipped at the cost of
their metadata (uncompressed buffers are never touched; an lz4/zstd-compressed file is
decompressed batch by batch), and a batch's rows are sliced to the unit before they
become Python objects. A file that breaks part-way (truncated, corrupt) is planned as the
units of the rows before the break plus one unit (``stop == -1``) whose reading reports it.

``save_to_disk`` layouts, as ``datasets`` writes them:

* a Dataset: ``data-0000i-of-0000N.arrow`` + ``state.json`` (``_data_files``: the files in
  order) + ``dataset_info.json``. Only the files ``state.json`` lists are read (``.map()``
  on a loaded dataset writes ``cache-*.arrow`` files into the same folder).
* a DatasetDict: ``dataset_dict.json`` (``splits``) and one Dataset folder per split. It is
  read as its split when it has one; with several, name one (``path/to/folder/train``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from .. import storage
from ..records import InputError
from .common import ReadUnit

_FILE_MAGIC = b"ARROW1"


def saved_dataset_files(d: Path) -> list[Path] | None:
    """The Arrow files of a ``save_to_disk`` folder ``d`` in order, None when ``d`` is not one;
    :class:`InputError` for a DatasetDict with several splits or a broken ``state.json``."""
    dd = d / "dataset_dict.json"
    if dd.is_file():
        try:
            splits = [str(s) for s in json.loads(dd.read_text())["splits"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"{str(dd)!r} cannot be read as a datasets DatasetDict ({type(e).__name__}: {e}); "
                             "name one split's folder instead") from e
        if len(splits) == 1:
            files = saved_dataset_files(d / splits[0])
            if files is None:
                raise InputError(f"input {str(d)!r}: its only split folder {splits[0]!r} has no state.json "
                                 "(is the save_to_disk folder complete?)")
            return files
        names = ", ".join(splits) or "none"
        raise InputError(f"input {str(d)!r} is a datasets DatasetDict with splits {names}: name the one to read, "
                         f"e.g. {str(d / (splits[0] if splits else 'train'))!r}")
    state = d / "state.json"
    if not state.is_file():
        return None
    try:
        names = [str(x["filename"]) for x in json.loads(state.read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{str(state)!r} cannot be read as a datasets save_to_disk state ({type(e).__name__}: "
                         f"{e}); expected {{\"_data_files\": [{{\"filename\": ...}}, ...]}}") from e
    missing = [n for n in names if not (d / n).is_file()]
    if missing:
        raise InputError(f"input {str(d)!r}: {missing[0]!r}, listed in its state.json, is missing "
                         f"({len(missing)} of {len(names)} data files missing)")
    return [d / n for n in names]


def _batches(src: str):
    """The file's record batches in order (memory-mapped; stream or file format)."""
    with (storage.open_input(src) if storage.is_url(src) else pa.memory_map(src)) as mm:
        if mm.read(len(_FILE_MAGIC)) == _FILE_MAGIC:
            mm.seek(0)
            reader = pa.ipc.open_file(mm)
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)
        else:
            mm.seek(0)
            yield from pa.ipc.open_stream(mm)


def _plan_arrow(f: Path | str, rpu: int) -> list[ReadUnit]:
    n = 0
    try:
        for batch in _batches(str(f)):
            n += batch.num_rows
    except Exception:  # not Arrow, or broken after n rows: the rest is one unit whose reading reports it
        return [ReadUnit(str(f), s, min(n, s + rpu)) for s in range(0, n, rpu)] + [ReadUnit(str(f), n, -1)]
    return [ReadUnit(str(f), s, min(n, s + rpu)) for s in range(0, n, rpu)]


def _read_arrow(src: str, unit: ReadUnit):
    r = 0
    for batch in _batches(src):
        n = batch.num_rows
        lo, hi = max(unit.start - r, 0), n if unit.stop < 0 else min(unit.stop - r, n)
        if hi > lo:  # slice before converting: only the unit's rows become Python objects
            yield from enumerate(batch.slice(lo, hi - lo).to_pylist(), r + lo)
        r += n
        if 0 <= unit.stop <= r:
            return
