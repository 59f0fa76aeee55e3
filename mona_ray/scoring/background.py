"""What the source pool says about each latent, and scores that weigh a target's latents by it
(issue 30): pure NumPy, no Ray.

Generalized Jaccard weighs a latent by its activation mass, so what every row has (punctuation,
the chat template, function words: the GSM8K prototype's strongest latent fires on ``" and"``)
fills the numerator and the denominator of every score, and what tells one task from another is
a small share of the mass. :class:`PoolStats` holds, per latent, how many pool rows fire it
(document frequency) and its summed activation; it adds up over any split of the pool, so it is
a reduce over store parts. :class:`Background` turns it into one of these scores
(``select.background``):

* ``none``: the paper's score, unchanged (bit for bit: the same kernels are called).
* ``idf``: every latent weighted by its rarity in the pool, ``w_j = log((n + 1) / (df_j + 1))``,
  on the row and on the prototype alike, then the chosen similarity (Jaccard or cosine). For
  ``w >= 0``, ``sum w min(z, p) / sum w max(z, p)`` is generalized Jaccard of ``w z`` and ``w p``.
* ``contrast``: the prototype minus the pool's mean activation, clipped at zero
  (``max(p - mean, 0)``): only what the target has more of than the pool is matched.
* ``lr``: a likelihood ratio per latent, DSIR's idea on SAE latents: with ``P`` the prototype's
  activation mass as a distribution over latents and ``Q`` the pool's, smoothed as
  ``P' = (1 - a) P + a Q`` (``a = LR_SMOOTHING``), a row scores the mean log-ratio of its own
  mass, ``sum_j z_j log(P'_j / Q_j) / |z|_1``. It ignores the similarity setting.
* ``lda``: a linear probe of the target against the pool in closed form (a Gaussian classifier
  with one diagonal covariance, Fisher's discriminant): ``w_j = (p_j - mean_j) / (var_j + s)``, ``var``
  the pool's per-latent variance and ``s`` its mean over latents (shrinkage, so that a latent
  that barely varies in the pool does not dominate); a row scores ``z . w``, the probe's logit
  up to a constant. It ignores the similarity setting.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config.schema import BACKGROUNDS
from .similarity import pairwise
from .sparse import SparseRows, segment_sum

LR_SMOOTHING = 0.1  # lr: the share of the pool's distribution mixed into the target's
_EPS = 1e-12


@dataclass(frozen=True)
class PoolStats:
    """Per latent, over ``rows`` pool rows: ``df`` (rows where the latent is > 0), ``mass`` (its
    summed activation) and ``sq`` (its summed squared activation). Adds up over any split of the
    rows (``+``)."""

    rows: int
    df: np.ndarray  # int64 [L]
    mass: np.ndarray  # float64 [L]
    sq: np.ndarray  # float64 [L]

    @classmethod
    def empty(cls, width: int) -> "PoolStats":
        return cls(0, np.zeros(width, np.int64), np.zeros(width, np.float64), np.zeros(width, np.float64))

    @classmethod
    def of(cls, rows: SparseRows, width: int) -> "PoolStats":
        """The statistics of some sparse rows (non-negative, mean-pooled codes)."""
        live = rows.values > 0
        idx, v = rows.indices[live], rows.values[live].astype(np.float64)
        return cls(len(rows), np.bincount(idx, minlength=width).astype(np.int64),
                   np.bincount(idx, weights=v, minlength=width), np.bincount(idx, weights=v * v, minlength=width))

    def __add__(self, other: "PoolStats") -> "PoolStats":
        return PoolStats(self.rows + other.rows, self.df + other.df, self.mass + other.mass, self.sq + other.sq)

    @property
    def width(self) -> int:
        return len(self.df)

    def idf(self) -> np.ndarray:
        return np.log((self.rows + 1.0) / (self.df + 1.0))

    def mean(self) -> np.ndarray:
        return self.mass / max(self.rows, 1)

    def var(self) -> np.ndarray:
        return np.maximum(self.sq / max(self.rows, 1) - np.square(self.mean()), 0.0)


@dataclass(frozen=True)
class Background:
    """How a score uses the pool (module docstring): ``kind`` and the pool's per-latent weights
    (``idf``) or mean activation (``contrast``, ``lr``). Small (two vectors of the SAE's width):
    it travels to every score task."""

    kind: str = "none"
    weights: np.ndarray | None = None
    mean: np.ndarray | None = None
    var: np.ndarray | None = None

    @classmethod
    def of(cls, kind: str, stats: PoolStats | None) -> "Background":
        if kind not in BACKGROUNDS:
            raise ValueError(f"select.background={kind!r}: use one of {', '.join(BACKGROUNDS)}")
        if kind == "none":
            return cls()
        if stats is None or stats.rows == 0:
            raise ValueError(f"select.background={kind}: needs the pool's statistics (no pool rows)")
        if kind == "idf":
            return cls(kind, weights=stats.idf())
        if kind == "lda":
            var = stats.var()
            return cls(kind, mean=stats.mean(), var=var + float(var.mean()))
        return cls(kind, mean=stats.mean())

    @property
    def active(self) -> bool:
        return self.kind != "none"

    def prototypes(self, P: np.ndarray) -> np.ndarray:
        """The prototypes as this score compares rows with them (``lr``: the log-ratios per latent)."""
        P = np.atleast_2d(np.asarray(P, dtype=np.float64))
        if self.kind == "idf":
            return P * self.weights[None, :]
        if self.kind == "contrast":
            return np.maximum(P - self.mean[None, :], 0.0)
        if self.kind == "lr":
            q = self.mean / max(float(self.mean.sum()), _EPS) + _EPS
            p = P / np.maximum(P.sum(axis=1, keepdims=True), _EPS)
            return np.log(((1 - LR_SMOOTHING) * p + LR_SMOOTHING * q[None, :]) / q[None, :])
        if self.kind == "lda":
            return (P - self.mean[None, :]) / self.var[None, :]
        return P

    def rows(self, X: SparseRows) -> SparseRows:
        """The rows as this score compares them (``idf``: weighted; otherwise unchanged)."""
        if self.kind == "idf":
            return SparseRows(X.indptr, X.indices, X.values.astype(np.float64) * self.weights[X.indices])
        return X

    def similarities(self, X: SparseRows, P: np.ndarray, similarity: str) -> np.ndarray:
        """``[n, c]``: every row against every prototype under this score."""
        Pb = self.prototypes(P)
        if self.kind in ("lr", "lda"):  # linear in the row: z . w per prototype
            v = X.values.astype(np.float64)
            out = np.stack([segment_sum(v * w[X.indices], X.indptr) for w in Pb], axis=1)
            if self.kind == "lda":
                return out
            norm = segment_sum(v, X.indptr)
            with np.errstate(invalid="ignore", divide="ignore"):
                return np.where(norm[:, None] > 0, out / norm[:, None], -np.inf)
        return pairwise(self.rows(X), Pb, similarity)

    def latent_weights(self, P: np.ndarray) -> np.ndarray:
        """``[c, L]``: how much each latent of each prototype counts in this score (the explanation's
        order): the prototype as compared (``idf``: weighted; ``contrast``: what exceeds the pool),
        ``lr`` / ``lda``: the prototype's mass times its positive log-ratio / probe weight."""
        Pb = self.prototypes(P)
        if self.kind in ("lr", "lda"):
            P = np.atleast_2d(np.asarray(P, dtype=np.float64))
            return P * np.maximum(Pb, 0.0)
        return Pb
