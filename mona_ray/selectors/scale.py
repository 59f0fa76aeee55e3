"""The baseline selectors (random, bm25, dsir, dense) at pool scale, as Ray tasks over prepared parts.

``Selector.score`` wants the whole source set as Python message lists in one process; at
1M rows that is several GB on the driver, and BM25's per-query matrix alone is
``[n_target, n_source]`` float64. ``score_distributed`` computes the same scores with the
work in Ray tasks, one prepared part per task (a bounded number in flight), and the driver
holding only corpus-level statistics (sized by the target or the hash space, never by the
source) plus the final ``id`` / ``score`` columns as Arrow / NumPy arrays.

This module is the shared part: the dispatch, reading a prepared part's rows and the
result table; the passes run through ``core.executor.Passes``. What runs where, per method
(``parts`` is a list of ``(parquet path, row positions)``), is each baseline's own module:

=========  ==================  ==============================================================
random     ``rand_parts.py``   one pass: the ``id`` column, ``rand.uniform_from_id``
bm25       ``bm25_parts.py``   term counts per part, bm25s's idf on the driver, score passes
dsir       ``dsir_parts.py``   n-gram counts per part, importance weights from stored buckets
dense      ``dense_parts.py``  the target embedded once, an actor pool of encoders over parts
=========  ==================  ==============================================================

``nait`` and ``mona`` are not handled here (``NotImplementedError``): ``mona`` has its own
distributed pipeline, and ``nait`` needs the selection model's activations per row.

Row order of the result: ``parts`` order, then the positions' order within each part.

Driver memory: the result (about 30 bytes a row), per-pass statistics sized by the query
vocabulary, the target or ``num_buckets``, and one ObjectRef per part. One caveat from Ray:
a task result under ``max_direct_call_object_size`` (100 KB by default) is kept in its
owner's process, so the per-part data that bm25 and dsir keep between passes sits on the
driver for parts whose data is that small -- at most 100 KB a part (under 400 MB for 1M
rows in 256-row parts; a part of 256 rows of 1.4 KB text keeps about 280 KB of dsir
buckets, so dsir's go to the object store, and bm25's counts for a 50-example target
are around that size). All of it is freed when ``score_distributed`` returns.
"""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np
import pyarrow as pa

from ..core.executor import Passes
from ..core.io import read_parquet
from .base import Messages, check_target, messages_text
from ..config.schema import TEXT_SELECTORS as METHODS

OUTPUT_SCHEMA = pa.schema([("id", pa.string()), ("score", pa.float64())])

Part = tuple[str, Sequence[int]]


def score_distributed(method: str, opts: dict | None, parts: Sequence[Part], target: Sequence[Messages],
                      task_num_cpus: float = 0.5, progress: bool = True, *, num_gpus: float = 0.0,
                      num_actors: int | None = None, max_in_flight: int | None = None,
                      info: dict | None = None) -> pa.Table:
    """Score the rows ``parts`` selects with baseline ``method`` against ``target``, on Ray.

    ``method`` / ``opts``: as ``get_selector(method, **opts)`` (the same validation and
    errors). ``parts``: prepared Parquet part files (columns ``id``, ``record`` = the record
    as JSON text) with the row positions to use in each. ``target``: normalised message
    lists. Work runs in Ray tasks of ``task_num_cpus`` CPUs each, at most ``max_in_flight``
    at a time (default: twice what the cluster runs at once); ``dense`` runs ``num_actors``
    encoder actors (default: one per cluster CPU, or per ``num_gpus`` of the cluster's
    GPUs) of ``task_num_cpus`` CPUs and ``num_gpus`` GPUs. Ray must be initialised.

    Returns a table ``id: string, score: float64``, one row per selected position, in
    ``parts`` order. ``info``, when given, is filled with what each pass did and the size
    of the largest array the driver received from a task (see ``Passes``).
    """
    from . import get_selector

    opts = dict(opts or {})
    if method in ("nait", "mona"):
        raise NotImplementedError(
            f"select.method={method} has no distributed scorer in selectors.scale: "
            + ("nait needs the selection model's activations for every row; score it on the driver"
               if method == "nait" else "mona is scored by the pipeline's own distributed stages"))
    if method not in METHODS:
        get_selector(method, **opts)  # the registry's error for an unknown name
        raise ValueError(f"selectors.scale cannot score {method!r}; use one of {', '.join(METHODS)}")
    sel = get_selector(method, **opts)  # validates the settings exactly as the driver path does
    check_target(target)
    jobs = [(str(p), np.asarray(pos, dtype=np.int64)) for p, pos in parts]
    jobs = [(i, p, pos) for i, (p, pos) in enumerate(jobs) if len(pos)]
    passes = Passes(task_num_cpus, progress, max_in_flight, info if info is not None else {})
    passes.info.update(method=method, parts=len(jobs), rows=int(sum(len(j[2]) for j in jobs)))
    if not jobs:
        return OUTPUT_SCHEMA.empty_table()
    if method == "random":
        from . import rand_parts

        return rand_parts.score_parts(sel, jobs, passes)
    if method == "bm25":
        from . import bm25_parts

        return bm25_parts.score_parts(sel, jobs, target, passes)
    if method == "dsir":
        from . import dsir_parts

        return dsir_parts.score_parts(sel, jobs, target, passes)
    from . import dense_parts

    return dense_parts.score_parts(opts, jobs, target, passes, task_num_cpus, num_gpus, num_actors)


# ----------------------------------------------------------------------------- reading parts


def part_rows(path: str, positions: np.ndarray) -> tuple[pa.Array, list[Messages]]:
    """The ids (Arrow) and normalised conversations of a part's selected rows."""
    from ..core.records import normalize_record

    t = read_parquet(path, ["id", "record"], positions)
    msgs = [normalize_record(json.loads(r)) for r in t.column("record").to_pylist()]
    return t.column("id").combine_chunks().cast(pa.string()), msgs


def part_texts(path: str, positions: np.ndarray) -> tuple[pa.Array, list[str]]:
    ids, msgs = part_rows(path, positions)
    return ids, [messages_text(m) for m in msgs]


# ----------------------------------------------------------------------------- results


def result_table(results: dict[int, tuple[pa.Array, np.ndarray]], jobs: list[tuple]) -> pa.Table:
    ids = [results[i][0] for i, *_ in jobs]
    scores = [np.asarray(results[i][1], dtype=np.float64) for i, *_ in jobs]
    return pa.table({"id": pa.concat_arrays(ids).cast(pa.string()), "score": pa.array(np.concatenate(scores))},
                    schema=OUTPUT_SCHEMA)
