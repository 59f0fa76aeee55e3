"""LESS's scores from gradient features (``less/data_selection/matching.py``), in numpy.

Each checkpoint ``i`` of the warm-up gives every source row a projected Adam direction
``s_i`` and every target row a projected gradient ``t_i``, each normalised to unit length
(their ``all_orig.pt``). A source row's score against one target task is

    sum_i  w_i * mean_j  cos(s_i, t_ij)

with ``w_i`` the checkpoint's mean learning rate over its epoch, renormalised to sum to one.
A target made of subtasks (their MMLU's 57, BBH's 27) takes the mean within each subtask and
the best subtask (``groups``). Features come from :mod:`mona_ray.features.gradients`.
"""

from __future__ import annotations

import numpy as np


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Each row scaled to unit L2 norm (``torch.nn.functional.normalize``: a zero row stays zero)."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def checkpoint_weights(lrs) -> np.ndarray:
    """The checkpoints' weights: their mean learning rates, scaled to sum to one."""
    w = np.asarray(lrs, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"checkpoint weights must be non-negative with a positive sum, got {list(w)}")
    return w / w.sum()


def less_scores(source: list[np.ndarray], target: list[np.ndarray], lrs, groups=None) -> np.ndarray:
    """One score per source row (float64). ``source[i]``: ``[n_source, d]`` features at checkpoint
    ``i``; ``target[i]``: ``[n_target, d]`` at the same checkpoint; ``lrs[i]``: its weight before
    renormalising. ``groups``: each target row's subtask (``None``: one task)."""
    if len(source) != len(target) or len(source) != len(lrs):
        raise ValueError(f"{len(source)} source, {len(target)} target feature sets and {len(lrs)} weights: "
                         "one of each per checkpoint")
    w = checkpoint_weights(lrs)
    n_src, n_tgt = source[0].shape[0], target[0].shape[0]
    if n_tgt == 0:
        raise ValueError("no target rows")
    sim = np.zeros((n_src, n_tgt), dtype=np.float64)
    for wi, s, t in zip(w, source, target):
        sim += wi * (unit_rows(s) @ unit_rows(t).T).astype(np.float64)
    if groups is None:
        return sim.mean(axis=1)
    groups = np.asarray(groups)
    if len(groups) != n_tgt:
        raise ValueError(f"{len(groups)} subtask labels for {n_tgt} target rows")
    return np.max(np.stack([sim[:, groups == g].mean(axis=1) for g in np.unique(groups)], axis=1), axis=1)
