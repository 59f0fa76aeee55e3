"""dsir at pool scale (``selectors.scale``), two passes over prepared parts.

1. per part: hash every row's n-grams (``dsir.NgramHasher``, one per worker process,
   its memo bounded); return the part's bucket counts (``int64 [num_buckets]``) to the
   driver, which sums them into the raw pool's distribution (``dsir.counts_probs``, as
   ``bow_probs``), and keep the rows' bucket sequences in the object store (2 bytes per
   n-gram for ``num_buckets <= 65536``: about 1.1 KB per 1.4 KB-text row).
2. per part, from the stored buckets: ``dsir.log_importance_weights`` against the
   target's distribution (hashed on the driver: the target set is small). Keeping the
   buckets halves the CPU (hashing is nearly all of it) against re-hashing in pass 2.
   ``gumbel=True``: the noise is drawn on the driver over the concatenated log weights,
   in ``parts`` order, exactly as ``DSIRSelector`` draws it over its input order.
   Rows under ``min_example_length`` words score ``-inf`` (``dsir.length_filter``, from
   the stored offsets), counted in ``info["filter"]``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from ..core.executor import Passes
from .base import messages_text
from .scale import part_texts, result_table

_HASHERS: dict = {}
_MEMO_CAP = 1 << 20


def _hasher(num_buckets: int, ngrams: int):
    """One ``NgramHasher`` per worker process and setting, its memo bounded (unigrams recur across parts)."""
    from .dsir import NgramHasher

    h = _HASHERS.get((num_buckets, ngrams))
    if h is None:
        h = _HASHERS[(num_buckets, ngrams)] = NgramHasher(num_buckets, ngrams)
    if len(h._memo) > _MEMO_CAP:
        h._memo.clear()
    return h


def dsir_count_part(path: str, positions: np.ndarray, num_buckets: int, ngrams: int) -> tuple[np.ndarray, dict]:
    """Pass 1 on one part: ``(counts, buckets)``: its hashed n-gram counts (``int64 [num_buckets]``)
    and, for pass 2, its ids and every row's n-gram buckets in order (the smallest unsigned
    dtype that holds them, CSR offsets)."""
    ids, texts = part_texts(path, positions)
    flat, offsets = _hasher(num_buckets, ngrams).many(texts)
    dtype = np.uint16 if num_buckets <= 1 << 16 else np.uint32
    return (np.bincount(flat, minlength=num_buckets).astype(np.int64),
            {"ids": ids, "flat": flat.astype(dtype), "offsets": offsets})


def dsir_score_part(buckets: dict, p_target: np.ndarray, p_raw: np.ndarray, eps: float, ngrams: int,
                    min_length: int) -> tuple[pa.Array, np.ndarray]:
    """Pass 2 on one part, from its stored buckets: ``(ids, log importance weights)``, the rows
    under ``min_length`` words at ``-inf``."""
    from .dsir import length_filter, log_importance_weights

    log_w = log_importance_weights(buckets["flat"], buckets["offsets"], p_target, p_raw, eps)
    return buckets["ids"], length_filter(log_w, buckets["offsets"], ngrams, min_length)


def score_parts(sel, jobs, target, passes: Passes) -> pa.Table:
    from .dsir import bow_probs, counts_probs, filter_note, gumbel_perturb

    nb, ng = sel.hasher.num_buckets, sel.hasher.ngrams
    counts = np.zeros(nb, dtype=np.int64)
    refs: dict[int, Any] = {}
    for i, (c, ref) in passes.run("count n-grams", dsir_count_part, jobs, (nb, ng), num_returns=2):
        counts += c
        refs[i] = ref
    passes.info["dsir"] = {"stored_bytes": int(counts.sum()) * (2 if nb <= 1 << 16 else 4)}
    p_raw = counts_probs(counts)
    t_flat, _ = sel.hasher.many([messages_text(m) for m in target])
    p_target = bow_probs(t_flat, nb)
    jobs2 = [(i, refs[i]) for i, *_ in jobs]
    try:
        out = result_table(dict(passes.run("score", dsir_score_part, jobs2,
                                     (p_target, p_raw, sel.eps, ng, sel.min_example_length))), jobs)
    finally:
        del refs, jobs2
    note = filter_note(out.column("score").to_numpy(), sel.min_example_length)
    if note:
        passes.info["filter"] = note
    if sel.gumbel:
        s = gumbel_perturb(out.column("score").to_numpy(), sel.seed)
        out = out.set_column(1, "score", pa.array(s, pa.float64()))
    return out
