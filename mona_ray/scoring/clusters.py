"""Clusters of target rows: spherical k-means with the number of clusters chosen by silhouette
(the ``clusters`` aggregation, issue 14). Pure NumPy; every step works on the ``[m, m]`` cosine
Gram matrix of the target rows, so none touches the L latents after it is built.
"""

from __future__ import annotations

import numpy as np


def _unit(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    n = np.linalg.norm(X, axis=1, keepdims=True)
    return np.divide(X, n, out=np.zeros_like(X), where=n > 0)


def gram(X: np.ndarray) -> np.ndarray:
    """Cosine similarities of the rows of ``X`` (zero rows: 0 to everything)."""
    U = _unit(X)
    return U @ U.T


def kmeans_gram(G: np.ndarray, c: int, rng: np.random.Generator, n_init: int, iters: int) -> np.ndarray:
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


def best_clusters(X: np.ndarray, seed: int = 0, max_k: int | None = None) -> tuple[np.ndarray, float]:
    """``(labels, silhouette)`` of the target rows ``X`` (dense ``[m, L]``) for the best number of
    clusters: spherical k-means for every k in ``2..max_k`` (default ``m // 2``, at most 64), each
    seeded from ``default_rng(seed)`` (k-means++, best of 4 runs), the k with the best cosine
    silhouette winning (all zeros and -inf when no k splits the rows). ``table.target_prototypes``
    keeps one cluster when that silhouette is below ``select.min_silhouette``. Deterministic for a
    seed; cost O(m^2 L) for the Gram matrix once, then O(m^2 k) per k."""
    m = len(X)
    G = gram(X)
    hi = min(m - 1, 64, m // 2 if max_k is None else max_k)
    best, best_s = np.zeros(m, dtype=np.int64), -np.inf
    for c in range(2, hi + 1):
        labels = kmeans_gram(G, c, np.random.default_rng(seed), 4, 100)
        if len(np.unique(labels)) < 2:
            continue
        s = _silhouette_gram(G, labels)
        if s > best_s + 1e-12:
            best, best_s = labels, s
    return best, float(best_s)


def cluster_prototypes(targets: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(prototypes [C, L], sizes [C])``: the mean of each cluster's target rows (dense)."""
    T = np.asarray(targets, dtype=np.float64)
    labs = np.unique(labels)
    P = np.stack([T[labels == q].mean(0) for q in labs])
    return P, np.asarray([(labels == q).sum() for q in labs], dtype=np.int64)
