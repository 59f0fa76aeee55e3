"""``bench width``: the paper's SAE width (131,072 latents, K=192) where a CPU can measure it.

The model pass at that width is measured by ``bench pipeline --latents 131072 --sae-k 192``
(the whole job, a tiny model). This benchmark measures what a wide SAE changes after the
model: how dense the stored rows are, what they cost to store, read, score and explain,
and which encoding of the store is cheapest for the same selection. Three phases:

* ``density``: the shipped SmolLM2 SAE (9,216 latents, K=64) on the demo rows, token by token
  through the feature engine (its ``token_hook``): per row, the pooled tokens T and the
  distinct latents D, and how D grows with the prefix length t. A pooled row holds at most
  ``min(T*K, L)`` non-zeros; D grows sublinearly because a row's tokens fire the same latents
  again. Projected to L=131,072 and K=192 three ways, per demo row (:func:`project`):
  ``low`` (the fraction of firings that are new latents stays what it is at 9,216, where the
  smaller latent space saturates: D x 192/64), ``high`` (the growth law fitted where the
  9,216-latent rows are not yet saturated, D = a (tK)^b, applied with K=192 and saturated in
  131,072 latents) and ``ceiling`` (min(T*K, L): every firing a new latent).
* ``store``: synthetic rows (``bench.synth``, 131,072 latents) at the projected low and high
  densities, written as store parts of ``--part-rows`` rows by the store's own writer
  (``features.store.rows_table`` + ``write_store_part``) in each ``--encodings`` variant, then
  read back (``core.io.read_parquet``), scored by the score stage's task function
  (``pipeline.stages.score_parts``, without Ray) with a running top-k, and the top
  ``--ratio`` explained as the explain step does (``FeatureStore.iter_read`` + ``explain_row``).
  Every variant's selection is compared with ``int32-f32`` (today's encoding): the top-k ids
  and the scores. Costs are per row and projected linearly to 1M rows (every stage works
  part by part).
* ``encode``: the feature engine's row-by-row SAE encode against a batched one (all pooled
  tokens of a micro-batch in one GEMM, chunked at ``sae_chunk_tokens``) on the bench
  pipeline's tiny model with a 131,072-latent SAE: time per row and whether the pooled rows
  are bitwise equal.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from .common import DEFAULT_OUT_DIR, BenchError, check_positive, peak_rss_mb, reset_peak_rss, table

PHASES = ("density", "store", "encode")
DEFAULT_WORK_DIR = DEFAULT_OUT_DIR / "width_work"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--phases", default=",".join(PHASES), help="comma-separated phases (default: %(default)s)")
    p.add_argument("--latents", type=int, default=131072, help="the wide SAE's latents (default: %(default)s)")
    p.add_argument("--sae-k", type=int, default=192, help="the wide SAE's K (default: %(default)s)")
    p.add_argument("--demo-rows", type=int, default=144, help="demo rows for the density phase (default: %(default)s)")
    p.add_argument("--layer", type=int, default=28, help="shipped SAE's block for the density phase (default: %(default)s)")
    p.add_argument("--tokens", type=float, default=303.0,
                   help="mean pooled tokens per row the projection is also given at (default: %(default)s, "
                        "bench pipeline's OpenHermes-shaped rows)")
    p.add_argument("--nnz", default="",
                   help="comma-separated non-zeros per row for the store phase (default: the density phase's low "
                        "and high projections; required when the density phase is not run)")
    p.add_argument("--store-rows", type=int, default=8192, help="rows written per density and encoding (default: %(default)s)")
    p.add_argument("--part-rows", type=int, default=256, help="rows per store part (default: %(default)s, embed.rows_per_unit)")
    p.add_argument("--pool-rows", type=int, default=2048, help="distinct synthetic rows (default: %(default)s)")
    p.add_argument("--encodings", default=",".join(ENCODINGS), help="store encodings compared (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each store measurement; the best is reported (default: %(default)s)")
    p.add_argument("--ratio", type=float, default=0.05, help="share selected and explained (default: %(default)s)")
    p.add_argument("--project-rows", type=int, default=1_000_000, help="rows the costs are projected to (default: %(default)s)")
    p.add_argument("--encode-rows", type=int, default=48, help="rows for the encode phase (default: %(default)s)")
    p.add_argument("--hidden", type=int, default=64, help="tiny model width for the encode phase (default: %(default)s)")
    p.add_argument("--work-dir", default=None, help=f"scratch folder (default: {DEFAULT_WORK_DIR}); parts are removed")
    p.add_argument("--seed", type=int, default=0)


# ----------------------------------------------------------------------------- density (the shipped SAE's rows)

GRID = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def token_codes(layer: int, n_rows: int, seed: int) -> tuple[list[np.ndarray], int, int]:
    """The shipped SAE's token codes on ``n_rows`` demo rows, as the pipeline computes them (chat
    template, ``max_length`` 512, special tokens not pooled, float32): per row, its pooled
    tokens' latent indices ``[T, K]`` in token order; and the SAE's latents and K."""
    import pyarrow.parquet as pq
    import torch
    from importlib.resources import files

    from ..config.schema import SHIPPED_SAE
    from ..core.model import ensure_embedded_model, load_tokenizer, load_truncated
    from ..core.records import normalize_record
    from ..core.render import render, tokenize_many
    from ..core.sae import load_sae
    from ..features.engine import Batching, FeatureEngine
    from ..features.readouts import Readout

    model_dir = ensure_embedded_model()
    tok = load_tokenizer(model_dir)
    t = pq.read_table(files("mona_ray") / "assets" / "demo" / "source.parquet").to_pylist()
    pick = np.sort(np.random.default_rng(seed).choice(len(t), min(n_rows, len(t)), replace=False))
    pairs = tokenize_many([render(normalize_record({k: t[i][k] for k in ("instruction", "input", "output")}), tok)
                           for i in pick], tok, 512, "special")
    lm = load_truncated(model_dir, layer, "float32", "cpu")
    sae = load_sae(str(files("mona_ray") / "assets" / SHIPPED_SAE), "sparsify", f"layers.{layer}", None,
                   dtype=lm.dtype)
    codes: dict[int, list] = {}

    def hook(_r, rows, positions, _vals, idx):
        for b, p, row in zip(rows, positions, idx.cpu().numpy()):
            codes.setdefault(b, []).append((p, row))

    engine = FeatureEngine(lm, [Readout("sae", layer, "special", k=sae.k, sae="shipped")], Batching(),
                           tok.pad_token_id, saes={"shipped": sae}, token_hook=hook)
    with torch.inference_mode():
        engine.run([p[0] for p in pairs], {"special": [p[1] for p in pairs]})
    out = [np.stack([r for _, r in sorted(codes[b], key=lambda x: x[0])]) for b in sorted(codes)]
    return out, sae.num_latents, int(sae.k)


def distinct_curve(codes: np.ndarray, grid=GRID) -> dict[int, int]:
    """Distinct latents among a row's first t pooled tokens, for each t of ``grid`` up to T."""
    first = {}
    for t, row in enumerate(codes, 1):
        for j in row.tolist():
            first.setdefault(j, t)
    at = np.sort(np.fromiter(first.values(), np.int64, len(first)))
    return {g: int(np.searchsorted(at, g, side="right")) for g in grid if g <= len(codes)}


def project(T: np.ndarray, D: np.ndarray, fit: tuple[float, float], L: int, K: int, L2: int, K2: int) -> dict:
    """Per row (its T pooled tokens, D distinct latents at L latents and K), the non-zeros it would
    have at ``L2`` latents and ``K2``: ``low`` (D x K2/K: the fraction of firings that are new
    latents as measured, saturation at L included), ``high`` (the unsaturated growth law
    ``D = a (tK)^b``, at ``tK2``, then saturated in L2: ``L2 (1 - exp(-D/L2))``), ``ceiling``
    (min(T K2, L2))."""
    a, b = fit
    low = np.minimum(D * (K2 / K), np.minimum(T * K2, L2))
    law = np.minimum(a * (T * float(K2)) ** b, T * K2)
    high = L2 * -np.expm1(-law / L2)
    ceiling = np.minimum(T * K2, L2)
    return {"low": float(low.mean()), "high": float(high.mean()), "ceiling": float(ceiling.mean()),
            "low_density": float(low.mean() / L2), "high_density": float(high.mean() / L2)}


def density(args) -> dict:
    t0 = time.perf_counter()
    codes, L, K = token_codes(args.layer, args.demo_rows, args.seed)
    T = np.array([len(c) for c in codes], np.float64)
    curves = [distinct_curve(c) for c in codes]
    D = np.array([len(np.unique(c)) for c in codes], np.float64)
    curve = {g: float(np.mean([c[g] for c in curves if g in c])) for g in GRID if any(g in c for c in curves)}
    # the growth law where a row has used under a tenth of the latents: the width is not yet in the way
    pts = [(g * K, c[g]) for c in curves for g in GRID if g in c and c[g] < 0.1 * L]
    x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    b, log_a = np.polyfit(x, y, 1)
    fit = (float(np.exp(log_a)), float(b))
    per_row = project(T, D, fit, L, K, args.latents, args.sae_k)
    # at --tokens: the mean distinct count of the rows' prefixes of that length (log-log interpolation;
    # past the longest prefix measured, the last two points' slope goes on)
    g = np.log(np.array(sorted(curve), np.float64))
    d = np.log([curve[x] for x in sorted(curve)])
    x = np.log(args.tokens)
    slope = (d[-1] - d[-2]) / (g[-1] - g[-2]) if len(g) > 1 else 1.0
    d_at = float(np.exp(np.interp(x, g, d) if x <= g[-1] else d[-1] + slope * (x - g[-1])))
    at_T = project(np.array([args.tokens]), np.array([d_at]), fit, L, K, args.latents, args.sae_k)
    return {"shipped_sae": {"layer": args.layer, "latents": L, "k": K}, "rows": len(codes),
            "pooled_tokens_mean": float(T.mean()), "pooled_tokens_median": float(np.median(T)),
            "nnz_mean": float(D.mean()), "nnz_median": float(np.median(D)), "density_mean": float(D.mean() / L),
            "nnz_over_tK_mean": float(np.mean(D / (T * K))),
            "distinct_by_prefix": {str(g): v for g, v in curve.items()},
            "growth_law": {"a": fit[0], "b": fit[1], "points": len(pts), "where": "t*K firings, rows under 10% of the latents"},
            "projection_per_row": per_row, "projection_at_tokens": {"tokens": args.tokens, "nnz_at_shipped_width": d_at, **at_T},
            "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- store, score, explain

def _encodings() -> dict[str, tuple[dict, str]]:
    """Name -> (the Parquet layout passed to ``write_store_part``, the values' dtype)."""
    from ..features.store import PART_ENCODING

    delta = {"use_dictionary": PART_ENCODING["use_dictionary"],
             "column_encoding": {"indices.list.element": "DELTA_BINARY_PACKED"}}
    return {"int32-f32": ({}, "float32"),  # Parquet's default layout: what every store was written in before
            "delta-f32": (delta, "float32"),
            "delta-bss-f32": (PART_ENCODING, "float32"),
            "delta-bss-f32-zstd3": ({**PART_ENCODING, "compression_level": 3}, "float32"),
            "int32-f16": ({}, "float16"),  # embed.value_dtype=float16 as it was
            "delta-bss-f16": (PART_ENCODING, "float16")}


ENCODINGS = ("int32-f32", "delta-f32", "delta-bss-f32", "delta-bss-f32-zstd3", "int32-f16", "delta-bss-f16")
BASE = "int32-f32"
# each reported as the best of --repeats runs, wall and CPU seconds
STAGES = ("write_s", "read_s", "score_s", "explain_s", "write_cpu_s", "read_cpu_s", "score_cpu_s", "explain_cpu_s")


def _column_bytes(paths: list[str]) -> dict[str, int]:
    import pyarrow.parquet as pq

    out: dict[str, int] = {}
    for p in paths:
        md = pq.ParquetFile(p).metadata
        for g in range(md.num_row_groups):
            for c in range(md.num_columns):
                col = md.row_group(g).column(c)
                name = col.path_in_schema.split(".")[0]
                out[name] = out.get(name, 0) + col.total_compressed_size
    return out


def _timed(fn, cpu: dict, stage: str):
    """(result, wall s, peak RSS MB of this process while ``fn`` ran); its CPU s into ``cpu[stage]``
    (on a shared machine, CPU time moves far less than wall time)."""
    reset_peak_rss()
    t0, c0 = time.perf_counter(), time.process_time()
    r = fn()
    cpu[stage] = time.process_time() - c0
    return r, time.perf_counter() - t0, peak_rss_mb()


def store_one(nnz: int, blocks: list, proto: np.ndarray, folder: Path, enc: str, args) -> dict:
    """Write ``blocks`` (the same rows for every encoding) as store parts in ``enc``, read them
    back, score them as the score stage does and explain the top ``--ratio``."""
    import pyarrow as pa

    from ..core.io import read_parquet
    from ..features.interpret import explain_row, strongest_latents
    from ..features.store import FeatureStore, rows_table, write_store_part
    from ..pipeline.stages import score_parts
    from ..scoring import RunningTopK, selection_size
    from ..scoring.table import scored_rows

    layout, vdt = _encodings()[enc]
    cpu: dict[str, float] = {}
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    n = sum(len(b[0]) for b in blocks)

    def write():
        for j, (ids, rows) in enumerate(blocks):
            outs = [(rows.indices[rows.indptr[i]:rows.indptr[i + 1]], rows.values[rows.indptr[i]:rows.indptr[i + 1]])
                    for i in range(len(ids))]
            t = rows_table(ids, [int(args.tokens)] * len(ids), [int(args.tokens)] * len(ids), outs, vdt)
            write_store_part(t, folder / f"part-{j:06d}.parquet", layout)

    _, write_s, write_mb = _timed(write, cpu, "write_cpu_s")
    store = FeatureStore(folder)
    store.index()  # the pipeline indexes the store once, before scoring
    paths = [str(p) for p in store.parts()]
    nbytes = sum(Path(p).stat().st_size for p in paths)
    cols = _column_bytes(paths)

    def read():
        return sum(len(read_parquet(p, ["content_hash", "n_pooled", "indices", "values"])) for p in paths)

    got, read_s, read_mb = _timed(read, cpu, "read_cpu_s")
    assert got == n
    k = selection_size(n, args.ratio)
    protos = proto[None, :]

    def score():  # one score task per part here; the pipeline groups parts into tasks of >= 4,096 rows
        top = RunningTopK(k)
        for j, p in enumerate(paths):
            ids = blocks[j][0]
            batch = pa.table({"id": pa.array(ids, pa.string()), "row_at": pa.array(np.arange(len(ids)), pa.int64()),
                              "content_hash": pa.array(ids, pa.string()), "part": pa.array(np.zeros(len(ids), np.int32))})
            t = score_parts(batch, protos, [p], "jaccard", "mean", 4096)
            top.add(t.column("score").to_numpy(), t.column("id").to_numpy(zero_copy_only=False))
        return top.result()

    (top_s, top_ids), score_s, score_mb = _timed(score, cpu, "score_cpu_s")
    top_set = {int(x) for x in strongest_latents(proto)}

    def explain():
        lines = 0
        for t in store.iter_read(pa.array(list(top_ids), pa.string()), ["indices", "values"]):
            X = scored_rows(t, False)
            for j, h in enumerate(t.column("content_hash").to_pylist()):
                a, b = X.indptr[j], X.indptr[j + 1]
                json.dumps(explain_row(h, X.indices[a:b], X.values[a:b], proto, top_set))
                lines += 1
        return lines

    explained, explain_s, explain_mb = _timed(explain, cpu, "explain_cpu_s")
    assert explained == len(top_ids)
    shutil.rmtree(folder, ignore_errors=True)
    return {"encoding": enc, "value_dtype": vdt, "layout": {k: v for k, v in layout.items()}, "rows": n,
            "nnz_per_row": None, "bytes_per_row": nbytes / n, "column_bytes_per_row": {c: b / n for c, b in cols.items()},
            "write_s": write_s, "read_s": read_s, "score_s": score_s, "explain_s": explain_s, **cpu, "explained": explained,
            "peak_rss_mb": {"write": write_mb, "read": read_mb, "score": score_mb, "explain": explain_mb},
            "_top": (top_s, list(top_ids))}


def store(args, nnz_list: list[int]) -> list[dict]:
    from .synth import Generator, RowPool, SynthSpec, prototype_from

    work = Path(args.work_dir) if args.work_dir else DEFAULT_WORK_DIR
    encs = [e.strip() for e in args.encodings.split(",") if e.strip()]
    if BASE not in encs:
        encs.insert(0, BASE)
    out = []
    for nnz in nnz_list:
        t0 = time.perf_counter()
        gen = Generator(SynthSpec(num_latents=args.latents, nnz=int(nnz), k=args.sae_k, seed=args.seed))
        pool = RowPool(gen, args.pool_rows, seed=args.seed + 2)
        rng = np.random.default_rng(args.seed + 3)
        blocks, at = [], 0
        while at < args.store_rows:
            m = min(args.part_rows, args.store_rows - at)
            blocks.append(([f"{i:016x}" for i in range(at, at + m)], pool.block(m, rng)))
            at += m
        draw_s = time.perf_counter() - t0
        real_nnz = sum(len(b[1].indices) for b in blocks) / args.store_rows
        res = {}
        for rep in range(args.repeats):  # the encodings interleaved, each repeat in the same order
            for enc in encs:
                vdt = _encodings()[enc][1]
                proto = prototype_from(gen, 100, value_dtype=np.float16 if vdt == "float16" else np.float32)
                r = store_one(nnz, blocks, proto, work / f"store-{nnz}-{enc}", enc, args)
                r["nnz_per_row"] = real_nnz
                if enc not in res:
                    res[enc] = {**r, **{f"{s}_runs": [r[s]] for s in STAGES}}
                else:
                    assert res[enc]["_top"][1] == r["_top"][1]  # a repeat selects the same rows
                    for s in STAGES:
                        res[enc][f"{s}_runs"].append(r[s])
                        res[enc][s] = min(res[enc][s], r[s])
        base_s, base_ids = res[BASE].pop("_top")
        for enc, r in res.items():
            if enc == BASE:
                continue
            s, ids = r.pop("_top")
            pos = {x: i for i, x in enumerate(base_ids)}
            same = [i for i, x in enumerate(ids) if x in pos]
            r["selection_vs_" + BASE] = {
                "ids_identical_in_order": list(ids) == list(base_ids),
                "overlap": len(same) / len(base_ids),
                "max_abs_score_diff": float(np.max(np.abs(np.asarray(s)[same] - np.asarray(base_s)[[pos[ids[i]] for i in same]])))
                if same else None}
        for r in res.values():
            r["bytes_saved_vs_" + BASE] = 1 - r["bytes_per_row"] / res[BASE]["bytes_per_row"]
        out.append({"nnz_target": int(nnz), "nnz_per_row": real_nnz, "density": real_nnz / args.latents,
                    "draw_s": draw_s, "encodings": list(res.values())})
    return out


def projection(st: list[dict], rows: int) -> list[dict]:
    """Each measured cost per row, times ``rows`` (every stage is linear: part by part)."""
    out = []
    for s in st:
        for r in s["encodings"]:
            n = r["rows"]
            out.append({"nnz_per_row": s["nnz_per_row"], "encoding": r["encoding"], "rows": rows,
                        "store_gb": r["bytes_per_row"] * rows / 1e9,
                        "write_s": r["write_s"] / n * rows, "read_s": r["read_s"] / n * rows,
                        "score_s": r["score_s"] / n * rows,
                        "explain_s": r["explain_s"] / n * rows,  # the top ratio of rows, as at n
                        **{k: r[k] / n * rows for k in STAGES if k.endswith("_cpu_s")}})
    return out


# ----------------------------------------------------------------------------- encode: row by row vs batched

def _batched_engine_class():
    from ..features.engine import FeatureEngine

    class BatchedEncode(FeatureEngine):
        """The feature engine with its SAE encode batched: the pooled tokens of a whole micro-batch,
        whatever row they belong to, ``sae_chunk_tokens`` per call (the alternative to the
        row-by-row rule, measured here, not used by the product)."""

        def _chunks(self, seg, B):
            step = max(1, int(self.b.sae_chunk_tokens))
            for a in range(0, len(seg), step):
                yield a, min(a + step, len(seg))

    return BatchedEncode


def encode(args) -> dict:
    """Row-by-row (the product) against batched SAE encode, same rows, same micro-batches."""
    import pyarrow.parquet as pq
    import torch
    from importlib.resources import files

    from ..core.model import load_tokenizer, load_truncated
    from ..core.records import normalize_record
    from ..core.render import render, tokenize_many
    from ..core.sae import load_sae
    from ..features.engine import Batching, FeatureEngine, micro_batches, pad_batch
    from ..features.readouts import Readout
    from .pipeline import random_sae, tiny_model

    work = (Path(args.work_dir) if args.work_dir else DEFAULT_WORK_DIR).expanduser().resolve()
    layers = 4
    model_dir = tiny_model(work, args.hidden, layers, args.seed)
    sae_dir = random_sae(work, args.hidden, args.latents, args.sae_k, f"layers.{layers - 2}", args.seed)
    tok = load_tokenizer(model_dir)
    t = pq.read_table(files("mona_ray") / "assets" / "demo" / "source.parquet").to_pylist()[:args.encode_rows]
    pairs = tokenize_many([render(normalize_record({k: r[k] for k in ("instruction", "input", "output")}), tok)
                           for r in t], tok, 512, "special")
    ids, masks = [p[0] for p in pairs], {"special": [p[1] for p in pairs]}
    lm = load_truncated(model_dir, layers - 2, "float32", "cpu")
    sae = load_sae(str(sae_dir), "sparsify", f"layers.{layers - 2}", None, dtype=lm.dtype)
    readout = Readout("sae", layers - 2, "special", k=sae.k, sae="wide")
    b = Batching()
    out = {"rows": len(ids), "tokens": sum(len(x) for x in ids), "pooled_tokens": sum(map(sum, masks["special"])),
           "sae": {"latents": sae.num_latents, "k": sae.k, "d_in": sae.d_in}, "torch_threads": torch.get_num_threads()}
    results = {}
    for name, cls in (("row_by_row", FeatureEngine), ("batched", _batched_engine_class())):
        eng = cls(lm, [readout], b, tok.pad_token_id, saes={"wide": sae})
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            res = eng.run(ids, masks)
            times.append(time.perf_counter() - t0)
        eng.close()
        results[name] = res.outputs[readout.name]
        out[name + "_s"] = times
    # the bare forward over the same micro-batches: what is left is the SAE stage (encode, TopK, pooling)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for mb in micro_batches([len(x) for x in ids], b.token_budget, b.max_batch_rows, b.pad_multiple):
            inp, att, _ = pad_batch(ids, mb, b.pad_multiple, tok.pad_token_id)
            lm(inp, att)
    out["forward_s"] = time.perf_counter() - t0
    a, c = results["row_by_row"], results["batched"]
    out["bitwise_equal"] = all(np.array_equal(x[0], y[0]) and np.array_equal(x[1].view(np.uint32), y[1].view(np.uint32))
                               for x, y in zip(a, c))
    out["rows_differing"] = sum(not (np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1])) for x, y in zip(a, c))
    out["max_abs_diff"] = max(float(np.abs(x[1] - y[1]).max()) if np.array_equal(x[0], y[0]) else float("inf")
                              for x, y in zip(a, c))
    out["nnz_per_row"] = float(np.mean([len(x[0]) for x in a]))
    best = min(out["row_by_row_s"])
    out["sae_share_of_row_by_row"] = max(0.0, 1 - out["forward_s"] / best)
    out["batched_over_row_by_row"] = min(out["batched_s"]) / best
    return out


# ----------------------------------------------------------------------------- the run

def _check(args) -> list[str]:
    phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    for ph in phases:
        if ph not in PHASES:
            raise BenchError(f"--phases: unknown {ph!r}; use any of {', '.join(PHASES)}")
    if not 1 <= args.sae_k <= args.latents:
        raise BenchError(f"--sae-k={args.sae_k} must be in [1, --latents={args.latents}]")
    check_positive(args, ("repeats", "demo_rows", "store_rows", "part_rows", "pool_rows", "encode_rows", "project_rows"),
                   within=("part_rows", "pool_rows"))
    for e in args.encodings.split(","):
        if e.strip() and e.strip() not in ENCODINGS:
            raise BenchError(f"--encodings: unknown {e.strip()!r}; use any of {', '.join(ENCODINGS)}")
    if "store" in phases and "density" not in phases and not args.nnz.strip():
        raise BenchError("--nnz is needed when the density phase is not run")
    return phases


def _nnz(text: str) -> list[int]:
    try:
        return [int(float(x)) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BenchError(f"--nnz={text!r}: expected comma-separated integers") from None


def run(args) -> tuple[dict, str]:
    phases = _check(args)
    nnz = _nnz(args.nnz)
    for x in nnz:
        if not 0 < x < args.latents:
            raise BenchError(f"--nnz={x} must be between 1 and --latents - 1")
    report: dict = {"params": dict(vars(args))}
    lines = []
    if "density" in phases:
        d = report["density"] = density(args)
        p, q = d["projection_per_row"], d["projection_at_tokens"]
        lines.append(f"density: shipped SAE layers.{d['shipped_sae']['layer']} ({d['shipped_sae']['latents']:,} latents, "
                     f"K={d['shipped_sae']['k']}) on {d['rows']} demo rows: T {d['pooled_tokens_mean']:.0f} pooled tokens, "
                     f"{d['nnz_mean']:,.0f} non-zeros ({d['density_mean']:.1%}); growth D = {d['growth_law']['a']:.2f} "
                     f"(tK)^{d['growth_law']['b']:.3f}")
        lines.append(f"  projected to {args.latents:,} x K={args.sae_k}, per demo row: low {p['low']:,.0f} "
                     f"({p['low_density']:.1%}), high {p['high']:,.0f} ({p['high_density']:.1%}), ceiling {p['ceiling']:,.0f}; "
                     f"at T={q['tokens']:.0f}: low {q['low']:,.0f}, high {q['high']:,.0f}, ceiling {q['ceiling']:,.0f}")
        if not nnz:
            nnz = [int(round(q["low"])), int(round(q["high"]))]
    if "store" in phases:
        st = report["store"] = store(args, nnz)
        report["projection"] = projection(st, args.project_rows)
        rows = [{"nnz": s["nnz_per_row"], "enc": r["encoding"], "bpr": r["bytes_per_row"],
                 "saved": r["bytes_saved_vs_" + BASE], "w": r["write_cpu_s"], "r": r["read_cpu_s"], "s": r["score_cpu_s"],
                 "e": r["explain_cpu_s"], "sel": "-" if r["encoding"] == BASE else
                 ("identical" if r["selection_vs_" + BASE]["ids_identical_in_order"] else
                  f"overlap {r['selection_vs_' + BASE]['overlap']:.4f}, max diff {r['selection_vs_' + BASE]['max_abs_score_diff']:.1e}"),
                 "mem": max(r["peak_rss_mb"].values())}
                for s in st for r in s["encodings"]]
        lines.append(f"store: {args.store_rows:,} synthetic rows per density, parts of {args.part_rows}, {args.latents:,} latents")
        lines.append(table(rows, [("nnz", "nnz/row"), ("enc", "encoding"), ("bpr", "bytes/row"), ("saved", "saved"),
                                  ("w", "write CPU s"), ("r", "read CPU s"), ("s", "score CPU s"),
                                  ("e", "explain CPU s"), ("sel", "selection vs int32-f32"), ("mem", "peak RSS MB")]))
        pr = [{"nnz": x["nnz_per_row"], "enc": x["encoding"], "gb": x["store_gb"], "w": x["write_cpu_s"],
               "r": x["read_cpu_s"], "s": x["score_cpu_s"], "e": x["explain_cpu_s"]} for x in report["projection"]]
        lines.append(f"projected to {args.project_rows:,} rows (one process; the pipeline spreads write, score across workers)")
        lines.append(table(pr, [("nnz", "nnz/row"), ("enc", "encoding"), ("gb", "store GB"), ("w", "write CPU s"),
                                ("r", "read CPU s"), ("s", "score CPU s"), ("e", "explain CPU s")]))
    if "encode" in phases:
        e = report["encode"] = encode(args)
        lines.append(f"encode: {e['rows']} demo rows ({e['pooled_tokens']:,} pooled tokens), tiny model h{args.hidden}, "
                     f"SAE {e['sae']['latents']:,} x K={e['sae']['k']}: row by row {min(e['row_by_row_s']):.2f} s, batched "
                     f"{min(e['batched_s']):.2f} s ({e['batched_over_row_by_row']:.2f}x), bare forward {e['forward_s']:.2f} s; "
                     f"SAE stage {e['sae_share_of_row_by_row']:.0%} of the engine; bitwise equal: "
                     f"{e['bitwise_equal']} ({e['rows_differing']} rows differ, max |diff| {e['max_abs_diff']:.1e})")
    return report, "\n".join(lines)
