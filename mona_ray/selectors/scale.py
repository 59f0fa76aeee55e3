"""The baseline selectors (random, bm25, dsir, dense) at pool scale, as Ray tasks over prepared parts.

``Selector.score`` wants the whole source set as Python message lists in one process; at
1M rows that is several GB on the driver, and BM25's per-query matrix alone is
``[n_target, n_source]`` float64. ``score_distributed`` computes the same scores with the
work in Ray tasks, one prepared part per task (a bounded number in flight), and the driver
holding only corpus-level statistics (sized by the target or the hash space, never by the
source) plus the final ``id`` / ``score`` columns as Arrow / NumPy arrays.

What runs where, per method (``parts`` is a list of ``(parquet path, row positions)``):

``random``
    one pass: each task reads the ``id`` column of its part and scores it with
    ``rand.uniform_from_id`` -- the same numbers as ``RandomSelector``.

``bm25``
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

``dsir``
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

``dense``
    the target embeddings in one Ray task, then a Ray Data actor pool over the parts, one
    sentence encoder per actor (``DenseSelector.embed``, so its ``cache_dir`` is honoured),
    each part scored with ``dense.centroid_cosine`` inside the actor.

``nait`` and ``mona`` are not handled here (``NotImplementedError``): ``mona`` has its own
distributed pipeline, and ``nait`` needs the selection model's activations per row.

Row order of the result: ``parts`` order, then the positions' order within each part.

Driver memory: the result (about 30 bytes a row), per-pass statistics sized by the query
vocabulary, the target or ``num_buckets``, and one ObjectRef per part. One caveat from Ray:
a task result under ``max_direct_call_object_size`` (100 KB by default) is kept in its
owner's process, so the per-part data that bm25 and dsir keep between passes sits on the
driver for parts whose data is that small -- at most 100 KB a part (under 400 MB for 1M
rows in 256-row parts; a part of 256 rows of 1.4 KB text keeps about 280 KB of dsir
buckets, so dsir's go to the object store, and bm25's counts for a 50-example target
are around that size). All of it is freed when ``score_distributed`` returns.
"""

from __future__ import annotations

import itertools
import json
import sys
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from ..core import executor
from ..core.executor import Passes
from ..core.io import read_parquet
from .base import Messages, check_target, messages_text

METHODS = ("random", "bm25", "dsir", "dense")
BM25_METHODS = ("lucene", "robertson", "atire", "bm25l", "bm25+")
OUTPUT_SCHEMA = pa.schema([("id", pa.string()), ("score", pa.float64())])

Part = tuple[str, Sequence[int]]


def score_distributed(method: str, opts: dict | None, parts: Sequence[Part], target: Sequence[Messages],
                      task_num_cpus: float = 0.5, progress: bool = True, *, num_gpus: float = 0.0,
                      num_actors: int | None = None, max_in_flight: int | None = None,
                      info: dict | None = None) -> pa.Table:
    """Score the rows ``parts`` selects with baseline ``method`` against ``target``, on Ray.

    ``method`` / ``opts``: as ``get_selector(method, **opts)`` (the same validation and
    errors). ``parts``: prepared Parquet part files (columns ``id``, ``record`` = the record
    as JSON text) with the row positions to use in each. ``target``: normalised message
    lists. Work runs in Ray tasks of ``task_num_cpus`` CPUs each, at most ``max_in_flight``
    at a time (default: twice what the cluster runs at once); ``dense`` runs ``num_actors``
    encoder actors (default: one per cluster CPU, or per ``num_gpus`` of the cluster's
    GPUs) of ``task_num_cpus`` CPUs and ``num_gpus`` GPUs. Ray must be initialised.

    Returns a table ``id: string, score: float64``, one row per selected position, in
    ``parts`` order. ``info``, when given, is filled with what each pass did and the size
    of the largest array the driver received from a task (see ``Passes``).
    """
    from . import get_selector

    opts = dict(opts or {})
    if method in ("nait", "mona"):
        raise NotImplementedError(
            f"select.method={method} has no distributed scorer in selectors.scale: "
            + ("nait needs the selection model's activations for every row; score it on the driver"
               if method == "nait" else "mona is scored by the pipeline's own distributed stages"))
    if method not in METHODS:
        get_selector(method, **opts)  # the registry's error for an unknown name
        raise ValueError(f"selectors.scale cannot score {method!r}; use one of {', '.join(METHODS)}")
    sel = get_selector(method, **opts)  # validates the settings exactly as the driver path does
    check_target(target)
    jobs = [(str(p), np.asarray(pos, dtype=np.int64)) for p, pos in parts]
    jobs = [(i, p, pos) for i, (p, pos) in enumerate(jobs) if len(pos)]
    passes = Passes(task_num_cpus, progress, max_in_flight, info if info is not None else {})
    passes.info.update(method=method, parts=len(jobs), rows=int(sum(len(j[2]) for j in jobs)))
    if not jobs:
        return OUTPUT_SCHEMA.empty_table()
    if method == "random":
        return _random(sel, jobs, passes)
    if method == "bm25":
        return _bm25(sel, jobs, target, passes)
    if method == "dsir":
        return _dsir(sel, jobs, target, passes)
    return _dense(opts, jobs, target, passes, task_num_cpus, num_gpus, num_actors)


# ----------------------------------------------------------------------------- reading parts


def part_rows(path: str, positions: np.ndarray) -> tuple[pa.Array, list[Messages]]:
    """The ids (Arrow) and normalised conversations of a part's selected rows."""
    from ..core.records import normalize_record

    t = read_parquet(path, ["id", "record"], positions)
    msgs = [normalize_record(json.loads(r)) for r in t.column("record").to_pylist()]
    return t.column("id").combine_chunks().cast(pa.string()), msgs


def part_texts(path: str, positions: np.ndarray) -> tuple[pa.Array, list[str]]:
    ids, msgs = part_rows(path, positions)
    return ids, [messages_text(m) for m in msgs]


# ----------------------------------------------------------------------------- task driver


def _table(results: dict[int, tuple[pa.Array, np.ndarray]], jobs: list[tuple]) -> pa.Table:
    ids = [results[i][0] for i, *_ in jobs]
    scores = [np.asarray(results[i][1], dtype=np.float64) for i, *_ in jobs]
    return pa.table({"id": pa.concat_arrays(ids).cast(pa.string()), "score": pa.array(np.concatenate(scores))},
                    schema=OUTPUT_SCHEMA)


# ----------------------------------------------------------------------------- random


def random_part(path: str, positions: np.ndarray, seed: int) -> tuple[pa.Array, np.ndarray]:
    from .rand import RandomSelector

    ids = read_parquet(path, ["id"], positions).column("id").combine_chunks().cast(pa.string())
    return ids, RandomSelector(seed).prepare([], ids.to_pylist())


def _random(sel, jobs, passes: Passes) -> pa.Table:
    return _table(dict(passes.run("score", random_part, jobs, (sel.seed,))), jobs)


# ----------------------------------------------------------------------------- bm25


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


def _bm25(sel, jobs, target, passes: Passes) -> pa.Table:
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
            return _table(results, jobs)
        best = np.zeros(len(queries), dtype=np.float64)
        for _, m in passes.run("best per query", bm25_part_pass, jobs2, (model_ref, queries_ref, sel.aggregate, None)):
            np.maximum(best, m, out=best)
        results = dict(passes.run("score", bm25_part_pass, jobs2, (model_ref, queries_ref, sel.aggregate, best)))
        return _table(results, jobs)
    finally:
        del counts_refs, jobs2  # the stored counts leave the object store with their last reference


# ----------------------------------------------------------------------------- dsir

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


def _dsir(sel, jobs, target, passes: Passes) -> pa.Table:
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
        out = _table(dict(passes.run("score", dsir_score_part, jobs2,
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


# ----------------------------------------------------------------------------- dense


def dense_embed_target(opts: dict, target: list[Messages]) -> np.ndarray:
    from . import get_selector

    return get_selector("dense", **{**opts, "progress": False}).embed(target, "dense: target")


class DenseScorer:
    """An actor of the executor's pool: one sentence encoder; scores one part per call against the
    target embeddings."""

    def __init__(self, opts: dict, target_emb: np.ndarray, threads: int = 1):
        import torch

        from . import get_selector

        torch.set_num_threads(max(1, int(threads)))
        self.sel = get_selector("dense", **{**opts, "progress": False})
        self.T = target_emb

    def score_part(self, job: tuple) -> pa.Table:
        """``job``: ``(i, part path, row positions)`` -> ``part, pos, id, score`` of those rows."""
        from .dense import centroid_cosine

        i, path, pos = job
        ids, msgs = part_rows(path, np.asarray(pos, dtype=np.int64))
        s = centroid_cosine(self.sel.embed(msgs), self.T)
        return pa.table({"part": pa.array(np.full(len(s), i, dtype=np.int64)),
                         "pos": pa.array(np.arange(len(s), dtype=np.int64)), "id": ids,
                         "score": pa.array(s, pa.float64())})


def _dense(opts, jobs, target, passes: Passes, num_cpus: float, num_gpus: float, num_actors: int | None) -> pa.Table:
    import math

    from tqdm import tqdm

    res = executor.resources()
    if num_actors is None:
        if num_gpus > 0:
            num_actors = max(1, int(res.get("GPU", 0) / num_gpus))
        else:
            num_actors = max(1, int(res.get("CPU", 1) // max(1.0, num_cpus)))
    num_actors = max(1, min(int(num_actors), len(jobs)))
    threads = max(1, math.floor(num_cpus)) if num_gpus <= 0 else 1
    T = executor.call(dense_embed_target, opts, list(target), num_cpus=num_cpus, num_gpus=max(0.0, num_gpus)).result()
    entry = {"pass": "target", "tasks": 1, "largest_result_array": int(T.size)}
    passes.info["passes"].append(entry)
    results = executor.map_items(list(jobs), actor=(DenseScorer, (opts, T, threads), "score_part"), size=num_actors,
                                 num_cpus=num_cpus, num_gpus=max(0.0, num_gpus))
    entry = {"pass": f"score ({num_actors} actor{'s' * (num_actors > 1)})", "tasks": len(jobs),
             "largest_result_array": 0}
    passes.info["passes"].append(entry)
    bar = tqdm(total=len(jobs), desc=f"dense: {entry['pass']}", unit="part", file=sys.stderr,
               disable=not passes.progress, mininterval=1.0)
    blocks, seen = [], set()
    for b in results:
        blocks.append(b)
        entry["largest_result_array"] = max(entry["largest_result_array"], len(b))
        new = set(np.unique(b.column("part").to_numpy()).tolist()) - seen
        seen |= new
        bar.update(len(new))
    bar.close()
    passes.info["largest_driver_array"] = max(passes.info["largest_driver_array"], entry["largest_result_array"],
                                              int(T.size))
    t = pa.concat_tables(blocks).sort_by([("part", "ascending"), ("pos", "ascending")])
    return pa.table({"id": t.column("id").cast(pa.string()), "score": t.column("score")}, schema=OUTPUT_SCHEMA)
