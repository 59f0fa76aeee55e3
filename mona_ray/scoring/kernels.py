"""Generalized Jaccard: the one kernel family every caller scores with (pure NumPy).

For non-negative vectors ``J(z, t) = sum_k min(z_k, t_k) / sum_k max(z_k, t_k)``, and because
``min + max = z + t`` the denominator is ``|z|_1 + |t|_1 - sum_k min(z_k, t_k)``: a sparse row
costs O(nnz(z)) per target, never O(num_latents). :func:`ratio` is that last step, the one
definition of the arithmetic; the sum of minima is reduced in one of two layouts:

* ``rows`` (:func:`sparse_jaccard`'s default for a few dense targets, and :func:`jaccard`, the
  one-prototype score): chunks of whole rows of about ``chunk_nnz`` non-zeros, each target's
  entries gathered into one reused cache-sized float64 scratch buffer (no temporaries the size
  of the block: at that size every call page-faults fresh memory, ``docs/benchmarks.md``). Each
  row is reduced on its own by ``np.add.reduceat`` over exactly its own entries, so a row's score
  is bitwise the same whatever block and chunk it lands in and however many targets share the
  call (column ``j`` equals ``jaccard(rows, targets[j])`` bit for bit).
* ``targets`` (many sparse targets, e.g. sparsified cluster prototypes): a block of rows is
  scattered into a dense buffer and only the targets' non-zero latents are read
  (``min(z, 0) = 0``), one gather for all targets: cost sum of nnz(target) per row; equal to
  ``rows`` up to float64 summation order.

:func:`dense_jaccard`: dense rows that may be negative (hidden states) use ``sum min / sum max``
directly (Ruzicka), since the shortcut above needs non-negative values.
"""

from __future__ import annotations

import numpy as np

from .sparse import SparseRows, dense_blocks, row_chunks, segment_sum

LAYOUTS = ("auto", "rows", "targets")


def ratio(s_min: np.ndarray, s_row: np.ndarray, t_sum: np.ndarray) -> np.ndarray:
    """``sum min / (|z|_1 + |t|_1 - sum min)`` from the three sums (broadcast); 0 where the
    denominator is 0 (an empty row against an all-zero target)."""
    denom = s_row + t_sum - s_min
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, s_min / denom, 0.0)


def sparse_jaccard(rows: SparseRows, targets: np.ndarray, layout: str = "auto", chunk_nnz: int = 1 << 16,
                   block_rows: int = 512) -> np.ndarray:
    """Generalized Jaccard of every non-negative sparse row with every non-negative dense target
    ``[m, L]``: ``[n, m]`` float64. ``layout`` (module docstring): ``rows``, ``targets`` or ``auto``:
    ``targets`` when it reads under half of what ``rows`` reads (many sparse targets), else ``rows``
    (always for one target)."""
    T = np.ascontiguousarray(np.atleast_2d(np.asarray(targets, dtype=np.float64)))
    if layout == "auto":  # targets: a dense scatter (~3 passes over nnz) + one read per target non-zero
        nnz = max(len(rows.indices), 1)
        layout = "targets" if 2 * (int(np.count_nonzero(T)) * len(rows) + 3 * nnz) < len(T) * nnz else "rows"
    if layout == "rows":
        return _by_rows(rows, T, chunk_nnz)
    if layout == "targets":
        return _by_targets(rows, T, block_rows)
    raise ValueError(f"layout={layout!r}: use one of {', '.join(LAYOUTS)}")


def jaccard(rows: SparseRows, proto: np.ndarray, chunk_nnz: int = 1 << 16) -> np.ndarray:
    """Generalized Jaccard of each non-negative sparse row with one non-negative prototype: ``[n]``."""
    return sparse_jaccard(rows, np.asarray(proto)[None, :], "rows", chunk_nnz)[:, 0]


def _by_rows(rows: SparseRows, T: np.ndarray, chunk_nnz: int) -> np.ndarray:
    n, indptr = len(rows), rows.indptr
    s_row = np.zeros(n, dtype=np.float64)
    s_min = np.zeros((len(T), n), dtype=np.float64)
    width = max(chunk_nnz, int(np.diff(indptr).max(initial=0)))
    buf_p = np.empty(width, dtype=np.float64)
    buf_v = np.empty(width, dtype=np.float64)
    for i, j in row_chunks(indptr, chunk_nnz):
        a, b = int(indptr[i]), int(indptr[j])
        p, v = buf_p[: b - a], buf_v[: b - a]
        idx, sub = rows.indices[a:b], indptr[i:j + 1] - a
        v[...] = rows.values[a:b]  # the float64 cast, once per chunk
        s_row[i:j] = segment_sum(v, sub)
        for q, t in enumerate(T):
            np.take(t, idx, out=p)
            np.minimum(v, p, out=p)
            s_min[q, i:j] = segment_sum(p, sub)
    return ratio(s_min.T, s_row[:, None], T.sum(axis=1)[None, :])


def _by_targets(rows: SparseRows, T: np.ndarray, block_rows: int) -> np.ndarray:
    n, m = len(rows), len(T)
    out = np.zeros((n, m), dtype=np.float64)
    t_sum = T.sum(axis=1)
    tr, tc = np.nonzero(T)  # target by target, latents ascending
    tv = T[tr, tc]
    starts = np.searchsorted(tr, np.arange(m))
    nonempty = np.bincount(tr, minlength=m) > 0
    block = max(1, min(block_rows, (1 << 20) // max(len(tc), 1)))  # G stays ~8 MB
    G = np.empty((block, len(tc)), dtype=np.float64)
    s_min = np.zeros((block, m), dtype=np.float64)
    for i, j, Z in dense_blocks(rows, T.shape[1], block, np.float64):
        a, b = int(rows.indptr[i]), int(rows.indptr[j])  # per block: no float64 copy of all rows
        s_row = segment_sum(rows.values[a:b].astype(np.float64), rows.indptr[i:j + 1] - a)
        g = G[:j - i]
        np.take(Z, tc, axis=1, out=g)
        np.minimum(g, tv, out=g)
        if nonempty.any():
            s_min[:j - i, nonempty] = np.add.reduceat(g, starts[nonempty], axis=1)
        out[i:j] = ratio(s_min[:j - i], s_row[:, None], t_sum[None, :])
    return out


def dense_jaccard(X: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``sum min / sum max`` of dense rows ``X [n, d]`` that may be negative with every target
    ``[m, d]``: ``[n, m]`` float64 (0 where ``sum max`` is 0)."""
    X = np.asarray(X, dtype=np.float64)
    T = np.atleast_2d(np.asarray(targets, dtype=np.float64))
    out = np.empty((len(X), len(T)), dtype=np.float64)
    for q, t in enumerate(T):
        mx = np.maximum(X, t).sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, q] = np.where(mx != 0, np.minimum(X, t).sum(1) / mx, 0.0)
    return out
