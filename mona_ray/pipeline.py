"""The MoNA job on Ray Data: a thin orchestration layer over ``stages.py``.

    plan      driver    split inputs into fixed row ranges (units); fingerprints
    prepare   tasks     read + validate + render + tokenize each unit  -> prepared/<fp>/
    dedupe    driver    duplicate ids rejected; identical content embedded once
    embed     actors    model + SAE, one unit per call                  -> embeddings/<fp>/
    prototype driver    mean of the target rows                         -> prototype.safetensors
    score     tasks     generalized Jaccard per block + per-block top-k -> merged on the driver
    report    driver    scores, selection (Parquet + JSONL), rejected, manifest

Resume and refresh come from one mechanism: every part file is named after its input
unit (prepare) or its content (embed) and written atomically, and the embedding store
is keyed by the content hash of each row under a fingerprint of everything that
changes an embedding (model, SAE, layer, K, rendering, max_length, pooling, dtype).
A re-run therefore skips every finished unit, embeds only rows it has never seen, and
re-embeds everything when a fingerprinted setting changes. We chose this over Ray
Data's ``CheckpointConfig`` because it also gives cross-run refresh (new rows only) and
works the same on every Ray version >= 2.51.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import records, report, stages
from .model import ModelError, fingerprint_model, parse_hookpoint, resolve_model_path
from .records import InputError
from .sae import SAEError, detect_format, file_fingerprint, find_sparsify_dir, to_sparsify_hookpoint

FINGERPRINT_VERSION = 1
# summed over the embedding actor's per-unit reports (unit_seconds: read + embed + write)
EMBED_STATS = ("real_tokens", "padded_tokens", "forward_seconds", "unit_seconds")


class RunError(RuntimeError):
    """The run cannot go on; the message says why and what to change."""


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _tqdm(**kw):
    from tqdm.auto import tqdm

    return tqdm(dynamic_ncols=True, file=sys.stderr, **kw)


# ----------------------------------------------------------------------------- validation


def resolve_sae(cfg) -> dict:
    """Locate the SAE and read its metadata without loading its weights."""
    if cfg.embed.representation != "sae":
        return {"path": None, "format": None, "fingerprint": None, "num_latents": None, "k": None, "provisional": False}
    path = str(cfg.sae.path)
    if not Path(path).expanduser().exists():
        raise SAEError(f"sae.path={path!r} does not exist. Set sae.path=/path/to/sae (a sparsify or SAELens folder).")
    fmt = detect_format(path, cfg.sae.hookpoint) if cfg.sae.format == "auto" else cfg.sae.format
    info = {"path": str(Path(path).expanduser().resolve()), "format": fmt, "provisional": False}
    if fmt == "sparsify":
        d = find_sparsify_dir(path, cfg.sae.hookpoint)
        sae_cfg = json.loads((d / "cfg.json").read_text())
        w = d / "sae.safetensors"
        info.update(num_latents=sae_cfg.get("num_latents") or sae_cfg["d_in"] * sae_cfg["expansion_factor"],
                    k=int(cfg.sae.k or sae_cfg["k"]), provisional=bool(sae_cfg.get("provisional", False)),
                    fingerprint=file_fingerprint(w))
    else:
        from .sae import load_sae

        sae = load_sae(path, fmt, cfg.sae.hookpoint, cfg.sae.k)
        info.update(num_latents=sae.num_latents, k=sae.k, fingerprint=sae.fingerprint,
                    provisional=bool(sae.meta.get("provisional", False)))
    return info


def check_output_dir(out: Path, overwrite: bool) -> None:
    manifest = out / "manifest.json"
    if manifest.exists():
        status = json.loads(manifest.read_text()).get("status")
        if status == "complete" and not overwrite:
            raise RunError(f"run.output_dir={str(out)!r} already holds a finished run. Pass run.overwrite=true "
                           "to redo it (the embedding store is kept and reused), or choose another run.output_dir.")
    if overwrite and out.exists():
        for child in out.iterdir():
            if child.name == "embeddings":
                continue  # content-addressed: never stale, always reusable
            shutil.rmtree(child) if child.is_dir() else child.unlink()


# ----------------------------------------------------------------------------- the job


class Pipeline:
    def __init__(self, cfg, cfg_dict: dict):
        self.cfg = cfg
        self.cfg_dict = cfg_dict
        self.out = Path(cfg.run.output_dir).expanduser().resolve()
        self.timings: dict[str, float] = {}
        self.counts: dict = {}

    # -------------------------------------------------------------- plan

    def plan(self) -> None:
        cfg = self.cfg
        t0 = time.perf_counter()
        if cfg.embed.representation not in ("sae", "hidden", "mlp_gate"):
            raise RunError(f"embed.representation={cfg.embed.representation!r}: use sae, hidden or mlp_gate")
        cfg.sae.hookpoint = to_sparsify_hookpoint(cfg.sae.hookpoint)  # SAELens hook names accepted too
        parse_hookpoint(cfg.sae.hookpoint)
        # Check every path before any work starts, and report all problems at once.
        problems = []
        for name, check in (("model", lambda: resolve_model_path(str(cfg.model.path))),
                            ("sae", lambda: resolve_sae(cfg)),
                            ("source", lambda: records.plan_units(list(cfg.source.paths), cfg.embed.rows_per_unit)),
                            ("target", lambda: records.plan_units(list(cfg.target.paths), cfg.embed.rows_per_unit))):
            try:
                setattr(self, f"_{name}", check())
            except (ModelError, SAEError, InputError) as e:
                msg = str(e)
                if name in ("source", "target"):
                    msg = f"{name}.paths: {msg}; set {name}.paths=[/path/to/files_or_folders]"
                problems.append(msg)
        if problems:
            raise InputError("\n  ".join(["cannot start:"] + problems) if len(problems) > 1 else problems[0])
        self.model_dir, self.sae_info = self._model, self._sae
        self.source_units, self.target_units = self._source, self._target
        for role, units in (("source", self.source_units), ("target", self.target_units)):
            if not units:
                paths = list(cfg[role].paths)
                files = records.input_files(paths)
                raise InputError(f"the {role} set {paths} has no usable rows: " + (
                    f"its files are empty ({', '.join(map(str, files))})" if files else
                    f"no .parquet/.jsonl/.json file matched; set {role}.paths=[...]"))
        check_output_dir(self.out, cfg.run.overwrite)
        self.model_fp = fingerprint_model(self.model_dir)
        render = {"mode": cfg.render.mode, "system_prompt": cfg.render.system_prompt,
                  "max_length": cfg.render.max_length, "exclude": cfg.pool.exclude}
        self.prep_fp = _sha({"v": FINGERPRINT_VERSION, "model": self.model_fp, **render})
        self.embed_fp = _sha({
            "v": FINGERPRINT_VERSION, "prep": self.prep_fp, "sae": self.sae_info["fingerprint"],
            "hookpoint": cfg.sae.hookpoint, "k": self.sae_info["k"], "representation": cfg.embed.representation,
            "pooling": cfg.pool.method, "dtype": cfg.model.dtype, "value_dtype": cfg.embed.value_dtype,
            "mlp_k": cfg.embed.get("mlp_k")})
        self.prepared_dir = self.out / "prepared" / self.prep_fp
        store = cfg.embed.store_dir or str(self.out / "embeddings")
        self.store = Path(store).expanduser().resolve() / self.embed_fp
        self.store.mkdir(parents=True, exist_ok=True)
        (self.store / "fingerprint.json").write_text(json.dumps({
            "model": str(cfg.model.path), "model_fingerprint": self.model_fp, "sae": self.sae_info,
            "hookpoint": cfg.sae.hookpoint, "representation": cfg.embed.representation, "pooling": cfg.pool.method,
            "render": render, "dtype": cfg.model.dtype, "value_dtype": cfg.embed.value_dtype}, indent=2, default=str))
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "manifest.json").write_text(json.dumps({"status": "running", "config": self.cfg_dict}, indent=2, default=str))
        self.timings["plan"] = time.perf_counter() - t0

    # -------------------------------------------------------------- prepare

    def prepare(self) -> None:
        import ray

        t0 = time.perf_counter()
        rs = stages.RenderSettings(str(self.model_dir), self.cfg.render.mode, self.cfg.render.system_prompt,
                                   self.cfg.render.max_length, self.cfg.pool.exclude, self.cfg.model.trust_remote_code)
        todo = []
        for role, units in (("source", self.source_units), ("target", self.target_units)):
            for u in units:
                f = Path(u.path)
                st = f.stat()
                key = _sha([u.path, st.st_size, st.st_mtime_ns, u.start, u.stop])
                part = self.prepared_dir / role / f"{key}.parquet"
                rej = self.prepared_dir / role / f"{key}.rejected.parquet"
                u_info = {"role": role, "unit": u, "part": part, "rejected": rej}
                (self.source_parts if role == "source" else self.target_parts).append(u_info)
                if not (part.exists() and rej.exists()):
                    todo.append(u_info)
        if todo:
            items = [{"unit": json.dumps([t["unit"].path, t["unit"].start, t["unit"].stop]),
                      "part": str(t["part"]), "rejected": str(t["rejected"])} for t in todo]

            def prep(batch, rs=rs):
                out = []
                for u, part, rej in zip(batch["unit"], batch["part"], batch["rejected"]):
                    path, start, stop = json.loads(u)
                    out.append(stages.prepare_unit(records.ReadUnit(path, start, stop), rs, part, rej))
                return {k: np.asarray([o[k] for o in out]) for k in out[0]}

            ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
                prep, batch_size=1, num_cpus=self.cfg.ray.task_num_cpus)
            bar = _tqdm(total=len(items), desc="prepare", unit="unit")
            for row in ds.iter_rows():
                bar.update(1)
                bar.set_postfix(rejected=int(row["rows_rejected"]))
            bar.close()
        self.timings["prepare"] = time.perf_counter() - t0

    def _load_index(self, parts: list[dict]) -> tuple[pa.Table, pa.Table]:
        tabs, rejs = [], []
        for i, p in enumerate(parts):
            t = pq.read_table(p["part"], columns=["id", "content_hash", "file", "row", "n_tokens"])
            tabs.append(t.append_column("part", pa.array(np.full(len(t), i, np.int32))).append_column(
                "pos", pa.array(np.arange(len(t), dtype=np.int64))))
            rejs.append(pq.read_table(p["rejected"]))
        idx = pa.concat_tables(tabs) if tabs else None
        rej = pa.concat_tables(rejs) if rejs else stages.rejected_table([])
        return idx, rej

    def dedupe(self) -> None:
        """Reject repeated ids (keeping the first, in file order) and record the row counts."""
        self.index, self.rejected = {}, {}
        for role, parts in (("source", self.source_parts), ("target", self.target_parts)):
            idx, rej = self._load_index(parts)
            ids = idx.column("id").to_pylist()
            first: dict[str, int] = {}
            dup = []
            for i, rid in enumerate(ids):
                if rid in first:
                    dup.append(i)
                else:
                    first[rid] = i
            if dup:
                d = idx.take(pa.array(dup))
                f0 = idx.take(pa.array([first[ids[i]] for i in dup]))
                dup_rej = pa.table({
                    "file": d.column("file"), "row": d.column("row"), "id": d.column("id"),
                    "stage": pa.array(["dedupe"] * len(dup)),
                    "reason": pa.array([f"duplicate id (first seen at {a}:{b})" for a, b in
                                        zip(f0.column("file").to_pylist(), f0.column("row").to_pylist())])})
                rej = pa.concat_tables([rej, dup_rej.cast(stages.REJECTED_SCHEMA)])
                keep = np.ones(len(idx), bool)
                keep[dup] = False
                idx = idx.filter(pa.array(keep))
            self.index[role] = idx
            self.rejected[role] = rej
            n_in = len(idx) + len(rej)
            self.counts[role] = {"rows_in": n_in, "rows_rejected": len(rej), "rows_usable": len(idx)}
        self._check_rejections("source")
        self._check_rejections("target")

    def _check_rejections(self, role: str) -> None:
        c = self.counts[role]
        paths = list(self.cfg[role].paths)
        if c["rows_usable"] == 0:
            reasons = self.rejected[role].slice(0, 5).to_pylist()
            detail = "; ".join(f"{r['file']}:{r['row']}: {r['reason']}" for r in reasons)
            raise InputError(f"the {role} set {paths} has no usable rows ({c['rows_in']} in, {c['rows_rejected']} rejected)"
                             + (f". First problems: {detail}" if detail else ""))
        frac = c["rows_rejected"] / max(1, c["rows_in"])
        if frac > self.cfg.run.max_rejected_fraction:
            raise InputError(f"{c['rows_rejected']} of {c['rows_in']} {role} rows were rejected ({frac:.0%} > "
                             f"run.max_rejected_fraction={self.cfg.run.max_rejected_fraction}); see the reasons in "
                             f"{self.prepared_dir / role}/*.rejected.parquet")

    # -------------------------------------------------------------- embed

    def _store_index(self) -> dict[str, list[str]]:
        """Content hashes held by each part file of the embedding store."""
        return {str(f): pq.read_table(f, columns=["content_hash"]).column("content_hash").to_pylist()
                for f in sorted(self.store.glob("part-*.parquet"))}

    def embed(self) -> None:
        import ray

        t0 = time.perf_counter()
        cached = set().union(*self._store_index().values()) if self._store_index() else set()
        units, planned = [], set()
        for role, parts in (("target", self.target_parts), ("source", self.source_parts)):
            for pi, (hashes, positions) in _rows_by_part(self.index[role]).items():
                rows, unit_hashes = [], []
                for h, pos in zip(hashes, positions):
                    if h in cached or h in planned:
                        continue  # embedded before, or earlier in this run (identical content)
                    planned.add(h)
                    rows.append(pos)
                    unit_hashes.append(h)
                if rows:  # the part file is named after its content: resumable, never clobbers
                    key = _sha(sorted(unit_hashes))
                    units.append({"key": key, "prepared": str(parts[pi]["part"]), "rows": rows,
                                  "out": str(self.store / f"part-{key}.parquet")})
        self.counts["embedded_now"] = sum(len(u["rows"]) for u in units)
        self.counts["reused_from_store"] = len(cached & set(self._current_hashes()))
        self.embed_stats = dict.fromkeys(EMBED_STATS, 0)
        embed_rejected = []
        if units:
            job = self._embed_job()
            n_actors = self._num_actors()
            remote = self._actor_resources()
            items = [{"unit": json.dumps(u)} for u in units]
            ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
                stages.EmbedActor, fn_constructor_args=(job,), batch_size=1,
                # Ray Data restarts dead actors and retries their units by default
                # (max_restarts=-1, max_task_retries=-1): a lost node costs only its units in flight.
                compute=ray.data.ActorPoolStrategy(size=n_actors), **remote)
            total_rows = sum(len(u["rows"]) for u in units)
            bar = _tqdm(total=total_rows, desc=f"embed ({n_actors} actor{'s' * (n_actors > 1)})", unit="row")
            for row in ds.iter_rows():
                bar.update(int(row["rows"]) + len(json.loads(row["rejected"])))
                for k in EMBED_STATS:
                    self.embed_stats[k] += row[k]
                embed_rejected += json.loads(row["rejected"])
                el = bar.format_dict["elapsed"] or 1e-9
                bar.set_postfix(tok_s=f"{self.embed_stats['real_tokens'] / el:,.0f}")
            bar.close()
        self.timings["embed"] = time.perf_counter() - t0
        if embed_rejected:
            self._reject_embed_failures(embed_rejected)

    def _reject_embed_failures(self, rows: list[dict]) -> None:
        table = stages.rejected_table(rows)
        failed = set(table.column("id").to_pylist())
        for role in ("source", "target"):
            idx = self.index[role]
            mask = pc.is_in(idx.column("id"), pa.array(list(failed), pa.string()))
            hit = table.filter(pc.is_in(table.column("id"), idx.column("id")))
            if len(hit):
                self.index[role] = idx.filter(pc.invert(mask))
                self.rejected[role] = pa.concat_tables([self.rejected[role], hit])
                self.counts[role]["rows_rejected"] += len(hit)
                self.counts[role]["rows_usable"] -= len(hit)
            self._check_rejections(role)

    def _current_hashes(self) -> list[str]:
        return self.index["source"].column("content_hash").to_pylist() + self.index["target"].column("content_hash").to_pylist()

    def _num_actors(self) -> int:
        import ray

        n = self.cfg.embed.num_actors
        if n not in (None, "auto"):
            return int(n)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        return max(1, gpus) if self._use_gpu() else 1

    def _use_gpu(self) -> bool:
        import ray

        dev = self.cfg.model.device
        return dev == "cuda" or (dev == "auto" and ray.cluster_resources().get("GPU", 0) >= 1)

    def _actor_resources(self) -> dict:
        extra = dict(self.cfg.embed.get("actor_resources") or {})  # e.g. pin actors to a node type
        res = {"resources": extra} if extra else {}
        if self._use_gpu():
            return {"num_gpus": 1, "num_cpus": self.cfg.embed.actor_num_cpus_gpu, **res}
        return {"num_cpus": self.cfg.embed.actor_num_cpus_cpu, **res}

    def _embed_job(self) -> stages.EmbedJob:
        cfg = self.cfg
        threads = cfg.embed.torch_threads
        if threads in (None, "auto"):
            threads = 0 if self._use_gpu() else max(1, (os.cpu_count() or 1) // max(1, self._num_actors()))
        return stages.EmbedJob(
            model_dir=str(self.model_dir), sae_path=str(self.sae_info["path"]), sae_format=self.sae_info["format"],
            hookpoint=cfg.sae.hookpoint, k=self.sae_info["k"], dtype=cfg.model.dtype,
            device="cuda" if self._use_gpu() else "cpu", representation=cfg.embed.representation,
            pooling=cfg.pool.method, value_dtype=cfg.embed.value_dtype, token_budget=cfg.embed.token_budget, pad_multiple=cfg.embed.pad_multiple,
            max_batch_rows=cfg.embed.max_batch_rows, sae_chunk_tokens=cfg.embed.sae_chunk_tokens,
            torch_threads=int(threads), trust_remote_code=cfg.model.trust_remote_code,
            attn_implementation=cfg.model.attn_implementation)

    # -------------------------------------------------------------- prototype + score

    def _store_files_for(self, hashes: set[str]) -> list[str]:
        return [f for f, h in self._store_index().items() if not hashes.isdisjoint(h)]

    def prototype(self) -> None:
        from safetensors.numpy import save_file

        from .scoring import SparseRows, prototype

        t0 = time.perf_counter()
        idx = self.index["target"]
        want = set(idx.column("content_hash").to_pylist())
        emb = pa.concat_tables([pq.read_table(f) for f in self._store_files_for(want)])
        emb = emb.filter(pc.is_in(emb.column("content_hash"), pa.array(sorted(want))))
        emb = _first_per_hash(emb)
        # one prototype entry per target row (duplicated content counts twice), in id order
        tgt = idx.select(["id", "content_hash"]).sort_by("id")
        at = {h: i for i, h in enumerate(emb.column("content_hash").to_pylist())}
        joined = emb.take(pa.array([at[h] for h in tgt.column("content_hash").to_pylist()], pa.int64()))
        joined = joined.append_column("id", tgt.column("id"))
        width = self.sae_info["num_latents"] or self._dense_width(joined)
        rows = SparseRows.from_arrow(joined.column("indices"), joined.column("values"))
        self.proto = prototype(rows, width)
        self.target_table = joined
        save_file({"prototype": self.proto.astype(np.float32)}, str(self.out / "prototype.safetensors"),
                  metadata={"rows": str(len(joined)), "embedding_fingerprint": self.embed_fp})
        self.timings["prototype"] = time.perf_counter() - t0

    @staticmethod
    def _dense_width(t: pa.Table) -> int:
        return int(pc.max(pc.list_value_length(t.column("indices"))).as_py())

    def score(self) -> None:
        import ray

        t0 = time.perf_counter()
        idx = self.index["source"]
        want = set(idx.column("content_hash").to_pylist())
        files = self._store_files_for(want)
        current = ray.put(idx.select(["content_hash", "id"]))
        proto = ray.put(self.proto)
        # One store part per task (our own reader: every stage reads its files the same way).
        ds = ray.data.from_items([{"path": f} for f in files], override_num_blocks=max(1, len(files)))
        scored = ds.map_batches(stages.score_parts, batch_format="pyarrow", batch_size=1,
                                fn_kwargs={"proto": proto, "current": current, "similarity": self.cfg.select.similarity,
                                           "batch_rows": self.cfg.select.score_batch_rows,
                                           "dense": self.cfg.embed.representation == "hidden"},
                                num_cpus=self.cfg.ray.task_num_cpus).materialize()
        n = scored.count()
        self.k = k = __import__("mona_ray.scoring", fromlist=["x"]).selection_size(
            n, self.cfg.select.ratio, self.cfg.select.count)
        heaps = scored.map_batches(stages.block_topk, batch_format="pyarrow", batch_size=None, fn_kwargs={"k": k},
                                   num_cpus=self.cfg.ray.task_num_cpus)
        parts = [(b["score"].to_numpy(), b["id"].to_numpy(zero_copy_only=False))
                 for b in heaps.iter_batches(batch_format="pyarrow", batch_size=None)]
        parts = [(s[np.lexsort((i.astype(str), -s))], i[np.lexsort((i.astype(str), -s))]) for s, i in parts]
        from .scoring import merge_topk

        self.top_scores, self.top_ids = merge_topk(parts, k)
        all_scores = pa.concat_tables(list(scored.iter_batches(batch_format="pyarrow", batch_size=None)))
        self.scores = idx.select(["id", "content_hash", "file", "row"]).join(
            all_scores.select(["id", "score"]), "id", join_type="left outer").sort_by([("file", "ascending"), ("row", "ascending")])
        missing = self.scores.filter(pc.is_null(self.scores.column("score")))
        if len(missing):
            raise RunError(f"{len(missing)} source rows have no embedding in {self.store} (first: "
                           f"{missing.column('id')[0].as_py()}); this is a bug, please report it")
        self.counts["source"]["rows_scored"] = len(self.scores)
        self.timings["score"] = time.perf_counter() - t0

    def score_with_selector(self) -> None:
        """A baseline selector (bm25, dsir, dense, random, nait) on the prepared rows, on the driver."""
        from .scoring import selection_size, topk
        from .selectors import selector_from_config

        t0 = time.perf_counter()
        sel = selector_from_config(self.cfg)
        src, src_ids = self._messages("source")
        tgt, _ = self._messages("target")
        s = np.asarray(sel.score(src, tgt, src_ids), dtype=np.float64)
        idx = self.index["source"]
        by_id = pa.table({"id": pa.array(src_ids, pa.string()), "score": pa.array(s, pa.float64())})
        self.scores = idx.select(["id", "content_hash", "file", "row"]).join(by_id, "id").sort_by(
            [("file", "ascending"), ("row", "ascending")])
        self.k = selection_size(len(s), self.cfg.select.ratio, self.cfg.select.count)
        self.top_scores, self.top_ids = topk(s, src_ids, self.k)
        self.counts["source"]["rows_scored"] = len(self.scores)
        self.counts["embedded_now"] = self.counts["reused_from_store"] = 0
        self.embed_stats = dict.fromkeys(EMBED_STATS, 0)
        self.timings["score"] = time.perf_counter() - t0

    def _messages(self, role: str) -> tuple[list[list[dict]], list[str]]:
        """The usable rows of a set as conversations, in file order, read back from the prepared parts."""
        msgs, ids = [], []
        for pi, (_, positions) in sorted(_rows_by_part(self.index[role]).items()):
            parts = self.source_parts if role == "source" else self.target_parts
            t = pq.read_table(parts[pi]["part"], columns=["id", "record"]).take(pa.array(positions, pa.int64()))
            ids += t.column("id").to_pylist()
            msgs += [records.normalize_record(json.loads(r)) for r in t.column("record").to_pylist()]
        return msgs, ids

    def explain(self) -> None:
        """explain.json / explain.md: the prototype's latents and why each selected row was chosen.

        Runs as one Ray task with an embedding actor's resources (a GPU on a cluster)."""
        import ray

        t0 = time.perf_counter()
        tgt_ids, tgt_masks = [], []
        for pi, (_, positions) in sorted(_rows_by_part(self.index["target"]).items()):
            t = pq.read_table(self.target_parts[pi]["part"], columns=["input_ids", "pool_mask"]).take(
                pa.array(positions, pa.int64()))
            tgt_ids += t.column("input_ids").to_pylist()
            tgt_masks += t.column("pool_mask").to_pylist()
        sel_hash = dict(zip(self.scores.column("id").to_pylist(), self.scores.column("content_hash").to_pylist()))
        want = {sel_hash[i] for i in self.top_ids}
        vecs = {}
        for f in self._store_files_for(want):
            t = pq.read_table(f)
            for h, ind, val in zip(t.column("content_hash").to_pylist(), t.column("indices").to_pylist(),
                                   t.column("values").to_pylist()):
                if h in want:
                    vecs[h] = (np.asarray(ind, np.int32), np.asarray(val, np.float32))
        selected = [(rid, *vecs[sel_hash[rid]]) for rid in self.top_ids]
        remote = ray.remote(**self._actor_resources())(stages.explain_task)
        doc = ray.get(remote.remote(self._embed_job(), tgt_ids, tgt_masks, self.proto, selected))
        from .interpret import write_explain

        write_explain(doc, self.out)
        self.timings["explain"] = time.perf_counter() - t0

    # -------------------------------------------------------------- outputs

    def write_outputs(self) -> dict:
        t0 = time.perf_counter()
        out = self.out
        stages.write_atomic(self.scores.select(["id", "score", "file", "row"]), out / "scores.parquet", 65536)
        rej = pa.concat_tables([self.rejected[r].append_column("set", pa.array([r] * len(self.rejected[r]), pa.string()))
                                for r in ("source", "target")])
        stages.write_atomic(rej.sort_by([("set", "ascending"), ("file", "ascending"), ("row", "ascending")]),
                            out / "rejected.parquet")
        self.selected = selected = self._selected_records()
        report.write_selection(selected, out)
        self.timings["write"] = time.perf_counter() - t0
        return report.manifest(self, selected)

    def _selected_records(self) -> list[dict]:
        idx = self.index["source"]
        rank = {rid: r for r, rid in enumerate(self.top_ids, start=1)}
        score = dict(zip(self.top_ids, self.top_scores))
        sel = idx.filter(pc.is_in(idx.column("id"), pa.array(list(self.top_ids), pa.string())))
        recs = {}
        for pi in sorted(set(sel.column("part").to_pylist())):
            part_rows = sel.filter(pc.equal(sel.column("part"), pi))
            t = pq.read_table(self.source_parts[pi]["part"], columns=["id", "record"]).take(part_rows.column("pos"))
            for rid, rec in zip(t.column("id").to_pylist(), t.column("record").to_pylist()):
                recs[rid] = json.loads(rec)
        out = []
        for rid in self.top_ids:
            rec = recs[rid]
            rec = rec if isinstance(rec, dict) else {"record": rec}
            out.append({**rec, "id": rid, "score": float(score[rid]), "rank": rank[rid]})
        return out

    # -------------------------------------------------------------- all

    def run(self) -> dict:
        import ray

        self.source_parts, self.target_parts = [], []
        self.plan()
        started_here = _init_ray(self.cfg)
        try:
            self.prepare()
            self.dedupe()
            if self.cfg.select.method == "mona":
                self.embed()
                self.prototype()
                self.score()
            else:
                self.score_with_selector()
            manifest = self.write_outputs()
            if self.cfg.select.method == "mona" and self.cfg.report.explain and self.cfg.embed.representation == "sae":
                self.explain()
                manifest["timings_s"]["explain"] = round(self.timings["explain"], 3)
                manifest["files"]["explain"] = "explain.md"
            # written last: "complete" means every output above is in place
            report.write_json_atomic(manifest, self.out / "manifest.json")
            return manifest
        finally:
            if started_here:
                ray.shutdown()


def _rows_by_part(idx: pa.Table) -> dict[int, tuple[list[str], list[int]]]:
    """Group an index table by prepared part: part -> (content hashes, row positions), in file order."""
    part = idx.column("part").to_numpy()
    order = np.lexsort((idx.column("pos").to_numpy(), part))
    part = part[order]
    hashes = np.asarray(idx.column("content_hash").to_pylist(), dtype=object)[order]
    pos = idx.column("pos").to_numpy()[order]
    starts = np.flatnonzero(np.r_[True, part[1:] != part[:-1]]) if len(part) else np.zeros(0, int)
    ends = np.r_[starts[1:], len(part)]
    return {int(part[a]): (list(hashes[a:b]), [int(x) for x in pos[a:b]]) for a, b in zip(starts, ends)}


def _first_per_hash(t: pa.Table) -> pa.Table:
    """Keep one row per content hash (the store may hold a hash twice after a retried write)."""
    hashes = t.column("content_hash").to_pylist()
    seen, keep = set(), []
    for i, h in enumerate(hashes):
        if h not in seen:
            seen.add(h)
            keep.append(i)
    return t.take(pa.array(keep, pa.int64())) if len(keep) < len(t) else t


def _init_ray(cfg) -> bool:
    import ray

    if ray.is_initialized():
        return False
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    import logging

    kw = dict(ignore_reinit_error=True, include_dashboard=False, log_to_driver=cfg.ray.log_to_driver,
              logging_level=logging.WARNING)
    if address:
        ray.init(address=address, **kw)
    else:
        # "local": always a fresh instance for this run, never a stray `ray start` cluster on this machine
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, num_gpus=cfg.ray.num_gpus, **kw)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours are per stage, in rows and tokens
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    return True
