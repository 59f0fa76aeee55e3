"""How prototypes and rows are cut to their heaviest latents: the support-bias fix (issues 14, 23).

Generalized Jaccard against a flat prototype rewards rows spreading mass over many latents;
cutting the prototype (:func:`sparsify_prototype`, by a rule decided from the target rows
alone: :func:`cut_prototypes`) and optionally each row (:func:`sparsify_rows`) to the latents
carrying a share of their L1 mass corrects it. Pure NumPy.
"""

from __future__ import annotations

import numpy as np

from ..config.schema import MASS_RULES
from .sparse import SparseRows, segment_sum


def sparsify_prototype(proto: np.ndarray, mass: float = 0.5) -> np.ndarray:
    """The prototype restricted to its largest entries that carry ``mass`` of its L1 norm.

    Entries are ranked by value (ties by latent index); the smallest set whose sum reaches
    ``mass * sum(p)`` is kept, the rest set to zero; ``mass=1`` is the prototype itself."""
    if not 0 < mass <= 1:
        raise ValueError(f"mass={mass} must be in (0, 1]")
    p = np.asarray(proto, dtype=np.float64)
    if mass == 1:
        return p.copy()
    order = np.lexsort((np.arange(len(p)), -p))
    csum = np.cumsum(p[order])
    keep = int(np.searchsorted(csum, mass * csum[-1] * (1 - 1e-12))) + 1 if csum[-1] > 0 else 0
    out = np.zeros_like(p)
    out[order[:keep]] = p[order[:keep]]
    return out


def sparsify_rows(rows: SparseRows, mass: float) -> SparseRows:
    """Every row restricted to its largest entries that carry ``mass`` of its L1 norm: the rule
    of :func:`sparsify_prototype` applied to each row on its own (values ranked descending,
    ties by stored position, i.e. by latent in rows stored in latent order; the smallest set
    reaching ``mass * sum(row)`` kept). ``mass=1`` returns ``rows`` itself. The kept entries
    stay in their stored order. One stable sort of the block's entries, for float32/float16
    values by a single 64-bit key (row, then the value's float32 bits inverted: non-negative
    floats order as their bits), for wider values (sum pooling's float64) by (row, value), so a
    row's cut never depends on the other rows of its block; no per-row Python loop."""
    if not 0 < mass <= 1:
        raise ValueError(f"mass={mass} must be in (0, 1]")
    if mass == 1 or len(rows) == 0:
        return rows
    lens = np.diff(rows.indptr)
    r = np.repeat(np.arange(len(rows)), lens)
    v = rows.values.astype(np.float64)
    if v.size and float(v.min()) < 0:
        raise ValueError("sparsify_rows needs non-negative values (SAE codes)")
    if rows.values.dtype.itemsize <= 4:  # exact as float32
        bits = np.ascontiguousarray(rows.values, dtype=np.float32).view(np.uint32).astype(np.uint64)
        order = np.argsort((r.astype(np.uint64) << np.uint64(32)) | (np.uint64(0xFFFFFFFF) - bits), kind="stable")
    else:
        order = np.lexsort((-v, r))  # stable: ties by stored position
    vs = v[order]
    cs = np.cumsum(vs)
    start_cs = np.concatenate([[0.0], cs])[rows.indptr[:-1]]  # the running sum where each row starts
    before = cs - vs - np.repeat(start_cs, lens)  # within its row, the mass of the entries ranked above
    keep = before < np.repeat(mass * segment_sum(v, rows.indptr) * (1 - 1e-12), lens)
    kept = np.sort(order[keep])
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(np.bincount(r[kept], minlength=len(rows)), out=indptr[1:])
    return SparseRows(indptr, rows.indices[kept], rows.values[kept])


# How each prototype is cut (issue 23: rules that decide from the target rows alone):
#   fixed     - every prototype keeps its largest latents carrying ``mass`` of its L1 (1.0: the paper's formula)
#   structure - the same, but only when the target rows split into clusters; a target without cluster
#               structure (one broad format) keeps its one full prototype, the paper's formula
#   support   - each prototype keeps as many latents as its median member row has (no tuned share):
#               a prototype as sparse as the rows it stands for, so Jaccard's max-sum cannot reward breadth


def cut_to_support(proto: np.ndarray, n: int) -> np.ndarray:
    """``proto`` restricted to its ``n`` largest entries (ties by latent index); the rest set to 0."""
    p = np.asarray(proto, dtype=np.float64)
    n = int(max(0, min(n, int((p > 0).sum()))))
    order = np.lexsort((np.arange(len(p)), -p))[:n]
    out = np.zeros_like(p)
    out[order] = p[order]
    return out


def cut_prototypes(P: np.ndarray, T: np.ndarray, labels: np.ndarray, mass: float, rule: str = "fixed") -> np.ndarray:
    """Each prototype of ``P [c, L]`` (cluster ``q`` = the target rows ``T[labels == q]``) cut by
    ``rule`` (:data:`MASS_RULES`) from the target rows alone."""
    if rule not in MASS_RULES:
        raise ValueError(f"select.mass_rule={rule!r}: use one of {', '.join(MASS_RULES)}")
    if rule == "support":
        nnz = (np.asarray(T) > 0).sum(1)
        return np.stack([cut_to_support(p, int(np.median(nnz[labels == q]))) for q, p in enumerate(P)])
    if mass >= 1 or (rule == "structure" and len(P) == 1):
        return np.asarray(P, dtype=np.float64)
    return np.stack([sparsify_prototype(p, mass) for p in P])
