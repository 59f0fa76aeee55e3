"""Ranking metrics for a selection against relevance labels (pure NumPy).

A ranking is the order ``scoring.order_key`` gives (score descending, id ascending), so
ties are broken exactly as the product breaks them.
"""

from __future__ import annotations

import re

import numpy as np

from ..scoring import order_key, selection_size


def resolve_k(k, n: int) -> int:
    """``50`` -> 50; ``"5%"`` -> ``selection_size(n, 0.05)`` (as the pipeline rounds)."""
    if isinstance(k, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*%\s*", k)
        if m:
            return selection_size(n, float(m.group(1)) / 100)
        k = int(k)
    if int(k) <= 0:
        raise ValueError(f"k={k}: must be positive")
    return min(int(k), n)


def precision_recall_at(rel_sorted: np.ndarray, k: int) -> tuple[float, float]:
    hits = float(rel_sorted[:k].sum())
    total = float(rel_sorted.sum())
    return hits / k, (hits / total if total else 0.0)


def average_precision(rel_sorted: np.ndarray) -> float:
    """Mean over the relevant rows of the precision at each one's rank (0 when none is relevant)."""
    rel = rel_sorted.astype(np.float64)
    if rel.sum() == 0:
        return 0.0
    prec = np.cumsum(rel) / np.arange(1, len(rel) + 1)
    return float((prec * rel).sum() / rel.sum())


def precision_curve(rel_sorted: np.ndarray, k_max: int) -> np.ndarray:
    """Precision@k for k = 1..k_max."""
    r = rel_sorted[:k_max].astype(np.float64)
    return np.cumsum(r) / np.arange(1, len(r) + 1)


def domain_share(domains_sorted: np.ndarray, k: int) -> dict[str, float]:
    vals, counts = np.unique(domains_sorted[:k], return_counts=True)
    order = np.argsort(-counts, kind="stable")
    return {str(vals[i]): float(counts[i]) / k for i in order}


def evaluate_ranking(scores: np.ndarray, ids, domains: np.ndarray, relevant: set[str], ks: list,
                     share_at, curve_max) -> dict:
    """All metrics of one selector's scores for one target."""
    n = len(scores)
    order = order_key(scores, ids)
    rel_sorted = np.isin(domains[order], list(relevant))
    out = {"precision": {}, "recall": {}}
    for k in ks:
        kk = resolve_k(k, n)
        p, r = precision_recall_at(rel_sorted, kk)
        out["precision"][str(k)] = p
        out["recall"][str(k)] = r
    out["ap"] = average_precision(rel_sorted)
    kshare = resolve_k(share_at, n)
    out["share_k"] = kshare
    out["share"] = domain_share(domains[order], kshare)
    out["curve"] = precision_curve(rel_sorted, resolve_k(curve_max, n)).tolist()
    return out
