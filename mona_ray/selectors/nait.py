"""NAIT (Chen et al. 2026, arXiv 2603.13201): neuron-activation directions of the target task.

The method as specified for this product, with every choice the paper leaves open:

1. **Activations.** For each block ``l`` (the residual stream at the block's output,
   read with forward hooks on ``model.layers[l]``; by default every block up to the
   hookpoint where the model is cut, ``layers.28`` = 29 of SmolLM2's 30 blocks, so one
   forward pass serves MoNA and NAIT) and each sample, the *delta* is the activation of
   the sample's last token minus that of its first token.
   - *last token*: the last real token after rendering and truncation (for the chat
     template, the newline after the final ``<|im_end|>``: it has attended to the whole
     sample).
   - *first token*: the first non-special token, not position 0. In SmolLM2 position 0
     (``<|im_start|>``) is an attention sink whose residual norm is ~100x any other
     token's; subtracting it would make every delta mostly ``-sink``. With the chat
     template the first non-special token is a fixed role word, so the subtraction
     removes a constant per block: it shifts every score by the same amount and never
     changes a ranking, but it keeps the sign rule below meaningful.
2. **Direction.** Per block, the first principal component of the target deltas (the top
   right singular vector of the centred ``[n_target, d]`` matrix), unit norm, with its
   sign chosen so that the mean target delta projects positively on it. With a single
   target example (no variance) the direction is the normalised mean delta.
3. **Score.** A candidate's deltas are projected on the directions, one number per
   block, and summed over blocks (``layer_norm="none"``, as specified). Because the
   residual norm grows with depth, that sum is dominated by the deepest blocks;
   ``layer_norm="zscore"`` first standardises each block's projection by the mean and
   standard deviation of the *target* projections on that block, so blocks weigh
   equally. Both are measured in ``docs/evaluation.md``.

Memory: :meth:`NAITSelector.score` computes the target directions first and then streams
the source keeping only ``[n_source, n_blocks]`` projections; ``prepare`` (used by the
evaluation to serve many targets from one pass) keeps the full deltas,
``n_source x n_blocks x d`` float32 (pool_5k on SmolLM2: ~340 MB).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .base import Messages, Selector, check_target
from .features import FeatureExtractor, ModelSpec

LAYER_NORMS = ("none", "zscore")


def nait_directions(deltas: np.ndarray) -> np.ndarray:
    """Per block, the sign-fixed first principal component of the target deltas: ``[n, L, d] -> [L, d]``."""
    X = np.asarray(deltas, dtype=np.float64)
    if X.ndim != 3 or X.shape[0] == 0:
        raise ValueError(f"NAIT needs target deltas of shape [n >= 1, layers, d], got {X.shape}")
    out = np.zeros(X.shape[1:], dtype=np.float64)
    for l in range(X.shape[1]):
        D = X[:, l, :]
        mean = D.mean(0)
        C = D - mean
        if X.shape[0] > 1 and np.abs(C).max() > 0:
            v = np.linalg.svd(C, full_matrices=False)[2][0]
        else:
            v = mean.copy()
        n = np.linalg.norm(v)
        v = v / n if n > 0 else v
        if v @ mean < 0:
            v = -v
        out[l] = v
    return out


def project(deltas: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    """``[n, L, d] x [L, d] -> [n, L]``: each block's delta on that block's direction."""
    return np.einsum("nld,ld->nl", np.asarray(deltas, dtype=np.float64), dirs)


def combine(proj: np.ndarray, target_proj: np.ndarray, layer_norm: str = "none") -> np.ndarray:
    """Sum over blocks of the projections, optionally z-scored per block by the target's."""
    if layer_norm not in LAYER_NORMS:
        raise ValueError(f"nait layer_norm={layer_norm!r}: use one of {', '.join(LAYER_NORMS)}")
    proj = np.asarray(proj, dtype=np.float64)
    if layer_norm == "zscore":
        mu = target_proj.mean(0)
        sd = target_proj.std(0)
        sd = np.where(sd > 0, sd, 1.0)
        proj = (proj - mu) / sd
    return proj.sum(1)


class NAITSelector(Selector):
    name = "nait"

    def __init__(self, layers: Sequence[int] | str = "all", layer_norm: str = "none", cache_dir: str | None = None,
                 chunk_rows: int = 256, progress: bool = True, **spec):
        if layer_norm not in LAYER_NORMS:
            raise ValueError(f"nait layer_norm={layer_norm!r}: use one of {', '.join(LAYER_NORMS)}")
        self.spec = ModelSpec(**spec)
        from ..core.model import parse_hookpoint

        last = parse_hookpoint(self.spec.hookpoint)
        self.layers = list(range(last + 1)) if layers == "all" else [int(x) for x in layers]
        self.layer_norm = layer_norm
        self.extractor = FeatureExtractor(self.spec, products=(), nait_layers=self.layers, cache_dir=cache_dir,
                                          chunk_rows=chunk_rows, progress=progress)

    def target_directions(self, target: Sequence[Messages]) -> tuple[np.ndarray, np.ndarray]:
        """(directions [L, d], target deltas [n, L, d])."""
        check_target(target)
        t = self.extractor.extract(target, "nait: target").nait
        return nait_directions(t), t

    def prepare(self, source: Sequence[Messages], source_ids: Sequence[str]) -> np.ndarray:
        return self.extractor.extract(source, "nait: source").nait

    def score_prepared(self, state: np.ndarray, target: Sequence[Messages]) -> np.ndarray:
        dirs, t = self.target_directions(target)
        return combine(project(state, dirs), project(t, dirs), self.layer_norm)

    def score(self, source, target, source_ids) -> np.ndarray:
        """Directions first, then one pass over the source keeping only projections."""
        if len(source) != len(source_ids):
            raise ValueError(f"{len(source)} source rows but {len(source_ids)} ids")
        dirs, t = self.target_directions(target)
        if len(source) == 0:
            return np.zeros(0)
        proj = self.extractor.extract(source, "nait: source", nait_dirs=dirs.astype(np.float32)).nait
        return combine(proj, project(t, dirs), self.layer_norm)
