"""DSIR: data selection with importance resampling over hashed n-grams (Xie et al. 2023).

Implemented here in NumPy, following the reference ``HashedNgramDSIR``:

1. Text -> lower-cased words with the ``wordpunct`` rule (runs of word characters, or
   runs of other non-space characters).
2. Every unigram and bigram (``"w1 w2"``) is hashed into one of ``num_buckets`` buckets:
   the first 8 bytes of BLAKE2b (little-endian) modulo ``num_buckets``. The reference
   (``data-selection`` 1.0.3, ``hash_buckets``) takes the whole SHA-256 digest as an integer
   modulo ``num_buckets`` instead. Both are stable hashes, neither is better, but they put
   n-grams in different buckets, so the two rank rows a little differently (6 of the top 50
   of 300 pool rows moved, issue 23); with the same hash the log weights agree to 3.6e-12.
   Ours is kept: changing it would move every stored DSIR result for no gain in fidelity
   to the method (the paper fixes hashed n-grams, not the hash).
3. Two bag-of-n-grams models: ``p_target`` from the target examples and ``p_raw`` from
   the raw (source) pool: bucket counts divided by their total.
4. A candidate's log importance weight is
   ``sum_j c_j(x) * (log(p_target[j] + eps) - log(p_raw[j] + eps))`` with ``c_j(x)`` its
   bucket counts and ``eps = 1e-8`` as in the reference.
5. The reference's length filter (``min_example_length``, default 100 as in the package):
   a source row with fewer words is not a candidate. Words are what the package counts,
   ``HashedNgramDSIR.get_perexample_metadata``: ``(n-gram count + n(n-1)/2) // n``, which
   is the row's number of ``wordpunct`` tokens. The package drops such rows before it
   selects; here they stay in the ranking, scored ``-inf`` (lowest, ties by id, as every
   row is), and the run records how many and why (``filter`` in the scores' ``info`` and
   the manifest). The raw distribution ``p_raw`` is still fitted on every row, as the
   package fits it. ``min_example_length=0`` turns the filter off.
6. Selection: deterministic top-k by log weight (default). With ``gumbel=True`` the score
   is the log weight plus seeded Gumbel(0, 1) noise, so that top-k of the score draws k
   samples without replacement with probability proportional to the importance
   weight (the Gumbel-top-k trick DSIR uses for resampling).
"""

from __future__ import annotations

import hashlib
import re
import sys
from typing import Sequence

import numpy as np

from .base import Messages, Selector, messages_text

_WORDPUNCT = re.compile(r"\w+|[^\w\s]+")
EPS = 1e-8
MIN_EXAMPLE_LENGTH = 100  # data-selection's HashedNgramDSIR default
FILTERED = -np.inf  # the score of a row the length filter takes out


def wordpunct(text: str) -> list[str]:
    return _WORDPUNCT.findall(text.lower())


def bucket_of(ngram: str, num_buckets: int) -> int:
    return int.from_bytes(hashlib.blake2b(ngram.encode("utf-8"), digest_size=8).digest(), "little") % num_buckets


class NgramHasher:
    """Text -> int64 array of the buckets of its unigrams and bigrams (memoised per n-gram)."""

    def __init__(self, num_buckets: int = 10000, ngrams: int = 2):
        if ngrams not in (1, 2):
            raise ValueError(f"dsir ngrams={ngrams}: use 1 (unigrams) or 2 (unigrams + bigrams)")
        self.num_buckets, self.ngrams = num_buckets, ngrams
        self._memo: dict[str, int] = {}

    def _b(self, s: str) -> int:
        b = self._memo.get(s)
        if b is None:
            b = self._memo[s] = bucket_of(s, self.num_buckets)
        return b

    def __call__(self, text: str) -> np.ndarray:
        w = wordpunct(text)
        grams = w + ([f"{a} {b}" for a, b in zip(w, w[1:])] if self.ngrams == 2 else [])
        return np.fromiter((self._b(g) for g in grams), dtype=np.int64, count=len(grams))

    def many(self, texts: Sequence[str], progress: bool = False, desc: str = "dsir") -> tuple[np.ndarray, np.ndarray]:
        """All texts' buckets concatenated, plus CSR-style offsets ``[n + 1]``."""
        from tqdm.auto import tqdm

        parts = [self(t) for t in tqdm(texts, desc=desc, unit="row", disable=not progress, file=sys.stderr,
                                       mininterval=2)]
        offsets = np.zeros(len(parts) + 1, dtype=np.int64)
        np.cumsum([len(p) for p in parts], out=offsets[1:])
        flat = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return flat, offsets


def bow_probs(flat_buckets: np.ndarray, num_buckets: int) -> np.ndarray:
    """Bag-of-n-grams model: bucket frequencies normalised to sum to 1."""
    return counts_probs(np.bincount(flat_buckets, minlength=num_buckets))


def counts_probs(counts: np.ndarray) -> np.ndarray:
    """``bow_probs`` from bucket counts (summed over parts by ``selectors.dsir_parts``)."""
    counts = np.asarray(counts).astype(np.float64)
    total = counts.sum()
    return counts / total if total > 0 else counts


def log_importance_weights(flat_buckets: np.ndarray, offsets: np.ndarray, p_target: np.ndarray,
                           p_raw: np.ndarray, eps: float = EPS) -> np.ndarray:
    """Per text: sum over its n-grams of ``log(p_target + eps) - log(p_raw + eps)`` at their buckets."""
    log_diff = np.log(p_target + eps) - np.log(p_raw + eps)
    per_gram = log_diff[flat_buckets]
    out = np.zeros(len(offsets) - 1, dtype=np.float64)
    nonempty = offsets[1:] > offsets[:-1]
    if nonempty.any():
        out[nonempty] = np.add.reduceat(per_gram, offsets[:-1][nonempty])
    return out


def example_lengths(offsets: np.ndarray, ngrams: int) -> np.ndarray:
    """Per row, its length as data-selection counts it from the row's n-gram features:
    ``(n-gram count + n(n-1)/2) // n`` (= its ``wordpunct`` tokens; ``offsets`` as ``NgramHasher.many``)."""
    grams = np.diff(np.asarray(offsets, dtype=np.int64))
    return (grams + ngrams * (ngrams - 1) // 2) // ngrams


def length_filter(log_w: np.ndarray, offsets: np.ndarray, ngrams: int, min_length: int) -> np.ndarray:
    """``log_w`` with the rows shorter than ``min_length`` words scored :data:`FILTERED` (0: no filter)."""
    log_w = np.asarray(log_w, dtype=np.float64)
    if min_length <= 0:
        return log_w
    return np.where(example_lengths(offsets, ngrams) < min_length, FILTERED, log_w)


def filter_note(scores: np.ndarray, min_length: int) -> dict | None:
    """What the length filter did, for the run's record (None when it took out nothing)."""
    n = int(np.isneginf(np.asarray(scores)).sum()) if min_length > 0 else 0
    if not n:
        return None
    return {"rows": n, "score": "-inf", "reason": f"fewer than {min_length} words (select.dsir.min_example_length, "
                                                    "the data-selection package's length filter; 0 turns it off)"}


def gumbel_perturb(log_w: np.ndarray, seed: int) -> np.ndarray:
    """``log_w + Gumbel(0, 1)`` noise: top-k of it samples k rows without replacement, prob. ~ w."""
    return log_w + np.random.default_rng(seed).gumbel(size=len(log_w))


class DSIRSelector(Selector):
    name = "dsir"

    def __init__(self, num_buckets: int = 10000, ngrams: int = 2, eps: float = EPS, gumbel: bool = False,
                 seed: int = 0, progress: bool = False, min_example_length: int = MIN_EXAMPLE_LENGTH):
        if not isinstance(min_example_length, int) or min_example_length < 0:
            raise ValueError(f"dsir min_example_length={min_example_length!r}: use a word count >= 0 (0: no filter)")
        self.hasher = NgramHasher(num_buckets, ngrams)
        self.eps, self.gumbel, self.seed, self.progress = eps, gumbel, seed, progress
        self.min_example_length = min_example_length

    def prepare(self, source: Sequence[Messages], source_ids: Sequence[str]):
        flat, offsets = self.hasher.many([messages_text(m) for m in source], self.progress, "dsir: n-grams")
        return flat, offsets, bow_probs(flat, self.hasher.num_buckets)

    def score_prepared(self, state, target: Sequence[Messages]) -> np.ndarray:
        flat, offsets, p_raw = state
        t_flat, _ = self.hasher.many([messages_text(m) for m in target])
        log_w = log_importance_weights(flat, offsets, bow_probs(t_flat, self.hasher.num_buckets), p_raw, self.eps)
        log_w = length_filter(log_w, offsets, self.hasher.ngrams, self.min_example_length)
        return gumbel_perturb(log_w, self.seed) if self.gumbel else log_w
