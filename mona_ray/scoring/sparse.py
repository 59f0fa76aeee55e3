"""Sparse rows in CSR form, per-row reductions and the ways a block of rows is walked (pure NumPy).

Every per-row quantity is reduced over that row's entries alone (``np.add.reduceat``),
never through a running sum across rows, so a row's result does not depend on which
other rows share its block: scores are bit-identical however the data is split.
"""

from __future__ import annotations

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


def row_chunks(indptr: np.ndarray, chunk_nnz: int):
    """``(i, j)``: consecutive row ranges of about ``chunk_nnz`` non-zeros (whole rows, at least one)."""
    n, i = len(indptr) - 1, 0
    while i < n:
        j = int(np.searchsorted(indptr, indptr[i] + chunk_nnz, side="right")) - 1
        j = min(max(j, i + 1), n)
        yield i, j
        i = j


def dense_blocks(rows: SparseRows, width: int, block_rows: int, dtype):
    """``(i, j, Z)``: rows ``[i, j)`` scattered into one reused dense ``[block_rows, width]`` buffer."""
    n = len(rows)
    Z = np.zeros((min(block_rows, max(n, 1)), width), dtype=dtype)
    flat_z = Z.reshape(-1)
    for i in range(0, n, block_rows):
        j = min(n, i + block_rows)
        a, b = int(rows.indptr[i]), int(rows.indptr[j])
        flat = np.repeat(np.arange(j - i, dtype=np.int64) * width, np.diff(rows.indptr[i:j + 1])) + rows.indices[a:b]
        flat_z[flat] = rows.values[a:b]
        yield i, j, Z[:j - i]
        flat_z[flat] = 0
