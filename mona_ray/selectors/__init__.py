"""The baseline selectors behind one interface (see ``base.Selector``): ``get_selector(name, **cfg)``.

MoNA itself is not here: it is the pipeline (``python -m mona_ray.run``), and the
evaluation scores it with the pipeline's own code.

=========  =============================================================================
name       what it scores (higher = better)
=========  =============================================================================
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
from .nait import NAITSelector
from .rand import RandomSelector

SELECTORS: dict[str, type[Selector]] = {
    "nait": NAITSelector,
    "bm25": BM25Selector,
    "dsir": DSIRSelector,
    "dense": DenseSelector,
    "random": RandomSelector,
}


def _settings(cls) -> list[str]:
    return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]


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
    """The baseline a typed run config (:class:`~mona_ray.config.RunConfig`) asks for:
    ``select.method`` with its settings from ``select.<method>``. NAIT also takes the run's
    ``model`` / ``sae`` / ``render`` / ``embed`` settings."""
    method = cfg.select.method
    opts = dict(getattr(cfg.select, method, None) or {})
    if method == "nait":
        m, r, e = cfg.model, cfg.render, cfg.embed
        opts = {"model_path": str(m.path), "hookpoint": cfg.sae.hookpoint, "dtype": m.dtype, "device": m.device,
                "render_mode": r.mode, "system_prompt": r.system_prompt, "max_length": int(r.max_length),
                "token_budget": int(e.token_budget), "pad_multiple": int(e.pad_multiple),
                "max_batch_rows": int(e.max_batch_rows), **opts}
    return get_selector(method, **{**opts, **overrides})


__all__ = ["SELECTORS", "Selector", "get_selector", "messages_text", "selector_from_config"]
