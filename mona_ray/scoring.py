"""Scoring and selection: pure NumPy functions, no Ray.

Rows are sparse non-negative vectors (mean-pooled SAE codes) held in CSR form
(:class:`SparseRows`). Against a dense prototype ``p`` the generalized Jaccard
similarity of a row ``z`` is

    J(z, p) = sum_k min(z_k, p_k) / sum_k max(z_k, p_k)

and, because ``min + max = z + p`` and both are non-negative, the denominator is
``|z|_1 + |p|_1 - sum_k min(z_k, p_k)``, so a row costs O(nnz(z)), not O(num_latents).

Every per-row quantity is reduced over that row's entries alone (``np.add.reduceat``),
never through a running sum across rows, so a row's score does not depend on which
other rows share its block: scores are bit-identical however the data is split.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np


@dataclass
class SparseRows:
    """CSR rows: row i holds ``indices[indptr[i]:indptr[i+1]]`` and the matching ``values``."""

    indptr: np.ndarray  # int64 [n + 1]
    indices: np.ndarray  # int32 [nnz]
    values: np.ndarray  # float32 or float16 [nnz]

    def __len__(self) -> int:
        return len(self.indptr) - 1

    @classmethod
    def from_lists(cls, indices, values) -> "SparseRows":
        lens = np.fromiter((len(x) for x in indices), dtype=np.int64, count=len(indices))
        indptr = np.zeros(len(lens) + 1, dtype=np.int64)
        np.cumsum(lens, out=indptr[1:])
        idx = np.concatenate([np.asarray(x, dtype=np.int32) for x in indices]) if len(indices) else np.zeros(0, np.int32)
        val = np.concatenate([np.asarray(x, dtype=np.float32) for x in values]) if len(values) else np.zeros(0, np.float32)
        return cls(indptr, idx, val)

    @classmethod
    def from_arrow(cls, indices_col, values_col) -> "SparseRows":
        """From two Arrow ``list<...>`` columns (zero-copy where Arrow allows)."""
        import pyarrow as pa

        ic = indices_col.combine_chunks() if isinstance(indices_col, pa.ChunkedArray) else indices_col
        vc = values_col.combine_chunks() if isinstance(values_col, pa.ChunkedArray) else values_col
        off = ic.offsets.to_numpy().astype(np.int64)
        if not np.array_equal(off, vc.offsets.to_numpy()):
            raise ValueError("indices and values columns have different row lengths")
        idx = ic.values.to_numpy(zero_copy_only=False)[off[0]:off[-1]]
        val = vc.values.to_numpy(zero_copy_only=False)[off[0]:off[-1]]
        return cls(off - off[0], idx.astype(np.int32, copy=False), val)

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.indptr[i], self.indptr[i + 1]
        return self.indices[a:b], self.values[a:b]

    def to_dense(self, num_latents: int) -> np.ndarray:
        out = np.zeros((len(self), num_latents), dtype=np.float64)
        rows = np.repeat(np.arange(len(self)), np.diff(self.indptr))
        out[rows, self.indices] = self.values
        return out


def segment_sum(x: np.ndarray, indptr: np.ndarray) -> np.ndarray:
    """Per-row sums of a CSR value array, in float64; each row is summed on its own."""
    starts = indptr[:-1]
    nonempty = indptr[1:] > starts
    out = np.zeros(len(starts), dtype=np.float64)
    if nonempty.any():
        out[nonempty] = np.add.reduceat(x.astype(np.float64, copy=False), starts[nonempty])
    return out


def prototype(rows: SparseRows, num_latents: int) -> np.ndarray:
    """The target prototype: the mean of the target rows, as a dense float64 vector.

    Rows are added one at a time in the given order (callers sort them by id), so the
    result is the same on every run.
    """
    if len(rows) == 0:
        raise ValueError("cannot build a prototype from zero target rows")
    acc = np.zeros(num_latents, dtype=np.float64)
    for i in range(len(rows)):
        idx, val = rows.row(i)
        np.add.at(acc, idx, val.astype(np.float64))
    return acc / len(rows)


def jaccard(rows: SparseRows, proto: np.ndarray) -> np.ndarray:
    """Generalized Jaccard of each non-negative sparse row with a non-negative prototype."""
    p = proto[rows.indices]
    s_min = segment_sum(np.minimum(rows.values.astype(np.float64), p), rows.indptr)
    s_row = segment_sum(rows.values, rows.indptr)
    denom = s_row + float(proto.sum()) - s_min
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, s_min / denom, 0.0)


def cosine(rows: SparseRows, proto: np.ndarray) -> np.ndarray:
    dot = segment_sum(rows.values.astype(np.float64) * proto[rows.indices], rows.indptr)
    nr = np.sqrt(segment_sum(np.square(rows.values.astype(np.float64)), rows.indptr))
    npr = float(np.sqrt(np.square(proto).sum()))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(nr * npr > 0, dot / (nr * npr), 0.0)


def neg_euclidean(rows: SparseRows, proto: np.ndarray) -> np.ndarray:
    """Negated Euclidean distance (higher is more similar): |z-p|^2 = |z|^2 - 2 z.p + |p|^2."""
    v = rows.values.astype(np.float64)
    sq = segment_sum(v * v, rows.indptr) - 2 * segment_sum(v * proto[rows.indices], rows.indptr) + float(np.square(proto).sum())
    return -np.sqrt(np.maximum(sq, 0.0))


SIMILARITIES = {"jaccard": jaccard, "cosine": cosine, "euclidean": neg_euclidean}


def dense_similarity(X: np.ndarray, proto: np.ndarray, similarity: str) -> np.ndarray:
    """The same similarities for dense rows that may be negative (hidden-state ablation).

    Jaccard uses ``sum min / sum max`` directly, which for signed vectors is the natural
    extension (Ruzicka); the sparse shortcut above needs non-negative values.
    """
    X = X.astype(np.float64)
    p = proto.astype(np.float64)[None, :]
    if similarity == "jaccard":
        mx = np.maximum(X, p).sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(mx != 0, np.minimum(X, p).sum(1) / mx, 0.0)
    if similarity == "cosine":
        n = np.linalg.norm(X, axis=1) * np.linalg.norm(p)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n > 0, (X @ p[0]) / n, 0.0)
    if similarity == "euclidean":
        return -np.linalg.norm(X - p, axis=1)
    raise ValueError(f"similarity={similarity!r}: use jaccard, cosine or euclidean")


def score(rows: SparseRows, proto: np.ndarray, similarity: str = "jaccard") -> np.ndarray:
    """Similarity of every row to ``proto``; Jaccard goes through the cache-blocked kernel,
    which equals :func:`jaccard` bit for bit (``tests/test_kernels.py``)."""
    if similarity == "jaccard":
        from .kernels import jaccard as blocked_jaccard

        return blocked_jaccard(rows, proto)
    try:
        fn = SIMILARITIES[similarity]
    except KeyError:
        raise ValueError(f"similarity={similarity!r}: use one of {', '.join(SIMILARITIES)}") from None
    return fn(rows, proto)


# ----------------------------------------------------------------------------- selection


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
