"""Selection: how many rows to keep, the deterministic order, and top-k over blocks and streams.

``RunningTopK``: the global top-k over a stream of blocks in O(k) memory. Each block is
first cut at the current k-th best score (rows strictly below it can never enter), then
its survivors are ranked with ``topk`` and kept as a part; when the kept parts hold more
than ``2k`` rows they are merged down to k with ``merge_topk``. The result is exactly
``topk`` over all rows (same scores, same tie-break by id).
"""

from __future__ import annotations

import heapq
import math

import numpy as np


def selection_size(n_rows: int, ratio: float | None = 0.05, count: int | None = None) -> int:
    """How many rows to keep: ``count`` if given, else ``ceil(ratio * n_rows)`` (at least 1)."""
    if n_rows <= 0:
        return 0
    if count is not None:
        if count <= 0:
            raise ValueError(f"select.count={count} must be positive")
        return min(int(count), n_rows)
    if ratio is None or not 0 < ratio <= 1:
        raise ValueError(f"select.ratio={ratio} must be in (0, 1]")
    return min(n_rows, max(1, math.ceil(ratio * n_rows - 1e-9)))


def order_key(scores: np.ndarray, ids) -> np.ndarray:
    """Row order of a ranking: score descending, then id ascending (the deterministic tie-break)."""
    ids = np.asarray(ids, dtype=object).astype(str)
    return np.lexsort((ids, -np.asarray(scores, dtype=np.float64)))


def topk(scores: np.ndarray, ids, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best rows of one block, best first: returns (scores, ids)."""
    ids = np.asarray(ids, dtype=object)
    scores = np.asarray(scores, dtype=np.float64)
    if k < len(scores):  # cheap pre-cut, keeping every row tied with the k-th score
        kth = np.partition(-scores, k - 1)[k - 1]
        keep = -scores <= kth
        scores, ids = scores[keep], ids[keep]
    order = order_key(scores, ids)[:k]
    return scores[order], ids[order]


def merge_topk(parts, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-block top-k lists (each sorted best first) into the global top-k.

    A k-way heap merge: O(k log B) for B blocks, never touching rows past the k-th.
    """
    streams = []
    for s, i in parts:
        streams.append(((-float(a), str(b)) for a, b in zip(s, i)))
    out_s, out_i = [], []
    for neg, rid in heapq.merge(*streams):
        out_s.append(-neg)
        out_i.append(rid)
        if len(out_s) == k:
            break
    return np.asarray(out_s, dtype=np.float64), np.asarray(out_i, dtype=object)


class RunningTopK:
    """The best ``k`` rows of a stream of (scores, ids) blocks, in O(k) memory."""

    def __init__(self, k: int):
        if k < 1:
            raise ValueError(f"k={k} must be positive")
        self.k = k
        self.parts: list[tuple[np.ndarray, np.ndarray]] = []
        self.kept = 0
        self.floor: float | None = None  # the k-th best score so far, once k rows are kept

    def add(self, scores: np.ndarray, ids) -> None:
        scores = np.asarray(scores, dtype=np.float64)
        ids = np.asarray(ids, dtype=object)
        if self.floor is not None:  # ties with the floor stay: the id decides them later
            keep = scores >= self.floor
            scores, ids = scores[keep], ids[keep]
        if len(scores) == 0:
            return
        part = topk(scores, ids, self.k)
        self.parts.append(part)
        self.kept += len(part[0])
        if self.kept > 2 * self.k:
            self._compact()

    def _compact(self) -> None:
        merged = merge_topk(self.parts, self.k)
        self.parts, self.kept = [merged], len(merged[0])
        if self.kept == self.k:
            self.floor = float(merged[0][-1])

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) best first, as ``scoring.topk`` over every row added."""
        if not self.parts:
            return np.zeros(0, dtype=np.float64), np.zeros(0, dtype=object)
        self._compact()
        return self.parts[0]
