"""Round robin (RDS+'s aggregation): one best-first list per target, interleaved (issue 14).

Each scoring task keeps per target its top ``k`` rows; the lists are interleaved by
:func:`round_robin`. ``k`` per list suffices: a list never walks past position ``k`` (each
position walked is a row it takes or a row already taken, at most ``k`` in all). Pure NumPy.
"""

from __future__ import annotations

import numpy as np

from .topk import topk


def candidates_from_scores(S: np.ndarray, ids, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per column of an in-memory ``[n, m]`` score matrix, its ``scoring.topk`` list."""
    return [topk(S[:, j], ids, k) for j in range(S.shape[1])]


def round_robin(candidates: list[tuple[np.ndarray, np.ndarray]], k: int, quotas=None,
                skip_taken: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Interleave best-first lists: list 0, 1, ..., m-1, then again, until ``k`` rows are taken.

    On its turn a list takes its best row not yet taken (``skip_taken``; RDS+'s code instead
    spends the turn when its next row is already taken: ``skip_taken=False``). A list that is
    exhausted or has taken its quota (``quotas[j]``) is passed over.
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
