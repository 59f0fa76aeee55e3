"""Transitional: the names ``pipeline/driver.py``, ``pipeline/stages.py`` and some tests still
import from here, each now defined in the module of its job. Delete this module once no import
of ``scoring.aggregate`` is left (``grep -rn "scoring.aggregate" mona_ray tests``).

* ``similarity.py``: :func:`pairwise`, :func:`similarities` (Jaccard from ``kernels.py``);
* ``round_robin.py``: :func:`round_robin`, :func:`candidates_from_scores`;
* ``cuts.py``: :func:`sparsify_prototype`, :func:`sparsify_rows`.
"""

from .cuts import sparsify_prototype, sparsify_rows
from .round_robin import candidates_from_scores, round_robin
from .similarity import pairwise, similarities

__all__ = ["candidates_from_scores", "pairwise", "round_robin", "similarities", "sparsify_prototype", "sparsify_rows"]
