"""The driver's side of each stage: one function per step, from the previous step's typed
result to its own (``driver.run`` chains them).

    prepare   PreparedSets   read + validate + render + tokenize each unit (tasks) -> prepared/<fp>/
    dedupe    Rows           repeated ids rejected (Arrow); every set's usable rows and counts
    embed     Embedding      model + SAE on the rows not in the store yet (actors) -> embeddings/<fp>/
    targets   Targets        what the source is scored against (scoring.table.build_targets)
    score     Scored         similarity per group of store parts (tasks), streamed through a top-k
    baseline  Scored         a text baseline (bm25, dsir, dense, random, nait) on the prepared rows
    write     Written        scores, selection (Parquet + JSONL), trainer files, rejected rows
    explain   dict           the prototype's top tokens (one task) and the selected rows' latents

The driver holds O(rows) Arrow columns (ids, hashes, scores), never the records or the
embeddings themselves. The per-unit work is in ``stages.py``; where it runs is ``core/executor.py``.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..core import executor
from ..core.io import read_parquet, recorded_path, reusable, set_aside, sha, write_parquet
from ..core.records import InputError, normalize_record
from ..features.store import first_per_key, groups_of
from . import report, stages
from .plan import RunError, RunPlan

ROLES = ("source", "target")
# summed over the embedding actor's per-unit reports (unit_seconds: read + embed + write)
EMBED_STATS = ("real_tokens", "padded_tokens", "forward_seconds", "unit_seconds")


def _tqdm(**kw):
    from tqdm.auto import tqdm

    return tqdm(dynamic_ncols=True, file=sys.stderr, **kw)


# ----------------------------------------------------------------------------- prepare


@dataclass(frozen=True)
class PreparedSets:
    """Every unit of each set, prepared (``parts[role][i]`` is the ``part`` index of the Rows)."""

    parts: dict[str, list[stages.PrepareUnit]]  # each unit with its prepared part and rejected rows
    units_run: int  # units prepared by this run (the others were reused)

    def files(self, role: str) -> pa.Array:
        """The input file of each prepared part (part index -> file name)."""
        return pa.array([p.unit.path for p in self.parts[role]], pa.string())


def prepare(plan: RunPlan, quarantined: list[dict]) -> PreparedSets:
    """Each unit's prepared part, reused when it is intact (a damaged one is quarantined and rebuilt)."""
    cfg = plan.cfg
    rs = stages.RenderSettings(str(plan.model_dir), plan.rendering, cfg.pool.exclude, cfg.model.trust_remote_code,
                               plan.model_hub)
    parts: dict[str, list[stages.PrepareUnit]] = {}
    todo = []
    for role in ROLES:
        parts[role] = []
        for u in plan.units[role]:
            v = plan.versions[u.path]  # taken before the file was indexed: a changed file or object is prepared again
            key = sha([u.path, v.size, v.version, u.start, u.stop])
            p = stages.PrepareUnit(u, str(plan.prepared_dir / role / f"{key}.parquet"),
                                   str(plan.prepared_dir / role / f"{key}.rejected.parquet"))
            parts[role].append(p)
            if not all([reusable(f, "prepared part", quarantined) for f in (p.part, p.rejected)]):
                todo.append(p)
    if todo:
        done = executor.map_items(todo, stages.prepare, fn_kwargs={"rs": rs}, num_cpus=cfg.ray.task_num_cpus)
        known = [p.unit.stop - p.unit.start for p in todo if p.unit.stop >= 0]
        rejected = 0
        with _tqdm(total=sum(known) if len(known) == len(todo) else None, desc="prepare (rows read+tokenized)",
                   unit="row") as bar:  # closed (its line ended) however the stage ends
            for res in done:
                bar.update(res.rows_ok + res.rows_rejected)
                rejected += res.rows_rejected
                bar.set_postfix(rejected=rejected)
    return PreparedSets(parts, len(todo))


# ----------------------------------------------------------------------------- dedupe


@dataclass(frozen=True)
class Rows:
    """Each set's usable rows (``index``: ``id, content_hash, row, n_tokens, part, pos``; ``part``
    indexes the prepared parts, whose unit names the file), its rejected rows and its counts."""

    index: dict[str, pa.Table]
    rejected: dict[str, pa.Table]
    counts: dict[str, dict]  # role -> rows_in, rows_rejected, rows_usable


def dedupe(plan: RunPlan, prepared: PreparedSets) -> Rows:
    """Reject repeated ids (keeping the first, in file order) and count the rows (Arrow only)."""
    index, rejected, counts = {}, {}, {}
    for role in ROLES:
        tabs, rejs = [], []
        for i, p in enumerate(prepared.parts[role]):
            t = read_parquet(p.part, ["id", "content_hash", "row", "n_tokens"])
            tabs.append(t.append_column("part", pa.array(np.full(len(t), i, np.int32))).append_column(
                "pos", pa.array(np.arange(len(t), dtype=np.int64))))
            rejs.append(read_parquet(p.rejected))
        idx, dup_rej = split_duplicate_ids(pa.concat_tables(tabs), prepared.files(role))
        rej = pa.concat_tables(rejs + ([dup_rej] if len(dup_rej) else []))
        index[role], rejected[role] = idx, rej
        counts[role] = {"rows_in": len(idx) + len(rej), "rows_rejected": len(rej), "rows_usable": len(idx)}
    rows = Rows(index, rejected, counts)
    for role in ROLES:
        check_rejections(plan, rows, role)
    return rows


def check_rejections(plan: RunPlan, rows: Rows, role: str) -> None:
    """Stop when a set has no usable row, or more rejected than ``run.max_rejected_fraction``."""
    c, cfg = rows.counts[role], plan.cfg
    paths = list(getattr(cfg, role).paths)
    if c["rows_usable"] == 0:
        reasons = rows.rejected[role].slice(0, 5).to_pylist()
        detail = "; ".join(f"{r['file']}:{r['row']}: {r['reason']}" for r in reasons)
        raise InputError(f"the {role} set {paths} has no usable rows ({c['rows_in']} in, {c['rows_rejected']} rejected)"
                         + (f". First problems: {detail}" if detail else ""))
    frac = c["rows_rejected"] / max(1, c["rows_in"])
    if frac > cfg.run.max_rejected_fraction:
        raise InputError(f"{c['rows_rejected']} of {c['rows_in']} {role} rows were rejected ({frac:.0%} > "
                         f"run.max_rejected_fraction={cfg.run.max_rejected_fraction}); see the reasons in "
                         f"{plan.prepared_dir / role}/*.rejected.parquet")


def split_duplicate_ids(idx: pa.Table, part_files: pa.Array) -> tuple[pa.Table, pa.Table]:
    """(rows with a first-seen id, rejected rows for the repeats), in Arrow; the first row of
    an id in the table's order (file order) is kept."""
    n = len(idx)
    order = pa.array(np.arange(n, dtype=np.int64))
    t = idx.select(["id", "part", "row"]).append_column("__i", order)
    first = t.group_by("id", use_threads=False).aggregate([("__i", "min")])
    is_first = pc.is_in(order, value_set=first.column("__i_min").combine_chunks())
    if pc.all(is_first).as_py() is not False:
        return idx, stages.rejected_table([])
    dups = t.filter(pc.invert(is_first)).join(first, "id").sort_by("__i")
    f0 = t.take(dups.column("__i_min"))
    where = pc.binary_join_element_wise(part_files.take(f0.column("part")), pc.cast(f0.column("row"), pa.string()), ":")
    reason = pc.binary_join_element_wise("duplicate id (first seen at ", where, ")", "")
    rej = pa.table({"file": part_files.take(dups.column("part")), "row": dups.column("row"), "id": dups.column("id"),
                    "stage": pa.array(["dedupe"] * len(dups), pa.string()), "reason": reason}).cast(stages.REJECTED_SCHEMA)
    return idx.filter(is_first), rej


# ----------------------------------------------------------------------------- embed


@dataclass(frozen=True)
class Embedding:
    """What the embed step did: units run, rows embedded now and reused, the actors' statistics."""

    units: int = 0
    embedded_now: int = 0
    reused: int = 0
    stats: dict = field(default_factory=lambda: dict.fromkeys(EMBED_STATS, 0))
    rows_per_actor: dict = field(default_factory=dict)


def embed_units(plan: RunPlan, prepared: PreparedSets, rows: Rows) -> list[stages.EmbedUnit]:
    """Units of at most ``embed.rows_per_unit`` rows that are not in the store yet, each
    content embedded once (targets first, then the source, in file order)."""
    cap = int(plan.cfg.embed.rows_per_unit)
    both = []
    for order, role in enumerate(("target", "source")):
        t = rows.index[role].select(["content_hash", "part", "pos"])
        both.append(t.append_column("role", pa.array(np.full(len(t), order, np.int8))))
    todo = pa.concat_tables(both)
    todo = todo.filter(pc.invert(pc.is_in(todo.column("content_hash"),
                                          value_set=plan.store.index().column("content_hash").combine_chunks())))
    todo = todo.append_column("__o", pa.array(np.arange(len(todo), dtype=np.int64)))
    todo = first_per_key(todo, "content_hash", "__o").sort_by([("role", "ascending"), ("part", "ascending"),
                                                               ("pos", "ascending")])
    role, part = todo.column("role").to_numpy(), todo.column("part").to_numpy()
    pos = todo.column("pos").to_numpy()
    hashes = todo.column("content_hash")
    starts = np.flatnonzero(np.r_[True, (role[1:] != role[:-1]) | (part[1:] != part[:-1])]) if len(todo) else []
    ends = np.r_[starts[1:], len(todo)] if len(todo) else []
    units = []
    for a, b in zip(starts, ends):
        parts = prepared.parts["target" if role[a] == 0 else "source"]
        for s in range(int(a), int(b), cap):
            e = min(int(b), s + cap)
            key = sha(sorted(hashes.slice(s, e - s).to_pylist()))  # named after its content: resumable
            units.append(stages.EmbedUnit(key, str(parts[int(part[a])].part), tuple(int(x) for x in pos[s:e]),
                                          {plan.readout.name: str(plan.store.part_path(key))}))
    return units


def embed(plan: RunPlan, prepared: PreparedSets, rows: Rows) -> tuple[Embedding, Rows]:
    """Every row not in the store yet through the model (one engine per actor; a dead actor is
    restarted and its unit retried). Rows the engine could not embed are rejected: the Rows
    returned no longer hold them."""
    units = embed_units(plan, prepared, rows)
    n_unique = len(pc.unique(pa.concat_tables([rows.index[r].select(["content_hash"]) for r in ROLES])
                             .column("content_hash")))
    embedded_now = sum(len(u.rows) for u in units)
    stats, per_actor, failed = dict.fromkeys(EMBED_STATS, 0), {}, []
    if units:
        progress = executor.Counter()
        results = executor.map_items(units, actor=(stages.EmbedActor, (plan.job, progress), "embed_unit"),
                                     size=plan.num_actors, **plan.actor_resources)
        total = sum(len(u.rows) for u in units)
        bar = _tqdm(total=total, desc=f"embed (rows, {plan.num_actors} actor{'s' * (plan.num_actors > 1)})", unit="row")
        with _LiveProgress(bar, progress, total) as live:
            for r in results:
                done = r.rows + len(r.rejected)
                live.unit_done(done)
                for k in EMBED_STATS:
                    stats[k] += getattr(r, k)
                per_actor[r.actor] = per_actor.get(r.actor, 0) + done
                failed += r.rejected
        progress.close()
        plan.store.add_parts([p for u in units for p in u.out.values() if Path(p).exists()])
    if failed:
        rows = _reject(plan, rows, stages.rejected_table(failed))
    return Embedding(len(units), embedded_now, n_unique - embedded_now, stats, dict(sorted(per_actor.items()))), rows


def _reject(plan: RunPlan, rows: Rows, table: pa.Table) -> Rows:
    """``rows`` less the rows of ``table`` (rejected-table rows), which join each set's rejected rows."""
    failed = table.column("id").combine_chunks()
    index, rejected, counts = dict(rows.index), dict(rows.rejected), {r: dict(c) for r, c in rows.counts.items()}
    for role in ROLES:
        idx = index[role]
        hit = table.filter(pc.is_in(table.column("id"), value_set=idx.column("id").combine_chunks()))
        if len(hit):
            index[role] = idx.filter(pc.invert(pc.is_in(idx.column("id"), value_set=failed)))
            rejected[role] = pa.concat_tables([rejected[role], hit])
            counts[role]["rows_rejected"] += len(hit)
            counts[role]["rows_usable"] -= len(hit)
    out = Rows(index, rejected, counts)
    for role in ROLES:
        check_rejections(plan, out, role)
    return out


class _LiveProgress:
    """Moves a tqdm bar from the embedding actors' per-micro-batch reports (polled in a thread),
    and from finished units (exact); shows tokens/s."""

    def __init__(self, bar, progress, total: int, interval: float = 1.0):
        self.bar, self.progress, self.total, self.interval = bar, progress, total, interval
        self.done_units_rows = 0
        self.live_rows = self.live_tokens = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.perf_counter()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._poll()
        self.bar.close()

    def _poll(self) -> None:
        try:
            self.live_rows, self.live_tokens = self.progress.get()
        except Exception:  # noqa: BLE001 - progress is best effort; the units' results are exact
            return
        self._show()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._poll()

    def unit_done(self, rows: int) -> None:
        self.done_units_rows += rows
        self._show()

    def _show(self) -> None:
        with self._lock:
            self.bar.n = min(self.total, max(self.done_units_rows, self.live_rows))
            el = time.perf_counter() - self._t0
            self.bar.set_postfix(tok_s=f"{self.live_tokens / max(el, 1e-9):,.0f}", refresh=False)
            self.bar.refresh()


# ----------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Targets:
    """What the source rows are scored against: the mean of the target rows (``proto``), the
    prototypes scored (one, one per cluster, or one per target row for round robin) and how
    they were built (``aggregation``: recorded in the manifest)."""

    proto: np.ndarray
    protos: np.ndarray
    aggregation: dict


def targets(plan: RunPlan, rows: Rows) -> Targets:
    """The target rows' embeddings (one entry per target row: duplicated content counts twice,
    in id order; published RDS+ in file order) into :func:`scoring.table.build_targets`;
    written to ``prototype.safetensors``."""
    from safetensors.numpy import save_file

    from ..scoring.table import build_targets

    tgt = rows.index["target"].select(["id", "content_hash", "part", "pos"]).sort_by(
        [("part", "ascending"), ("pos", "ascending")] if plan.rds_published else "id")
    try:
        joined = plan.store.read_ordered(tgt.column("content_hash").to_pylist(), ["n_pooled", "indices", "values"])
    except KeyError:
        raise RunError(f"target rows have no embedding in {plan.store.root}; this is a bug, please report it") from None
    dense, sel = not plan.readout.sparse, plan.cfg.select
    proto, protos, aggregation = build_targets(
        joined, plan.width, dense, plan.aggregate, float(sel.prototype_mass), sel.cluster_seed, sel.max_clusters,
        plan.cfg.pool.method, sel.mass_rule, sel.min_silhouette)
    labels, ids = aggregation.pop("labels", None), tgt.column("id").to_pylist()
    if labels is not None and len(protos) > 1:
        aggregation["members"] = [[i for i, q in zip(ids, labels) if q == c] for c in range(len(protos))]
    if not dense and sel.row_mass < 1:  # dense readouts are compared whole
        aggregation["row_mass"] = float(sel.row_mass)
    save_file({"prototype": proto.astype(np.float32), "prototypes": protos.astype(np.float32)},
              str(plan.out / "prototype.safetensors"),
              metadata={"rows": str(len(joined)), "embedding_fingerprint": plan.embed_fp, "aggregate": plan.aggregate})
    return Targets(proto, protos, aggregation)


# ----------------------------------------------------------------------------- score


@dataclass(frozen=True)
class Scored:
    """Every usable source row's score (``scores``: ``id, content_hash, part, pos, row, score`` in
    input order) and the selection: ``top_ids`` / ``top_scores`` in rank order, ``k`` of them."""

    scores: pa.Table
    top_ids: list
    top_scores: np.ndarray
    k: int
    filter: dict | None = None  # rows a baseline scored lowest on purpose, and why (dsir's length filter)
    background: dict | None = None  # select.background: the pool statistics used (PoolBackground.info)


def _source_locations(plan: RunPlan, rows: Rows) -> pa.Table:
    """``(id, content_hash, row_at, part, ...)``: where each source row's embedding is in the store,
    sorted by part (``row_at``: the row's position in the driver's index)."""
    idx = rows.index["source"].select(["id", "content_hash"])
    idx = idx.append_column("row_at", pa.array(np.arange(len(idx), dtype=np.int64)))
    loc = idx.join(plan.store.index(), "content_hash", join_type="left outer")
    missing = loc.filter(pc.is_null(loc.column("part")))
    if len(missing):
        raise RunError(f"{len(missing)} source rows have no embedding in {plan.store.root} (first: "
                       f"{missing.column('id')[0].as_py()}); this is a bug, please report it")
    return loc.sort_by([("part", "ascending"), ("id", "ascending")])


@dataclass(frozen=True)
class PoolBackground:
    """The source pool's latent statistics as the score uses them (``select.background``) and how
    they were had (``info``: rows and parts read, whether from the cache; in the manifest)."""

    background: object  # scoring.background.Background
    info: dict


def background(plan: RunPlan, rows: Rows) -> PoolBackground | None:
    """The pool statistics ``select.background`` needs (``None`` for the paper's score): a reduce
    over store parts in tasks, each summing its rows' per-latent counts and masses. At most about
    ``select.background_rows`` rows are read (all of them when there are that few; else whole parts
    drawn by a hash of their names, so a refresh draws the same parts), and the sums are cached in
    the store under a digest of the rows read: a rerun over the same rows reads nothing."""
    from ..scoring.background import Background, PoolStats

    sel = plan.cfg.select
    if sel.background == "none":
        return None
    loc = _source_locations(plan, rows)
    n, budget = len(loc), int(sel.background_rows)
    if n > budget:  # whole parts, each kept when the hash of its name falls under the share wanted
        share = budget / n
        drawn = np.asarray([int(sha(Path(p).name, 15), 16) / 16 ** 15 < share for p in plan.store.paths])
        parts = loc.column("part").to_numpy()
        loc = loc.filter(pa.array(drawn[parts]))
    hashes = sorted(set(loc.column("content_hash").to_pylist()))
    key = sha({"store": plan.embed_fp, "pooling": plan.cfg.pool.method, "rows": sha(hashes, 32)}, 24)
    cache = plan.store.root / "pool_stats" / f"{key}.npz"
    info = {"kind": sel.background, "rows": len(hashes), "of_rows": n,
            "parts": int(len(set(loc.column("part").to_pylist()))), "cache": str(cache)}
    if reusable(cache, "pool statistics"):
        try:
            with np.load(cache) as z:
                stats = PoolStats(int(z["rows"]), z["df"], z["mass"], z["sq"])
            return PoolBackground(Background.of(sel.background, stats), {**info, "cached": True})
        except (OSError, ValueError, KeyError) as e:  # the right size, but not what was written: computed again
            set_aside(cache, str(e)[:200], "pool statistics", "they are computed again")
    width = plan.width
    stats = PoolStats.empty(width)
    for b in executor.map_tables(_groups_of_parts(loc, int(sel.score_batch_rows)), stages.pool_stats_parts,
                                 num_cpus=plan.cfg.ray.task_num_cpus,
                                 fn_kwargs={"paths": executor.put(list(plan.store.paths)), "width": width,
                                            "pooling": plan.cfg.pool.method}):
        for r in b.to_pylist():
            stats = stats + PoolStats(int(r["rows"]), np.asarray(r["df"], np.int64), np.asarray(r["mass"]),
                                      np.asarray(r["sq"]))
    with recorded_path(cache) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, rows=stats.rows, df=stats.df, mass=stats.mass, sq=stats.sq)
    return PoolBackground(Background.of(sel.background, stats), {**info, "cached": False})


def score(plan: RunPlan, rows: Rows, tg: Targets, bg: PoolBackground | None = None) -> Scored:
    """Every source row scored by tasks, one group of store parts each; the results stream
    through a running top-k here, which keeps only (id, score) in Arrow."""
    from ..scoring import RunningTopK, selection_size
    from ..scoring.round_robin import round_robin

    sel = plan.cfg.select
    loc = _source_locations(plan, rows)
    n = len(rows.index["source"])
    k = selection_size(n, sel.ratio, sel.count)
    rr = plan.aggregate == "round_robin"
    batches = executor.map_tables(
        _groups_of_parts(loc, int(sel.score_batch_rows)), stages.score_parts, num_cpus=plan.cfg.ray.task_num_cpus,
        fn_kwargs={"protos": executor.put(tg.protos), "paths": executor.put(list(plan.store.paths)),
                   "similarity": plan.similarity, "pooling": plan.cfg.pool.method,
                   "batch_rows": sel.score_batch_rows, "dense": not plan.readout.sparse,
                   "candidates": k if rr else 0, "row_mass": float(sel.row_mass),
                   "background": bg.background if bg else None})
    top = RunningTopK(k) if not rr else None
    per_target = [RunningTopK(k) for _ in range(len(tg.protos))] if rr else None
    scores = np.zeros(n)  # by position in the index: no join on the ids afterwards
    seen = np.zeros(n, dtype=bool)
    with _tqdm(total=n, desc="score (rows)", unit="row") as bar:
        for b in batches:
            j = b.column("target").to_numpy()
            if rr:  # each task's best k rows per target row, merged here into one list per target
                for t in np.unique(j[j >= 0]):
                    c = b.filter(pa.array(j == t))
                    per_target[int(t)].add(c.column("score").to_numpy(), c.column("id").to_numpy(zero_copy_only=False))
            b = b.filter(pa.array(j < 0))
            if top is not None:
                top.add(b.column("score").to_numpy(), b.column("id").to_numpy(zero_copy_only=False))
            at = b.column("row_at").to_numpy()
            scores[at], seen[at] = b.column("score").to_numpy(), True
            bar.update(len(b))
    if rr:
        top_ids, _, top_scores = round_robin([t.result() for t in per_target], k, skip_taken=not plan.rds_published)
    else:
        top_scores, top_ids = top.result()
    return Scored(_scores_table(rows, scores, seen), top_ids, top_scores, k, background=bg.info if bg else None)


def score_baseline(plan: RunPlan, prepared: PreparedSets, rows: Rows) -> Scored:
    """A baseline selector (bm25, dsir, dense, random, nait) on the prepared rows.

    bm25, dsir, dense and random run as Ray tasks over the prepared parts
    (``selectors.scale``: bounded driver memory at 1M rows); nait needs the selection
    model's activations per row and still runs on the driver."""
    from ..scoring import selection_size, topk
    from ..selectors.scale import METHODS, score_distributed

    cfg, method = plan.cfg, plan.method
    tgt, _ = _messages(prepared, rows, "target")
    info: dict = {}
    if method in METHODS:
        parts = [(str(prepared.parts["source"][pi].part), positions)
                 for pi, positions in _positions_by_part(rows.index["source"])]
        by_id = score_distributed(method, dict(getattr(cfg.select, method)), parts, tgt,
                                  task_num_cpus=cfg.ray.task_num_cpus, info=info)
    else:
        from ..selectors import selector_from_config

        src, src_ids = _messages(prepared, rows, "source")
        s = np.asarray(selector_from_config(cfg).score(src, tgt, src_ids), dtype=np.float64)
        by_id = pa.table({"id": pa.array(src_ids, pa.string()), "score": pa.array(s, pa.float64())})
    idx = rows.index["source"].select(["id"]).append_column(
        "row_at", pa.array(np.arange(len(rows.index["source"]), dtype=np.int64)))
    j = idx.join(by_id.select(["id", "score"]), "id", join_type="inner")
    scores, seen = np.zeros(len(idx)), np.zeros(len(idx), dtype=bool)
    at = j.column("row_at").to_numpy()
    scores[at], seen[at] = j.column("score").to_numpy(zero_copy_only=False), True
    k = selection_size(len(by_id), cfg.select.ratio, cfg.select.count)
    top_scores, top_ids = topk(by_id.column("score").to_numpy(), by_id.column("id").to_numpy(zero_copy_only=False), k)
    return Scored(_scores_table(rows, scores, seen), top_ids, top_scores, k, info.get("filter"))


def _scores_table(rows: Rows, scores: np.ndarray, seen: np.ndarray) -> pa.Table:
    """Every usable source row's score (``scores[i]``: row ``i`` of the source index, scored
    where ``seen[i]``), in input order (file, then row)."""
    idx = rows.index["source"]
    missing = np.flatnonzero(~seen)
    if len(missing):
        raise RunError(f"{len(missing)} source rows got no score (first: {idx.column('id')[int(missing[0])].as_py()}); "
                       "this is a bug, please report it")
    t = idx.select(["id", "content_hash", "part", "pos", "row"]).append_column("score", pa.array(scores, pa.float64()))
    part, pos = t.column("part").to_numpy(), t.column("pos").to_numpy()
    in_order = len(t) < 2 or bool(np.all((part[1:] > part[:-1]) | ((part[1:] == part[:-1]) & (pos[1:] > pos[:-1]))))
    return t if in_order else t.sort_by([("part", "ascending"), ("pos", "ascending")])


def _messages(prepared: PreparedSets, rows: Rows, role: str) -> tuple[list[list[dict]], list[str]]:
    """The usable rows of a set as conversations, in file order, read back from the prepared parts."""
    msgs, ids = [], []
    for pi, positions in _positions_by_part(rows.index[role]):
        t = read_parquet(prepared.parts[role][pi].part, ["id", "record"], positions)
        ids += t.column("id").to_pylist()
        msgs += [normalize_record(json.loads(r)) for r in t.column("record").to_pylist()]
    return msgs, ids


# ----------------------------------------------------------------------------- write


@dataclass(frozen=True)
class Written:
    """The selected records (rank order, with id, score and rank) and the trainer files' entry."""

    selected: list[dict]
    trainer: dict | None


def write_outputs(plan: RunPlan, prepared: PreparedSets, rows: Rows, scored: Scored) -> Written:
    """scores.parquet, rejected.parquet, the selection (JSONL + Parquet) and the trainer files."""
    from .export import write_trainer_files

    out = plan.out
    # the file name dictionary-encoded: one string per file (not per part): the same bytes for any unit size
    names = prepared.files("source").to_pylist()
    uniq = list(dict.fromkeys(names))
    at = {u: i for i, u in enumerate(uniq)}
    code = np.asarray([at[n] for n in names], dtype=np.int32)
    s = scored.scores
    files = pa.DictionaryArray.from_arrays(pa.array(code[s.column("part").to_numpy()], pa.int32()),
                                           pa.array(uniq, pa.string()))
    write_parquet(pa.table({"id": s.column("id"), "score": s.column("score"), "file": files, "row": s.column("row")}),
                  out / "scores.parquet", 65536)
    del files
    rej = pa.concat_tables([rows.rejected[r].append_column("set", pa.array([r] * len(rows.rejected[r]), pa.string()))
                            for r in ROLES])
    write_parquet(rej.sort_by([("set", "ascending"), ("file", "ascending"), ("row", "ascending")]), out / "rejected.parquet")
    selected = _selected_records(prepared, rows, scored)
    report.write_selection(selected, out)
    return Written(selected, write_trainer_files(selected, out, plan.cfg.report.trainer_format))


def _selected_of(table: pa.Table, scored: Scored) -> pa.Table:
    """The rows of ``table`` (an index of source rows) that the selection kept."""
    return table.filter(pc.is_in(table.column("id"), value_set=pa.array(list(scored.top_ids), pa.string())))


def _selected_records(prepared: PreparedSets, rows: Rows, scored: Scored) -> list[dict]:
    recs = {}
    for pi, positions in _positions_by_part(_selected_of(rows.index["source"], scored)):
        t = read_parquet(prepared.parts["source"][pi].part, ["id", "record"], positions)
        for rid, rec in zip(t.column("id").to_pylist(), t.column("record").to_pylist()):
            recs[rid] = json.loads(rec)
    out = []
    for rank, (rid, sc) in enumerate(zip(scored.top_ids, scored.top_scores), start=1):
        rec = recs[rid]
        rec = rec if isinstance(rec, dict) else {"record": rec}
        out.append({**rec, "id": rid, "score": float(sc), "rank": rank})
    return out


# ----------------------------------------------------------------------------- explain


def explain(plan: RunPlan, prepared: PreparedSets, rows: Rows, tg: Targets, scored: Scored,
            bg: PoolBackground | None = None) -> dict:
    """explain.json / explain.md: the prototype's latents and why each selected row was chosen;
    returns what the selected rows' explanation read from the store.

    The prototype's top tokens need the model: one task with an embedding actor's resources (a
    GPU on a cluster), over the target rows only. The selected rows' contributions are computed
    here meanwhile, from the store, reading only the selected rows."""
    from ..features.interpret import strongest_latents, write_explain

    tgt_ids, tgt_masks, tgt_rid = [], [], []
    for pi, positions in _positions_by_part(rows.index["target"]):
        t = read_parquet(prepared.parts["target"][pi].part, ["id", "input_ids", "pool_mask"], positions)
        tgt_ids += t.column("input_ids").to_pylist()
        tgt_masks += t.column("pool_mask").to_pylist()
        tgt_rid += t.column("id").to_pylist()
    protos, groups = [tg.proto], [list(range(len(tgt_ids)))]
    members = tg.aggregation.get("members")
    if members:  # clusters: each cluster's prototype, explained on its own target rows
        pos = {rid: i for i, rid in enumerate(tgt_rid)}
        for c, rids in enumerate(members):
            protos.append(tg.protos[c])
            groups.append([pos[r] for r in rids if r in pos])
    background = bg.background if bg else None  # select.background: latents ranked by the weight the score gives them
    weights = [background.latent_weights(p[None, :])[0] for p in protos] if background else None
    pending = executor.call(stages.explain_task, plan.job, tgt_ids, tgt_masks, protos, groups, weights,
                            **plan.actor_resources)
    # the selected rows are explained here while the task runs (their marks need only the prototype)
    lines, read = _explain_selected(plan, tg, scored, set(strongest_latents(weights[0] if weights else tg.proto).tolist()),
                                    background)
    docs = pending.result()
    doc = {"prototype": docs[0], **({"background": background.kind} if background else {})}
    if members:
        doc["clusters"] = [{"cluster": c, "size": len(m), "target_ids": m[:10], **d}
                           for c, (m, d) in enumerate(zip(members, docs[1:]))]
    write_explain(doc, plan.out, lines)
    return read


def _explain_selected(plan: RunPlan, tg: Targets, scored: Scored, top_set: set[int], background=None
                      ) -> tuple[list[str], dict]:
    """Each selected row's explanation as one line of JSON, in rank order. The rows are read
    from the store one part at a time (only the selected rows of each part), so memory is
    bounded by a part whatever the selection's size; with several prototypes, a row is
    explained against the one it scored best with."""
    from ..features.interpret import explain_row
    from ..scoring.table import scored_rows, similarities_of

    sel = _selected_of(scored.scores, scored)
    ranks: dict[str, list[int]] = {}  # content -> the ranks of the selected rows with it
    rank_of = {rid: r for r, rid in enumerate(scored.top_ids)}
    for rid, h in zip(sel.column("id").to_pylist(), sel.column("content_hash").to_pylist()):
        ranks.setdefault(h, []).append(rank_of[rid])
    lines: list[str | None] = [None] * len(scored.top_ids)
    many = len(tg.protos) > 1
    # the rows and prototypes as the score compares them (weighted by the pool when select.background says so)
    protos = background.prototypes(tg.protos) if background else tg.protos
    linear = background.kind if background and background.kind in ("lr", "lda") else None
    for t in plan.store.iter_read(sel.column("content_hash"), ["indices", "values"]):
        X = scored_rows(t, False, row_mass=float(plan.cfg.select.row_mass))  # the values as they were scored
        best = (similarities_of(X, tg.protos, plan.similarity, False, background).argmax(1) if many
                else np.zeros(len(t), np.int64))
        X = background.rows(X) if background else X
        for j, h in enumerate(t.column("content_hash").to_pylist()):
            a, b = X.indptr[j], X.indptr[j + 1]
            for r in ranks.pop(h, ()):
                row = explain_row(scored.top_ids[r], X.indices[a:b], X.values[a:b], protos[int(best[j])], top_set,
                                  linear=linear)
                if many:
                    row["cluster"] = int(best[j])
                lines[r] = json.dumps(row, ensure_ascii=False)
    missing = sum(x is None for x in lines)
    if missing:
        raise RunError(f"{missing} selected rows have no embedding in {plan.store.root}; this is a bug, please report it")
    return lines, dict(plan.store.last_read)


# ----------------------------------------------------------------------------- grouping


def _groups_of_parts(loc: pa.Table, min_rows: int) -> list[pa.Table]:
    """Split a table sorted by ``part`` into slices of whole parts, each of >= ``min_rows`` rows
    (the last may be smaller): the score tasks."""
    part = loc.column("part").combine_chunks()
    codes = pc.dictionary_encode(part).indices.to_numpy(zero_copy_only=False) if len(part) else np.zeros(0, int)
    bounds = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]]) if len(codes) else np.zeros(0, int)
    out, start = [], 0
    for b in list(bounds[1:]) + [len(loc)]:
        if b - start >= min_rows or b == len(loc):
            out.append(loc.slice(start, b - start))
            start = b
    return [t for t in out if len(t)]


def _positions_by_part(idx: pa.Table) -> list[tuple[int, list[int]]]:
    """Group an index table by prepared part: [(part, row positions)], in file order."""
    pos = idx.column("pos").to_numpy()
    order, groups = groups_of(idx.column("part").to_numpy(), within=pos)
    pos = pos[order]
    return [(part, pos[a:b].tolist()) for part, a, b in groups]

