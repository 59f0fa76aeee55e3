"""Scoring rows as the feature store holds them (Arrow), the one path the pipeline's score
tasks and the evaluation both take.

A stored row is mean-pooled: ``indices``/``values`` (sparse readouts) or ``values`` alone
(dense). ``pooling="sum"`` (the ablation) multiplies each row by its ``n_pooled`` first.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ..config.schema import POOLINGS
from .clusters import best_clusters, cluster_prototypes
from .cuts import cut_prototypes, sparsify_prototype, sparsify_rows
from .similarity import dense_similarity, prototype, score, similarities
from .sparse import SparseRows


def rows_of(table: pa.Table, dense: bool, pooling: str = "mean"):
    """``SparseRows`` (sparse) or a float ``[n, d]`` array (dense) of a stored table's rows."""
    if pooling not in POOLINGS:
        raise ValueError(f"pool.method={pooling!r}: use mean or sum")
    vals = table.column("values").combine_chunks()
    if dense:
        off = vals.offsets.to_numpy()
        d = int(off[1] - off[0]) if len(table) else 0
        X = vals.values.to_numpy(zero_copy_only=False)[off[0]:off[-1]].reshape(len(table), d)
        if pooling == "sum":
            X = X.astype(np.float64) * table.column("n_pooled").to_numpy().astype(np.float64)[:, None]
        return X
    rows = SparseRows.from_arrow(table.column("indices"), vals)
    if pooling == "sum":
        n = np.repeat(table.column("n_pooled").to_numpy().astype(np.float64), np.diff(rows.indptr))
        rows = SparseRows(rows.indptr, rows.indices, rows.values.astype(np.float64) * n)
    return rows


def prototype_of(table: pa.Table, width: int, dense: bool, pooling: str = "mean") -> np.ndarray:
    """The mean of the table's rows, in the table's order (callers sort target rows by id)."""
    if len(table) == 0:
        raise ValueError("cannot build a prototype from zero target rows")
    X = rows_of(table, dense, pooling)
    if dense:
        acc = np.zeros(X.shape[1], dtype=np.float64)
        for i in range(len(X)):
            acc += X[i].astype(np.float64)
        return acc / len(X)
    return prototype(X, width)


def scored_rows(table: pa.Table, dense: bool, pooling: str = "mean", row_mass: float = 1.0):
    """:func:`rows_of` as a selection compares them: with ``row_mass < 1`` each sparse row keeps
    its largest latents carrying that share of its L1 mass (``select.row_mass``, the row side of
    the support-bias fix; dense readouts are compared whole)."""
    X = rows_of(table, dense, pooling)
    if dense or row_mass >= 1:
        return X
    return sparsify_rows(X, row_mass)


def score_rows(table: pa.Table, proto: np.ndarray, similarity: str, dense: bool, pooling: str = "mean",
               batch_rows: int = 4096, row_mass: float = 1.0) -> np.ndarray:
    """Similarity of every stored row to ``proto``, in slices of ``batch_rows`` rows (a row's score
    never depends on its slice: per-row reductions only)."""
    out = []
    for start in range(0, len(table), batch_rows):
        blk = table.slice(start, batch_rows)
        X = scored_rows(blk, dense, pooling, row_mass)
        # dense rows (hidden states) are signed: the sparse shortcuts assume z >= 0
        out.append(dense_similarity(X, proto, similarity) if dense else score(X, proto, similarity))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float64)


AGGREGATES = ("prototype", "clusters")


def target_prototypes(T: np.ndarray, aggregate: str = "prototype", mass: float = 1.0, seed: int = 0,
                      max_clusters: int | None = None, proto: np.ndarray | None = None,
                      mass_rule: str = "fixed", min_silhouette: float = 0.25,
                      search: tuple[np.ndarray, float] | None = None) -> tuple[np.ndarray, dict]:
    """The prototypes a selection scores against, from the target rows ``T`` (dense ``[m, L]``,
    in id order): ``prototype`` (the paper: their mean, ``proto`` when the caller has it) or
    ``clusters`` (one mean per cluster of target rows, their number chosen by silhouette;
    one cluster when the best silhouette is below ``min_silhouette``, which is exactly
    ``prototype``). Each prototype is then cut by ``mass_rule`` (:func:`cut_prototypes`): with
    ``fixed`` and ``mass < 1`` it keeps only its largest latents carrying that share of its L1
    mass (the support-bias fix; 1 = the paper's formula). ``search``: this ``T``'s
    ``clusters.best_clusters`` result when the caller has it (the evaluation scores many settings
    of one target). Returns ``(P [c, L], info)``."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"select.aggregate={aggregate!r}: use one of {', '.join(AGGREGATES)}")
    sil = None
    if aggregate == "clusters" and len(T) >= 4:
        labels, sil = search if search is not None else best_clusters(np.asarray(T, dtype=np.float64), seed,
                                                                      max_clusters)
        if sil < min_silhouette:  # no substantial structure: one cluster, exactly ``prototype``
            labels = np.zeros(len(T), dtype=np.int64)
    else:
        labels = np.zeros(len(T), dtype=np.int64)
    if labels.max(initial=0) == 0:
        P = (np.asarray(proto, dtype=np.float64) if proto is not None else np.asarray(T, np.float64).mean(0))[None, :]
        sizes = np.asarray([len(T)])
    else:
        P, sizes = cluster_prototypes(T, labels)
    P = cut_prototypes(P, T, labels, mass, mass_rule)
    applied = 1.0 if mass_rule == "support" or (mass_rule == "structure" and len(P) == 1) else mass
    return P, {"aggregate": aggregate, "clusters": int(len(P)), "sizes": sizes.tolist(), "labels": labels.tolist(),
               "mass": float(applied), "mass_rule": mass_rule, "min_silhouette": float(min_silhouette),
               "support": [int((p > 0).sum()) for p in P], "seed": int(seed),
               "silhouette": None if sil is None or not np.isfinite(sil) else float(sil)}


def build_targets(tgt: pa.Table, width: int, dense: bool, aggregate: str = "prototype", mass: float = 1.0,
                  seed: int = 0, max_clusters: int | None = None, pooling: str = "mean", mass_rule: str = "fixed",
                  min_silhouette: float = 0.25, search=None) -> tuple[np.ndarray, np.ndarray, dict]:
    """The one target builder: what a selection scores against, from the target rows' stored
    table ``tgt`` (in the order the prototype takes them). The pipeline's prototype stage and the
    evaluation both call it.

    Returns ``(proto, P, info)``: the mean of the target rows (``prototype.safetensors``'
    ``prototype``), the prototypes the rows are scored against (``P [c, L]``: one for
    ``prototype``, one per cluster for ``clusters``, one per target row for ``round_robin`` /
    ``rds``) and what was built (``labels`` per target row for clusters). Dense readouts (signed
    hidden states, e.g. RDS+'s) have no largest-values order, so they are compared whole: no mass
    cut, rule ``fixed``. ``search``: ``T -> clusters.best_clusters(T)`` when the caller caches
    the silhouette search (the evaluation scores many settings of one target)."""
    proto = prototype_of(tgt, width, dense, pooling)
    if dense:
        mass, mass_rule = 1.0, "fixed"
    if aggregate == "prototype" and mass >= 1 and mass_rule != "support":
        return proto, proto[None, :], {"aggregate": "prototype", "clusters": 1}
    T = rows_of(tgt, dense, pooling)
    T = T if dense else T.to_dense(width)  # [target rows, width]: the targets only
    if aggregate in ("round_robin", "rds"):
        P = T if mass >= 1 else np.stack([sparsify_prototype(t, mass) for t in T])
        return proto, P, {"aggregate": aggregate, "targets": int(len(T)), "mass": mass}
    found = search(T) if search is not None and aggregate == "clusters" and len(T) >= 4 else None
    P, info = target_prototypes(T, aggregate, mass, seed, max_clusters, proto=proto, mass_rule=mass_rule,
                                min_silhouette=min_silhouette, search=found)
    return proto, P, info


def score_rows_against(table: pa.Table, P: np.ndarray, similarity: str, dense: bool, pooling: str = "mean",
                       batch_rows: int = 4096, row_mass: float = 1.0, background=None) -> np.ndarray:
    """Each stored row's best similarity over the prototypes ``P [c, L]`` (c = 1: :func:`score_rows`,
    bit for bit). ``background``: a ``scoring.background.Background`` that weighs latents by the
    pool's statistics (``select.background``; sparse codes only); ``None`` or ``none``: the paper's score."""
    active = background is not None and background.active
    if len(P) == 1 and not active:
        return score_rows(table, P[0], similarity, dense, pooling, batch_rows, row_mass)
    out = []
    for start in range(0, len(table), batch_rows):
        X = scored_rows(table.slice(start, batch_rows), dense, pooling, row_mass)
        out.append(similarities_of(X, P, similarity, dense, background).max(axis=1))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float64)


def similarities_of(X, P: np.ndarray, similarity: str, dense: bool, background=None) -> np.ndarray:
    """``[n, c]``: rows as compared (:func:`scored_rows`) against every prototype, under the pool's
    latent weighting when there is one (``background``, SAE codes only)."""
    if background is None or not background.active:
        return similarities(X, P, similarity, dense)
    if dense:
        raise ValueError(f"select.background={background.kind}: SAE codes only (dense readouts are compared whole)")
    return background.similarities(X, P, similarity)
