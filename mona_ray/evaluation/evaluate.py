"""Selection-quality evaluation: ``python -m mona_ray.evaluate`` (settings: ``EvalConfig`` in ``config/schema.py``).

Takes a labelled pool (a ``domain`` per row), any number of target sets and a relevance
map (target -> relevant domains), runs the selectors, and writes, for each target,
precision@k and recall@k at several k, average precision and the share of the selection
per domain, as ``results.md`` / ``results.csv`` / ``results.json``, plus
``precision_at_k.png``, ``figure4.png`` (the MoNA paper's Figure 4) and ``scores.parquet``
(every selector's score of every pool row, one column per ``<target>/<selector>``), under
``output_dir``.

Model-based selectors (MoNA and all its ablations, NAIT) run the product's code: the
feature engine (``features/engine.py``, the one the pipeline's actors run) reads every
representation out of ONE forward pass per row into the feature store, where a pipeline run
with the same model, SAE, rendering and dtype finds them (and vice versa); each variant is
then scored with the pipeline's own functions (``scoring.prototype_of``, ``scoring.score_rows``).
Evaluating another target, ratio, pooling or similarity, or re-running the evaluation, does
not run the model again.

Example::

    python -m mona_ray.evaluate data.pool=pool.parquet \\
        data.targets='{gsm8k: gsm8k.parquet, mbpp: mbpp.parquet}' data.relevance=relevance.json
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import hydra
import numpy as np
import pyarrow as pa
from omegaconf import DictConfig

from . import plots, report
from .data import read_relevance, read_rows, target_paths
from .suite import load_suite, pool_masks, suite_relevance, suite_report
from .metrics import evaluate_ranking
from ..core.io import write_parquet
from ..config import CONF_DIR, EvalConfig, exit_on_bad_command_line, to_plain, to_typed, validate  # importing it registers the ${mona_ray.asset:...} resolver
from ..core.hub import HubError
from ..core.model import ModelError, parse_hookpoint
from ..core.records import InputError, content_hash
from ..scoring import rows_of
from ..scoring.table import score_rows_against
from ..core.sae import SAEError
from ..selectors import get_selector
from ..selectors.nait import combine, nait_directions, project
from ..config.schema import AGGREGATES, BACKGROUNDS, TEXT_SELECTORS

# A suite ranks each target over its own pool. These scores depend on the other rows of the pool (BM25's IDF,
# DSIR's pool n-gram model, random's draw, a round robin's interleaving), so they are computed over each
# target's pool; every other score is a function of the row and the target alone (MoNA's prototypes and
# clusters, dense centroid cosine, NAIT), computed once over the whole pool and read for the target's rows.
POOL_DEPENDENT_TEXT = ("random", "bm25", "dsir")
POOL_DEPENDENT = ("round_robin", "rds")
USER_ERRORS = (InputError, ModelError, SAEError, HubError, ValueError)


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


# ----------------------------------------------------------------------------- main


def evaluate(cfg: DictConfig) -> dict:
    """The whole evaluation for a validated config (``load_config(..., "eval/default")``),
    read as a typed :class:`EvalConfig` from here on; returns the results document."""
    settings_doc = to_plain(cfg)
    cfg: EvalConfig = to_typed(cfg)
    timer = Timer()
    if cfg.embed.torch_threads not in (None, "auto"):
        import torch

        torch.set_num_threads(int(cfg.embed.torch_threads))
    out_dir = Path(cfg.output_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    _SEARCHES.clear()
    _STORED.clear()

    # inputs: a pool, targets and a relevance map, or a suite (mona_ray.evaluation.suite) that names all three
    # and, per target, the pool categories left out of its ranking
    suite = load_suite(cfg.data.suite) if cfg.data.suite else None
    if not suite:
        for key in ("pool", "targets", "relevance"):
            if getattr(cfg.data, key) in (None, ""):
                raise InputError(f"data.{key} is not set: give data.pool, data.targets and data.relevance, "
                                 "or data.suite=DIR/suite.json (python -m mona_ray.evaluation.suite)")
    pool_path = suite["pool"] if suite else cfg.data.pool
    pool = timer.run("read inputs", read_rows, pool_path, "data.pool", cfg.data.id_column, cfg.data.domain_column)
    tpaths = {t: v["path"] for t, v in suite["targets"].items()} if suite else target_paths(cfg.data.targets)
    targets = {t: timer.run("read inputs", read_rows, p, f"data.targets.{t}", cfg.data.id_column) for t, p in tpaths.items()}
    if suite:
        relevance = suite_relevance(suite, set(pool.domains))
    else:
        relevance, rel_notes = read_relevance(cfg.data.relevance, list(targets), set(pool.domains))
        notes += rel_notes
    if pool.rejected:
        notes.append(f"{len(pool.rejected)} pool rows could not be read and were left out (first: "
                     f"{pool.rejected[0]['row']}: {pool.rejected[0]['reason']})")
    for t, ts in targets.items():
        if ts.rejected:
            notes.append(f"target {t}: {len(ts.rejected)} rows could not be read and were left out")
    _log(f"pool {pool_path}: {len(pool)} rows; targets: " + ", ".join(f"{t} ({len(v)})" for t, v in targets.items()))
    wanted = list(cfg.selectors)
    unknown = sorted(set(wanted) - set(TEXT_SELECTORS) - {"mona", "nait"})
    if unknown:
        raise InputError(f"selectors: unknown {unknown}; use any of {', '.join(TEXT_SELECTORS + ('mona', 'nait'))}")

    # every target is ranked over ITS pool: the whole pool, or (a suite) the pool without the target's
    # excluded categories. Targets that share a pool share one pass of each selector over it, and every
    # selector sees exactly that pool (BM25's and DSIR's pool statistics included), so nothing is approximate.
    keep = pool_masks(suite, pool, cfg.data.id_column) if suite else {t: None for t in targets}
    groups: dict = {}
    for t in targets:
        groups.setdefault(None if keep[t] is None else keep[t].tobytes(), []).append(t)
    scores: dict[str, dict[str, np.ndarray]] = {t: {} for t in targets}
    results, features_doc, profiles = {}, {}, None
    whole = {t: {} for t in targets}
    if suite:  # the per-row scores once, over the whole pool, for every target
        _log(f"the whole pool: the scores that depend on the row and the target alone, {len(targets)} targets")
        features_doc, profiles = score_selectors(cfg, pool, targets, whole, timer, notes, wanted, "per_row")
    for g, names in enumerate(groups.values()):
        mask = keep[names[0]]
        sub = pool if mask is None else pool.subset(mask)
        if len(groups) > 1:
            _log(f"pool {g + 1}/{len(groups)}: {len(sub)} rows for {', '.join(names)}")
        got = {t: {s: sc if mask is None else sc[mask] for s, sc in whole[t].items()} for t in names}
        fdoc, prof = score_selectors(cfg, sub, {t: targets[t] for t in names}, got, timer, notes, wanted,
                                     "pool" if suite else "all")
        features_doc = features_doc or fdoc
        profiles = profiles or (prof if mask is None else None)
        sub_domains = np.asarray(sub.domains, dtype=object)
        for t in names:
            rel = relevance[t]
            n_rel = int(np.isin(sub_domains, list(rel)).sum())
            res = {"relevant": sorted(rel), "n_target": len(targets[t]), "n_relevant": n_rel, "pool_rows": len(sub),
                   "base_rate": n_rel / len(sub), "selectors": {}}
            if suite:
                res["suite"] = {k: suite["targets"][t][k] for k in ("kind", "domain", "half", "exclude_categories")}
            for s, sc in got[t].items():
                res["selectors"][s] = evaluate_ranking(sc, sub.ids, sub_domains, rel, list(cfg.k), cfg.share_at,
                                                       cfg.curve_max)
                full = np.full(len(pool), np.nan)  # scores.parquet: excluded rows are NaN
                full[slice(None) if mask is None else mask] = sc
                scores[t][s] = full
            results[t] = res
    results = {t: results[t] for t in targets}

    doc = {"inputs": {"pool": str(pool_path), "pool_rows": len(pool), "pool_rejected": pool.rejected[:50],
                      "targets": tpaths, "relevance": str(cfg.data.suite or cfg.data.relevance)},
           "settings": settings_doc, "model": features_doc, "notes": notes,
           "results": results, "timings": dict(timer)}
    doc["settings"]["k"] = list(cfg.k)
    plot_sel = [s for s in cfg.plot_selectors if any(s in results[t]["selectors"] for t in results)]
    plotted = {t: r for t, r in results.items() if not suite or not suite["targets"][t]["exclude_categories"]}
    plots.precision_curves(plotted or results, plot_sel, out_dir / "precision_at_k.png", title=f"pool: {Path(str(pool_path)).name}")
    if profiles:
        pair = tuple(cfg.figure4.targets) if cfg.figure4.targets else tuple(list(targets)[:2])
        missing = [t for t in pair if t not in next(iter(profiles.values()))]  # (a suite: whole-pool targets only)
        if missing or len(pair) != 2:
            notes.append(f"figure4.targets={list(pair)}: needs two of the evaluated targets ({', '.join(targets)}); skipped")
        else:
            cos = plots.figure4(profiles, pair, int(cfg.figure4.latents), out_dir / "figure4.png")
            doc["figure4"] = {"pair": list(pair), "cosine": cos, "latents": int(cfg.figure4.latents)}
    write_parquet(pa.table({"id": pa.array(pool.ids, pa.string()),
                            **{f"{t}/{name}": pa.array(np.asarray(sc, np.float64)) for t in scores
                               for name, sc in scores[t].items()}}), out_dir / "scores.parquet")
    report.write_json(doc, out_dir / "results.json")
    report.write_csv(results, out_dir / "results.csv")
    report.write_markdown(doc, out_dir / "results.md")
    if suite:
        doc["suite"] = {k: v for k, v in suite.items() if k != "targets"}
        (out_dir / "suite.md").write_text(suite_report(doc, suite))
        report.write_json(doc, out_dir / "results.json")
    return doc


def score_selectors(cfg, pool, targets, scores, timer, notes, wanted, part: str = "all") -> tuple[dict, dict | None]:
    """Every wanted selector's scores of ``pool`` for each of ``targets`` into ``scores[target][selector]``;
    returns the model features' document and the prototypes for Figure 4 (``model_selectors``).
    ``part``: ``all``, ``pool`` (only the scores that depend on the other pool rows) or ``per_row`` (the rest)."""
    # text selectors: one source pass each, then every target
    text = [s for s in wanted if s in TEXT_SELECTORS and (part == "all" or (s in POOL_DEPENDENT_TEXT) == (part == "pool"))]
    for name in text:
        settings = dict(cfg.text_selectors.get(name) or {})
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
    if "mona" in wanted or ("nait" in wanted and part != "pool"):
        return model_selectors(cfg, pool, targets, scores, timer, notes, wanted, part)
    return {}, None


def model_selectors(cfg, pool, targets, scores, timer, notes, wanted, part: str = "all") -> tuple[dict, dict | None]:
    """Every model-based selector's scores, computed as ``python -m mona_ray.run`` computes them:
    the feature engine fills the feature store (one forward per row for every readout, rows the
    store already holds are reused), then each variant is the pipeline's own scoring
    (``scoring.prototype_of`` over the target rows in id order, ``scoring.score_rows`` over the pool)."""
    from ..features.local import LocalEmbedder, Rendering
    from ..features.readouts import Readout
    from ..features.spec import readout_width, representation_readout
    from ..pipeline.plan import embed_plan, local_model, local_resources, sae_at
    from ..scoring import prototype_of, score_rows

    resolved: dict = {}  # hub ids, resolved as the run resolves them (the model, the SAE of each hookpoint)
    model_dir = local_model(cfg.model.path, resolved)
    refs: dict[str, object] = {}
    missing: dict[str, Exception] = {}  # hookpoint -> why sae.path has no SAE for it

    def ref(hookpoint):
        """The SAE for ``hookpoint`` (from the hub: only its files), or None."""
        if hookpoint not in refs and hookpoint not in missing:
            try:
                refs[hookpoint] = sae_at(cfg.sae, hookpoint, resolved)
            except (SAEError, HubError) as e:
                missing[hookpoint] = e
        return refs.get(hookpoint)

    sae_k = None
    if "mona" in wanted:
        if ref(cfg.sae.hookpoint) is None:
            why = missing[cfg.sae.hookpoint]
            raise why if isinstance(why, HubError) else SAEError(
                f"sae.path={cfg.sae.path!r}: no SAE for hookpoint {cfg.sae.hookpoint} (MoNA needs one); set "
                "sae.path, or drop mona from selectors")
        sae_k = ref(cfg.sae.hookpoint).k
    mlp_k = int(cfg.embed.mlp_k or sae_k or 32)
    kept, readout_of = [], {}
    for v in (mona_variants(cfg, sae_k) if "mona" in wanted else []):
        if v["representation"] == "sae" and ref(v["hookpoint"]) is None:
            notes.append(f"{variant_name(v, cfg, sae_k)} skipped: no SAE for {v['hookpoint']} under {cfg.sae.path}")
            continue
        r = representation_readout(v["representation"], v["hookpoint"], v["exclude"],
                                   ref(v["hookpoint"]) if v["representation"] == "sae" else None, mlp_k)
        if v["representation"] == "sae" and v["k"] != r.k:
            r = Readout("sae", r.block, r.exclude, k=int(v["k"]), sae=r.sae)
        kept.append(v)
        readout_of[variant_name(v, cfg, sae_k)] = r
    agg = []  # (name, readout, aggregate, similarity, prototype mass, row mass)
    if "mona" in wanted:
        for h, k in dict.fromkeys([(cfg.sae.hookpoint, None), *map(_hookpoint_k, cfg.mona.aggregation_hookpoints)]):
            if ref(h) is None:
                continue
            r = representation_readout("sae", h, cfg.pool.exclude, ref(h))
            for spec in cfg.mona.aggregations:
                a, sim, mass, row_mass = _aggregation(spec)
                agg.append((f"mona:sae/mean/{sim}" + (f"@{h}" if h != cfg.sae.hookpoint else "")
                            + (f"/k={k}" if k else "") + f"/{a}" + _mass_name(mass)
                            + (f"/row_mass={row_mass:g}" if row_mass < 1 else ""),
                            r if not k else Readout("sae", r.block, r.exclude, k=int(k), sae=r.sae), a, sim, mass, row_mass))
    if cfg.mona.rds and "mona" in wanted:  # RDS+ as published: hidden_states[-1] (the final norm), aggregate "rds"
        from ..features.readouts import rds_readout  # (targets in file order, a taken row spends the target's turn)
        from ..features.spec import num_layers

        agg.append(("rds", rds_readout(num_layers(model_dir, bool(cfg.model.trust_remote_code))), "rds", "cosine", 1.0, 1.0))
    nait = None
    if "nait" in wanted:
        last = parse_hookpoint(cfg.sae.hookpoint)
        layers = list(range(last + 1)) if cfg.nait.layers == "all" else sorted(int(x) for x in cfg.nait.layers)
        nait = Readout("nait", max(layers), "special", blocks=tuple(layers))
    if part == "pool":  # only the selectors whose scores depend on the other pool rows (the round robins)
        kept, readout_of, nait = [], {}, None
        agg = [x for x in agg if _pool_dependent(x[2], x[3])]
        if not agg:
            return {}, None
    elif part == "per_row":
        agg = [x for x in agg if not _pool_dependent(x[2], x[3])]
    readouts = list(dict.fromkeys(list(readout_of.values()) + [a[1] for a in agg] + ([nait] if nait else [])))
    saes = {refs[h].key: refs[h] for h in refs if any(r.sae == refs[h].key for r in readouts)}
    ep = embed_plan(cfg, model_dir, resolved.get("model.path"), readouts, saes.values(), cfg.embed.store_dir,
                    local_resources())
    job, stores, model_fp, device = ep.job, ep.stores, ep.model_fp, ep.job.device
    rendering = Rendering.of(cfg.render)
    executor = str(cfg.embed.executor)
    if executor == "ray":  # the model pass on Ray actors (a cluster: one per GPU)
        from ..pipeline.remote import RayEmbedder

        emb = RayEmbedder(job, rendering, stores, int(cfg.embed.rows_per_unit), bool(cfg.progress),
                          num_actors=ep.num_actors, actor_num_cpus=float(ep.actor_resources["num_cpus"]))
    elif executor == "local":
        emb = LocalEmbedder(job, rendering, stores, int(cfg.embed.rows_per_unit), bool(cfg.progress))
    else:
        raise InputError(f"embed.executor={executor!r}: use local or ray")
    _log("model features: pool (one pass for every representation; reused from the feature store when there)")
    rej = timer.run("model features: pool", emb.embed, pool.messages, "features: pool")
    pool_stats = dict(emb.stats)
    for t, ts in targets.items():
        rej.update(timer.run("model features: targets", emb.embed, ts.messages, f"features: {t}"))
    pool_hash = [content_hash(m) for m in pool.messages]
    live = np.asarray([h not in rej for h in pool_hash])
    if not live.all():
        notes.append(f"{int((~live).sum())} pool rows got no model features (they score lowest)")
    live_hash = [h for h, ok in zip(pool_hash, live) if ok]
    tgt_hash, tgt_file_hash = {}, {}
    for t, ts in targets.items():
        order = sorted(range(len(ts)), key=lambda i: ts.ids[i])  # the pipeline's prototype order: by id
        tgt_hash[t] = [content_hash(ts.messages[i]) for i in order if content_hash(ts.messages[i]) not in rej]
        tgt_file_hash[t] = [h for h in map(content_hash, ts.messages) if h not in rej]  # published RDS+'s order
        if not tgt_hash[t]:
            raise InputError(f"target {t}: no row has model features")
    cols = ["n_pooled", "indices", "values"]
    aggregation_info: dict = {}
    t0 = time.perf_counter()
    widths = {r.name: readout_width(r, model_dir, next((s for s in job.saes if s.key == r.sae), None))
              for r in readouts}
    pool_tab = {}
    for v in kept:
        name = variant_name(v, cfg, sae_k)
        r = readout_of[name]
        if r.name not in pool_tab:
            pool_tab[r.name] = _read_ordered(stores[r.name], live_hash, cols)
        for t in targets:
            tgt = stores[r.name].read_ordered(tgt_hash[t], cols)
            proto = prototype_of(tgt, widths[r.name], not r.sparse, v["pooling"])
            sc = np.full(len(pool_hash), -np.inf)
            sc[live] = score_rows(pool_tab[r.name], proto, v["similarity"], not r.sparse, v["pooling"])
            scores[t][name] = sc
    tgt_tab = {}  # each target's stored rows, read once per readout and order (every setting scores them)
    for name, r, a, sim, mass, row_mass in agg:
        if r.name not in pool_tab:
            pool_tab[r.name] = _read_ordered(stores[r.name], live_hash, cols)
        for t in targets:
            order = tgt_file_hash if a == "rds" else tgt_hash
            if (r.name, t, a == "rds") not in tgt_tab:
                tgt_tab[r.name, t, a == "rds"] = stores[r.name].read_ordered(order[t], cols)
            sc = np.full(len(pool_hash), -np.inf)
            sc[live], info = aggregated_scores(pool_tab[r.name], tgt_tab[r.name, t, a == "rds"],
                                               widths[r.name], not r.sparse, a, sim, mass, int(cfg.mona.cluster_seed),
                                               row_mass)
            scores[t][name] = sc
            aggregation_info.setdefault(t, {})[name] = info
    if nait is not None:
        X = stores[nait.name].read_ordered(live_hash, ["values"])
        src = _nait_deltas(X, len(nait.blocks))
        for t in targets:
            tgt = _nait_deltas(stores[nait.name].read_ordered(tgt_hash[t], ["values"]), len(nait.blocks))
            dirs = nait_directions(tgt)
            proj, proj_t = project(src, dirs), project(tgt, dirs)
            for ln in cfg.nait.layer_norms:
                sc = np.full(len(pool_hash), -np.inf)
                sc[live] = combine(proj, proj_t, ln)
                scores[t]["nait" if ln == "none" else f"nait:{ln}"] = sc
        del src, X
    timer["model selectors: scoring"] = timer.get("model selectors: scoring", 0.0) + time.perf_counter() - t0
    doc = {"model_path": str(model_dir), "model_fingerprint": model_fp, "dtype": job.dtype,
           "dtype_reason": ep.dtype_reason, "device": device, "hookpoint": cfg.sae.hookpoint,
           "hub": {k: v.manifest() for k, v in resolved.items()},
           "saes": {s.key: {"fingerprint": s.fingerprint, "k": s.k, "num_latents": s.num_latents,
                            "provisional": s.provisional, **({"hub": s.hub} if s.hub else {})} for s in job.saes},
           "readouts": {r.name: {"store": str(stores[r.name].root), "width": widths[r.name]} for r in readouts},
           "pool_pass": pool_stats, "sae_k": sae_k, "mlp_k": mlp_k, "variants": list(readout_of) + [a[0] for a in agg],
           "aggregation": aggregation_info}
    profiles = None
    base = {"sae": "mona:sae/mean/jaccard", "mlp_gate": "mona:mlp_gate/mean/jaccard", "hidden": "mona:hidden/mean/jaccard"}
    have = {rep: readout_of[n] for rep, n in base.items() if n in readout_of}
    if have:
        profiles = {rep: {t: prototype_of(stores[r.name].read_ordered(tgt_hash[t], cols), widths[r.name], not r.sparse)
                          for t in targets} for rep, r in have.items()}
    return doc, profiles


def _hookpoint_k(spec: str) -> tuple[str, int | None]:
    """``"layers.15"`` -> ("layers.15", None); ``"layers.15/k=16"`` -> ("layers.15", 16): the SAE at that K."""
    h, _, k = str(spec).partition("/k=")
    if k and not k.isdigit():
        raise InputError(f"mona.aggregation_hookpoints: {spec!r} is not layers.N[/k=K]")
    return h, int(k) if k else None


def _mass_name(mass) -> str:
    if isinstance(mass, str):
        return f"/mass={mass}"
    return f"/mass={mass:g}" if mass < 1 else ""


def _aggregation(spec: str) -> tuple[str, str, float | str, float]:
    """``"clusters/jaccard/0.65[/0.75]"`` -> (aggregate, similarity, prototype mass, row mass (1.0 if absent)).

    The aggregate may carry a silhouette threshold (``clusters@0.4``: one cluster below it) and the
    prototype mass may be a rule decided from the target rows (``scoring.table.cut_prototypes``):
    ``structure:0.65`` (cut to 0.65 only when the target splits into clusters) or ``support``
    (each prototype as sparse as its median member row); a rule is returned as its spec string."""
    parts = str(spec).split("/")
    agg, _, sil = parts[0].partition("@")
    if (len(parts) not in (3, 4) or agg not in AGGREGATES
            or (sil and (agg != "clusters" or not _is_share(sil, zero=True)))):
        raise InputError(f"mona.aggregations: {spec!r} is not <prototype|clusters[@<silhouette>]|round_robin>/"
                         "<similarity>/<prototype mass | structure:<mass> | support>[/<row mass>]")
    mass = parts[2]
    rule, _, value = mass.partition(":") if ":" in mass else ("", "", mass)
    if mass == "support" or rule == "structure":
        if agg == "round_robin" or (rule and not _is_share(value)):
            raise InputError(f"mona.aggregations: {spec!r}: the rule {mass!r} applies to prototype/clusters "
                             "(structure:<mass in (0, 1]> or support)")
    for m in ([] if mass == "support" or rule == "structure" else [mass]) + parts[3:]:
        if not _is_share(m):
            raise InputError(f"mona.aggregations: {spec!r}: the mass {m!r} is not a number in (0, 1]")
    return (parts[0], parts[1], mass if (mass == "support" or rule) else float(mass),
            float(parts[3]) if len(parts) > 3 else 1.0)


def _background_of(similarity: str) -> tuple[str, str]:
    """An aggregation's similarity token -> (``select.background``, ``select.similarity``):
    ``jaccard`` -> (none, jaccard), ``idf-cosine`` -> (idf, cosine), ``lr`` -> (lr, jaccard)."""
    if similarity in BACKGROUNDS:
        return similarity, "jaccard"
    bg, _, sim = similarity.rpartition("-")
    bg = bg or "none"
    if bg not in BACKGROUNDS:
        raise InputError(f"mona.aggregations: similarity {similarity!r}: use [<{'|'.join(BACKGROUNDS)}>-]<similarity>")
    return bg, sim


def _pool_dependent(aggregate: str, similarity: str) -> bool:
    """Whether an aggregation's scores depend on the other pool rows (round robins; the pool's latent statistics)."""
    return aggregate in POOL_DEPENDENT or _background_of(similarity)[0] != "none"


def _is_share(x: str, zero: bool = False) -> bool:
    try:
        v = float(x)
    except ValueError:
        return False
    return (0 <= v if zero else 0 < v) and v <= 1


def _cut_settings(aggregate: str, mass) -> tuple[str, float, str, float]:
    """An aggregation's (aggregate, mass, mass rule, min silhouette) from its spec's parts."""
    agg, _, sil = aggregate.partition("@")
    if isinstance(mass, str):
        rule, _, value = mass.partition(":")
        return agg, float(value) if value else 1.0, rule, float(sil) if sil else 0.25
    return agg, float(mass), "fixed", float(sil) if sil else 0.25


_STORED: dict = {}  # per store and columns: the largest pool read so far, and its rows by content hash


def _read_ordered(store, hashes: list[str], cols: list[str]):
    """``store.read_ordered(hashes, cols)``, taken from an earlier read that holds every hash when there
    is one: a suite ranks each target over a part of one pool, so the pool is read once per readout."""
    key = (str(store.root), tuple(cols))
    got = _STORED.get(key)
    if got is not None:
        idx = [got[1].get(h) for h in hashes]
        if None not in idx:
            return got[0].take(pa.array(idx, pa.int64()))
    table = store.read_ordered(hashes, cols)
    if got is None or len(hashes) > len(got[1]):
        _STORED[key] = (table, {h: i for i, h in enumerate(hashes)})
    return table


_SEARCHES: dict = {}  # the silhouette search per target rows (content digest): the same for every setting


def aggregated_scores(pool, tgt, width: int, dense: bool, aggregate: str, similarity: str, mass: float,
                      seed: int, row_mass: float = 1.0) -> tuple[np.ndarray, dict]:
    """A full ranking of the pool (as scores) for one aggregation over the target rows ``tgt``
    (stored tables, targets in id order): ``prototype`` / ``clusters`` score each row by its best
    prototype (the pipeline's ``score_rows_against``); ``round_robin`` interleaves one ranking
    per target row (RDS+), and a row's score is minus its position in the interleaving. Pool rows
    are compared as the pipeline compares them (``scored_rows``: cut to ``row_mass``)."""
    from ..scoring.round_robin import candidates_from_scores, round_robin
    from ..scoring.background import Background, PoolStats
    from ..scoring.table import build_targets, scored_rows, similarities_of

    rr = aggregate in ("round_robin", "rds")  # rds: the published rule, a taken row spends the target's turn
    rule, min_sil = "fixed", 0.25
    bg, similarity = _background_of(similarity)
    # the pool's latent statistics (select.background): over exactly this target's pool, as a run over it computes them
    background = Background.of(bg, PoolStats.of(rows_of(pool, dense), width)) if bg != "none" else None
    if not rr:
        aggregate, mass, rule, min_sil = _cut_settings(aggregate, mass)
    _, P, info = build_targets(tgt, width, dense, aggregate, mass, seed, mass_rule=rule, min_silhouette=min_sil,
                               search=_cached_search(seed))
    if rr:
        S = similarities_of(scored_rows(pool, dense, row_mass=row_mass), P, similarity, dense, background)
        ids = np.asarray([f"{i:09d}" for i in range(S.shape[0])], dtype=object)  # ties: pool order
        order, _, _ = round_robin(candidates_from_scores(S, ids, len(ids)), len(ids), skip_taken=aggregate != "rds")
        out = np.empty(len(ids))
        out[np.asarray([int(i) for i in order])] = -np.arange(len(order), dtype=np.float64)
        return out, {**info, "row_mass": row_mass}
    return (score_rows_against(pool, P, similarity, dense, row_mass=row_mass, background=background),
            {**{k: v for k, v in info.items() if k != "labels"}, "row_mass": row_mass, "background": bg})


def _cached_search(seed: int):
    """``T -> best_clusters(T, seed)``, one silhouette search per target rows for every clusters setting."""
    from ..scoring.clusters import best_clusters

    def search(T):
        key = (hashlib.blake2b(np.ascontiguousarray(T).tobytes(), digest_size=16).hexdigest(), T.shape, seed)
        if key not in _SEARCHES:
            _SEARCHES[key] = best_clusters(np.asarray(T, dtype=np.float64), seed)
        return _SEARCHES[key]
    return search


def _nait_deltas(table, n_blocks: int) -> np.ndarray:
    """Stored NAIT rows ``[n, blocks * d]`` as deltas ``[n, blocks, d]``."""
    X = rows_of(table, dense=True)
    return X.reshape(len(X), n_blocks, -1)


@hydra.main(config_path=str(CONF_DIR / "eval"), config_name="default", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    try:
        doc = evaluate(validate(cfg))
    except USER_ERRORS as e:
        print(f"mona_ray.evaluate: error: {e}", file=sys.stderr)
        sys.exit(2)
    out = Path(cfg.output_dir)
    print((out / "results.md").read_text())
    print(f"written: {out / 'results.md'}, results.csv, results.json, precision_at_k.png"
          + (", figure4.png" if "figure4" in doc else ""))


def main() -> None:
    exit_on_bad_command_line("eval/default")
    _hydra_main()


if __name__ == "__main__":
    main()
