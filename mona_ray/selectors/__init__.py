"""Data selectors behind one interface (see ``base.Selector``): ``get_selector(name, **cfg)``.

=========  =============================================================================
name       what it scores (higher = better)
=========  =============================================================================
mona       generalized Jaccard of mean-pooled SAE codes with the target prototype, and
           its ablations (representation, pooling, similarity, layer, K) -- ``mona.py``
nait       target-task activation directions (PCA of last-minus-first token deltas) --
           ``nait.py``
bm25       BM25 with the target examples as queries (``bm25s``) -- ``bm25.py``
dsir       hashed-n-gram importance weights (Xie et al. 2023) -- ``dsir.py``
dense      cosine to the target centroid in all-MiniLM-L6-v2 space -- ``dense.py``
random     seeded uniform scores -- ``rand.py``
=========  =============================================================================
"""

from __future__ import annotations

import inspect

from .base import Selector, messages_text
from .bm25 import BM25Selector
from .dense import DenseSelector
from .dsir import DSIRSelector
from .mona import MonaSelector
from .nait import NAITSelector
from .rand import RandomSelector

SELECTORS: dict[str, type[Selector]] = {
    "mona": MonaSelector,
    "nait": NAITSelector,
    "bm25": BM25Selector,
    "dsir": DSIRSelector,
    "dense": DenseSelector,
    "random": RandomSelector,
}


def _settings(cls) -> list[str]:
    names = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "spec")]
    if "spec" in inspect.signature(cls.__init__).parameters:
        from dataclasses import fields

        from .features import ModelSpec

        names += [f.name for f in fields(ModelSpec)]
    return names


def get_selector(name: str, **cfg) -> Selector:
    """The selector ``name`` configured with ``cfg`` (its settings; unknown ones are an error)."""
    try:
        cls = SELECTORS[name]
    except KeyError:
        raise ValueError(f"unknown selector {name!r}; use one of {', '.join(SELECTORS)}") from None
    allowed = _settings(cls)
    unknown = sorted(set(cfg) - set(allowed))
    if unknown:
        raise ValueError(f"selector {name!r} has no setting(s) {', '.join(unknown)}; its settings: {', '.join(allowed)}")
    return cls(**cfg)


def selector_from_config(cfg, **overrides) -> Selector:
    """The selector a pipeline config asks for: ``select.method`` with its settings from
    ``select.<method>`` (a mapping, optional). The model-based selectors (``mona``, ``nait``)
    also take the run's ``model`` / ``sae`` / ``render`` / ``pool`` / ``embed`` settings, and
    ``mona`` its ``embed.representation``, ``pool.method`` and ``select.similarity``."""
    from dataclasses import asdict

    select = cfg.get("select", {}) or {}
    method = select.get("method", "mona")
    opts = dict(select.get(method, {}) or {})
    if method in ("mona", "nait"):
        from .features import spec_from_config

        base = asdict(spec_from_config(cfg))
        if method == "mona":
            base.update(representation=(cfg.get("embed", {}) or {}).get("representation", "sae"),
                        pooling=(cfg.get("pool", {}) or {}).get("method", "mean"),
                        similarity=select.get("similarity", "jaccard"))
        opts = {**base, **opts}
    return get_selector(method, **{**opts, **overrides})


__all__ = ["SELECTORS", "Selector", "get_selector", "messages_text", "selector_from_config"]
