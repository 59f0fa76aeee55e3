"""Fast paths for the scoring stage, each equal bit for bit to its reference in ``scoring.py``.

``jaccard``: ``scoring.jaccard`` materialises three float64 temporaries the size of the
whole block (the gathered prototype, the cast values, their minimum: 3 x 8 bytes per
non-zero, ~470 MB for 8k rows of 2,400 non-zeros). At that size every call page-faults
fresh memory and streams it through DRAM several times; measured on the 2-core dev
machine that is ~0.15 s per 8k-row block (see ``docs/benchmarks.md``). This version walks
the block in chunks of whole rows of about ``chunk_nnz`` non-zeros and reuses two
cache-sized float64 scratch buffers, which is ~3x faster. Every arithmetic step is the
same NumPy operation on the same numbers, and each row is still reduced on its own by
``np.add.reduceat`` over exactly its own entries, so the scores are identical to
``scoring.jaccard`` (``tests/test_kernels.py`` checks bitwise equality), independent of
the block and chunk a row lands in.

``RunningTopK``: the global top-k over a stream of blocks in O(k) memory. Each block is
first cut at the current k-th best score (rows strictly below it can never enter), then
its survivors are ranked with ``scoring.topk`` and kept as a part; when the kept parts
hold more than ``2k`` rows they are merged down to k with ``scoring.merge_topk``. The
result is exactly ``scoring.topk`` over all rows (same scores, same tie-break by id).
"""

from __future__ import annotations

import numpy as np

from .scoring import SparseRows, merge_topk, segment_sum, topk


def jaccard(rows: SparseRows, proto: np.ndarray, chunk_nnz: int = 1 << 16) -> np.ndarray:
    """Generalized Jaccard of each row with ``proto``; equals ``scoring.jaccard`` bitwise."""
    n = len(rows)
    indptr = rows.indptr
    s_min = np.zeros(n, dtype=np.float64)
    s_row = np.zeros(n, dtype=np.float64)
    width = max(chunk_nnz, int(np.diff(indptr).max(initial=0)))
    buf_p = np.empty(width, dtype=np.float64)
    buf_v = np.empty(width, dtype=np.float64)
    i = 0
    while i < n:
        # rows [i, j): as many whole rows as fit in chunk_nnz, and at least one
        j = int(np.searchsorted(indptr, indptr[i] + chunk_nnz, side="right")) - 1
        j = min(max(j, i + 1), n)
        a, b = int(indptr[i]), int(indptr[j])
        p, v = buf_p[: b - a], buf_v[: b - a]
        np.take(proto, rows.indices[a:b], out=p)
        v[...] = rows.values[a:b]  # the same float64 cast scoring.jaccard makes
        sub = indptr[i:j + 1] - a
        s_row[i:j] = segment_sum(v, sub)
        np.minimum(v, p, out=p)
        s_min[i:j] = segment_sum(p, sub)
        i = j
    denom = s_row + float(proto.sum()) - s_min
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, s_min / denom, 0.0)


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
