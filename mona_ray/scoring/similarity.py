"""Similarities of sparse rows to targets: pure NumPy, no Ray.

Rows are sparse non-negative vectors (mean-pooled SAE codes) held in CSR form
(:class:`SparseRows`); dense rows (hidden states) may be signed. A row is compared with one
prototype (:func:`score`, :func:`dense_similarity`) or with every one of several targets
(:func:`pairwise`, :func:`dense_pairwise`; :func:`similarities` picks by layout) under
generalized Jaccard (the one kernel family in ``kernels.py``), cosine or negated Euclidean
distance. Every per-row quantity is reduced over that row's entries alone
(``np.add.reduceat``), never through a running sum across rows, so a row's score does not
depend on which other rows share its block: scores are bit-identical however the data is split.
"""

from __future__ import annotations

import numpy as np

from .kernels import dense_jaccard, jaccard, sparse_jaccard
from .sparse import SparseRows, dense_blocks, segment_sum


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
    if similarity == "jaccard":
        return dense_jaccard(X, proto)[:, 0]
    X = X.astype(np.float64)
    p = proto.astype(np.float64)[None, :]
    if similarity == "cosine":
        n = np.linalg.norm(X, axis=1) * np.linalg.norm(p)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n > 0, (X @ p[0]) / n, 0.0)
    if similarity == "euclidean":
        return -np.linalg.norm(X - p, axis=1)
    raise ValueError(f"similarity={similarity!r}: use one of {', '.join(SIMILARITIES)}")


def score(rows: SparseRows, proto: np.ndarray, similarity: str = "jaccard") -> np.ndarray:
    """Similarity of every row to ``proto`` (Jaccard: ``kernels.jaccard``)."""
    try:
        fn = SIMILARITIES[similarity]
    except KeyError:
        raise ValueError(f"similarity={similarity!r}: use one of {', '.join(SIMILARITIES)}") from None
    return fn(rows, proto)


def pairwise(rows: SparseRows, targets: np.ndarray, similarity: str = "jaccard", layout: str = "auto",
             chunk_nnz: int = 1 << 16, block_rows: int = 512, gemm_dtype=np.float64) -> np.ndarray:
    """Similarity of every row to every target (dense ``[m, L]``): ``[n, m]`` float64.

    ``jaccard``: ``kernels.sparse_jaccard`` (``layout``: which of its two reductions; with the
    ``rows`` layout, column ``j`` equals ``score(rows, targets[j])`` bit for bit).
    ``cosine`` / ``euclidean`` (negated distance): blocks of ``block_rows`` rows are scattered
    into a reused dense buffer and multiplied with the targets (one GEMM; SAE rows are ~45%
    dense, so this beats a sparse product); norms are exact float64 sums; equal to
    :func:`score` up to rounding. ``gemm_dtype=np.float32``: the GEMM ~2x faster, dot
    products to ~1e-6 relative.
    """
    if similarity == "jaccard":
        return sparse_jaccard(rows, targets, layout, chunk_nnz, block_rows)
    if similarity not in ("cosine", "euclidean"):
        raise ValueError(f"similarity={similarity!r}: use one of {', '.join(SIMILARITIES)}")
    T = np.ascontiguousarray(np.atleast_2d(np.asarray(targets, dtype=np.float64)))
    out = np.zeros((len(rows), T.shape[0]), dtype=np.float64)
    t_sq = np.square(T).sum(axis=1)
    Tt = np.ascontiguousarray(T.T, dtype=gemm_dtype)
    for i, j, Z in dense_blocks(rows, T.shape[1], block_rows, gemm_dtype):
        a, b = int(rows.indptr[i]), int(rows.indptr[j])
        r_sq = segment_sum(np.square(rows.values[a:b].astype(np.float64)), rows.indptr[i:j + 1] - a)
        dot = (Z @ Tt).astype(np.float64, copy=False)
        if similarity == "cosine":
            nn = np.sqrt(r_sq)[:, None] * np.sqrt(t_sq)[None, :]
            with np.errstate(invalid="ignore", divide="ignore"):
                out[i:j] = np.where(nn > 0, dot / nn, 0.0)
        else:
            out[i:j] = -np.sqrt(np.maximum(r_sq[:, None] - 2 * dot + t_sq[None, :], 0.0))
    return out


def dense_pairwise(X: np.ndarray, targets: np.ndarray, similarity: str = "cosine") -> np.ndarray:
    """:func:`pairwise` for dense, possibly signed rows (hidden states): ``[n, m]``; Jaccard is
    ``kernels.dense_jaccard`` (``sum min / sum max``)."""
    if similarity == "jaccard":
        return dense_jaccard(X, targets)
    X, T = np.asarray(X, np.float64), np.atleast_2d(np.asarray(targets, np.float64))
    dot = X @ T.T
    xs, ts = np.square(X).sum(1), np.square(T).sum(1)
    if similarity == "cosine":
        nn = np.sqrt(xs)[:, None] * np.sqrt(ts)[None, :]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(nn > 0, dot / nn, 0.0)
    if similarity == "euclidean":
        return -np.sqrt(np.maximum(xs[:, None] - 2 * dot + ts[None, :], 0.0))
    raise ValueError(f"similarity={similarity!r}: use one of {', '.join(SIMILARITIES)}")


def similarities(X, targets: np.ndarray, similarity: str, dense: bool) -> np.ndarray:
    """``[n, m]``: :func:`dense_pairwise` for dense (signed) rows, :func:`pairwise` for sparse ones."""
    return dense_pairwise(X, targets, similarity) if dense else pairwise(X, targets, similarity)
