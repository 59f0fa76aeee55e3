"""bm25 at pool scale (``selectors.scale``), pass by pass over prepared parts.

BM25 needs, from the whole corpus, only ``N``, the mean document length and the
document frequency of the *query* terms (the target examples' terms).

1. per part: tokenize exactly as ``BM25Selector._tokenize`` (``bm25s.tokenize``), return
   ``(docs, total length, df over the query terms)`` to the driver, and keep in the Ray
   object store (not on the driver) the part's ids, document lengths and its sparse
   term counts restricted to the query terms (``doc, term, tf``: the only part of a
   document BM25 ever reads for these queries).
2. driver: ``N``, ``avgdl`` and the idf of every query term, with bm25s's own functions
   for the retriever's ``method`` (lucene, robertson, atire, bm25l, bm25+; for the last
   two also the non-occurrence array), so the numbers are bm25s's.
3. per part, from the stored counts: each document's weight for each query term exactly
   as bm25s computes it (float32, the same operations and types), every target query's
   score as bm25s sums it (float32, query-token order), as a ``[n_target, part rows]``
   block that lives only inside the task. ``sum``: the task returns the aggregate and
   this is the last pass. ``mean`` / ``max``: the task returns each query's best score
   in the part (``[n_target]``); the driver takes the maximum over parts.
4. (``mean`` / ``max``) per part again from the stored counts: recompute the block,
   divide by the global per-query best and aggregate as ``bm25.aggregate_scores``.

Recomputing the block (step 4) rather than keeping it costs one cheap pass over the
stored counts (no re-reading, no re-tokenizing) and keeps memory bounded: kept blocks
would be ``4 * n_target * n_source`` bytes in all (12 GB for 3,000 targets over 1M
rows), the very matrix this module exists to avoid. The stored counts are 12 bytes
per (document, distinct query term) pair plus the part's ids, spread over the cluster's object
stores (spilled to disk by Ray when they do not fit), and freed when the call returns.
The scores equal ``BM25Selector.score`` bit for bit (tested), because every float32
rounding happens in the same order as in bm25s.
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from ..core import executor
from ..core.executor import Passes
from .base import Messages, messages_text
from .scale import part_texts, result_table

BM25_METHODS = ("lucene", "robertson", "atire", "bm25l", "bm25+")


def query_terms(sel, target: Sequence[Messages]) -> tuple[dict[str, int], list[np.ndarray]]:
    """The target queries tokenized as ``BM25Selector.query_scores`` does: the distinct query
    terms (term -> index, first-seen order) and each query as term indices, in token order."""
    queries = sel._tokenize([messages_text(m) for m in target], ids=False)
    terms: dict[str, int] = {}
    for q in queries:
        for t in q:
            terms.setdefault(t, len(terms))
    return terms, [np.fromiter((terms[t] for t in q), dtype=np.int64, count=len(q)) for q in queries]


def bm25_count_part(path: str, positions: np.ndarray, terms: dict[str, int], stopwords) -> tuple[dict, dict]:
    """Pass 1 on one part: ``(stats, counts)``. ``stats``: docs, total length, df of each query
    term (``int64 [n_terms]``). ``counts``: the part's ids, document lengths and its
    (doc, query term, tf) triples, sorted by doc then term."""
    from .bm25 import BM25Selector

    ids, texts = part_texts(path, positions)
    tok = BM25Selector(stopwords=stopwords)._tokenize(texts, ids=True)
    n_terms, nd = len(terms), len(texts)
    to_term = np.full(max(1, len(tok.vocab)), -1, dtype=np.int64)
    for w, j in tok.vocab.items():
        k = terms.get(w)
        if k is not None:
            to_term[j] = k
    dl = np.fromiter((len(d) for d in tok.ids), dtype=np.int64, count=nd)
    flat = np.fromiter(itertools.chain.from_iterable(tok.ids), dtype=np.int64, count=int(dl.sum()))
    doc = np.repeat(np.arange(nd, dtype=np.int64), dl)
    t = to_term[flat]
    keep = t >= 0
    key, tf = np.unique(doc[keep] * max(1, n_terms) + t[keep], return_counts=True)
    pair_doc, pair_term = key // max(1, n_terms), key % max(1, n_terms)
    stats = {"docs": nd, "length": int(dl.sum()), "df": np.bincount(pair_term, minlength=n_terms).astype(np.int64)}
    counts = {"ids": ids, "dl": dl.astype(np.int32), "doc": pair_doc.astype(np.int32),
              "term": pair_term.astype(np.int32), "tf": tf.astype(np.uint32)}
    return stats, counts


def bm25_weights(counts: dict, model: dict) -> np.ndarray:
    """bm25s's stored score of every (doc, query term) pair in ``counts``: float32, computed by
    bm25s's term-frequency function with a scalar document length, as its indexer does."""
    from bm25s.scoring import _select_tfc_scorer

    tfc_fn = _select_tfc_scorer(model["method"])
    tf32 = counts["tf"].astype(model["dtype"])
    term = counts["term"].astype(np.int64)
    pair_dl = counts["dl"][counts["doc"]]
    order = np.argsort(pair_dl, kind="stable")
    bounds = np.flatnonzero(np.r_[True, pair_dl[order][1:] != pair_dl[order][:-1], True])
    out = np.empty(len(term), dtype=model["dtype"])
    idf, nonocc = model["idf"], model["nonocc"]
    for a, b in zip(bounds[:-1], bounds[1:]):
        rows = order[a:b]
        tfc = tfc_fn(tf_array=tf32[rows], l_d=int(pair_dl[rows[0]]), l_avg=model["avgdl"], k1=model["k1"],
                     b=model["b"], delta=model["delta"])
        scores_doc = idf[term[rows]] * tfc
        if nonocc is not None:
            scores_doc -= nonocc[term[rows]]
        out[rows] = scores_doc
    return out


def bm25_part_scores(counts: dict, model: dict, queries: list[np.ndarray]) -> np.ndarray:
    """Raw BM25 scores of one part's documents for every query: ``float64 [n_queries, part rows]``
    (``BM25Selector.query_scores`` restricted to these columns). Only the query terms the part
    contains are materialised (``[terms in part, part rows]`` float32)."""
    nd = len(counts["dl"])
    present, local_term = np.unique(counts["term"], return_inverse=True)
    W = np.zeros((len(present), nd), dtype=model["dtype"])
    W[local_term, counts["doc"]] = bm25_weights(counts, model)
    loc = np.full(model["n_terms"] + 1, -1, dtype=np.int64)
    loc[present] = np.arange(len(present))
    out = np.zeros((len(queries), nd), dtype=np.float64)
    nonocc = model["nonocc"]
    for i, q in enumerate(queries):  # q: the query's terms that occur in the corpus, in token order
        if not len(q):
            continue
        ql = loc[q]
        ql = ql[ql >= 0]  # terms absent from this part add exact zeros in bm25s's float32 sum
        s = np.add.accumulate(W[ql], axis=0)[-1] if len(ql) else np.zeros(nd, dtype=model["dtype"])
        if nonocc is not None:
            s += nonocc[q.astype(np.int32)].sum()
        out[i] = s
    return out


def _seq_sum0(a: np.ndarray) -> np.ndarray:
    """Sum over axis 0 in row order (what ``a.sum(0)`` does for a C-ordered matrix with 2+ columns)."""
    return np.add.accumulate(a, axis=0)[-1] if len(a) else np.zeros(a.shape[1:], a.dtype)


def bm25_part_pass(counts: dict, model: dict, queries: list[np.ndarray], aggregate: str,
                   best: np.ndarray | None):
    """Passes 2 and 3 on one part. ``best is None``: ``sum`` -> ``(ids, scores)``, else each
    query's best raw score in the part (``float64 [n_queries]``). ``best`` given (the global
    per-query maxima): ``(ids, scores)`` for ``mean`` / ``max`` as ``bm25.aggregate_scores``."""
    raw = bm25_part_scores(counts, model, queries)
    if aggregate == "sum":
        return counts["ids"], _seq_sum0(raw)
    if best is None:
        return raw.max(1)
    b = best[:, None]
    norm = np.divide(raw, b, out=np.zeros_like(raw), where=b > 0)
    return counts["ids"], (_seq_sum0(norm) / len(queries) if aggregate == "mean" else norm.max(0))


def bm25_model(sel, n_docs: int, total_length: int, df: np.ndarray) -> dict:
    """What pass 3 needs from the corpus: bm25s's idf (and non-occurrence) arrays over the query
    terms, built by bm25s's own functions from the reduced statistics."""
    import bm25s
    from bm25s.scoring import _build_idf_array, _build_nonoccurrence_array, _select_idf_scorer, _select_tfc_scorer

    r = bm25s.BM25(k1=sel.k1, b=sel.b, method=sel.method)  # the retriever BM25Selector.prepare builds
    if r.method not in BM25_METHODS:
        raise ValueError(f"bm25 method={r.method!r}: use one of {', '.join(BM25_METHODS)}")
    # bm25s: avg_doc_len = np.array(lengths).mean(), a numpy float64 (its type matters: see bm25_weights)
    avgdl = np.float64(total_length) / n_docs if n_docs else np.float64(0.0)
    dfs = {i: int(d) for i, d in enumerate(df)}
    idf = _build_idf_array(doc_frequencies=dfs, n_docs=n_docs, compute_idf_fn=_select_idf_scorer(r.idf_method),
                           dtype=r.dtype)
    nonocc = None
    if r.method in r.methods_requiring_nonoccurrence:
        nonocc = _build_nonoccurrence_array(doc_frequencies=dfs, n_docs=n_docs,
                                            compute_idf_fn=_select_idf_scorer(r.idf_method),
                                            calculate_tfc_fn=_select_tfc_scorer(r.method), l_d=avgdl, l_avg=avgdl,
                                            k1=r.k1, b=r.b, delta=r.delta, dtype=r.dtype)
    return {"method": r.method, "k1": r.k1, "b": r.b, "delta": r.delta, "dtype": np.dtype(r.dtype),
            "avgdl": avgdl, "idf": idf, "nonocc": nonocc, "n_terms": len(df), "n_docs": n_docs}


def score_parts(sel, jobs, target, passes: Passes) -> pa.Table:
    if sel.method not in BM25_METHODS:
        raise ValueError(f"bm25 method={sel.method!r}: use one of {', '.join(BM25_METHODS)}")
    terms, queries = query_terms(sel, target)
    n_terms = len(terms)
    n_docs, total, df = 0, 0, np.zeros(n_terms, dtype=np.int64)
    counts_refs: dict[int, Any] = {}
    pairs = 0
    for i, (stats, ref) in passes.run("count terms", bm25_count_part, jobs, (terms, sel.stopwords), num_returns=2):
        n_docs += stats["docs"]
        total += stats["length"]
        df += stats["df"]
        pairs += int(stats["df"].sum())
        counts_refs[i] = ref
    passes.info["bm25"] = {"n_terms": n_terms, "n_queries": len(queries), "stored_pairs": pairs,
                           "stored_bytes": 12 * pairs + 4 * n_docs}
    model = bm25_model(sel, n_docs, total, df)
    # the query as bm25s scores it: only terms in the corpus vocabulary (df > 0), token order kept
    queries = [q[df[q] > 0] for q in queries]
    model_ref, queries_ref = executor.put(model), executor.put(queries)
    jobs2 = [(i, counts_refs[i]) for i, *_ in jobs]
    try:
        if sel.aggregate == "sum":
            results = dict(passes.run("score", bm25_part_pass, jobs2, (model_ref, queries_ref, "sum", None)))
            return result_table(results, jobs)
        best = np.zeros(len(queries), dtype=np.float64)
        for _, m in passes.run("best per query", bm25_part_pass, jobs2, (model_ref, queries_ref, sel.aggregate, None)):
            np.maximum(best, m, out=best)
        results = dict(passes.run("score", bm25_part_pass, jobs2, (model_ref, queries_ref, sel.aggregate, best)))
        return result_table(results, jobs)
    finally:
        del counts_refs, jobs2  # the stored counts leave the object store with their last reference
