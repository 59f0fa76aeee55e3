"""Fast paths for the scoring stage, each equal bit for bit to its reference in ``similarity.py``.

``jaccard``: ``similarity.jaccard`` materialises three float64 temporaries the size of the
whole block (the gathered prototype, the cast values, their minimum: 3 x 8 bytes per
non-zero). At that size every call page-faults fresh memory and streams it through DRAM
several times. This version walks the block in chunks of whole rows of about
``chunk_nnz`` non-zeros and reuses two cache-sized float64 scratch buffers (the speed-up
is measured by ``bench score``, in ``docs/benchmarks.md``). Every arithmetic step is the
same NumPy operation on the same numbers, and each row is still reduced on its own by
``np.add.reduceat`` over exactly its own entries, so the scores are identical to
``similarity.jaccard`` (``tests/test_kernels.py`` checks bitwise equality), independent of
the block and chunk a row lands in.
"""

from __future__ import annotations

import numpy as np

from .sparse import SparseRows, segment_sum


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
