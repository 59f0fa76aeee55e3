"""Scoring and selection, pure NumPy (no Ray, no torch): sparse rows, similarities, top-k."""

from .kernels import jaccard as blocked_jaccard
from .similarity import SIMILARITIES, cosine, dense_similarity, jaccard, neg_euclidean, prototype, score
from .sparse import SparseRows, segment_sum
from .table import prototype_of, rows_of, score_rows
from .topk import RunningTopK, merge_topk, order_key, selection_size, topk

__all__ = ["SIMILARITIES", "RunningTopK", "SparseRows", "blocked_jaccard", "cosine", "dense_similarity", "jaccard",
           "merge_topk", "neg_euclidean", "order_key", "prototype", "prototype_of", "rows_of", "score", "score_rows", "segment_sum",
           "selection_size", "topk"]
