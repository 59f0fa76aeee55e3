"""The aggregation pieces only ``bench score`` uses (the pipeline and the evaluation do not).

* :class:`PerTargetTopK` / :func:`merge_candidates`: per list the best ``k`` rows of a stream of
  ``[B, m]`` score blocks in O(m*k), merged over simulated scoring tasks (the pipeline keeps one
  ``scoring.RunningTopK`` per target instead); :func:`best_k` is their numeric top-k.
* :func:`allocate`: the selection split over clusters by size (``clusters`` with quotas).
* :func:`spherical_kmeans` with a fixed number of clusters and :func:`choose_clusters`, the
  silhouette-threshold choice (the pipeline's is ``scoring.table.target_prototypes``).
* :func:`doc_freq` / :func:`idf_weights`: per-latent IDF weights for ``-idf``; IDF-weighted
  Jaccard is Jaccard of the weighted vectors (``w min(z, t) = min(w z, w t)`` for ``w >= 0``).
"""

from __future__ import annotations

import numpy as np

from ..scoring.clusters import best_clusters, gram, kmeans_gram
from ..scoring.sparse import SparseRows


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


def spherical_kmeans(X: np.ndarray, n_clusters: int, seed: int = 0, n_init: int = 4, iters: int = 100) -> np.ndarray:
    """Labels of spherical k-means (cosine) on the rows of ``X``: k-means++ seeding from
    ``numpy.random.default_rng(seed)``, best of ``n_init`` runs; labels renumbered by first
    occurrence, so the result depends only on ``X``, ``n_clusters`` and ``seed``."""
    return kmeans_gram(gram(X), min(max(1, n_clusters), len(X)), np.random.default_rng(seed), n_init, iters)


def choose_clusters(X: np.ndarray, seed: int = 0, max_k: int | None = None, min_silhouette: float = 0.25) -> np.ndarray:
    """Cluster labels of the target rows ``X`` (``scoring.clusters.best_clusters``), all rows one
    cluster when the best silhouette is below ``min_silhouette``."""
    labels, s = best_clusters(X, seed, max_k)
    return labels if s >= min_silhouette else np.zeros(len(X), dtype=np.int64)


def doc_freq(rows: SparseRows, num_latents: int) -> np.ndarray:
    """In how many rows each latent is non-zero (int64); add the counts of several blocks."""
    return np.bincount(rows.indices[rows.values != 0], minlength=num_latents).astype(np.int64)


def idf_weights(doc_freq: np.ndarray, n_rows: int, smooth: bool = False) -> np.ndarray:
    """Per-latent weights ``log((1 + n) / (1 + df))`` (``+ 1`` with ``smooth``, as scikit-learn).

    A latent active in every pool row weighs (almost) nothing. Measured on a pool_5k subset
    (issue 14) this does *not* fix the support bias: up-weighting rare latents favours rows
    with even broader support on flat prototypes (MMLU, BBH); ``scoring.cuts.sparsify_prototype`` does."""
    w = np.log((1.0 + n_rows) / (1.0 + np.asarray(doc_freq, dtype=np.float64)))
    return w + 1.0 if smooth else w
