"""Aggregation over target examples, the support-bias correction and RDS+ pooling (issue 14).

Pure NumPy, no Ray, no file I/O. Rows are CSR (:class:`SparseRows`); targets are a dense
``[m, L]`` float64 array (one target row, cluster prototype or prototype per line:
``SparseRows.to_dense(L)`` for target rows).

* :func:`pairwise` scores every row against every target in blocks of rows (gathers and
  GEMMs over the block, never a Python loop over targets); column ``j`` equals
  ``scoring.score(rows, targets[j])`` (bitwise for jaccard, to float64 rounding for cosine
  and euclidean, which go through a dense GEMM).
* Aggregations: ``prototype`` (the paper: one mean), ``round_robin`` (one ranking per target
  example, interleaved as RDS+ does) and ``clusters`` (one prototype per cluster of target
  rows, the selection split across clusters by size). The streaming form: each scoring task
  keeps, per target or cluster, its top ``k`` (:class:`PerTargetTopK`, O(m*k)); the driver
  merges the tasks' lists (:func:`merge_candidates`) and interleaves them (:func:`round_robin`).
  ``k`` per list is enough: a list never walks past position ``k`` (every position it walks
  is a row it takes or a row already taken, at most ``k`` in all).
* Support bias: generalized Jaccard against a flat prototype rewards rows whose mass is
  spread over many latents. Fixes: per-latent weights (``idf_weights``: weighted Jaccard
  ``sum w min / (sum w z + sum w p - sum w min)``, still O(nnz) per row) and
  :func:`sparsify_prototype`.
* :func:`position_weighted_mean`: RDS+'s pooling of hidden states (torch tensors).
"""

from __future__ import annotations

import numpy as np

from .scoring import SparseRows, merge_topk, segment_sum, topk

try:  # the name stays importable from either place while the package is restructured
    from .kernels import RunningTopK
except ImportError:  # pragma: no cover
    from .scoring import RunningTopK

AGGREGATIONS = ("prototype", "round_robin", "clusters")


# ----------------------------------------------------------------------------- similarities


def _chunks(indptr: np.ndarray, chunk_nnz: int):
    """``(i, j)``: consecutive row ranges of about ``chunk_nnz`` non-zeros (at least one row)."""
    n, i = len(indptr) - 1, 0
    while i < n:
        j = int(np.searchsorted(indptr, indptr[i] + chunk_nnz, side="right")) - 1
        j = min(max(j, i + 1), n)
        yield i, j
        i = j


def _segments(G: np.ndarray, sub: np.ndarray) -> np.ndarray:
    """Per-row sums of ``G [m, nnz]`` over the CSR segments ``sub`` (rows summed on their own)."""
    out = np.zeros((G.shape[0], len(sub) - 1), dtype=np.float64)
    starts = sub[:-1]
    nonempty = sub[1:] > starts
    if nonempty.any():
        out[:, nonempty] = np.add.reduceat(G, starts[nonempty], axis=1)
    return out


def pairwise(rows: SparseRows, targets: np.ndarray, similarity: str = "jaccard", weights: np.ndarray | None = None,
             chunk_nnz: int = 1 << 15, block_rows: int = 512, gemm_dtype=np.float64) -> np.ndarray:
    """Similarity of every row to every target: ``[n, m]`` float64.

    ``jaccard``: generalized Jaccard ``sum min / (|z|_1 + |t|_1 - sum min)``, with ``weights``
    ``sum w min / (sum w z + sum w t - sum w min)``; the block's entries are gathered once per
    target as an ``[m, nnz]`` array, so each column is the very same sequence of operations
    as ``scoring.jaccard`` (bitwise equal). Cost O(m * nnz): m times one prototype.
    ``cosine`` / ``euclidean`` (negated distance): blocks of ``block_rows`` rows are scattered
    into a reused dense buffer and multiplied with the targets (one GEMM; SAE rows are ~45%
    dense, so this beats a sparse product); norms are exact float64 sums. With
    ``gemm_dtype=np.float32`` the GEMM is ~2x faster and the dot products agree to ~1e-6
    relative instead of float64 rounding. Weights are defined for jaccard only.
    """
    T = np.ascontiguousarray(np.atleast_2d(np.asarray(targets, dtype=np.float64)))
    n, m = len(rows), T.shape[0]
    out = np.zeros((n, m), dtype=np.float64)
    if similarity == "jaccard":
        w = None if weights is None else np.asarray(weights, dtype=np.float64)
        t_sum = T.sum(axis=1) if w is None else T @ w
        for i, j in _chunks(rows.indptr, chunk_nnz):
            a, b = int(rows.indptr[i]), int(rows.indptr[j])
            idx, sub = rows.indices[a:b], rows.indptr[i:j + 1] - a
            v = rows.values[a:b].astype(np.float64)
            G = np.minimum(v[None, :], T[:, idx])
            if w is not None:
                wi = w[idx]
                G *= wi[None, :]
                v = v * wi
            s_min = _segments(G, sub).T
            denom = segment_sum(v, sub)[:, None] + t_sum[None, :] - s_min
            with np.errstate(invalid="ignore", divide="ignore"):
                out[i:j] = np.where(denom > 0, s_min / denom, 0.0)
        return out
    if similarity not in ("cosine", "euclidean"):
        raise ValueError(f"similarity={similarity!r}: use jaccard, cosine or euclidean")
    if weights is not None:
        raise ValueError("weights are defined for jaccard only")
    t_sq = np.square(T).sum(axis=1)
    r_sq = segment_sum(np.square(rows.values.astype(np.float64)), rows.indptr)
    Tt = np.ascontiguousarray(T.T, dtype=gemm_dtype)
    width = T.shape[1]
    Z = np.zeros((min(block_rows, max(n, 1)), width), dtype=gemm_dtype)
    flat_z = Z.reshape(-1)
    for i in range(0, n, block_rows):
        j = min(n, i + block_rows)
        a, b = int(rows.indptr[i]), int(rows.indptr[j])
        flat = np.repeat(np.arange(j - i, dtype=np.int64) * width, np.diff(rows.indptr[i:j + 1])) + rows.indices[a:b]
        flat_z[flat] = rows.values[a:b]
        dot = (Z[:j - i] @ Tt).astype(np.float64, copy=False)
        flat_z[flat] = 0
        if similarity == "cosine":
            nn = np.sqrt(r_sq[i:j])[:, None] * np.sqrt(t_sq)[None, :]
            with np.errstate(invalid="ignore", divide="ignore"):
                out[i:j] = np.where(nn > 0, dot / nn, 0.0)
        else:
            out[i:j] = -np.sqrt(np.maximum(r_sq[i:j, None] - 2 * dot + t_sq[None, :], 0.0))
    return out


def dense_pairwise(X: np.ndarray, targets: np.ndarray, similarity: str = "cosine") -> np.ndarray:
    """``pairwise`` for dense, possibly signed rows (hidden states): cosine or negated euclidean."""
    X, T = np.asarray(X, np.float64), np.atleast_2d(np.asarray(targets, np.float64))
    dot = X @ T.T
    xs, ts = np.square(X).sum(1), np.square(T).sum(1)
    if similarity == "cosine":
        nn = np.sqrt(xs)[:, None] * np.sqrt(ts)[None, :]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(nn > 0, dot / nn, 0.0)
    if similarity == "euclidean":
        return -np.sqrt(np.maximum(xs[:, None] - 2 * dot + ts[None, :], 0.0))
    raise ValueError(f"similarity={similarity!r}: dense rows take cosine or euclidean")


# ----------------------------------------------------------------------------- support bias


def doc_freq(rows: SparseRows, num_latents: int) -> np.ndarray:
    """In how many rows each latent is non-zero (int64); add the counts of several blocks."""
    return np.bincount(rows.indices[rows.values != 0], minlength=num_latents).astype(np.int64)


def idf_weights(doc_freq: np.ndarray, n_rows: int, smooth: bool = False) -> np.ndarray:
    """Per-latent weights ``log((1 + n) / (1 + df))`` (``+ 1`` with ``smooth``, as scikit-learn).

    A latent active in every pool row weighs (almost) nothing: it says nothing about a row's
    topic, yet under the plain formula it is where broad rows collect their clipped mass."""
    w = np.log((1.0 + n_rows) / (1.0 + np.asarray(doc_freq, dtype=np.float64)))
    return w + 1.0 if smooth else w


def weighted_jaccard(rows: SparseRows, proto: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``sum_k w_k min(z_k, p_k) / sum_k w_k max(z_k, p_k)`` for every row, O(nnz) per row."""
    return pairwise(rows, proto[None, :], "jaccard", weights)[:, 0]


def sparsify_prototype(proto: np.ndarray, mass: float = 0.5) -> np.ndarray:
    """The prototype restricted to its largest entries that carry ``mass`` of its L1 norm.

    Entries are ranked by value (ties by latent index); the smallest set whose sum reaches
    ``mass * sum(p)`` is kept, the rest set to zero."""
    if not 0 < mass <= 1:
        raise ValueError(f"mass={mass} must be in (0, 1]")
    p = np.asarray(proto, dtype=np.float64)
    order = np.lexsort((np.arange(len(p)), -p))
    csum = np.cumsum(p[order])
    keep = int(np.searchsorted(csum, mass * csum[-1] * (1 - 1e-12))) + 1 if csum[-1] > 0 else 0
    out = np.zeros_like(p)
    out[order[:keep]] = p[order[:keep]]
    return out


# ----------------------------------------------------------------------------- candidates


class PerTargetTopK:
    """Per target (column) the best ``k`` rows of a stream of ``[B, m]`` score blocks: O(m*k).

    One :class:`RunningTopK` per column, so each list is exactly ``scoring.topk`` of that
    column over every row added (score descending, ties by id)."""

    def __init__(self, n_targets: int, k: int):
        self.k = k
        self.runs = [RunningTopK(k) for _ in range(n_targets)]

    def add(self, scores: np.ndarray, ids) -> None:
        scores = np.asarray(scores, dtype=np.float64)
        ids = np.asarray(ids, dtype=object)
        for j, run in enumerate(self.runs):
            run.add(scores[:, j], ids)

    def result(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per target ``(scores, ids)`` best first: what a scoring task returns to the driver."""
        return [run.result() for run in self.runs]


def merge_candidates(parts: list[list[tuple[np.ndarray, np.ndarray]]], k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Merge the per-target lists of several tasks (``PerTargetTopK.result`` each) into one per target."""
    if not parts:
        return []
    return [merge_topk([p[j] for p in parts], k) for j in range(len(parts[0]))]


def candidates_from_scores(S: np.ndarray, ids, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per column of an in-memory ``[n, m]`` score matrix, its ``scoring.topk`` list."""
    return [topk(S[:, j], ids, k) for j in range(S.shape[1])]


def round_robin(candidates: list[tuple[np.ndarray, np.ndarray]], k: int, quotas=None,
                skip_taken: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Interleave best-first lists: list 0, 1, ..., m-1, then again, until ``k`` rows are taken.

    On its turn a list takes its best row not yet taken (``skip_taken``; RDS+'s code instead
    spends the turn when its next row is already taken: ``skip_taken=False``). A list that is
    exhausted or has taken its quota (``quotas[j]``, for :func:`allocate`) is passed over.
    Returns ``(ids, list index, score in that list)`` in selection order; deterministic for
    deterministic lists (``scoring.topk`` orders them by score, then id)."""
    m = len(candidates)
    pos = [0] * m
    took = [0] * m
    cap = [np.inf] * m if quotas is None else [int(q) for q in quotas]
    taken: set = set()
    out_i, out_j, out_s = [], [], []
    active = [j for j in range(m) if len(candidates[j][1]) and cap[j] > 0]
    while len(out_i) < k and active:
        nxt = []
        for j in active:
            if len(out_i) >= k:
                break
            s, ids = candidates[j]
            p = pos[j]
            if skip_taken:
                while p < len(ids) and ids[p] in taken:
                    p += 1
            if p < len(ids) and ids[p] not in taken:
                taken.add(ids[p])
                out_i.append(ids[p])
                out_j.append(j)
                out_s.append(float(s[p]))
                took[j] += 1
            pos[j] = p + 1
            if pos[j] < len(ids) and took[j] < cap[j]:
                nxt.append(j)
        active = nxt
    return np.asarray(out_i, dtype=object), np.asarray(out_j, dtype=np.int64), np.asarray(out_s, dtype=np.float64)


# ----------------------------------------------------------------------------- clusters


def allocate(sizes, k: int) -> np.ndarray:
    """Split ``k`` over clusters in proportion to ``sizes`` by largest remainder (Hamilton).

    Ties in the remainder go to the larger cluster, then the lower index; sums to ``k``."""
    sizes = np.asarray(sizes, dtype=np.float64)
    if len(sizes) == 0 or sizes.sum() <= 0:
        raise ValueError("allocate needs at least one cluster of positive size")
    exact = k * sizes / sizes.sum()
    base = np.floor(exact).astype(np.int64)
    order = np.lexsort((np.arange(len(sizes)), -sizes, -(exact - base)))
    base[order[:k - int(base.sum())]] += 1
    return base


def _unit(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    n = np.linalg.norm(X, axis=1, keepdims=True)
    return np.divide(X, n, out=np.zeros_like(X), where=n > 0)


def spherical_kmeans(X: np.ndarray, n_clusters: int, seed: int = 0, n_init: int = 4, iters: int = 100) -> np.ndarray:
    """Labels of spherical k-means (cosine) on the rows of ``X``: k-means++ seeding from
    ``numpy.random.default_rng(seed)``, best of ``n_init`` runs; labels renumbered by first
    occurrence, so the result depends only on ``X``, ``n_clusters`` and ``seed``."""
    U = _unit(X)
    m = len(U)
    c = min(max(1, n_clusters), m)
    rng = np.random.default_rng(seed)
    best, best_obj = None, -np.inf
    for _ in range(n_init):
        centers = [int(rng.integers(m))]
        for _ in range(c - 1):
            d = np.maximum(1 - (U @ U[centers].T).max(1), 0)
            centers.append(int(rng.choice(m, p=d / d.sum())) if d.sum() > 0 else int(rng.integers(m)))
        C = U[centers]
        labels = np.full(m, -1)
        for _ in range(iters):
            new = np.argmax(U @ C.T, axis=1)
            if np.array_equal(new, labels):
                break
            labels = new
            for q in range(c):
                members = labels == q
                if members.any():
                    C[q] = _unit(U[members].sum(0, keepdims=True))[0]
                else:  # empty: restart it at the row worst served by its centre
                    C[q] = U[int(np.argmin((U * C[labels]).sum(1)))]
        obj = float((U * C[labels]).sum())
        if obj > best_obj + 1e-12:
            best, best_obj = labels, obj
    _, first = np.unique(best, return_index=True)
    remap = np.empty(best.max() + 1, dtype=np.int64)
    remap[best[np.sort(first)]] = np.arange(len(first))
    return remap[best]


def silhouette(X: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette with cosine distance; a row alone in its cluster counts 0 (Rousseeuw 1987)."""
    U = _unit(X)
    D = np.maximum(1 - U @ U.T, 0)
    labs, inv = np.unique(labels, return_inverse=True)
    if len(labs) < 2:
        return 0.0
    rows = np.arange(len(U))
    cnt = np.bincount(inv).astype(np.float64)
    sums = D @ np.eye(len(labs))[inv]  # [m, C]: summed distance of each row to each cluster
    n_own = cnt[inv]
    a = sums[rows, inv] / np.maximum(n_own - 1, 1)
    other = sums / cnt[None, :]
    other[rows, inv] = np.inf
    b = other.min(1)
    s = np.where(n_own > 1, (b - a) / np.maximum(np.maximum(a, b), 1e-300), 0.0)
    return float(s.mean())


def choose_clusters(X: np.ndarray, seed: int = 0, max_k: int | None = None,
                    min_silhouette: float = 0.25) -> np.ndarray:
    """Cluster labels of the target rows ``X`` (dense ``[m, L]``), the number chosen by silhouette.

    Spherical k-means for every k in ``2..max_k`` (default ``m // 2``, at most 64); the k
    with the best cosine silhouette wins, unless that silhouette is below ``min_silhouette``
    (0.25: "no substantial structure", Kaufman & Rousseeuw 1990), in which case all rows form
    one cluster and ``clusters`` is exactly ``prototype``. Deterministic for a seed."""
    m = len(X)
    hi = min(m - 1, 64, m // 2 if max_k is None else max_k)
    best, best_s = np.zeros(m, dtype=np.int64), -np.inf
    for c in range(2, hi + 1):
        labels = spherical_kmeans(X, c, seed=seed)
        if len(np.unique(labels)) < 2:
            continue
        s = silhouette(X, labels)
        if s > best_s + 1e-12:
            best, best_s = labels, s
    return best if best_s >= min_silhouette else np.zeros(m, dtype=np.int64)


def cluster_prototypes(targets: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(prototypes [C, L], sizes [C])``: the mean of each cluster's target rows (dense)."""
    T = np.asarray(targets, dtype=np.float64)
    labs = np.unique(labels)
    P = np.stack([T[labels == q].mean(0) for q in labs])
    return P, np.asarray([(labels == q).sum() for q in labs], dtype=np.int64)


def best_cluster_score(S: np.ndarray) -> np.ndarray:
    """A row's score for a full ranking under ``clusters``: its best score over the clusters."""
    return np.asarray(S, dtype=np.float64).max(axis=1)


# ----------------------------------------------------------------------------- RDS+ pooling


def position_weighted_mean(h, mask):
    """RDS+ pooling: ``sum_t w_t h_t`` with ``w_t = t / sum_s s`` over the real tokens.

    ``h [B, T, d]``, ``mask [B, T]`` (1 = real token) torch tensors -> ``[B, d]`` in ``h``'s
    dtype. ``t`` counts real tokens from 1 (the SGPT weighting Ivison et al. 2025 use). Their
    code applies ``arange(T) + 1`` to the padded batch, which is the same at batch size 1
    (how they run it); counting real tokens keeps padding out of the weights. Tensor methods
    only, so this module does not import torch."""
    m = mask.to(h.dtype)
    pos = m.cumsum(dim=1) * m
    w = pos / pos.sum(dim=1, keepdim=True).clamp_min(1)
    return (h * w.unsqueeze(-1)).sum(dim=1)
