"""MoNA and its ablations as a selector: pooled model features, target prototype, similarity.

``representation``: ``sae`` (MoNA: monosemantic SAE codes) | ``mlp_gate`` (polysemantic
TopK of |SiLU(W_gate x)| at the same block) | ``hidden`` (raw residual stream, dense).
``pooling``: ``mean`` (MoNA) | ``sum``. ``similarity``: ``jaccard`` (MoNA) | ``cosine`` |
``euclidean`` (negated distance). The math is ``scoring.py``'s, shared with the pipeline:
the prototype is the mean of the target rows' pooled vectors, sparse rows are scored with
``scoring.score`` and the dense ``hidden`` rows with ``scoring.dense_similarity``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..scoring import SIMILARITIES, dense_similarity, prototype, score
from .base import Messages, Selector, check_target
from .features import EMBEDDER_PRODUCTS, FeatureExtractor, Features, ModelSpec


def mona_scores(src: Features, tgt: Features, product: str, pooling: str = "mean",
                similarity: str = "jaccard") -> np.ndarray:
    """Scores of every source row for one feature product (``sae``, ``mlp_gate``, ``hidden``
    or an SAE variant's name), pooling and similarity."""
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity={similarity!r}: use one of {', '.join(SIMILARITIES)}")
    live = [i for i in range(tgt.n_rows) if i not in tgt.rejected]
    if not live:
        raise ValueError("no target row has features (all were rejected)")
    if product in src.dense:
        T = tgt.pooled(product, pooling)[live]
        return dense_similarity(src.pooled(product, pooling), T.mean(0), similarity)
    rows = tgt.pooled(product, pooling)
    from ..scoring import SparseRows

    sel = SparseRows.from_lists([rows.row(i)[0] for i in live], [rows.row(i)[1] for i in live])
    return score(src.pooled(product, pooling), prototype(sel, tgt.width[product]), similarity)


class MonaSelector(Selector):
    name = "mona"

    def __init__(self, representation: str = "sae", pooling: str = "mean", similarity: str = "jaccard",
                 cache_dir: str | None = None, chunk_rows: int = 256, progress: bool = True, **spec):
        if representation not in EMBEDDER_PRODUCTS:
            raise ValueError(f"representation={representation!r}: use one of {', '.join(EMBEDDER_PRODUCTS)}")
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity={similarity!r}: use one of {', '.join(SIMILARITIES)}")
        self.representation, self.pooling, self.similarity = representation, pooling, similarity
        self.extractor = FeatureExtractor(ModelSpec(**spec), products=(representation,), cache_dir=cache_dir,
                                          chunk_rows=chunk_rows, progress=progress)

    def prepare(self, source: Sequence[Messages], source_ids: Sequence[str]) -> Features:
        return self.extractor.extract(source, "mona: source")

    def score_prepared(self, state: Features, target: Sequence[Messages]) -> np.ndarray:
        check_target(target)
        tgt = self.extractor.extract(target, "mona: target")
        return mona_scores(state, tgt, self.representation, self.pooling, self.similarity)
