"""Synthetic mean-pooled SAE codes that look like the real ones, generated block by block.

A real row is ``z = (1/n) sum_t z_t`` over the n tokens of a sample, each token carrying
TopK codes. So latent j is non-zero in a row when at least one token fired it, and its
value is (number of tokens that fired it) x (their mean activation) / n. The generator
follows that model:

* latent popularity is Zipf-like (a few latents fire on almost every sample, most rarely);
* a random tenth of the latents are "task" latents; every row has an affinity a in [0, 1]
  to the task (most rows near 0, a continuum up to 1) that boosts those latents, and the
  target rows have a close to 1, so Jaccard scores against the target prototype form a
  realistic continuum with a tail of similar rows rather than a clean split;
* per row, the expected number of firings of latent j is ``lam_ij = g_i * w_ij``, with
  ``g_i`` calibrated so the mean number of non-zeros per row is ``nnz`` (the shipped
  SmolLM2 SAE, K=64, gives 4,129 of 9,216 on average over 144 demo rows, median 3,820);
* a latent is present with probability ``1 - exp(-lam_ij)``; 
  its value is count x activation / n with n = (total firings) / K (the count is
  drawn as ``1 + floor(lam * Exp(1))``, a cheap stand-in for a zero-truncated Poisson).

Dense [rows, latents] work is needed to draw a block, which costs about 1 s per 8k rows
at 9,216 latents; :class:`RowPool` therefore draws a fixed pool once and serves blocks as
random windows of it with a fresh random scale per row, so 1M rows stream at memory
speed while every row keeps a realistic sparsity pattern.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..scoring import SparseRows


@dataclass(frozen=True)
class SynthSpec:
    num_latents: int = 9216
    nnz: int = 4100  # mean non-zeros per row (the shipped SmolLM2 SAE, K=64, gives 4,129 on the demo)
    k: int = 64  # per-token TopK of the simulated SAE (sets the token count n)
    value_scale: float = 40.0  # puts the median value near the shipped SAE's (0.38 on the demo)
    zipf: float = 0.7  # latent popularity exponent
    task_fraction: float = 0.1  # share of latents that the target task boosts
    task_boost: float = 8.0
    seed: int = 0

    def check(self) -> None:
        if self.num_latents < 2:
            raise ValueError(f"--latents={self.num_latents} must be at least 2")
        if not 0 < self.nnz < self.num_latents:
            raise ValueError(f"--nnz={self.nnz} must be between 1 and --latents - 1 ({self.num_latents - 1})")
        if self.k < 1:
            raise ValueError(f"--sae-k={self.k} must be positive")


class Generator:
    """Draws realistic rows (see the module docstring); one instance per data set."""

    _LEVELS = 33  # affinity grid on which the per-row scale g is calibrated

    def __init__(self, spec: SynthSpec):
        spec.check()
        self.spec = spec
        rng = np.random.default_rng(spec.seed)
        L = spec.num_latents
        w = 1.0 / np.arange(1, L + 1, dtype=np.float64) ** spec.zipf
        self.w = rng.permutation(w / w.mean())
        self.task = np.zeros(L, dtype=np.float64)
        self.task[rng.choice(L, max(1, int(spec.task_fraction * L)), replace=False)] = 1.0
        self.act_scale = rng.lognormal(0.0, 0.5, L)  # typical activation of each latent
        self._grid = np.linspace(0.0, 1.0, self._LEVELS)
        self._g = np.array([self._calibrate(a) for a in self._grid])
        self._w32 = self.w.astype(np.float32)
        self._wtask32 = (self.w * self.task * spec.task_boost).astype(np.float32)
        self._act32 = self.act_scale.astype(np.float32)

    def weights(self, affinity: np.ndarray) -> np.ndarray:
        return self.w[None, :] * (1.0 + affinity[:, None] * self.spec.task_boost * self.task[None, :])

    def _calibrate(self, a: float) -> float:
        """g such that sum_j (1 - exp(-g w_j(a))) = nnz (bisection on a log scale)."""
        w = self.weights(np.array([a]))[0]
        lo, hi = 1e-6, 1e6
        for _ in range(80):
            mid = (lo * hi) ** 0.5
            if (-np.expm1(-mid * w)).sum() < self.spec.nnz:
                lo = mid
            else:
                hi = mid
        return (lo * hi) ** 0.5

    def rows(self, affinity: np.ndarray, rng: np.random.Generator) -> SparseRows:
        """One row per affinity value, as float32 CSR."""
        B = len(affinity)
        g = np.interp(affinity, self._grid, self._g) * rng.lognormal(0.0, 0.25, B)
        # lam = g * w * (1 + a * boost * task), as two float32 outer products
        lam = np.multiply.outer(g.astype(np.float32), self._w32)
        lam += np.multiply.outer((g * affinity).astype(np.float32), self._wtask32)
        # present with probability 1 - exp(-lam)  <=>  an Exp(1) draw falls below lam
        present = rng.standard_exponential(lam.shape, dtype=np.float32) < lam
        r, c = np.nonzero(present)
        lam_nz = lam[r, c]
        n_tokens = np.maximum(lam.sum(1, dtype=np.float64) / self.spec.k, 1.0).astype(np.float32)
        counts = np.minimum(1.0 + np.floor(lam_nz * rng.standard_exponential(len(c), dtype=np.float32)), n_tokens[r])
        act = self._act32[c] * np.float32(self.spec.value_scale) * np.exp(np.float32(0.3) * rng.standard_normal(len(c), dtype=np.float32))
        values = counts * act / n_tokens[r]
        indptr = np.zeros(B + 1, dtype=np.int64)
        np.cumsum(present.sum(1), out=indptr[1:])
        return SparseRows(indptr, c.astype(np.int32), values.astype(np.float32, copy=False))

    def draw(self, n: int, rng: np.random.Generator, target: bool = False) -> SparseRows:
        """``n`` source (or target) rows, drawn in chunks so the dense scratch stays ~128 MB."""
        step = max(16, (1 << 25) // self.spec.num_latents)
        aff = self.target_affinity if target else self.source_affinity
        return concat([self.rows(aff(min(step, n - a), rng), rng) for a in range(0, n, step)])

    def source_affinity(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Most source rows are unrelated to the task; a tail of them is increasingly related."""
        return np.clip(rng.beta(0.3, 3.0, n), 0.0, 1.0)

    def target_affinity(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return np.clip(rng.beta(8.0, 1.5, n), 0.0, 1.0)


def prototype_from(gen: Generator, n_targets: int, value_dtype=np.float32, seed: int = 1) -> np.ndarray:
    """The mean of ``n_targets`` target rows (stored in ``value_dtype``), float64."""
    from ..scoring import prototype

    t = gen.draw(n_targets, np.random.default_rng(seed), target=True)
    t.values = t.values.astype(value_dtype)
    return prototype(t, gen.spec.num_latents)


class RowPool:
    """A fixed pool of realistic rows served as random windows with per-row rescaling.

    ``block(n, rng)`` returns ``n`` rows that are a contiguous slice of the pool (indices
    shared, zero-copy) with values multiplied by a fresh random factor per row, so scores
    differ from block to block. Memory is the pool plus one block, whatever the total.
    """

    def __init__(self, gen: Generator, pool_rows: int, seed: int = 2):
        self.rows = gen.draw(pool_rows, np.random.default_rng(seed))

    def block(self, n: int, rng: np.random.Generator) -> SparseRows:
        P = len(self.rows)
        if n > P:
            raise ValueError(f"block of {n} rows is larger than the pool ({P} rows); raise --pool-rows")
        a = int(rng.integers(0, P - n + 1))
        ip = self.rows.indptr[a:a + n + 1]
        lo, hi = int(ip[0]), int(ip[-1])
        scale = rng.uniform(0.5, 1.5, n).astype(np.float32)
        vals = self.rows.values[lo:hi] * np.repeat(scale, np.diff(ip))
        return SparseRows(ip - lo, self.rows.indices[lo:hi], vals)


def concat(parts: list[SparseRows]) -> SparseRows:
    if len(parts) == 1:
        return parts[0]
    offs = np.cumsum([0] + [int(p.indptr[-1]) for p in parts])
    indptr = np.concatenate([parts[0].indptr[:1]] + [p.indptr[1:] + o for p, o in zip(parts, offs)])
    return SparseRows(indptr, np.concatenate([p.indices for p in parts]), np.concatenate([p.values for p in parts]))
