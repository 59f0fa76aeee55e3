"""random at pool scale (``selectors.scale``): one pass; each task reads the ``id`` column of its
part and scores it with ``rand.uniform_from_id`` -- the same numbers as ``RandomSelector``."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ..core.executor import Passes
from ..core.io import read_parquet
from .scale import result_table


def random_part(path: str, positions: np.ndarray, seed: int) -> tuple[pa.Array, np.ndarray]:
    from .rand import RandomSelector

    ids = read_parquet(path, ["id"], positions).column("id").combine_chunks().cast(pa.string())
    return ids, RandomSelector(seed).prepare([], ids.to_pylist())


def score_parts(sel, jobs, passes: Passes) -> pa.Table:
    return result_table(dict(passes.run("score", random_part, jobs, (sel.seed,))), jobs)
