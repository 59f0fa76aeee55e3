"""``bench embed``: the real pipeline's embedding throughput against its ceiling and the naive way.

One run, same rows, same tokens, same device, three measurements:

1. **pipeline**: ``mona_ray.run`` (Ray Data: prepare/tokenize tasks, the embedding actor
   pool, scoring, outputs) on ``--rows`` rows of the source set plus the target set, in
   a fresh output folder. Its embedding-stage tokens/s (real tokens / stage wall time,
   actor start-up and model load included) is the number that matters;
2. **bare**: the truncated model's forward alone over the same rows in the same
   micro-batches (``forward.bare_forward``), the ceiling for stage 1 on this device.
   ``pipeline / bare`` is the figure of merit (target >= 0.85 on CPU);
3. **naive**: the full model with ``output_hidden_states=True``, fixed batches in input
   order padded to the longest row, then the same SAE encode and pooling
   (``forward.naive_embed``). ``pipeline / naive`` is the speedup. The naive codes also
   select a top-k, compared with the pipeline's selection.

The SAE is the configured one (``sae.path``); when it is not there yet, a random TopK SAE
of the same shape (9,216 latents, K=32 for the embedded model) is written to the work
folder: speed does not depend on the weights, and the report says which was used.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from importlib.resources import files
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .common import BenchError, CpuMeter, peak_rss_mb, reset_peak_rss, table

DEFAULT_SOURCE = "demo/source.parquet"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", type=int, default=128, help="source rows to embed (default: %(default)s)")
    p.add_argument("--source", default=None, help="Parquet/JSONL source file (default: the demo source set)")
    p.add_argument("--target-rows", type=int, default=16, help="target rows (default: %(default)s; 0 = all)")
    p.add_argument("--bare-repeats", type=int, default=2,
                   help="bare-forward passes (before and after the naive one), averaged (default: %(default)s)")
    p.add_argument("--naive-batch", type=int, default=16, help="fixed batch size of the naive loop (default: %(default)s)")
    p.add_argument("--skip-naive", action="store_true", help="skip the naive comparison")
    p.add_argument("--work-dir", default=None, help="where the pipeline writes (default: a fresh temporary folder)")
    p.add_argument("--random-sae-k", type=int, default=32, help="K of the stand-in SAE when none is configured")
    p.add_argument("--random-sae-latents", type=int, default=9216, help="width of the stand-in SAE")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="config overrides for the pipeline run, e.g. embed.token_budget=4096")


# ----------------------------------------------------------------------------- setup


def _sample_rows(src: str, n: int, seed: int, dest: Path, flag: str = "--source") -> int:
    path = Path(src)
    if not path.exists():
        raise BenchError(f"{flag}={src}: no such file")
    if path.suffix == ".parquet":
        t = pq.read_table(path)
    else:
        import pyarrow.json as pj

        t = pj.read_json(path)
    n = n or len(t)
    if n > len(t):
        raise BenchError(f"{'--rows' if flag == '--source' else '--target-rows'}={n}: {src} has only {len(t)} rows")
    pick = np.sort(np.random.default_rng(seed).choice(len(t), n, replace=False))
    pq.write_table(t.take(pa.array(pick)), dest)
    return len(t)


def _compose(overrides: list[str]):
    from ..config import ConfigError, load_config

    try:
        return load_config(overrides)
    except ConfigError as e:
        raise BenchError(f"bad override: {e}") from None


def _stand_in_sae(model_dir: Path, hookpoint: str, latents: int, k: int, root: Path, seed: int) -> Path:
    import torch

    from ..core.model import parse_hookpoint
    from ..core.sae import save_sparsify
    from .gpu import random_sae

    d = json.loads((model_dir / "config.json").read_text())["hidden_size"]
    sae = random_sae(d, latents, k, parse_hookpoint(hookpoint), torch.float32, "cpu", seed)
    sae.W_dec = sae.W_dec.clone()  # safetensors refuses tensors that share memory
    save_sparsify(sae, root, extra_cfg={"note": "random stand-in for bench embed"})
    return root


def _prepared(out: Path) -> list[tuple[str, pa.Table]]:
    """The pipeline's tokenized rows, target parts first (the order its embed stage uses)."""
    parts = []
    for role in ("target", "source"):
        for f in sorted(out.glob(f"prepared/*/{role}/*.parquet")):
            if not f.name.endswith(".rejected.parquet"):
                parts.append((role, pq.read_table(f, columns=["id", "content_hash", "input_ids", "pool_mask"])))
    if not parts:
        raise BenchError(f"no prepared rows under {out}/prepared: the pipeline layout changed; update bench/embed.py")
    return parts


def _units(parts) -> tuple[list[list[list[int]]], list[dict]]:
    """Group rows as the embed stage does: per prepared part, each content hash once."""
    seen, groups, rows = set(), [], []
    for role, t in parts:
        ids, masks = t.column("input_ids").to_pylist(), t.column("pool_mask").to_pylist()
        group = []
        for rid, h, x, m in zip(t.column("id").to_pylist(), t.column("content_hash").to_pylist(), ids, masks):
            if h in seen or not x:
                continue
            seen.add(h)
            group.append(x)
            rows.append({"role": role, "id": rid, "ids": x, "mask": m})
        if group:
            groups.append(group)
    return groups, rows


# ----------------------------------------------------------------------------- measurements


def run_pipeline(cfg) -> tuple[dict, float, float]:
    """Run the job with a Ray instance of its own; returns (manifest, wall s, CPU s of every process)."""
    from ..pipeline.cli import USER_ERRORS
    from ..pipeline.cli import run as run_job

    t0 = time.perf_counter()
    try:
        with CpuMeter() as cpu:
            manifest = run_job(cfg, quiet=True)
    except USER_ERRORS as e:
        raise BenchError(f"pipeline run failed: {e}") from None
    return manifest, time.perf_counter() - t0, cpu.seconds


def naive_selection(pooled, rows: list[dict], ratio: float, count) -> list[str]:
    from ..scoring import SparseRows, jaccard, prototype, selection_size, topk

    def sparse(sel):
        sub = pooled[sel]
        nz = [np.flatnonzero(r) for r in sub]
        return SparseRows.from_lists(nz, [r[i] for r, i in zip(sub, nz)])

    tgt = [i for i, r in enumerate(rows) if r["role"] == "target"]
    src = [i for i, r in enumerate(rows) if r["role"] == "source"]
    order = sorted(tgt, key=lambda i: rows[i]["id"])
    proto = prototype(sparse(order), pooled.shape[1])
    s = jaccard(sparse(src), proto)
    k = selection_size(len(src), ratio, count)
    return list(topk(s, [rows[i]["id"] for i in src], k)[1])


def _naive(model_dir, layer, dtype, device, cfg, rows, batch, pad):
    """The naive loop over the same rows: (seconds, padded tokens, CPU seconds, pooled, peak RSS)."""
    from transformers import AutoModelForCausalLM

    from ..core.sae import load_sae
    from .forward import naive_embed

    reset_peak_rss()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    sae = load_sae(str(cfg.sae.path), str(cfg.sae.format), cfg.sae.hookpoint, cfg.sae.k, device=device)
    c0 = time.process_time()
    sec, padded, pooled = naive_embed(model, layer, sae, [r["ids"] for r in rows], [r["mask"] for r in rows],
                                      batch, pad, cfg.embed.sae_chunk_tokens)
    cpu = time.process_time() - c0
    del model
    return sec, padded, cpu, pooled, peak_rss_mb()


def _setup(args) -> tuple[Path, object, Path, str, str, int]:
    """Sample the rows, compose the run's config; (work dir, cfg, model dir, SAE note, source, its rows)."""
    from ..core.model import resolve_model_path

    if args.rows < 1:
        raise BenchError(f"--rows={args.rows} must be positive")
    if args.naive_batch < 1:
        raise BenchError(f"--naive-batch={args.naive_batch} must be positive")
    if args.target_rows < 0 or args.bare_repeats < 1:
        raise BenchError("--target-rows must be >= 0 and --bare-repeats >= 1")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="mona_bench_embed_"))
    work.mkdir(parents=True, exist_ok=True)
    src = args.source or str(files("mona_ray") / "assets" / DEFAULT_SOURCE)
    src_rows = _sample_rows(src, args.rows, args.seed, work / "rows.parquet")
    overrides = [f"source.paths=[{work / 'rows.parquet'}]", f"run.output_dir={work / 'run'}", *args.overrides]
    tgt = list(_compose(overrides).target.paths)
    if len(tgt) != 1:
        raise BenchError(f"target.paths={tgt}: the benchmark samples one target file")
    _sample_rows(tgt[0], args.target_rows, args.seed, work / "targets.parquet", flag="target.paths")
    overrides.append(f"target.paths=[{work / 'targets.parquet'}]")
    cfg = _compose(overrides)
    model_dir = resolve_model_path(str(cfg.model.path))
    sae_note = "configured"
    if not Path(str(cfg.sae.path)).exists():
        sae_note = (f"random stand-in ({args.random_sae_latents} latents, K={args.random_sae_k}): "
                    f"{cfg.sae.path} missing")
        root = _stand_in_sae(model_dir, cfg.sae.hookpoint, args.random_sae_latents, args.random_sae_k,
                             work / "sae", args.seed)
        cfg = _compose(overrides + [f"sae.path={root}", "sae.format=sparsify"])
    return work, cfg, model_dir, sae_note, src, src_rows


def _references(args, cfg, model_dir: Path, groups, rows) -> dict:
    """Bare forward (warm, ``--bare-repeats`` passes around the naive one) and the naive loop."""
    import torch

    from ..core.model import load_tokenizer, load_truncated, parse_hookpoint, resolve_dtype
    from .forward import bare_forward

    threads = cfg.embed.torch_threads  # as many threads as the pipeline's single actor
    threads = max(1, os.cpu_count() or 1) if threads in (None, "auto") else int(threads)
    torch.set_num_threads(threads)
    layer = parse_hookpoint(cfg.sae.hookpoint)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = resolve_dtype(str(cfg.model.dtype), device)
    pad = load_tokenizer(model_dir).pad_token_id
    batching = (cfg.embed.token_budget, cfg.embed.max_batch_rows, cfg.embed.pad_multiple, pad)
    reset_peak_rss()
    t0 = time.perf_counter()
    lm = load_truncated(model_dir, layer, str(cfg.model.dtype), device)
    out = {"device": device, "dtype": str(dtype).replace("torch.", ""), "torch_threads": threads,
           "bare_model_load_s": time.perf_counter() - t0, "bare_runs": []}
    bare_forward(lm, [[g[0]] for g in groups], *batching)  # warm-up: one row per unit, untimed

    def bare_pass():
        c0 = time.process_time()
        sec, padded = bare_forward(lm, groups, *batching)
        out["bare_runs"].append({"s": sec, "cpu_s": time.process_time() - c0, "padded": padded})

    bare_pass()
    out["bare_peak_rss_mb"] = peak_rss_mb()
    if not args.skip_naive:
        out["naive"] = _naive(model_dir, layer, dtype, device, cfg, rows, args.naive_batch, pad)
    for _ in range(args.bare_repeats - 1):
        bare_pass()
    return out


def run(args) -> tuple[dict, str]:
    load_start = os.getloadavg()[0]
    work, cfg, model_dir, sae_note, src, src_rows = _setup(args)

    reset_peak_rss()
    manifest, wall, pipeline_cpu = run_pipeline(cfg)
    driver_rss = peak_rss_mb()
    thr, tim = manifest["throughput"], manifest["timings_s"]
    real = thr["real_tokens"]
    groups, rows = _units(_prepared(work / "run"))
    if sum(len(r["ids"]) for r in rows) != real:
        raise BenchError(f"token count mismatch: pipeline embedded {real} real tokens, the prepared rows hold "
                         f"{sum(len(r['ids']) for r in rows)} (was the embedding store reused? use a fresh --work-dir)")
    ref = _references(args, cfg, model_dir, groups, rows)
    runs = ref.pop("bare_runs")
    naive = ref.pop("naive", None)
    bare_s = float(np.mean([b["s"] for b in runs]))
    bare_cpu = float(np.mean([b["cpu_s"] for b in runs]))
    stage_tok_s = real / tim["embed"]
    res = {
        "rows_source": args.rows, "rows_embedded": len(rows), "source_file": src, "source_file_rows": src_rows,
        "sae": sae_note, **ref,
        "real_tokens": real, "pipeline_padded_tokens": thr["padded_tokens"], "padding_fraction": thr["padding_fraction"],
        "pipeline_wall_s": wall, "pipeline_cpu_s": pipeline_cpu, "pipeline_timings_s": tim,
        "pipeline_embed_s": tim["embed"], "pipeline_embed_tokens_per_s": stage_tok_s,
        "pipeline_forward_tokens_per_s": thr["tokens_per_s_forward"], "pipeline_end_to_end_tokens_per_s": real / wall,
        "pipeline_tokens_per_cpu_s": real / pipeline_cpu, "pipeline_rows_per_s": len(rows) / tim["embed"],
        "pipeline_driver_peak_rss_mb": driver_rss,
        "bare_runs": runs, "bare_s": bare_s, "bare_cpu_s": bare_cpu, "bare_padded_tokens": runs[0]["padded"],
        "bare_tokens_per_s": real / bare_s, "bare_tokens_per_cpu_s": real / bare_cpu,
        "ratio_pipeline_over_bare": stage_tok_s / (real / bare_s),
        "cpu_ratio_pipeline_over_bare": bare_cpu / pipeline_cpu,
        "ratio_actor_forward_over_bare": (thr["tokens_per_s_forward"] or 0) / (real / bare_s),
        "pipeline_units_tokens_per_s": thr["tokens_per_s_units"],
        "ratio_units_over_bare": (thr["tokens_per_s_units"] or 0) / (real / bare_s),
        "load_average_1m_start": load_start, "load_average_1m_end": os.getloadavg()[0],
    }
    if naive is not None:
        naive_s, naive_padded, naive_cpu, pooled, naive_rss = naive
        chosen = naive_selection(pooled.numpy(), rows, cfg.select.ratio, cfg.select.count)
        sel = pq.read_table(work / "run" / "selected.parquet", columns=["id"]).column("id").to_pylist()
        res.update({
            "naive_batch": args.naive_batch, "naive_s": naive_s, "naive_cpu_s": naive_cpu,
            "naive_padded_tokens": naive_padded, "naive_padding_fraction": 1 - real / naive_padded,
            "naive_tokens_per_s": real / naive_s, "naive_tokens_per_cpu_s": real / naive_cpu,
            "naive_peak_rss_mb": naive_rss,
            "speedup_pipeline_over_naive": stage_tok_s / (real / naive_s),
            "cpu_speedup_pipeline_over_naive": naive_cpu / pipeline_cpu,
            "speedup_bare_over_naive": naive_s / bare_s, "cpu_speedup_bare_over_naive": naive_cpu / bare_cpu,
            "naive_selection_overlap": len(set(chosen) & set(sel)) / max(1, len(sel)),
            "naive_selection_identical": chosen == sel,
        })
    report = {"params": dict(vars(args)), "work_dir": str(work), "result": res}
    return report, _text(res)


def _text(r: dict) -> str:
    lines = [f"embed: {r['rows_embedded']} rows ({r['rows_source']} source + targets), {r['real_tokens']:,} real tokens, "
             f"{r['dtype']} on {r['device']} ({r['torch_threads']} threads); SAE: {r['sae']}; "
             f"load average {r['load_average_1m_start']:.1f} -> {r['load_average_1m_end']:.1f}"]
    real = r["real_tokens"]
    rows = [{"what": "pipeline, embed stage (Ray actor pool, incl. start-up)", "sec": r["pipeline_embed_s"],
             "tok_s": r["pipeline_embed_tokens_per_s"], "pad": r["padding_fraction"], "rss": r["pipeline_driver_peak_rss_mb"]},
            {"what": "pipeline, inside the actor (units: read+embed+write, no start-up)",
             "sec": real / r["pipeline_units_tokens_per_s"] if r["pipeline_units_tokens_per_s"] else None,
             "tok_s": r["pipeline_units_tokens_per_s"]},
            {"what": "pipeline, end to end (Ray start..outputs; CPU of all processes)", "sec": r["pipeline_wall_s"],
             "tok_s": r["pipeline_end_to_end_tokens_per_s"], "cpu": r["pipeline_cpu_s"],
             "tok_cpu": r["pipeline_tokens_per_cpu_s"]},
            {"what": "bare truncated forward, same micro-batches", "sec": r["bare_s"], "tok_s": r["bare_tokens_per_s"],
             "pad": 1 - real / r["bare_padded_tokens"], "rss": r["bare_peak_rss_mb"], "cpu": r["bare_cpu_s"],
             "tok_cpu": r["bare_tokens_per_cpu_s"]}]
    if "naive_s" in r:
        rows.append({"what": f"naive: full model, hidden_states, batch {r['naive_batch']}", "sec": r["naive_s"],
                     "tok_s": r["naive_tokens_per_s"], "pad": r["naive_padding_fraction"], "rss": r["naive_peak_rss_mb"],
                     "cpu": r["naive_cpu_s"], "tok_cpu": r["naive_tokens_per_cpu_s"]})
    lines.append(table(rows, [("what", "path"), ("sec", "wall s"), ("tok_s", "tokens/s"), ("cpu", "CPU s"),
                              ("tok_cpu", "tokens/CPU s"), ("pad", "padding"), ("rss", "peak RSS MB")]))
    lines.append(f"pipeline / bare: {r['ratio_pipeline_over_bare']:.3f} in wall time (embed stage), "
                 f"{r['cpu_ratio_pipeline_over_bare']:.3f} in CPU time (whole job), {r['ratio_units_over_bare']:.3f} "
                 f"inside the actor (start-up excluded)   rows/s = {r['pipeline_rows_per_s']:.2f}")
    if "naive_s" in r:
        lines.append(f"speedup over naive: pipeline {r['speedup_pipeline_over_naive']:.2f}x wall, "
                     f"{r['cpu_speedup_pipeline_over_naive']:.2f}x CPU; bare forward {r['speedup_bare_over_naive']:.2f}x "
                     f"wall, {r['cpu_speedup_bare_over_naive']:.2f}x CPU; naive selection overlap with the pipeline's "
                     f"{r['naive_selection_overlap']:.0%} (identical: {'yes' if r['naive_selection_identical'] else 'no'})")
    return "\n".join(lines)
