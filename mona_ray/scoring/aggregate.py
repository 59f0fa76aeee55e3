"""Aggregation over target examples, the support-bias fix and RDS+ pooling (issue 14).

Pure NumPy, no Ray, no file I/O. Rows are CSR (:class:`SparseRows`); targets are a dense
``[m, L]`` array, one target row / cluster prototype / prototype per line.

* :func:`pairwise`: every row against every target, block by block (gathers and GEMMs,
  never a Python loop over targets); column ``j`` equals ``scoring.score(rows, targets[j])``.
* Aggregations: ``prototype`` (the paper), ``round_robin`` (one ranking per target example,
  interleaved as RDS+ does) and ``clusters`` (one prototype per cluster of target rows from
  :func:`choose_clusters`; the selection split by cluster size with :func:`allocate`, or
  rows ranked by their best cluster, :func:`best_cluster_score`). Streaming: each scoring
  task keeps per list its top ``k`` (:class:`PerTargetTopK`, O(m*k)); the driver merges them
  (:func:`merge_candidates`) and interleaves (:func:`round_robin`). ``k`` per list suffices:
  a list never walks past position ``k`` (each position walked is a row it takes or a row
  already taken, at most ``k`` in all).
* Support bias (Jaccard against a flat prototype rewards rows spreading mass over many
  latents): :func:`sparsify_prototype` (keep the latents carrying a share of the mass) and
  per-latent weights (:func:`idf_weights`; weighted Jaccard
  ``sum w min / (sum w z + sum w p - sum w min)``, O(nnz) per row).
* :func:`position_weighted_mean`: RDS+'s pooling of hidden states (torch tensors).
"""

from __future__ import annotations

import numpy as np

from .similarity import score
from .sparse import SparseRows, segment_sum
from .topk import topk


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


def _dense_blocks(rows: SparseRows, width: int, block_rows: int, dtype):
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


def _jaccard_from(s_min: np.ndarray, s_row: np.ndarray, t_sum: np.ndarray) -> np.ndarray:
    denom = s_row[:, None] + t_sum[None, :] - s_min
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, s_min / denom, 0.0)


def pairwise(rows: SparseRows, targets: np.ndarray, similarity: str = "jaccard", weights: np.ndarray | None = None,
             kernel: str = "auto", chunk_nnz: int = 1 << 15, block_rows: int = 512, gemm_dtype=np.float64) -> np.ndarray:
    """Similarity of every row to every target (dense ``[m, L]``): ``[n, m]`` float64.

    ``jaccard``: generalized Jaccard ``sum min / (|z|_1 + |t|_1 - sum min)``; with ``weights``
    ``sum w min / (sum w z + sum w t - sum w min)``. Two exact kernels, chosen by ``kernel``:

    * ``rows``: a chunk of rows' entries is gathered from every target at once as an
      ``[m, nnz]`` array, so each column is the very same sequence of operations as
      ``scoring.jaccard``: **bitwise equal** to ``scoring.score``. Cost m x nnz(row).
    * ``targets``: rows are scattered into a dense block and only the targets' non-zero
      latents are read (``min(z, 0) = 0``), one concatenated gather for all targets. Cost
      sum of nnz(target) per row, so sparse targets (``sparsify_prototype``) are cheap; equal
      to ``scoring.score`` up to float64 summation order.
    * ``auto`` (default): ``targets`` when it reads under half of what ``rows`` reads
      (many sparse targets, e.g. 30 sparsified cluster prototypes), else ``rows``; one
      unweighted target goes straight to ``scoring.score`` (the cache-blocked kernel).

    ``cosine`` / ``euclidean`` (negated distance): blocks of ``block_rows`` rows are scattered
    into a reused dense buffer and multiplied with the targets (one GEMM; SAE rows are ~45%
    dense, so this beats a sparse product); norms are exact float64 sums; equal to
    ``scoring.score`` up to rounding. ``gemm_dtype=np.float32``: the GEMM ~2x faster, dot
    products to ~1e-6 relative. Weights are defined for jaccard only.
    """
    T = np.ascontiguousarray(np.atleast_2d(np.asarray(targets, dtype=np.float64)))
    n, m = len(rows), T.shape[0]
    out = np.zeros((n, m), dtype=np.float64)
    if similarity == "jaccard":
        w = None if weights is None else np.asarray(weights, dtype=np.float64)
        if m == 1 and w is None and kernel != "targets":  # one target: the cache-blocked kernel itself
            out[:, 0] = score(rows, T[0], "jaccard")
            return out
        t_sum = T.sum(axis=1) if w is None else T @ w
        tr, tc = np.nonzero(T)  # target by target, latents ascending
        if kernel == "auto":  # targets: a dense scatter (~3 passes over nnz) + one read per target non-zero
            nnz = max(len(rows.indices), 1)
            kernel = "targets" if 2 * (len(tc) * n + 3 * nnz) < m * nnz else "rows"
        if kernel == "targets":
            tv = T[tr, tc] if w is None else T[tr, tc] * w[tc]
            wt = None if w is None else w[tc]
            starts = np.searchsorted(tr, np.arange(m))
            nonempty = np.bincount(tr, minlength=m) > 0
            block = max(1, min(block_rows, (1 << 20) // max(len(tc), 1)))  # G stays ~8 MB
            G = np.empty((block, len(tc)), dtype=np.float64)
            s_min = np.zeros((block, m), dtype=np.float64)
            for i, j, Z in _dense_blocks(rows, T.shape[1], block, np.float64):
                a, b = int(rows.indptr[i]), int(rows.indptr[j])  # per block: no float64 copy of all rows
                v = rows.values[a:b].astype(np.float64)
                s_row = segment_sum(v if w is None else v * w[rows.indices[a:b]], rows.indptr[i:j + 1] - a)
                g = G[:j - i]
                np.take(Z, tc, axis=1, out=g)
                if wt is not None:  # w min(z, t) = min(w z, w t) for w >= 0
                    np.multiply(g, wt, out=g)
                np.minimum(g, tv, out=g)
                if nonempty.any():
                    s_min[:j - i, nonempty] = np.add.reduceat(g, starts[nonempty], axis=1)
                out[i:j] = _jaccard_from(s_min[:j - i], s_row, t_sum)
            return out
        if kernel != "rows":
            raise ValueError(f"kernel={kernel!r}: use auto, rows or targets")
        for i, j in _chunks(rows.indptr, chunk_nnz):
            a, b = int(rows.indptr[i]), int(rows.indptr[j])
            idx, sub = rows.indices[a:b], rows.indptr[i:j + 1] - a
            v = rows.values[a:b].astype(np.float64)
            G = np.minimum(v[None, :], T[:, idx])
            if w is not None:
                wi = w[idx]
                G *= wi[None, :]
                v = v * wi
            out[i:j] = _jaccard_from(_segments(G, sub).T, segment_sum(v, sub), t_sum)
        return out
    if similarity not in ("cosine", "euclidean"):
        raise ValueError(f"similarity={similarity!r}: use jaccard, cosine or euclidean")
    if weights is not None:
        raise ValueError("weights are defined for jaccard only")
    t_sq = np.square(T).sum(axis=1)
    Tt = np.ascontiguousarray(T.T, dtype=gemm_dtype)
    for i, j, Z in _dense_blocks(rows, T.shape[1], block_rows, gemm_dtype):
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


def similarities(X, targets: np.ndarray, similarity: str, dense: bool) -> np.ndarray:
    """``[n, m]``: :func:`dense_pairwise` for dense (signed) rows, :func:`pairwise` for sparse ones."""
    return dense_pairwise(X, targets, similarity) if dense else pairwise(X, targets, similarity)


def doc_freq(rows: SparseRows, num_latents: int) -> np.ndarray:
    """In how many rows each latent is non-zero (int64); add the counts of several blocks."""
    return np.bincount(rows.indices[rows.values != 0], minlength=num_latents).astype(np.int64)


def idf_weights(doc_freq: np.ndarray, n_rows: int, smooth: bool = False) -> np.ndarray:
    """Per-latent weights ``log((1 + n) / (1 + df))`` (``+ 1`` with ``smooth``, as scikit-learn).

    A latent active in every pool row weighs (almost) nothing. Measured on a pool_5k subset
    (issue 14) this does *not* fix the support bias: up-weighting rare latents favours rows
    with even broader support on flat prototypes (MMLU, BBH); :func:`sparsify_prototype` does."""
    w = np.log((1.0 + n_rows) / (1.0 + np.asarray(doc_freq, dtype=np.float64)))
    return w + 1.0 if smooth else w


def weighted_jaccard(rows: SparseRows, proto: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``sum_k w_k min(z_k, p_k) / sum_k w_k max(z_k, p_k)`` for every row, O(nnz) per row."""
    return pairwise(rows, proto[None, :], "jaccard", weights)[:, 0]


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


# ----------------------------------------------------------------------------- candidates


def best_k(scores: np.ndarray, ids, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``scoring.topk`` (score descending, ties by id) with numeric sorts: ids are compared
    only inside runs of equal scores, so no string sort of the whole block."""
    scores = np.asarray(scores, dtype=np.float64)
    ids = np.asarray(ids, dtype=object)
    if k <= 0:
        return scores[:0], ids[:0]
    if k < len(scores):  # keep every row tied with the k-th best score
        keep = scores >= -np.partition(-scores, k - 1)[k - 1]
        scores, ids = scores[keep], ids[keep]
    o = np.argsort(-scores, kind="stable")
    s = scores[o]
    tie = np.flatnonzero(np.diff(np.concatenate([[0], (s[1:] == s[:-1]).astype(np.int8), [0]])))
    for a, b in zip(tie[::2], tie[1::2] + 1):  # positions a..b share one score
        seg = o[a:b]
        o[a:b] = seg[np.argsort(ids[seg].astype(str), kind="stable")]
    o = o[:k]
    return scores[o], ids[o]


class PerTargetTopK:
    """Per target (column) the best ``k`` rows of a stream of ``[B, m]`` score blocks: O(m*k).

    Each column keeps the rows at or above its current k-th best score (cut for all columns
    in one comparison) and is compacted to ``k`` with :func:`best_k` when it holds ``2k``;
    each list equals ``scoring.topk`` of its column over every row added."""

    def __init__(self, n_targets: int, k: int):
        if k < 1:
            raise ValueError(f"k={k} must be positive")
        self.k = k
        self.parts: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(n_targets)]
        self.kept = np.zeros(n_targets, dtype=np.int64)
        self.floor = np.full(n_targets, -np.inf)

    def add(self, scores: np.ndarray, ids) -> None:
        S = np.asarray(scores, dtype=np.float64)
        ids = np.asarray(ids, dtype=object)
        keep = S >= self.floor[None, :]  # ties with the floor stay: the id decides them later
        for j in np.flatnonzero(keep.any(axis=0)):
            kj = keep[:, j]
            self.parts[j].append((S[kj, j], ids[kj]))
            self.kept[j] += int(kj.sum())
            if self.kept[j] > 2 * self.k:
                self._compact(j)

    def _compact(self, j: int) -> None:
        s, i = best_k(np.concatenate([p[0] for p in self.parts[j]]), np.concatenate([p[1] for p in self.parts[j]]), self.k)
        self.parts[j], self.kept[j] = [(s, i)], len(s)
        if len(s) == self.k:
            self.floor[j] = s[-1]

    def result(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per target ``(scores, ids)`` best first: what a scoring task returns to the driver."""
        out = []
        for j, parts in enumerate(self.parts):
            if not parts:
                out.append((np.zeros(0, dtype=np.float64), np.zeros(0, dtype=object)))
                continue
            self._compact(j)
            out.append(self.parts[j][0])
        return out


def merge_candidates(parts: list[list[tuple[np.ndarray, np.ndarray]]], k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Merge the per-target lists of several tasks (``PerTargetTopK.result`` each; every row in
    one task) into one per target: ``scoring.merge_topk``'s result, by :func:`best_k`."""
    if not parts:
        return []
    return [best_k(np.concatenate([p[j][0] for p in parts]), np.concatenate([p[j][1] for p in parts]), k)
            for j in range(len(parts[0]))]


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


def _gram(X: np.ndarray) -> np.ndarray:
    """Cosine similarities of the rows of ``X`` (zero rows: 0 to everything)."""
    U = _unit(X)
    return U @ U.T


def _kmeans_gram(G: np.ndarray, c: int, rng: np.random.Generator, n_init: int, iters: int) -> np.ndarray:
    """Spherical k-means from the Gram matrix alone: a row's cosine to the centroid of cluster
    q is ``sum_{j in q} G[i, j] / |sum_{j in q} u_j|``, so no step touches the L latents."""
    m = len(G)
    best, best_obj = None, -np.inf
    for _ in range(n_init):
        centers = [int(rng.integers(m))]
        near = G[:, centers[0]].copy()
        for _ in range(c - 1):  # k-means++ on the distance 1 - cos
            d = np.maximum(1 - near, 0)
            centers.append(int(rng.choice(m, p=d / d.sum())) if d.sum() > 0 else int(rng.integers(m)))
            near = np.maximum(near, G[:, centers[-1]])
        sim = G[:, centers]
        labels = np.full(m, -1)
        for _ in range(iters):
            new = np.argmax(sim, axis=1)
            if np.array_equal(new, labels):
                break
            labels = new
            M = np.zeros((m, c))
            M[np.arange(m), labels] = 1
            empty = M.sum(0) == 0
            if empty.any():  # restart each empty cluster at the row worst served by its centre
                worst = np.argsort(sim[np.arange(m), labels], kind="stable")[:int(empty.sum())]
                M[worst] = 0
                M[worst, np.flatnonzero(empty)] = 1
                labels = M.argmax(1)
            S = G @ M  # [m, c]: summed cosine of each row to each cluster's members
            norm = np.sqrt(np.maximum((M * S).sum(0), 1e-300))
            sim = S / norm
        obj = float(sim[np.arange(m), labels].sum())
        if obj > best_obj + 1e-12:
            best, best_obj = labels, obj
    _, first = np.unique(best, return_index=True)
    remap = np.empty(best.max() + 1, dtype=np.int64)
    remap[best[np.sort(first)]] = np.arange(len(first))
    return remap[best]


def spherical_kmeans(X: np.ndarray, n_clusters: int, seed: int = 0, n_init: int = 4, iters: int = 100) -> np.ndarray:
    """Labels of spherical k-means (cosine) on the rows of ``X``: k-means++ seeding from
    ``numpy.random.default_rng(seed)``, best of ``n_init`` runs; labels renumbered by first
    occurrence, so the result depends only on ``X``, ``n_clusters`` and ``seed``."""
    m = len(X)
    return _kmeans_gram(_gram(X), min(max(1, n_clusters), m), np.random.default_rng(seed), n_init, iters)


def _silhouette_gram(G: np.ndarray, labels: np.ndarray) -> float:
    D = np.maximum(1 - G, 0)
    labs, inv = np.unique(labels, return_inverse=True)
    if len(labs) < 2:
        return 0.0
    rows = np.arange(len(G))
    cnt = np.bincount(inv).astype(np.float64)
    sums = D @ np.eye(len(labs))[inv]  # [m, C]: summed distance of each row to each cluster
    n_own = cnt[inv]
    a = (sums[rows, inv] - D[rows, rows]) / np.maximum(n_own - 1, 1)
    other = sums / cnt[None, :]
    other[rows, inv] = np.inf
    b = other.min(1)
    s = np.where(n_own > 1, (b - a) / np.maximum(np.maximum(a, b), 1e-300), 0.0)
    return float(s.mean())


def silhouette(X: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette with cosine distance; a row alone in its cluster counts 0 (Rousseeuw 1987)."""
    return _silhouette_gram(_gram(X), np.asarray(labels))


def best_clusters(X: np.ndarray, seed: int = 0, max_k: int | None = None) -> tuple[np.ndarray, float]:
    """The silhouette search behind :func:`choose_clusters`: ``(labels, silhouette)`` of the best k
    (all zeros and -inf when no k splits the rows)."""
    m = len(X)
    G = _gram(X)
    hi = min(m - 1, 64, m // 2 if max_k is None else max_k)
    best, best_s = np.zeros(m, dtype=np.int64), -np.inf
    for c in range(2, hi + 1):
        labels = _kmeans_gram(G, c, np.random.default_rng(seed), 4, 100)
        if len(np.unique(labels)) < 2:
            continue
        s = _silhouette_gram(G, labels)
        if s > best_s + 1e-12:
            best, best_s = labels, s
    return best, float(best_s)


def choose_clusters(X: np.ndarray, seed: int = 0, max_k: int | None = None,
                    min_silhouette: float = 0.25) -> np.ndarray:
    """Cluster labels of the target rows ``X`` (dense ``[m, L]``), the number chosen by silhouette.

    Spherical k-means for every k in ``2..max_k`` (default ``m // 2``, at most 64), each
    seeded from ``default_rng(seed)``; the k with the best cosine silhouette wins, unless that
    silhouette is below ``min_silhouette`` (0.25: "no substantial structure", Kaufman &
    Rousseeuw 1990), in which case all rows form one cluster and ``clusters`` is exactly
    ``prototype``. Deterministic for a seed; works on the ``[m, m]`` Gram matrix (cost
    O(m^2 L) once, then O(m^2 k) per k)."""
    labels, s = best_clusters(X, seed, max_k)
    return labels if s >= min_silhouette else np.zeros(len(X), dtype=np.int64)


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
