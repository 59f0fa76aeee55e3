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

import numpy as np

from .kernels import jaccard as blocked_jaccard
from .sparse import SparseRows, segment_sum


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
        return blocked_jaccard(rows, proto)
    try:
        fn = SIMILARITIES[similarity]
    except KeyError:
        raise ValueError(f"similarity={similarity!r}: use one of {', '.join(SIMILARITIES)}") from None
    return fn(rows, proto)
