"""``bench score``: Jaccard scoring + top-k of N synthetic sparse rows, streamed block by block.

For each N (default 10k, 100k, 1M) the rows arrive in blocks of ``--block-rows`` as a
Parquet reader would hand them over (two Arrow ``list`` columns plus string ids); each
block is turned into CSR (``SparseRows.from_arrow``), scored against the target
prototype and fed to a running top-k (``scoring.RunningTopK``), so memory is one block
plus O(k), whatever N. Reported per N: seconds per stage, rows/s and peak RSS.

Two extra measurements on the same data:

* ``kernels``: the straightforward Jaccard (:func:`reference_jaccard`) against the cache-blocked
  ``kernels.jaccard`` (``scoring.jaccard``) on the same blocks: time per block and whether every
  score is bitwise equal;
* ``float16``: a fresh realistic sample stored with float16 values (targets included)
  against float32: is the top-``ratio`` selection identical, and how much overlaps.

``aggregations`` (issue 14): at each N, the same blocks scored with ``scoring.similarity.pairwise``
against all ``--targets`` target rows (``round_robin``), ``--clusters`` cluster prototypes
(``clusters``: allocation by size, ``clusters_best``: best-cluster ranking) or the one
prototype with a support-bias fix (``-sparse50``, ``-idf``). For per-list aggregations each
of ``--agg-tasks`` simulated scoring tasks keeps per list its top-k
(``aggregations.PerTargetTopK``); the driver merges them (``aggregations.merge_candidates``) and
interleaves (``scoring.round_robin.round_robin``). Jaccard against dense lists costs O(lists x nnz) per
row, so ``round_robin:jaccard`` and ``clusters:jaccard`` run only up to ``--jaccard-max-rows``.
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager

import numpy as np
import pyarrow as pa

from .. import scoring
from ..scoring import kernels
from ..scoring.clusters import cluster_prototypes
from ..scoring.cuts import sparsify_prototype
from ..scoring.round_robin import round_robin
from ..scoring.similarity import pairwise
from ..scoring.sparse import SparseRows, segment_sum
from . import aggregations
from .common import BenchError, Stages, check_positive, peak_rss_mb, reset_peak_rss, table
from .synth import Generator, RowPool, SynthSpec, prototype_from



def reference_jaccard(rows: SparseRows, proto: np.ndarray) -> np.ndarray:
    """The straightforward generalized Jaccard, three float64 temporaries the size of the block
    (the gathered prototype, the cast values, their minimum): what the cache-blocked
    ``kernels.jaccard`` is timed against, and equals bit for bit (``tests/test_kernels.py``)."""
    s_min = segment_sum(np.minimum(rows.values.astype(np.float64), proto[rows.indices]), rows.indptr)
    return kernels.ratio(s_min, segment_sum(rows.values, rows.indptr), float(proto.sum()))


KERNELS = {"fast": kernels.jaccard, "reference": reference_jaccard}
AGGREGATIONS = ("prototype:jaccard-sparse50", "prototype:jaccard-idf", "clusters_best:jaccard-sparse50",
                "clusters:jaccard-sparse50", "clusters:cosine", "clusters:jaccard", "round_robin:cosine",
                "round_robin:cosine-f32", "round_robin:jaccard")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated row counts (default: %(default)s)")
    p.add_argument("--block-rows", type=int, default=8192, help="rows per streamed block (default: %(default)s)")
    p.add_argument("--latents", type=int, default=9216, help="SAE width (default: %(default)s, the embedded SAE)")
    p.add_argument("--nnz", type=int, default=4100,
                   help="mean non-zeros per row (default: %(default)s, as the shipped SmolLM2 SAE gives on the demo)")
    p.add_argument("--sae-k", type=int, default=64, help="per-token TopK of the simulated SAE (default: %(default)s)")
    p.add_argument("--targets", type=int, default=100, help="target rows in the prototype (default: %(default)s)")
    p.add_argument("--ratio", type=float, default=0.05, help="share selected (default: %(default)s)")
    p.add_argument("--kernel", choices=sorted(KERNELS), default="fast", help="Jaccard implementation (default: %(default)s)")
    p.add_argument("--pool-rows", type=int, default=16384, help="distinct synthetic rows blocks are drawn from (default: %(default)s)")
    p.add_argument("--compare-blocks", type=int, default=8, help="blocks timed with both kernels (0: skip)")
    p.add_argument("--quality-rows", type=int, default=20000, help="rows for the float16-vs-float32 check (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--aggregations", default=",".join(AGGREGATIONS),
                   help="aggregations timed next to the prototype ('' to skip; default: %(default)s)")
    p.add_argument("--clusters", type=int, default=30,
                   help="cluster prototypes for clusters*:* (default: %(default)s, what BBH's 81 rows give)")
    p.add_argument("--agg-tasks", type=int, default=2, help="simulated scoring tasks merged by the driver (default: %(default)s)")
    p.add_argument("--jaccard-max-rows", type=int, default=10000,
                   help="largest N for round_robin:jaccard and clusters:jaccard, O(lists x nnz) per row (default: %(default)s)")


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(x.replace("_", "")) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BenchError(f"--sizes={text!r}: expected comma-separated integers, e.g. 10000,100000") from None
    if not sizes or min(sizes) < 1:
        raise BenchError(f"--sizes={text!r}: every size must be a positive integer")
    return sizes


def _check(args) -> list[int]:
    sizes = _sizes(args.sizes)
    check_positive(args, ("block_rows", "latents", "targets", "pool_rows"), within=("block_rows", "pool_rows"))
    for name in _aggregations(args):
        if name not in AGGREGATIONS:
            raise BenchError(f"--aggregations: unknown {name!r}; use any of {', '.join(AGGREGATIONS)}")
    for name in ("clusters", "agg_tasks"):
        if getattr(args, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')}={getattr(args, name)} must be positive")
    return sizes


def _aggregations(args) -> list[str]:
    return [x.strip() for x in (args.aggregations or "").split(",") if x.strip()]


def _as_arrow(rows: scoring.SparseRows) -> tuple[pa.Array, pa.Array]:
    """The two list columns a Parquet reader would return for this block."""
    off = pa.array(rows.indptr.astype(np.int32))
    return (pa.ListArray.from_arrays(off, pa.array(rows.indices)),
            pa.ListArray.from_arrays(off, pa.array(rows.values)))


def _ids(start: int, n: int) -> np.ndarray:
    return np.array([f"row-{i:09d}" for i in range(start, start + n)], dtype=object)


def stream(n_rows: int, pool: RowPool, proto: np.ndarray, args, kernel) -> dict:
    """Score ``n_rows`` rows block by block; time each stage and track peak RSS."""
    k = scoring.selection_size(n_rows, args.ratio)
    st = Stages()
    reset_peak_rss()
    rss0 = peak_rss_mb()
    run = scoring.RunningTopK(k)
    nnz = 0
    for _, rows, ids in _blocks(n_rows, pool, args, st):
        with st("score"):
            s = kernel(rows, proto)
        with st("topk"):
            run.add(s, ids)
        nnz += len(rows.indices)
        del rows, s, ids
    with st("topk"):
        top_s, _ = run.result()
    work = st["to_csr"] + st["score"] + st["topk"]
    return {"rows": n_rows, "selected": len(top_s), "nnz_per_row": nnz / n_rows,
            "generate_s": st["generate"], "to_csr_s": st["to_csr"], "score_s": st["score"],
            "topk_s": st["topk"], "score_topk_s": work, "rows_per_s": n_rows / work if work else None,
            "rss_at_start_mb": rss0, "peak_rss_mb": peak_rss_mb()}


class _Clock:
    """Wall and CPU seconds per stage (``with clock("score"): ...``): on a shared machine the
    CPU time of this single-threaded process moves much less than its wall time."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        w, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - w
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c

    def __getitem__(self, name: str) -> float:
        return self.wall.get(name, 0.0)

    def cpu_s(self, *names: str) -> float:
        return sum(self.cpu.get(n, 0.0) for n in names)


def _blocks(n_rows: int, pool: RowPool, args, st):
    """The very blocks ``stream`` scores (same seed), as CSR rows + ids."""
    rng = np.random.default_rng(args.seed + n_rows)
    for a in range(0, n_rows, args.block_rows):
        b = min(args.block_rows, n_rows - a)
        with st("generate"):
            idx_col, val_col = _as_arrow(pool.block(b, rng))
            ids = _ids(a, b)
        with st("to_csr"):
            rows = scoring.SparseRows.from_arrow(idx_col, val_col)
        del idx_col, val_col
        yield a, rows, ids


def stream_aggregation(name: str, n_rows: int, pool: RowPool, proto: np.ndarray, targets: np.ndarray,
                       centers: tuple[np.ndarray, np.ndarray], args) -> dict:
    """One aggregation over ``n_rows`` streamed rows (the blocks ``stream`` scores).

    ``round_robin`` / ``clusters``: per-list top-k in each of ``--agg-tasks`` tasks, merged by
    the driver and interleaved (clusters: quotas by size). ``clusters_best`` and ``prototype``:
    one ranking (best cluster score, or the one prototype), a running top-k. ``-sparse50``:
    prototypes cut to the latents carrying half their mass; ``-idf``: IDF-weighted Jaccard
    after a document-frequency pass. Every block is also scored the paper's way (Jaccard with
    the prototype + running top-k) in the same pass, so ``vs_prototype`` compares the two
    under the same machine load."""
    kind, sim = name.split(":")
    k = scoring.selection_size(n_rows, args.ratio)
    out = {"aggregation": name, "rows": n_rows, "selected": 0}
    dense_jaccard = sim == "jaccard" and kind in ("round_robin", "clusters")
    if dense_jaccard and n_rows > args.jaccard_max_rows:
        return {**out, "skipped": f"N > --jaccard-max-rows={args.jaccard_max_rows}"}
    st, ref = _Clock(), _Clock()
    reset_peak_rss()
    rss0 = peak_rss_mb()
    base = sim.split("-")[0]
    gemm = np.float32 if sim.endswith("-f32") else np.float64
    weights = None
    if kind == "prototype":
        lists, sizes = proto[None, :], None
    elif kind == "round_robin":
        lists, sizes = targets, None
    else:
        lists, sizes = centers
    if sim.endswith("-sparse50"):
        lists = np.stack([sparsify_prototype(q, 0.5) for q in lists])
    if sim.endswith("-idf"):
        df = np.zeros(lists.shape[1], dtype=np.int64)
        for _, rows, _ in _blocks(n_rows, pool, args, st):
            with st("prepass"):
                df += aggregations.doc_freq(rows, lists.shape[1])
        weights = aggregations.idf_weights(df, n_rows)
        lists = lists * weights[None, :]  # w min(z, t) = min(w z, w t) for w >= 0
    per_list = kind in ("round_robin", "clusters")
    tasks = [aggregations.PerTargetTopK(len(lists), k) for _ in range(args.agg_tasks)] if per_list else []
    single = None if per_list else scoring.RunningTopK(k)
    paper = scoring.RunningTopK(k)
    st_csr = _Clock()
    for a, rows, ids in _blocks(n_rows, pool, args, st_csr):
        with ref("score"):
            paper.add(kernels.jaccard(rows, proto), ids)
        with st("score"):
            if weights is not None:  # IDF-weighted Jaccard: Jaccard of the weighted rows and lists
                rows = SparseRows(rows.indptr, rows.indices, rows.values * weights[rows.indices])
            S = pairwise(rows, lists, base, gemm_dtype=gemm)
        with st("topk"):
            if per_list:
                tasks[(a // args.block_rows) % len(tasks)].add(S, ids)
            else:
                single.add(S.max(axis=1), ids)  # a row ranked by its best list
        del rows, S, ids
    with ref("score"):
        paper.result()
    with st("topk"):
        parts = [t.result() for t in tasks]
        if single is not None:
            sel = single.result()[1]
    if per_list:
        with st("merge"):
            cand = aggregations.merge_candidates(parts, k)
        del parts, tasks
        with st("interleave"):
            quotas = None if sizes is None or kind == "round_robin" else aggregations.allocate(sizes, k)
            sel, _, _ = round_robin(cand, k, quotas=quotas)
    prepass = st["prepass"] + st["to_csr"]  # the df pass reads (and converts) every block once more
    stages = ("score", "topk", "merge", "interleave")
    work = prepass + st_csr["to_csr"] + sum(st[x] for x in stages)
    paper_s = st_csr["to_csr"] + ref["score"]
    work_cpu = st.cpu_s("prepass", "to_csr", *stages) + st_csr.cpu_s("to_csr")
    paper_cpu = st_csr.cpu_s("to_csr") + ref.cpu_s("score")
    return {**out, "lists": len(lists), "list_nnz": float((lists > 0).sum(1).mean()), "selected": len(sel),
            "prepass_s": prepass, "to_csr_s": st_csr["to_csr"], "score_s": st["score"], "topk_s": st["topk"],
            "merge_s": st["merge"], "interleave_s": st["interleave"], "total_s": work, "prototype_in_pass_s": paper_s,
            "vs_prototype": work / paper_s if paper_s else None, "total_cpu_s": work_cpu, "prototype_in_pass_cpu_s": paper_cpu,
            "vs_prototype_cpu": work_cpu / paper_cpu if paper_cpu else None,
            "rss_at_start_mb": rss0, "peak_rss_mb": peak_rss_mb()}


def aggregation_setup(gen: Generator, args) -> dict:
    """The target rows (dense) and ``--clusters`` spherical k-means prototypes of them;
    also how long the automatic choice (``aggregations.choose_clusters``) takes on them."""
    t = gen.draw(args.targets, np.random.default_rng(1), target=True)  # the rows prototype_from averages
    T = t.to_dense(gen.spec.num_latents)
    t0 = time.perf_counter()
    auto = aggregations.choose_clusters(T, seed=args.seed)
    choose_s = time.perf_counter() - t0
    labels = aggregations.spherical_kmeans(T, args.clusters, seed=args.seed)
    P, sizes = cluster_prototypes(T, labels)
    return {"targets": T, "centers": (P, sizes),
            "info": {"target_rows": len(T), "clusters_timed": len(P), "cluster_sizes": sizes.tolist(),
                     "auto_clusters": int(auto.max()) + 1, "choose_clusters_s": choose_s}}


def compare_kernels(pool: RowPool, proto: np.ndarray, args) -> dict:
    rng = np.random.default_rng(args.seed + 7)
    t_ref = t_fast = 0.0
    equal = True
    for _ in range(args.compare_blocks):
        rows = pool.block(args.block_rows, rng)
        t0 = time.perf_counter()
        ref = reference_jaccard(rows, proto)
        t1 = time.perf_counter()
        fast = kernels.jaccard(rows, proto)
        t2 = time.perf_counter()
        t_ref, t_fast = t_ref + t1 - t0, t_fast + t2 - t1
        equal &= bool(np.array_equal(ref.view(np.int64), fast.view(np.int64)))
    n = args.compare_blocks
    return {"blocks": n, "block_rows": args.block_rows, "reference_s_per_block": t_ref / n,
            "fast_s_per_block": t_fast / n, "speedup": t_ref / t_fast if t_fast else None, "bitwise_equal": equal}


def float16_effect(gen: Generator, args) -> dict:
    """Select top-``ratio`` of fresh realistic rows from float32 and from float16 storage."""
    rng = np.random.default_rng(args.seed + 11)
    rows = gen.draw(args.quality_rows, rng)
    ids = _ids(0, len(rows))
    k = scoring.selection_size(len(rows), args.ratio)
    out = {"rows": len(rows), "selected": k}
    sel = {}
    scores = {}
    for name, dt in (("float32", np.float32), ("float16", np.float16)):
        r = scoring.SparseRows(rows.indptr, rows.indices, rows.values.astype(dt))
        proto = prototype_from(gen, args.targets, value_dtype=dt)
        scores[name] = kernels.jaccard(r, proto)
        sel[name] = list(scoring.topk(scores[name], ids, k)[1])
    a, b = set(sel["float32"]), set(sel["float16"])
    diff = np.abs(scores["float32"] - scores["float16"])
    out.update({
        "identical_order": sel["float32"] == sel["float16"],
        "identical_set": a == b,
        "overlap": len(a & b) / k,
        "swapped_rows": len(a - b),
        "max_abs_score_diff": float(diff.max()),
        "median_abs_score_diff": float(np.median(diff)),
        "score_gap_at_cut": float(np.sort(scores["float32"])[::-1][k - 1] - np.sort(scores["float32"])[::-1][k])
        if k < len(rows) else None,
        "subnormal_share_fp16": float(np.mean(np.abs(rows.values) < np.finfo(np.float16).tiny)),
        "bytes_per_row_float32": 8 * len(rows.indices) / len(rows),
        "bytes_per_row_float16": 6 * len(rows.indices) / len(rows),
    })
    return out


def run(args) -> tuple[dict, str]:
    sizes = _check(args)
    spec = SynthSpec(num_latents=args.latents, nnz=args.nnz, k=args.sae_k, seed=args.seed)
    try:
        gen = Generator(spec)
    except ValueError as e:
        raise BenchError(str(e)) from None
    t0 = time.perf_counter()
    proto = prototype_from(gen, args.targets)
    pool = RowPool(gen, args.pool_rows, seed=args.seed + 2)
    setup_s = time.perf_counter() - t0
    kernel = KERNELS[args.kernel]
    results = [stream(n, pool, proto, args, kernel) for n in sizes]
    report = {"params": {**vars(args), "sizes": sizes}, "setup_s": setup_s, "results": results}
    text = [f"score: Jaccard + top-{args.ratio:g} of N rows, {args.nnz} nnz of {args.latents} latents, "
            f"blocks of {args.block_rows}, kernel={args.kernel}",
            table(results, [("rows", "N"), ("nnz_per_row", "nnz/row"), ("generate_s", "generate s"),
                            ("to_csr_s", "to_csr s"), ("score_s", "score s"), ("topk_s", "topk s"),
                            ("score_topk_s", "total s"), ("rows_per_s", "rows/s"), ("peak_rss_mb", "peak RSS MB")]),
            "(total = to_csr + score + topk; generate is the synthetic data source, not part of the pipeline)"]
    aggs = _aggregations(args)
    if aggs:
        setup = aggregation_setup(gen, args)
        rows_out = []
        for r in results:
            base = r["score_topk_s"]
            rows_out.append({"aggregation": "prototype:jaccard", "rows": r["rows"], "lists": 1, "selected": r["selected"],
                             "to_csr_s": r["to_csr_s"], "score_s": r["score_s"], "topk_s": r["topk_s"], "total_s": base,
                             "prototype_in_pass_s": base, "vs_prototype": 1.0, "vs_prototype_cpu": 1.0,
                             "peak_rss_mb": r["peak_rss_mb"]})
            for name in aggs:
                rows_out.append(stream_aggregation(name, r["rows"], pool, proto, setup["targets"], setup["centers"], args))
        report["aggregations"] = {"setup": setup["info"], "results": rows_out}
        info = setup["info"]
        text += ["", f"aggregations: {info['target_rows']} target rows; clusters:* with {info['clusters_timed']} "
                 f"prototypes (choose_clusters picks {info['auto_clusters']} on these targets, "
                 f"{info['choose_clusters_s']:.2f} s); {args.agg_tasks} scoring tasks merged",
                 table([x for x in rows_out if "total_s" in x],
                       [("rows", "N"), ("aggregation", "aggregation"), ("lists", "lists"), ("list_nnz", "nnz/list"),
                        ("prepass_s", "df pass s"), ("score_s", "score s"), ("topk_s", "topk s"), ("merge_s", "merge s"),
                        ("interleave_s", "interleave s"), ("total_s", "total s"),
                        ("prototype_in_pass_s", "prototype s"), ("vs_prototype", "x prototype"),
                        ("vs_prototype_cpu", "x prototype (CPU)"), ("peak_rss_mb", "peak RSS MB")]),
                 "(total = [df pass +] to_csr + score + top-k [+ merge + interleave]; prototype s: the paper's "
                 "to_csr + Jaccard + top-k on the same blocks in the same pass; the first row per N is the run above)"]
        skipped = [f"{x['aggregation']} at N={x['rows']}: {x['skipped']}" for x in rows_out if "skipped" in x]
        if skipped:
            text += ["skipped: " + "; ".join(skipped)]
    if args.compare_blocks > 0:
        report["kernels"] = compare_kernels(pool, proto, args)
        text += ["", "kernels: reference_jaccard vs kernels.jaccard on the same blocks",
                 table([report["kernels"]], [("blocks", "blocks"), ("block_rows", "rows/block"),
                                             ("reference_s_per_block", "reference s/block"),
                                             ("fast_s_per_block", "fast s/block"), ("speedup", "speedup"),
                                             ("bitwise_equal", "bitwise equal")])]
    if args.quality_rows > 0:
        report["float16"] = float16_effect(gen, args)
        text += ["", f"float16 vs float32 stored values: top-{args.ratio:g} selection",
                 table([report["float16"]], [("rows", "rows"), ("selected", "selected"),
                                             ("identical_order", "same order"), ("identical_set", "same set"),
                                             ("overlap", "overlap"), ("swapped_rows", "swapped"),
                                             ("max_abs_score_diff", "max |dscore|"),
                                             ("score_gap_at_cut", "gap at cut")])]
    return report, "\n".join(text)
