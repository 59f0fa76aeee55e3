"""Reporting: the selection files, the manifest and the end-of-run summary."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa

from ..core.io import write_jsonl, write_parquet
from .plan import MODEL_METHODS


def write_selection(selected: list[dict], out: Path) -> None:
    """``selected.jsonl`` (one original record per line, plus id, score, rank) and the same as Parquet."""
    write_jsonl(selected, out / "selected.jsonl")
    try:  # every field any record has (from_pylist would take the first record's fields only)
        keys = dict.fromkeys(k for r in selected for k in r)
        table = pa.Table.from_pydict({k: [r.get(k) for r in selected] for k in keys}) if selected else pa.table({})
    except (pa.ArrowException, TypeError, ValueError):
        # records of mixed formats whose fields clash in type: keep each record as JSON text
        table = pa.table({"id": [r["id"] for r in selected], "rank": [r["rank"] for r in selected],
                          "score": [r["score"] for r in selected],
                          "record": [json.dumps({k: v for k, v in r.items() if k not in ("id", "rank", "score")},
                                                ensure_ascii=False) for r in selected]})
    write_parquet(table, out / "selected.parquet")


def _versions() -> dict:
    from importlib.metadata import version

    import numpy
    import torch
    import transformers

    import mona_ray

    return {"python": sys.version.split()[0], "mona_ray": getattr(mona_ray, "__version__", "0"), "torch": torch.__version__,
            "transformers": transformers.__version__, "ray": version("ray"), "numpy": numpy.__version__,
            "pyarrow": pa.__version__, "platform": platform.platform()}


def manifest(r) -> dict:
    """Everything needed to audit or reproduce the run, from its :class:`~mona_ray.pipeline.driver.RunResult`."""
    p, st, sc, cfg = r.plan, r.embedding.stats, r.scored, r.plan.cfg
    selected = r.written.selected
    fwd = st["forward_seconds"]
    src = {**r.rows.counts["source"], "rows_scored": len(sc.scores), "rows_selected": len(selected)}
    sae = p.sae
    explained = r.explain_read is not None
    return {
        "status": "complete",
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "output_dir": str(p.root),
        "run_id": p.run_id,
        "run_dir": str(p.out),
        "counts": {"source": src, "target": dict(r.rows.counts["target"]), "embedded_now": r.embedding.embedded_now,
                   "reused_from_store": r.embedding.reused},
        "invariant_rows_in_eq_scored_plus_rejected": src["rows_in"] == src["rows_scored"] + src["rows_rejected"],
        "selection": {"k": int(sc.k), "ratio": cfg.select.ratio, "count": cfg.select.count, "method": p.method,
                      "similarity": p.similarity,
                      "aggregation": dict(r.targets.aggregation) if r.targets else {"aggregate": "prototype"},
                      **({"filter": sc.filter} if sc.filter else {}),
                      **({"background": sc.background} if sc.background else {}),
                      "top_score": float(sc.top_scores[0]) if len(selected) else None,
                      "cutoff_score": float(sc.top_scores[-1]) if len(selected) else None},
        "fingerprints": {"model": p.model_fp, "sae": sae.fingerprint if sae else None, "prepared": p.prep_fp,
                         "embedding": p.embed_fp},
        "sae": asdict(sae) if sae else None,
        "hub": _hub(p.hub),
        "objects": _objects(p),
        "readout": {"name": p.readout.name, **p.readout.spec(), "width": p.width} if p.readout else None,
        "sae_provisional": bool(sae and sae.provisional),
        "embedding_store": str(p.store.root) if p.store else None,
        "compute": {"device": p.device, "dtype": p.dtype, "dtype_reason": p.dtype_reason,
                    "actor_memory_bytes": p.actor_resources.get("memory")},  # declared to Ray per embedding actor
        "units": {"prepare": r.prepared.units_run, "embed": r.embedding.units},
        "embed_rows_per_actor": dict(sorted(r.embedding.rows_per_actor.items())),
        "timings_s": {k: round(v, 3) for k, v in r.timings.items()},
        "throughput": {
            "real_tokens": st["real_tokens"], "padded_tokens": st["padded_tokens"],
            "padding_fraction": round(1 - st["real_tokens"] / st["padded_tokens"], 4) if st["padded_tokens"] else None,
            "tokens_per_s_forward": round(st["real_tokens"] / fwd, 1) if fwd else None,
            # per actor, summed over its units (read + embed + write): the steady state, start-up excluded
            "tokens_per_s_units": round(st["real_tokens"] / st["unit_seconds"], 1) if st["unit_seconds"] else None,
            "tokens_per_s_stage": round(st["real_tokens"] / r.timings["embed"], 1) if st["real_tokens"] else None,
        },
        "files": {"selected_jsonl": "selected.jsonl", "selected_parquet": "selected.parquet", "scores": "scores.parquet",
                  "rejected": "rejected.parquet", "prototype": "prototype.safetensors",
                  **({"embeddings": os.path.relpath(p.store.root, p.root)} if p.store else {}),
                  "dataset_info": "dataset_info.json", "selected_messages": "selected.messages.jsonl",
                  **({"explain": "explain.md"} if explained else {})},
        "trainer": r.written.trainer,
        "versions": _versions(),
        "config": p.cfg_dict,
        **({"explain_read": r.explain_read} if explained else {}),
        "driver_memory_mb": r.memory,
        "quarantined": r.quarantined,
    }


def _hub(resolved: dict) -> dict | None:
    """What each hub id resolved to (repository, revision, commit) and the hub settings; None
    when the run named none."""
    if not resolved:
        return None
    from ..core.hub import env_summary

    return {**{what: [x.manifest() for x in r] if isinstance(r, list) else r.manifest() for what, r in resolved.items()},
            "settings": env_summary()}


def _objects(p) -> dict | None:
    """The inputs read from object storage, per set: URL, bytes, ETag, last modified (the
    version their prepared rows are named after); None when every input is a local file."""
    from ..core.storage import is_url

    out = {role: [p.versions[f].manifest(f) for f in dict.fromkeys(u.path for u in units) if is_url(f)]
           for role, units in p.units.items()}
    return {role: objs for role, objs in out.items() if objs} or None


def _preview(rec: dict, width: int = 90) -> str:
    for key in ("instruction", "conversations", "messages"):
        v = rec.get(key)
        if isinstance(v, str) and v.strip():
            text = v
            break
        if isinstance(v, list) and v and isinstance(v[0], dict):
            text = str(v[0].get("value") or v[0].get("content") or "")
            break
    else:
        text = rec.get("record", "")
    text = " ".join(str(text).split())
    return text[: width - 1] + "…" if len(text) > width else text


def summary(m: dict, selected: list[dict], top: int = 5) -> str:
    c = m["counts"]
    src, tgt = c["source"], c["target"]
    thr = m["throughput"]
    method = m["selection"].get("method", "mona")
    mona = method in MODEL_METHODS
    agg = m["selection"].get("aggregation") or {}
    bg = m["selection"].get("background")
    how = (f"{bg['kind']}-weighted " if bg and bg["kind"] in ("idf", "contrast") else "") + f"similarity {m['selection']['similarity']}"
    if bg and bg["kind"] in ("lr", "lda"):
        how = f"score {bg['kind']} against the pool"
    if bg:
        how += f" (pool statistics from {bg['rows']:,} rows{', cached' if bg.get('cached') else ''})"
    sae = m.get("sae") or {}
    if method == "mona" and sae.get("k") and (m.get("readout") or {}).get("kind") == "sae":
        how = f"SAE {sae['hookpoint']} at K={sae['k']}, " + how
    if agg.get("aggregate", "prototype") != "prototype" or agg.get("clusters", 1) != 1:
        n = agg.get("clusters", 1)
        how += f", {agg['aggregate']}" + (f" ({n} cluster{'s' if n != 1 else ''})" if agg.get("aggregate") == "clusters"
                                          else "")
    if agg.get("mass", 1.0) < 1:
        how += f", prototype mass {agg['mass']:g}"
    if agg.get("row_mass", 1.0) < 1:
        how += f", row mass {agg['row_mass']:g}"
    lines = [
        "",
        ("MoNA selection finished" if method == "mona" else "RDS+ selection finished" if method == "rds"
         else f"Selection finished (baseline: {method})")
        + (" (PROVISIONAL SAE: see the manifest)" if m.get("sae_provisional") else ""),
        f"  source rows in      {src['rows_in']:>10,}   rejected {src['rows_rejected']:,}   scored {src['rows_scored']:,}",
        f"  target rows in      {tgt['rows_in']:>10,}   rejected {tgt['rows_rejected']:,}   (prototype from {tgt['rows_usable']:,})",
        f"  selected            {src['rows_selected']:>10,}   ("
        + (how if mona else f"method {method}") + ", "
        f"cutoff score {m['selection']['cutoff_score']:.4f})" if selected else "  selected: none",
        f"  embedded this run   {c['embedded_now']:>10,}   reused from the store {c['reused_from_store']:,}",
    ]
    filt = m["selection"].get("filter")
    if filt:  # rows a baseline scored lowest on purpose (dsir's length filter)
        lines.insert(4, f"  filtered            {filt['rows']:>10,}   scored {filt['score']}: {filt['reason']}")
    if thr["tokens_per_s_forward"]:
        lines.append(f"  throughput          {thr['tokens_per_s_stage']:>10,.0f} tokens/s (model+SAE {thr['tokens_per_s_forward']:,.0f}), "
                     f"padding {thr['padding_fraction']:.1%}")
    lines.append(f"  time                {sum(m['timings_s'].values()):>10.1f} s  " +
                 "  ".join(f"{k} {v:.1f}" for k, v in m["timings_s"].items()))
    for key in ("domain", "category"):
        vals = [r.get(key) for r in selected if isinstance(r.get(key), str)]
        if len(vals) == len(selected) and vals:
            common = Counter(vals).most_common(6)
            lines.append(f"  selected by {key:<8}" + ", ".join(f"{k} {v}" for k, v in common))
            break
    lines.append("  top examples:")
    for r in selected[:top]:
        lines.append(f"    #{r['rank']:<3} {r['score']:.4f}  {r['id'][:36]:<36}  {_preview(r)}")
    lines.append(f"  output: {m['output_dir']}/  (selected.jsonl, selected.parquet, scores.parquet, rejected.parquet, manifest.json)")
    tr = m.get("trainer") or {}
    if tr.get("file"):
        lines.append(f"  train on it: dataset_info.json -> {tr['file']} ({tr.get('formatting')}); "
                     "LLaMA-Factory: dataset_dir=<output>, dataset=" + str(tr.get("dataset")) + "; see docs/training.md")
    return "\n".join(lines)
