"""BM25 (Robertson & Zaragoza 2009) with the ``bm25s`` library: target examples as queries.

The source samples are the BM25 corpus (``bm25s`` "lucene" variant by default:
``idf(t) = ln(1 + (N - df + 0.5) / (df + 0.5))``, term weight
``tf / (tf + k1 (1 - b + b |d| / avgdl))``). Every target example is one query, tokenized
the same way (lower-cased words of 2+ characters, English stop words removed).

Aggregation per candidate (``aggregate``):

* ``mean`` (default): each query's scores are divided by that query's best score over
  the corpus, then averaged over the queries. The normalisation gives every target
  example the same weight; without it the longest target prompts (many matching terms)
  would decide the ranking alone.
* ``max``: the best normalised score over the queries (nearest target example).
* ``sum``: the plain sum of raw BM25 scores (no normalisation).

A query with no term in the corpus vocabulary scores 0 everywhere and is skipped in the
normalisation (it still counts in the mean's denominator, which does not change ranks).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .base import Messages, Selector, messages_text

AGGREGATES = ("mean", "max", "sum")


class BM25Selector(Selector):
    name = "bm25"

    def __init__(self, k1: float = 1.5, b: float = 0.75, method: str = "lucene", aggregate: str = "mean",
                 stopwords: str | None = "en", progress: bool = False):
        if aggregate not in AGGREGATES:
            raise ValueError(f"bm25 aggregate={aggregate!r}: use one of {', '.join(AGGREGATES)}")
        self.k1, self.b, self.method, self.aggregate = k1, b, method, aggregate
        self.stopwords, self.progress = stopwords, progress

    def _tokenize(self, texts: list[str], ids: bool):
        import bm25s

        return bm25s.tokenize(texts, stopwords=self.stopwords, return_ids=ids, show_progress=self.progress)

    def prepare(self, source: Sequence[Messages], source_ids: Sequence[str]):
        import bm25s

        retriever = bm25s.BM25(k1=self.k1, b=self.b, method=self.method)
        retriever.index(self._tokenize([messages_text(m) for m in source], ids=True), show_progress=self.progress)
        return retriever

    def query_scores(self, retriever, target: Sequence[Messages]) -> np.ndarray:
        """Raw BM25 scores, one row per target example: ``[n_target, n_source]``."""
        queries = self._tokenize([messages_text(m) for m in target], ids=False)
        vocab = retriever.vocab_dict
        out = np.zeros((len(queries), retriever.scores["num_docs"]), dtype=np.float64)
        for i, q in enumerate(queries):
            q = [t for t in q if t in vocab]
            if q:
                out[i] = retriever.get_scores(q)
        return out

    def score_prepared(self, retriever, target: Sequence[Messages]) -> np.ndarray:
        return aggregate_scores(self.query_scores(retriever, target), self.aggregate)


def aggregate_scores(per_query: np.ndarray, how: str) -> np.ndarray:
    """Combine ``[n_queries, n_docs]`` scores into one score per doc (see the module doc)."""
    if how == "sum":
        return per_query.sum(0)
    best = per_query.max(1, keepdims=True)
    norm = np.divide(per_query, best, out=np.zeros_like(per_query), where=best > 0)
    return norm.mean(0) if how == "mean" else norm.max(0)
