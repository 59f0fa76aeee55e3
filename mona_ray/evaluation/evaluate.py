"""Selection-quality evaluation: ``python -m mona_ray.evaluate`` (Hydra config ``conf/eval/default.yaml``).

Takes a labelled pool (a ``domain`` per row), any number of target sets and a relevance
map (target -> relevant domains), runs the selectors, and writes, for each target,
precision@k and recall@k at several k, average precision and the share of the selection
per domain, as ``results.md`` / ``results.csv`` / ``results.json``, plus
``precision_at_k.png`` and ``figure4.png`` (the MoNA paper's Figure 4), under
``output_dir``.

Model-based selectors (MoNA and all its ablations, NAIT) share ONE model pass over the
pool: ``selectors/features.py`` computes every representation from the same forward pass
and caches it on disk by content, so evaluating another target, ratio, pooling or
similarity, or re-running the evaluation, does not run the model again; a new SAE (at a
block whose residual stream is cached) costs one SAE encode, not a model pass.

Example::

    python -m mona_ray.evaluate data.pool=pool.parquet \\
        data.targets='{gsm8k: gsm8k.parquet, mbpp: mbpp.parquet}' data.relevance=relevance.json
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from . import plots, report
from .data import read_relevance, read_rows, target_paths
from .metrics import evaluate_ranking
from ..config import CONF_DIR  # importing it registers the ${mona_ray.asset:...} resolver
from ..core.model import ModelError, parse_hookpoint
from ..core.records import InputError
from ..core.sae import SAEError, detect_format, load_sae
from ..selectors import get_selector
from ..selectors.features import FeatureExtractor, MlpGateVariant, SaeVariant, spec_from_config
from ..selectors.mona import mona_scores
from ..selectors.nait import combine, nait_directions, project

TEXT_SELECTORS = ("random", "bm25", "dsir", "dense")
USER_ERRORS = (InputError, ModelError, SAEError, ValueError)


def _log(msg: str) -> None:
    print(f"[evaluate] {msg}", file=sys.stderr, flush=True)


class Timer(dict):
    def run(self, name: str, fn, *a, **kw):
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        self[name] = self.get(name, 0.0) + time.perf_counter() - t0
        return out


# ----------------------------------------------------------------------------- model-based variants


def mona_variants(cfg, sae_k: int) -> list[dict]:
    """The MoNA variants to score: the full representation x pooling x similarity grid, plus
    the default (sae/mean/jaccard) at other token-exclusion rules, blocks and K.
    ``sae_k``: the K the SAE is used with (``sae.k`` or its own)."""
    m = cfg.mona
    base = dict(representation="sae", pooling="mean", similarity="jaccard", exclude=cfg.pool.exclude,
                hookpoint=cfg.sae.hookpoint, k=sae_k)
    out = []
    for rep in m.representations:
        for pool in m.poolings:
            for sim in m.similarities:
                out.append({**base, "representation": rep, "pooling": pool, "similarity": sim})
    out += [{**base, "exclude": e} for e in m.excludes if e != cfg.pool.exclude]
    out += [{**base, "hookpoint": h} for h in m.hookpoints if h != cfg.sae.hookpoint]
    out += [{**base, "k": k} for k in m.ks if k != sae_k]
    return out


def variant_name(v: dict, cfg, sae_k: int) -> str:
    name = f"mona:{v['representation']}/{v['pooling']}/{v['similarity']}"
    if v["representation"] == "sae":
        if v["hookpoint"] != cfg.sae.hookpoint:
            name += f"@{v['hookpoint']}"
        if v["k"] != sae_k:
            name += f"/k={v['k']}"
        if v["exclude"] != cfg.pool.exclude:
            name += f"/exclude={v['exclude']}"
    return name


def product_of(v: dict, mlp_k: int) -> str:
    """The feature product a variant is scored on (``hidden`` comes from the Embedder; SAE and
    mlp_gate codes are encoded from the cached activations of the one pass)."""
    if v["representation"] == "hidden":
        return "hidden"
    if v["representation"] == "mlp_gate":
        return MlpGateVariant(v["hookpoint"], mlp_k, v["exclude"]).name
    return SaeVariant(v["hookpoint"], v["k"], v["exclude"]).name


def sae_available(path, hookpoint: str) -> bool:
    try:
        detect_format(path, hookpoint)
        return True
    except SAEError:
        return False


# ----------------------------------------------------------------------------- main


def evaluate(cfg: DictConfig) -> dict:
    timer = Timer()
    if cfg.get("threads"):
        import torch

        torch.set_num_threads(int(cfg.threads))
    out_dir = Path(cfg.output_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []

    # inputs
    pool = timer.run("read inputs", read_rows, cfg.data.pool, "data.pool", cfg.data.id_column, cfg.data.domain_column)
    tpaths = target_paths(OmegaConf.to_container(cfg.data.targets) if isinstance(cfg.data.targets, DictConfig)
                          or OmegaConf.is_list(cfg.data.targets) else cfg.data.targets)
    targets = {t: timer.run("read inputs", read_rows, p, f"data.targets.{t}", cfg.data.id_column) for t, p in tpaths.items()}
    relevance, rel_notes = read_relevance(cfg.data.relevance, list(targets), set(pool.domains))
    notes += rel_notes
    if pool.rejected:
        notes.append(f"{len(pool.rejected)} pool rows could not be read and were left out (first: "
                     f"{pool.rejected[0]['row']}: {pool.rejected[0]['reason']})")
    for t, ts in targets.items():
        if ts.rejected:
            notes.append(f"target {t}: {len(ts.rejected)} rows could not be read and were left out")
    _log(f"pool {cfg.data.pool}: {len(pool)} rows; targets: " + ", ".join(f"{t} ({len(v)})" for t, v in targets.items()))
    domains = np.asarray(pool.domains, dtype=object)
    scores: dict[str, dict[str, np.ndarray]] = {t: {} for t in targets}
    wanted = list(cfg.selectors)
    unknown = sorted(set(wanted) - set(TEXT_SELECTORS) - {"mona", "nait"})
    if unknown:
        raise InputError(f"selectors: unknown {unknown}; use any of {', '.join(TEXT_SELECTORS + ('mona', 'nait'))}")

    # text selectors: one source pass each, then every target
    for name in [s for s in wanted if s in TEXT_SELECTORS]:
        settings = OmegaConf.to_container(cfg.text_selectors.get(name, {}) or {}, resolve=True)
        if name == "dense" and settings.get("cache_dir", "unset") == "unset":
            settings["cache_dir"] = str(Path(cfg.cache_dir).expanduser() / "dense")
        if not cfg.progress and name != "random":
            settings["progress"] = False  # progress=false silences every bar
        sel = get_selector(name, **settings)
        _log(f"{name}: preparing the pool")
        state = timer.run(f"{name}: pool", sel.prepare, pool.messages, pool.ids)
        for t, ts in targets.items():
            scores[t][name] = timer.run(f"{name}: targets", sel.score_prepared, state, ts.messages)
        del state

    # model-based selectors: one forward pass over the pool for every variant
    features_doc = {}
    profiles = None
    if "mona" in wanted or "nait" in wanted:
        features_doc, profiles = model_selectors(cfg, pool, targets, scores, timer, notes, wanted)

    # metrics
    results = {}
    for t, ts in targets.items():
        rel = relevance[t]
        n_rel = int(np.isin(domains, list(rel)).sum())
        res = {"relevant": sorted(rel), "n_target": len(ts), "n_relevant": n_rel, "base_rate": n_rel / len(pool),
               "selectors": {}}
        for s, sc in scores[t].items():
            res["selectors"][s] = evaluate_ranking(sc, pool.ids, domains, rel, list(cfg.k), cfg.share_at, cfg.curve_max)
        results[t] = res

    doc = {"inputs": {"pool": str(cfg.data.pool), "pool_rows": len(pool), "pool_rejected": pool.rejected[:50],
                      "targets": tpaths, "relevance": str(cfg.data.relevance)},
           "settings": OmegaConf.to_container(cfg, resolve=True), "model": features_doc, "notes": notes,
           "results": results, "timings": dict(timer)}
    doc["settings"]["k"] = list(cfg.k)
    plot_sel = [s for s in cfg.plot_selectors if any(s in results[t]["selectors"] for t in results)]
    plots.precision_curves(results, plot_sel, out_dir / "precision_at_k.png", title=f"pool: {Path(str(cfg.data.pool)).name}")
    if profiles:
        pair = tuple(cfg.figure4.targets) if cfg.figure4.targets else tuple(list(targets)[:2])
        missing = [t for t in pair if t not in targets]
        if missing or len(pair) != 2:
            notes.append(f"figure4.targets={list(pair)}: needs two of the evaluated targets ({', '.join(targets)}); skipped")
        else:
            cos = plots.figure4(profiles, pair, int(cfg.figure4.latents), out_dir / "figure4.png")
            doc["figure4"] = {"pair": list(pair), "cosine": cos, "latents": int(cfg.figure4.latents)}
    report.write_json(doc, out_dir / "results.json")
    report.write_csv(results, out_dir / "results.csv")
    report.write_markdown(doc, out_dir / "results.md")
    return doc


def model_selectors(cfg, pool, targets, scores, timer, notes, wanted) -> tuple[dict, dict | None]:
    spec = replace(spec_from_config(cfg), mlp_k=cfg.embed.mlp_k)
    sae_k = None
    if "mona" in wanted:
        if not sae_available(cfg.sae.path, cfg.sae.hookpoint):
            raise SAEError(f"sae.path={cfg.sae.path!r}: no SAE for hookpoint {cfg.sae.hookpoint} "
                           "(MoNA needs one); set sae.path, or drop mona from selectors")
        sae_k = int(cfg.sae.k or load_sae(cfg.sae.path, cfg.sae.format, hookpoint=cfg.sae.hookpoint).k)
    mlp_k = int(cfg.embed.mlp_k or sae_k or 32)  # as the pipeline: embed.mlp_k, else the SAE's K
    variants = mona_variants(cfg, sae_k) if "mona" in wanted else []
    kept = []
    for v in variants:
        if v["representation"] == "sae" and not sae_available(cfg.sae.path, v["hookpoint"]):
            notes.append(f"{variant_name(v, cfg, sae_k)} skipped: no SAE for {v['hookpoint']} under {cfg.sae.path}")
            continue
        kept.append(v)
    sae_vars = sorted({SaeVariant(v["hookpoint"], v["k"], v["exclude"]) for v in kept if v["representation"] == "sae"},
                      key=lambda x: x.name)
    mlp_vars = sorted({MlpGateVariant(v["hookpoint"], mlp_k, v["exclude"]) for v in kept
                       if v["representation"] == "mlp_gate"}, key=lambda x: x.name)
    products = ("hidden",) if any(v["representation"] == "hidden" for v in kept) else ()
    nait_layers = None
    if "nait" in wanted:
        last = parse_hookpoint(cfg.sae.hookpoint)
        nait_layers = list(range(last + 1)) if cfg.nait.layers == "all" else [int(x) for x in cfg.nait.layers]
    resid = sorted({parse_hookpoint(v.hookpoint) for v in sae_vars}) if cfg.embed.keep_residuals else []
    fx = FeatureExtractor(spec, products=products, variants=sae_vars + mlp_vars, nait_layers=nait_layers,
                          cache_dir=Path(cfg.cache_dir).expanduser() / "features", chunk_rows=int(cfg.embed.chunk_rows),
                          progress=bool(cfg.progress), keep_residuals=resid,
                          keep_mlp_inputs=sorted({parse_hookpoint(v.hookpoint) for v in mlp_vars}))
    _log("model features: pool (one pass for every representation; cached)")
    src = timer.run("model features: pool", fx.extract, pool.messages, "features: pool")
    pool_stats = dict(fx.stats)
    tgt = {t: timer.run("model features: targets", fx.extract, ts.messages, f"features: {t}") for t, ts in targets.items()}
    if src.rejected:
        notes.append(f"{len(src.rejected)} pool rows got no model features (they score lowest)")
    t0 = time.perf_counter()
    for t in targets:
        for v in kept:
            sc = mona_scores(src, tgt[t], product_of(v, mlp_k), v["pooling"], v["similarity"])
            scores[t][variant_name(v, cfg, sae_k)] = _demote(sc, src.rejected)
        if nait_layers is not None:
            dirs = nait_directions(tgt[t].nait)
            proj_t = project(tgt[t].nait, dirs)
            proj = project(src.nait, dirs)
            for ln in cfg.nait.layer_norms:
                scores[t]["nait" if ln == "none" else f"nait:{ln}"] = _demote(combine(proj, proj_t, ln), src.rejected)
    timer["model selectors: scoring"] = time.perf_counter() - t0
    doc = {**fx.model_info(), "pool_pass": pool_stats, "sae_k": sae_k, "mlp_k": mlp_k,
           "variants": [variant_name(v, cfg, sae_k) for v in kept]}
    profiles = None
    reps = {"sae": SaeVariant(cfg.sae.hookpoint, sae_k, cfg.pool.exclude).name,
            "mlp_gate": MlpGateVariant(cfg.sae.hookpoint, mlp_k, cfg.pool.exclude).name, "hidden": "hidden"}
    have = {r: p for r, p in reps.items() if p in tgt[next(iter(tgt))].sparse or p in tgt[next(iter(tgt))].dense}
    if have:
        profiles = {}
        for r, p in have.items():
            profiles[r] = {}
            for t, f in tgt.items():
                X = f.pooled(p, "mean")
                profiles[r][t] = (X.mean(0) if isinstance(X, np.ndarray) else X.to_dense(f.width[p]).mean(0))
    return doc, profiles


def _demote(scores: np.ndarray, rejected: dict) -> np.ndarray:
    if rejected:
        scores = scores.copy()
        scores[list(rejected)] = -np.inf
    return scores


@hydra.main(config_path=str(CONF_DIR / "eval"), config_name="default", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    try:
        doc = evaluate(cfg)
    except USER_ERRORS as e:
        print(f"mona_ray.evaluate: error: {e}", file=sys.stderr)
        sys.exit(2)
    out = Path(cfg.output_dir)
    print((out / "results.md").read_text())
    print(f"written: {out / 'results.md'}, results.csv, results.json, precision_at_k.png"
          + (", figure4.png" if "figure4" in doc else ""))


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
