"""dense at pool scale (``selectors.scale``): an actor pool over prepared parts.

The target embeddings in one Ray task, then a Ray Data actor pool over the parts, one
sentence encoder per actor (``DenseSelector.embed``, so its ``cache_dir`` is honoured),
each part scored with ``dense.centroid_cosine`` inside the actor.
"""

from __future__ import annotations

import sys

import numpy as np
import pyarrow as pa

from ..core import executor
from ..core.executor import Passes
from .base import Messages
from .scale import OUTPUT_SCHEMA, part_rows


def dense_embed_target(opts: dict, target: list[Messages]) -> np.ndarray:
    from . import get_selector

    return get_selector("dense", **{**opts, "progress": False}).embed(target, "dense: target")


class DenseScorer:
    """An actor of the executor's pool: one sentence encoder; scores one part per call against the
    target embeddings."""

    def __init__(self, opts: dict, target_emb: np.ndarray, threads: int = 1):
        import torch

        from . import get_selector

        torch.set_num_threads(max(1, int(threads)))
        self.sel = get_selector("dense", **{**opts, "progress": False})
        self.T = target_emb

    def score_part(self, job: tuple) -> pa.Table:
        """``job``: ``(i, part path, row positions)`` -> ``part, pos, id, score`` of those rows."""
        from .dense import centroid_cosine

        i, path, pos = job
        ids, msgs = part_rows(path, np.asarray(pos, dtype=np.int64))
        s = centroid_cosine(self.sel.embed(msgs), self.T)
        return pa.table({"part": pa.array(np.full(len(s), i, dtype=np.int64)),
                         "pos": pa.array(np.arange(len(s), dtype=np.int64)), "id": ids,
                         "score": pa.array(s, pa.float64())})


def score_parts(opts, jobs, target, passes: Passes, num_cpus: float, num_gpus: float, num_actors: int | None) -> pa.Table:
    import math

    from tqdm import tqdm

    res = executor.resources()
    if num_actors is None:
        if num_gpus > 0:
            num_actors = max(1, int(res.get("GPU", 0) / num_gpus))
        else:
            num_actors = max(1, int(res.get("CPU", 1) // max(1.0, num_cpus)))
    num_actors = max(1, min(int(num_actors), len(jobs)))
    threads = max(1, math.floor(num_cpus)) if num_gpus <= 0 else 1
    T = executor.call(dense_embed_target, opts, list(target), num_cpus=num_cpus, num_gpus=max(0.0, num_gpus)).result()
    entry = {"pass": "target", "tasks": 1, "largest_result_array": int(T.size)}
    passes.info["passes"].append(entry)
    results = executor.map_items(list(jobs), actor=(DenseScorer, (opts, T, threads), "score_part"), size=num_actors,
                                 num_cpus=num_cpus, num_gpus=max(0.0, num_gpus))
    entry = {"pass": f"score ({num_actors} actor{'s' * (num_actors > 1)})", "tasks": len(jobs),
             "largest_result_array": 0}
    passes.info["passes"].append(entry)
    bar = tqdm(total=len(jobs), desc=f"dense: {entry['pass']}", unit="part", file=sys.stderr,
               disable=not passes.progress, mininterval=1.0)
    blocks, seen = [], set()
    for b in results:
        blocks.append(b)
        entry["largest_result_array"] = max(entry["largest_result_array"], len(b))
        new = set(np.unique(b.column("part").to_numpy()).tolist()) - seen
        seen |= new
        bar.update(len(new))
    bar.close()
    passes.info["largest_driver_array"] = max(passes.info["largest_driver_array"], entry["largest_result_array"],
                                              int(T.size))
    t = pa.concat_tables(blocks).sort_by([("part", "ascending"), ("pos", "ascending")])
    return pa.table({"id": t.column("id").cast(pa.string()), "score": t.column("score")}, schema=OUTPUT_SCHEMA)
