"""Scoring and selection, pure NumPy (no Ray, no torch).

``sparse`` (CSR rows), ``kernels`` (generalized Jaccard, the one kernel family), ``similarity``
(Jaccard / cosine / Euclidean against one prototype or many targets), ``cuts`` (the support-bias
cuts of prototypes and rows), ``clusters`` (target clusters chosen by silhouette), ``round_robin``
(per-target lists interleaved), ``topk`` (top-k, streaming top-k), ``table`` (stored rows scored,
the one target builder).
"""

from .similarity import SIMILARITIES, cosine, dense_similarity, jaccard, neg_euclidean, prototype, score
from .sparse import SparseRows, segment_sum
from .table import prototype_of, rows_of, score_rows
from .topk import RunningTopK, merge_topk, order_key, selection_size, topk

__all__ = ["SIMILARITIES", "RunningTopK", "SparseRows", "cosine", "dense_similarity", "jaccard",
           "merge_topk", "neg_euclidean", "order_key", "prototype", "prototype_of", "rows_of", "score", "score_rows", "segment_sum",
           "selection_size", "topk"]
