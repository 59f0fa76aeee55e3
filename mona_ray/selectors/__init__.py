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
    """The baseline a pipeline config asks for: ``select.method`` with its settings from
    ``select.<method>`` (a mapping, optional). NAIT also takes the run's ``model`` / ``sae`` /
    ``render`` / ``embed`` settings."""
    select = cfg.get("select", {}) or {}
    method = select.get("method", "bm25")
    opts = dict(select.get(method, {}) or {})
    if method == "nait":
        m, r, e = (cfg.get(k, {}) or {} for k in ("model", "render", "embed"))
        opts = {"model_path": str(m.get("path")), "hookpoint": (cfg.get("sae", {}) or {}).get("hookpoint", "layers.28"),
                "dtype": m.get("dtype", "auto"), "device": m.get("device", "auto"),
                "render_mode": r.get("mode", "chat_template"), "system_prompt": r.get("system_prompt"),
                "max_length": int(r.get("max_length", 512)), "token_budget": int(e.get("token_budget", 8192)),
                "pad_multiple": int(e.get("pad_multiple", 16)), "max_batch_rows": int(e.get("max_batch_rows", 64)),
                **opts}
    return get_selector(method, **{**opts, **overrides})


__all__ = ["SELECTORS", "Selector", "get_selector", "messages_text", "selector_from_config"]
