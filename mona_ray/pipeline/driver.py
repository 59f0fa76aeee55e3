"""The MoNA job on Ray Data: a thin orchestration layer over ``stages.py``.

    plan      driver    check paths and rendering, split inputs into row units (one indexing
                        pass per file, see records.plan_units); device, dtype, fingerprints
    prepare   tasks     read + validate + render + tokenize each unit  -> prepared/<fp>/
    dedupe    driver    duplicate ids rejected (Arrow); identical content embedded once
    embed     actors    model + SAE, units of <= rows_per_unit rows     -> embeddings/<fp>/
    prototype driver    mean of the target rows                         -> prototype.safetensors
    score     tasks     similarity per store part -> streamed through a running top-k here
    report    driver    scores, selection (Parquet + JSONL), trainer files, rejected, manifest
    explain   task      the prototype's top tokens (model + SAE on the target rows only);
                        the selected rows' contributions read from the store, only those rows

The driver holds O(rows) Arrow columns (ids, hashes, scores), never the records or the
embeddings themselves.

Where it writes (``publish.py``): each attempt writes its outputs into
``<output_dir>/runs/<run id>/`` under the folder's lease, and a complete run is published by
one atomic rename of ``<output_dir>/current``; readers of ``<output_dir>/selected.jsonl`` see
the previous selection until then. Prepared parts, staged copies and the embedding store
live beside the attempts and are checked before reuse (a damaged one is quarantined and
rebuilt).

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

import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..config import RunConfig
from ..core import procmem, records
from ..core.io import sha as _sha
from ..core.io import read_parquet, reusable, write_json, write_parquet
from ..core.model import ModelError, fingerprint_model, parse_hookpoint, resolve_model_path
from ..core.records import InputError
from ..core.sae import SAEError, to_sparsify_hookpoint
from ..features.engine import Batching
from ..features.local import Rendering
from ..features.readouts import Readout, rds_readout
from ..features.spec import EngineJob, num_layers, readout_width, representation_readout, sae_ref
from ..features.store import FeatureStore, embedding_fingerprint, first_per_key, groups_of
from ..core import executor
from . import publish, report, stages

FINGERPRINT_VERSION = 2
# summed over the embedding actor's per-unit reports (unit_seconds: read + embed + write)
EMBED_STATS = ("real_tokens", "padded_tokens", "forward_seconds", "unit_seconds")


class RunError(RuntimeError):
    """The run cannot go on; the message says why and what to change."""


def _tqdm(**kw):
    from tqdm.auto import tqdm

    return tqdm(dynamic_ncols=True, file=sys.stderr, **kw)


# ----------------------------------------------------------------------------- validation


def resolve_sae(cfg):
    """The run's SAE (metadata only), or None when the representation needs none and none is set."""
    if cfg.embed.representation == "sae":
        return sae_ref(cfg.sae.path, cfg.sae.format, cfg.sae.hookpoint, cfg.sae.k)
    if cfg.embed.representation == "mlp_gate" and not cfg.embed.mlp_k and cfg.sae.path:
        return sae_ref(cfg.sae.path, cfg.sae.format, cfg.sae.hookpoint, cfg.sae.k)  # its K is mlp_gate's default
    return None


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse to redo a finished run unless asked. Nothing is deleted: a redo writes a new
    attempt and the finished selection stays published until the new one replaces it."""
    if (publish.published_manifest(out) or {}).get("status") == "complete" and not overwrite:
        raise RunError(f"run.output_dir={str(out)!r} already holds a finished run. Pass run.overwrite=true "
                       "to redo it (the finished selection stays readable until the new one replaces it; "
                       "prepared rows and embeddings are reused), or choose another run.output_dir.")


# ----------------------------------------------------------------------------- the job


class Pipeline:
    """The job for one typed :class:`~mona_ray.config.RunConfig` (``cfg_dict``: the same
    settings as plain data, recorded in the manifest)."""

    def __init__(self, cfg: RunConfig, cfg_dict: dict):
        self.cfg = cfg
        self.cfg_dict = cfg_dict
        self.root = Path(cfg.run.output_dir).expanduser().resolve()  # what readers see (publish.py)
        self.run_id = publish.new_run_id()
        self.out = self.root / publish.RUNS / self.run_id  # this attempt's outputs, published at the end
        self.lock: publish.OutputLock | None = None
        self.quarantined: list[dict] = []  # damaged parts moved aside this run (store and prepared)
        self.timings: dict[str, float] = {}
        self.counts: dict = {}
        self.units = {"prepare": 0, "embed": 0}
        self.rows_per_actor: dict[str, int] = {}
        self.selected: list[dict] = []

    # -------------------------------------------------------------- plan

    def plan(self) -> None:
        cfg = self.cfg
        t0 = time.perf_counter()
        if cfg.embed.representation not in ("sae", "hidden", "mlp_gate"):
            raise RunError(f"embed.representation={cfg.embed.representation!r}: use sae, hidden or mlp_gate")
        cfg.sae.hookpoint = to_sparsify_hookpoint(cfg.sae.hookpoint)  # SAELens hook names accepted too
        address = executor.address_of(cfg.ray)
        if address:
            executor.check_reachable(address)  # before any work: ray.init retries an unreachable address for minutes
        parse_hookpoint(cfg.sae.hookpoint)
        # Check every path before any work starts (and before anything is written), all problems at once.
        problems = []
        model_dir = sae_info = None
        try:
            model_dir = resolve_model_path(str(cfg.model.path))
        except ModelError as e:
            problems.append(str(e))
        try:
            sae_info = resolve_sae(cfg)
        except SAEError as e:
            problems.append(str(e))
        files = {}
        for role in ("source", "target"):
            try:
                files[role] = records.input_files(list(getattr(cfg, role).paths))
            except InputError as e:
                problems.append(f"{role}.paths: {e}; set {role}.paths=[/path/to/files_or_folders]")
        if problems:
            raise InputError("\n  ".join(["cannot start:"] + problems) if len(problems) > 1 else problems[0])
        for role in ("source", "target"):
            if not files[role]:
                raise InputError(f"the {role} set {getattr(cfg, role).paths} has no usable rows: no .parquet/.jsonl/.json "
                                 f"(or .jsonl.gz/.json.gz) file matched; set {role}.paths=[...]")
        self.model_dir, self.sae_info = model_dir, sae_info
        self.tokenizer_check()
        check_output_dir(self.root, cfg.run.overwrite)
        self.root.mkdir(parents=True, exist_ok=True)
        publish.check_layout(self.root)
        self.lock = publish.OutputLock(self.root, self.run_id, cfg.run.lock_stale_s, wait_s=cfg.run.lock_wait_s).acquire()
        last = publish.published(self.root)
        if last:  # links a stopped publish may have left half made, made whole
            with _signals_held():
                publish.publish(self.root, last)
        check_output_dir(self.root, cfg.run.overwrite)  # again under the lease: a run may have finished meanwhile
        publish.prune(self.root, int(cfg.run.keep_runs))  # unfinished attempts; their parts stay for reuse
        self.out.mkdir(parents=True, exist_ok=True)
        staging = self.root / "staged"
        self.source_units = records.plan_units(files["source"], cfg.embed.rows_per_unit, staging_dir=staging)
        self.target_units = records.plan_units(files["target"], cfg.embed.rows_per_unit, staging_dir=staging)
        for role, units in (("source", self.source_units), ("target", self.target_units)):
            if not units:
                raise InputError(f"the {role} set {getattr(cfg, role).paths} has no usable rows: its files are empty "
                                 f"({', '.join(map(str, files[role]))})")
        self.timings["plan"] = time.perf_counter() - t0

    def fingerprint(self) -> None:
        """Device, dtype and the fingerprints that key the prepared rows and the embedding store
        (needs Ray: whether the actors get GPUs decides the device)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        self.device = "cuda" if self._use_gpu() else "cpu"
        self.dtype, self.dtype_reason = self._resolve_dtype()
        self.model_fp = fingerprint_model(self.model_dir)
        self.rendering = Rendering.of(cfg.render)
        render = self.rendering.spec()
        self.prep_fp = _sha({"v": FINGERPRINT_VERSION, "model": self.model_fp, **render, "exclude": cfg.pool.exclude})
        # RDS+: position-weighted mean hidden states, cosine, round-robin; select.rds_variant=published reads
        # hidden_states[-1] and interleaves as the authors' code does (targets in file order, a taken row spends the turn)
        self.rds_published = cfg.select.method == "rds" and cfg.select.rds_variant == "published"
        if cfg.select.method == "rds":
            self.readout = (rds_readout(num_layers(self.model_dir, cfg.model.trust_remote_code)) if self.rds_published
                            else Readout("hidden", parse_hookpoint(cfg.sae.hookpoint), "none", weighting="position"))
            self.similarity, self.aggregate = "cosine", "round_robin"
        else:
            self.readout = representation_readout(cfg.embed.representation, cfg.sae.hookpoint, cfg.pool.exclude,
                                                  self.sae_info, cfg.embed.mlp_k)
            self.similarity, self.aggregate = cfg.select.similarity, cfg.select.aggregate
        self.batching = Batching.of(cfg.embed)
        sae_fp = self.sae_info.fingerprint if self.readout.kind == "sae" and self.sae_info else None
        self.embed_fp = embedding_fingerprint(self.model_fp, self.dtype, render, self.readout.spec(), sae_fp,
                                              self.batching.pad_multiple, self.batching.sae_chunk_tokens,
                                              self.batching.value_dtype)
        self.width = readout_width(self.readout, self.model_dir, self.sae_info, cfg.model.trust_remote_code)
        self.prepared_dir = self.root / "prepared" / self.prep_fp
        store = cfg.embed.store_dir or str(self.root / "embeddings")
        self.store = FeatureStore(Path(store).expanduser().resolve() / self.embed_fp)
        self.store.root.mkdir(parents=True, exist_ok=True)
        # the folders a run writes, as they are now: a mount that goes away mid-run is noticed
        self.folders = {"run.output_dir": (self.root, publish.identity(self.root)),
                        "the embedding store": (self.store.root, publish.identity(self.store.root))}
        write_json({
            "model": str(cfg.model.path), "model_fingerprint": self.model_fp,
            "sae": asdict(self.sae_info) if sae_fp else None, "readout": self.readout.spec(),
            "readout_name": self.readout.name, "render": render, "dtype": self.dtype,
            "value_dtype": cfg.embed.value_dtype, "pad_multiple": self.batching.pad_multiple,
            "sae_chunk_tokens": self.batching.sae_chunk_tokens}, self.store.root / "fingerprint.json")
        write_json({"status": "running", "run_id": self.run_id, "config": self.cfg_dict}, self.out / "manifest.json")
        self.timings["plan"] += time.perf_counter() - t0

    def tokenizer_check(self) -> None:
        """Render and tokenize one conversation on the driver before any task starts, so a
        rendering that cannot work with this model's tokenizer fails here, clearly."""
        from ..core.model import load_tokenizer

        cfg = self.cfg
        tok = load_tokenizer(self.model_dir, cfg.model.trust_remote_code)
        probe = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]
        try:
            rendered = records.render(probe, tok, cfg.render.mode, cfg.render.system_prompt)
            records.tokenize(rendered, tok, cfg.render.max_length, cfg.pool.exclude)
        except (InputError, ValueError) as e:
            hint = (" The tokenizer at model.path has no chat template (a base model, e.g. Meta-Llama-3-8B): "
                    "set render.mode=plain." if cfg.render.mode == "chat_template" and not getattr(tok, "chat_template", None)
                    else "")
            raise InputError(f"render.mode={cfg.render.mode!r} cannot render with the tokenizer of "
                             f"model.path={str(cfg.model.path)!r}: {e}.{hint}") from None
        except Exception as e:  # noqa: BLE001 - a template that raises on an ordinary conversation
            raise InputError(f"render.mode={cfg.render.mode!r}: the tokenizer of model.path={str(cfg.model.path)!r} "
                             f"failed on a plain two-turn conversation ({type(e).__name__}: {e}); "
                             "set render.mode=plain or fix the chat template") from None

    def _resolve_dtype(self) -> tuple[str, str]:
        """The compute dtype every actor uses (decided once, here) and why."""
        import torch

        from ..core.model import dtype_name, resolve_dtype_reason

        name = str(self.cfg.model.dtype)
        if name == "auto" and self.device == "cuda" and not torch.cuda.is_available():
            # the driver has no GPU to ask; the actors' GPUs are assumed to be Ampere or newer
            return "bfloat16", "auto: CUDA actors (bf16 assumed: Ampere or newer; set model.dtype otherwise)"
        dt, why = resolve_dtype_reason(name, self.device)
        return dtype_name(dt), why

    # -------------------------------------------------------------- prepare

    def prepare(self) -> None:
        t0 = time.perf_counter()
        rs = stages.RenderSettings(str(self.model_dir), self.rendering, self.cfg.pool.exclude,
                                   self.cfg.model.trust_remote_code)
        todo = []
        self.source_parts, self.target_parts = [], []
        for role, units in (("source", self.source_units), ("target", self.target_units)):
            for u in units:
                st = Path(u.path).stat()
                key = _sha([u.path, st.st_size, st.st_mtime_ns, u.start, u.stop])
                part = self.prepared_dir / role / f"{key}.parquet"
                rej = self.prepared_dir / role / f"{key}.rejected.parquet"
                u_info = {"role": role, "unit": u, "part": part, "rejected": rej}
                (self.source_parts if role == "source" else self.target_parts).append(u_info)
                if not all([reusable(f, "prepared part", self.quarantined) for f in (part, rej)]):
                    todo.append(u_info)
        self.units["prepare"] = len(todo)
        if todo:
            items = [stages.PrepareUnit(t["unit"], str(t["part"]), str(t["rejected"])) for t in todo]
            done = executor.map_items(items, stages.prepare, fn_kwargs={"rs": rs}, num_cpus=self.cfg.ray.task_num_cpus)
            known = [t["unit"].stop - t["unit"].start for t in todo if t["unit"].stop >= 0]
            rejected = 0
            with _tqdm(total=sum(known) if len(known) == len(todo) else None, desc="prepare (rows read+tokenized)",
                       unit="row") as bar:  # closed (its line ended) however the stage ends
                for res in done:
                    bar.update(res.rows_ok + res.rows_rejected)
                    rejected += res.rows_rejected
                    bar.set_postfix(rejected=rejected)
        self.timings["prepare"] = time.perf_counter() - t0

    def _load_index(self, parts: list[dict]) -> tuple[pa.Table, pa.Table]:
        """The usable rows of a set: ``id, content_hash, row, n_tokens, part, pos`` (``part``
        indexes ``parts``, whose unit names the file: no file name is repeated per row)."""
        tabs, rejs = [], []
        for i, p in enumerate(parts):
            t = read_parquet(p["part"], ["id", "content_hash", "row", "n_tokens"])
            tabs.append(t.append_column("part", pa.array(np.full(len(t), i, np.int32))).append_column(
                "pos", pa.array(np.arange(len(t), dtype=np.int64))))
            rejs.append(read_parquet(p["rejected"]))
        idx = pa.concat_tables(tabs) if tabs else None
        rej = pa.concat_tables(rejs) if rejs else stages.rejected_table([])
        return idx, rej

    def dedupe(self) -> None:
        """Reject repeated ids (keeping the first, in file order) and record the row counts (Arrow only)."""
        self.index, self.rejected = {}, {}
        for role, parts in (("source", self.source_parts), ("target", self.target_parts)):
            idx, rej = self._load_index(parts)
            idx, dup_rej = split_duplicate_ids(idx, _part_files(parts))
            if len(dup_rej):
                rej = pa.concat_tables([rej, dup_rej])
            self.index[role] = idx
            self.rejected[role] = rej
            n_in = len(idx) + len(rej)
            self.counts[role] = {"rows_in": n_in, "rows_rejected": len(rej), "rows_usable": len(idx)}
        self._check_rejections("source")
        self._check_rejections("target")

    def _check_rejections(self, role: str) -> None:
        c = self.counts[role]
        paths = list(getattr(self.cfg, role).paths)
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

    def _embed_units(self) -> list[stages.EmbedUnit]:
        """Units of at most ``embed.rows_per_unit`` rows that are not in the store yet, each
        content embedded once (targets first, then the source, in file order)."""
        cap = int(self.cfg.embed.rows_per_unit)
        both = []
        for order, role in enumerate(("target", "source")):
            t = self.index[role].select(["content_hash", "part", "pos"])
            both.append(t.append_column("role", pa.array(np.full(len(t), order, np.int8))))
        todo = pa.concat_tables(both)
        todo = todo.filter(pc.invert(pc.is_in(todo.column("content_hash"),
                                              value_set=self.store.index().column("content_hash").combine_chunks())))
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
            parts = self.target_parts if role[a] == 0 else self.source_parts
            for s in range(int(a), int(b), cap):
                e = min(int(b), s + cap)
                key = _sha(sorted(hashes.slice(s, e - s).to_pylist()))  # named after its content: resumable
                units.append(stages.EmbedUnit(key, str(parts[int(part[a])]["part"]), tuple(int(x) for x in pos[s:e]),
                                              {self.readout.name: str(self.store.part_path(key))}))
        return units

    def embed(self) -> None:
        t0 = time.perf_counter()
        units = self._embed_units()
        self.units["embed"] = len(units)
        current = pa.concat_tables([self.index[r].select(["content_hash"]) for r in ("source", "target")])
        n_unique = len(pc.unique(current.column("content_hash")))
        self.counts["embedded_now"] = sum(len(u.rows) for u in units)
        self.counts["reused_from_store"] = n_unique - self.counts["embedded_now"]
        self.embed_stats = dict.fromkeys(EMBED_STATS, 0)
        embed_rejected = []
        if units:
            job = self._embed_job()
            n_actors = self._num_actors()
            progress = executor.Counter()
            # one engine per actor; a dead actor is restarted and its unit retried (a lost node costs its units in flight)
            results = executor.map_items(units, actor=(stages.EmbedActor, (job, progress), "embed_unit"), size=n_actors,
                                         **self._actor_resources())
            total_rows = sum(len(u.rows) for u in units)
            bar = _tqdm(total=total_rows, desc=f"embed (rows, {n_actors} actor{'s' * (n_actors > 1)})", unit="row")
            with _LiveProgress(bar, progress, total_rows) as live:
                for r in results:
                    done = r.rows + len(r.rejected)
                    live.unit_done(done)
                    for k in EMBED_STATS:
                        self.embed_stats[k] += getattr(r, k)
                    self.rows_per_actor[r.actor] = self.rows_per_actor.get(r.actor, 0) + done
                    embed_rejected += r.rejected
            progress.close()
            self.store.add_parts([p for u in units for p in u.out.values() if Path(p).exists()])
        self.timings["embed"] = time.perf_counter() - t0
        if embed_rejected:
            self._reject_embed_failures(embed_rejected)

    def _reject_embed_failures(self, rows: list[dict]) -> None:
        table = stages.rejected_table(rows)
        failed = table.column("id").combine_chunks()
        for role in ("source", "target"):
            idx = self.index[role]
            mask = pc.is_in(idx.column("id"), value_set=failed)
            hit = table.filter(pc.is_in(table.column("id"), value_set=idx.column("id").combine_chunks()))
            if len(hit):
                self.index[role] = idx.filter(pc.invert(mask))
                self.rejected[role] = pa.concat_tables([self.rejected[role], hit])
                self.counts[role]["rows_rejected"] += len(hit)
                self.counts[role]["rows_usable"] -= len(hit)
            self._check_rejections(role)

    def _num_actors(self) -> int:
        n = self.cfg.embed.num_actors
        if n not in (None, "auto"):
            return int(n)
        gpus = int(executor.resources().get("GPU", 0))
        return max(1, gpus) if self.device == "cuda" else 1

    def _use_gpu(self) -> bool:
        dev = self.cfg.model.device
        if dev == "cuda":
            return True
        if dev != "auto":
            return False
        return executor.resources().get("GPU", 0) >= 1

    def _actor_resources(self) -> dict:
        """An embedding actor's (or explain task's) resources, as the executor takes them."""
        custom = dict(self.cfg.embed.actor_resources)  # e.g. pin actors to a node type
        if self.device == "cuda":
            return {"num_gpus": 1, "num_cpus": self.cfg.embed.actor_num_cpus_gpu, "custom": custom}
        return {"num_cpus": self.cfg.embed.actor_num_cpus_cpu, "custom": custom}

    def _embed_job(self) -> EngineJob:
        cfg = self.cfg
        threads = cfg.embed.torch_threads
        if threads in (None, "auto"):
            threads = 0 if self.device == "cuda" else max(1, (os.cpu_count() or 1) // max(1, self._num_actors()))
        return EngineJob(model_dir=str(self.model_dir), dtype=self.dtype, device=self.device,
                         readouts=(self.readout,), saes=(self.sae_info,) if self.readout.kind == "sae" else (),
                         batching=self.batching, torch_threads=int(threads),
                         trust_remote_code=cfg.model.trust_remote_code, attn_implementation=cfg.model.attn_implementation)

    # -------------------------------------------------------------- prototype + score

    def prototype(self) -> None:
        from safetensors.numpy import save_file

        from ..scoring.table import build_targets

        t0 = time.perf_counter()
        # one prototype entry per target row (duplicated content counts twice), in id order
        tgt = self.index["target"].select(["id", "content_hash", "part", "pos"]).sort_by(
            [("part", "ascending"), ("pos", "ascending")] if self.rds_published else "id")  # published RDS+: file order
        try:
            joined = self.store.read_ordered(tgt.column("content_hash").to_pylist(), ["n_pooled", "indices", "values"])
        except KeyError:
            raise RunError(f"target rows have no embedding in {self.store.root}; this is a bug, please report it") from None
        dense, sel = not self.readout.sparse, self.cfg.select
        self.proto, self.protos, self.aggregation = build_targets(
            joined, self.width, dense, self.aggregate, float(sel.prototype_mass), sel.cluster_seed, sel.max_clusters,
            self.cfg.pool.method, sel.mass_rule, sel.min_silhouette)
        labels, ids = self.aggregation.pop("labels", None), tgt.column("id").to_pylist()
        if labels is not None and len(self.protos) > 1:
            self.aggregation["members"] = [[i for i, q in zip(ids, labels) if q == c] for c in range(len(self.protos))]
        if not dense and sel.row_mass < 1:  # dense readouts are compared whole
            self.aggregation["row_mass"] = float(sel.row_mass)
        save_file({"prototype": self.proto.astype(np.float32), "prototypes": self.protos.astype(np.float32)},
                  str(self.out / "prototype.safetensors"),
                  metadata={"rows": str(len(joined)), "embedding_fingerprint": self.embed_fp,
                            "aggregate": self.aggregate})
        self.timings["prototype"] = time.perf_counter() - t0

    def score(self) -> None:
        """Every source row scored by tasks, one group of store parts each; the driver streams the
        results through a running top-k and keeps only (id, score) in Arrow."""
        from ..scoring import RunningTopK
        from ..scoring import selection_size

        t0 = time.perf_counter()
        idx = self.index["source"].select(["id", "content_hash"])
        idx = idx.append_column("row_at", pa.array(np.arange(len(idx), dtype=np.int64)))
        loc = idx.join(self.store.index(), "content_hash", join_type="left outer")
        missing = loc.filter(pc.is_null(loc.column("part")))
        if len(missing):
            raise RunError(f"{len(missing)} source rows have no embedding in {self.store.root} (first: "
                           f"{missing.column('id')[0].as_py()}); this is a bug, please report it")
        loc = loc.sort_by([("part", "ascending"), ("id", "ascending")])
        groups = _groups_of_parts(loc, int(self.cfg.select.score_batch_rows))
        self.k = k = selection_size(len(idx), self.cfg.select.ratio, self.cfg.select.count)
        rr = self.aggregate == "round_robin"
        batches = executor.map_tables(
            groups, stages.score_parts, num_cpus=self.cfg.ray.task_num_cpus,
            fn_kwargs={"protos": executor.put(self.protos), "paths": executor.put(list(self.store.paths)),
                       "similarity": self.similarity, "pooling": self.cfg.pool.method,
                       "batch_rows": self.cfg.select.score_batch_rows, "dense": not self.readout.sparse,
                       "candidates": k if rr else 0, "row_mass": float(self.cfg.select.row_mass)})
        top = RunningTopK(k) if not rr else None
        per_target = [RunningTopK(k) for _ in range(len(self.protos))] if rr else None
        scores = np.zeros(len(idx))  # by position in the index: no join on the ids afterwards
        seen = np.zeros(len(idx), dtype=bool)
        with _tqdm(total=len(idx), desc="score (rows)", unit="row") as bar:
            for b in batches:
                j = b.column("target").to_numpy()
                if rr:  # each task's best k rows per target row, merged here into one list per target
                    for t in np.unique(j[j >= 0]):
                        c = b.filter(pa.array(j == t))
                        per_target[int(t)].add(c.column("score").to_numpy(),
                                               c.column("id").to_numpy(zero_copy_only=False))
                b = b.filter(pa.array(j < 0))
                if top is not None:
                    top.add(b.column("score").to_numpy(), b.column("id").to_numpy(zero_copy_only=False))
                at = b.column("row_at").to_numpy()
                scores[at], seen[at] = b.column("score").to_numpy(), True
                bar.update(len(b))
        if rr:
            from ..scoring.aggregate import round_robin

            ids, _, sc = round_robin([t.result() for t in per_target], k, skip_taken=not self.rds_published)
            self.top_scores, self.top_ids = sc, ids
        else:
            self.top_scores, self.top_ids = top.result()
        self._set_scores_at(scores, seen)
        self.timings["score"] = time.perf_counter() - t0

    def _set_scores(self, by_id: pa.Table) -> None:
        """Every usable source row's score from an ``(id, score)`` table (a baseline selector's)."""
        idx = self.index["source"].select(["id"]).append_column(
            "row_at", pa.array(np.arange(len(self.index["source"]), dtype=np.int64)))
        j = idx.join(by_id.select(["id", "score"]), "id", join_type="inner")
        scores, seen = np.zeros(len(idx)), np.zeros(len(idx), dtype=bool)
        at = j.column("row_at").to_numpy()
        scores[at], seen[at] = j.column("score").to_numpy(zero_copy_only=False), True
        self._set_scores_at(scores, seen)

    def _set_scores_at(self, scores: np.ndarray, seen: np.ndarray) -> None:
        """Every usable source row's score (``scores[i]``: row ``i`` of the source index, scored
        where ``seen[i]``), in input order (file, then row)."""
        idx = self.index["source"]
        missing = np.flatnonzero(~seen)
        if len(missing):
            raise RunError(f"{len(missing)} source rows got no score (first: {idx.column('id')[int(missing[0])].as_py()}); "
                           "this is a bug, please report it")
        t = idx.select(["id", "content_hash", "part", "pos", "row"]).append_column("score", pa.array(scores, pa.float64()))
        part, pos = t.column("part").to_numpy(), t.column("pos").to_numpy()
        in_order = len(t) < 2 or bool(np.all((part[1:] > part[:-1]) | ((part[1:] == part[:-1]) & (pos[1:] > pos[:-1]))))
        self.scores = t if in_order else t.sort_by([("part", "ascending"), ("pos", "ascending")])
        self.counts["source"]["rows_scored"] = len(self.scores)

    def score_with_selector(self) -> None:
        """A baseline selector (bm25, dsir, dense, random, nait) on the prepared rows.

        bm25, dsir, dense and random run as Ray tasks over the prepared parts
        (``selectors.scale``: bounded driver memory at 1M rows); nait needs the selection
        model's activations per row and still runs on the driver."""
        from ..scoring import selection_size, topk
        from ..selectors.scale import METHODS, score_distributed

        t0 = time.perf_counter()
        method = self.cfg.select.method
        tgt, _ = self._messages("target")
        if method in METHODS:
            parts = [(str(self.source_parts[pi]["part"]), positions)
                     for pi, positions in _positions_by_part(self.index["source"])]
            opts = dict(getattr(self.cfg.select, method))
            info: dict = {}
            by_id = score_distributed(method, opts, parts, tgt, task_num_cpus=self.cfg.ray.task_num_cpus, info=info)
            self.selection_filter = info.get("filter")  # rows a baseline scored lowest on purpose, and why (dsir)
        else:
            from ..selectors import selector_from_config

            src, src_ids = self._messages("source")
            s = np.asarray(selector_from_config(self.cfg).score(src, tgt, src_ids), dtype=np.float64)
            by_id = pa.table({"id": pa.array(src_ids, pa.string()), "score": pa.array(s, pa.float64())})
        self._set_scores(by_id)
        self.k = selection_size(len(by_id), self.cfg.select.ratio, self.cfg.select.count)
        self.top_scores, self.top_ids = topk(by_id.column("score").to_numpy(),
                                             by_id.column("id").to_numpy(zero_copy_only=False), self.k)
        self.counts["embedded_now"] = self.counts["reused_from_store"] = 0
        self.embed_stats = dict.fromkeys(EMBED_STATS, 0)
        self.timings["score"] = time.perf_counter() - t0

    def _check_folders(self) -> None:
        """Stop with one line when a folder the run writes is no longer the one it started with
        (its mount went away or was replaced: writes would land on the disk beneath it)."""
        for what, (path, ident) in self.folders.items():
            if publish.identity(path) != ident:
                raise RunError(f"{what} {path} went away while the run was writing it (an unmounted or remounted "
                               "filesystem?). Mount it again, then run the same command again to resume")
        if self.lock.lost:
            raise RunError(f"another run took the lease of run.output_dir={str(self.root)!r} while this one ran "
                           f"(no heartbeat for run.lock_stale_s={self.cfg.run.lock_stale_s:g} s?); this run stops "
                           f"unpublished (its outputs so far: {self.out})")

    def _messages(self, role: str) -> tuple[list[list[dict]], list[str]]:
        """The usable rows of a set as conversations, in file order, read back from the prepared parts."""
        msgs, ids = [], []
        for pi, positions in _positions_by_part(self.index[role]):
            parts = self.source_parts if role == "source" else self.target_parts
            t = read_parquet(parts[pi]["part"], ["id", "record"], positions)
            ids += t.column("id").to_pylist()
            msgs += [records.normalize_record(json.loads(r)) for r in t.column("record").to_pylist()]
        return msgs, ids

    def explain(self) -> None:
        """explain.json / explain.md: the prototype's latents and why each selected row was chosen.

        The prototype's top tokens need the model: one Ray task with an embedding actor's
        resources (a GPU on a cluster), over the target rows only. The selected rows'
        contributions are computed here meanwhile, from the store, reading only the selected rows."""
        from ..features.interpret import strongest_latents, write_explain

        t0 = time.perf_counter()
        tgt_ids, tgt_masks, tgt_rid = [], [], []
        for pi, positions in _positions_by_part(self.index["target"]):
            t = read_parquet(self.target_parts[pi]["part"], ["id", "input_ids", "pool_mask"], positions)
            tgt_ids += t.column("input_ids").to_pylist()
            tgt_masks += t.column("pool_mask").to_pylist()
            tgt_rid += t.column("id").to_pylist()
        protos, groups = [self.proto], [list(range(len(tgt_ids)))]
        members = self.aggregation.get("members")
        if members:  # clusters: each cluster's prototype, explained on its own target rows
            pos = {rid: i for i, rid in enumerate(tgt_rid)}
            for c, rids in enumerate(members):
                protos.append(self.protos[c])
                groups.append([pos[r] for r in rids if r in pos])
        pending = executor.call(stages.explain_task, self._embed_job(), tgt_ids, tgt_masks, protos, groups,
                                **self._actor_resources())
        # the selected rows are explained here while the task runs (their marks need only the prototype)
        rows = self._explain_selected(set(strongest_latents(self.proto).tolist()))
        docs = pending.result()
        doc = {"prototype": docs[0]}
        if members:
            doc["clusters"] = [{"cluster": c, "size": len(m), "target_ids": m[:10], **d}
                               for c, (m, d) in enumerate(zip(members, docs[1:]))]
        write_explain(doc, self.out, rows)
        self.timings["explain"] = time.perf_counter() - t0

    def _explain_selected(self, top_set: set[int]) -> list[str]:
        """Each selected row's explanation as one line of JSON, in rank order. The rows are read
        from the store one part at a time (only the selected rows of each part), so memory is
        bounded by a part whatever the selection's size; with several prototypes, a row is
        explained against the one it scored best with."""
        from ..features.interpret import explain_row
        from ..scoring.aggregate import pairwise
        from ..scoring.table import scored_rows

        sel = self._selected_of(self.scores)
        ranks: dict[str, list[int]] = {}  # content -> the ranks of the selected rows with it
        rank_of = {rid: r for r, rid in enumerate(self.top_ids)}
        for rid, h in zip(sel.column("id").to_pylist(), sel.column("content_hash").to_pylist()):
            ranks.setdefault(h, []).append(rank_of[rid])
        lines: list[str | None] = [None] * len(self.top_ids)
        many = len(self.protos) > 1
        for t in self.store.iter_read(sel.column("content_hash"), ["indices", "values"]):
            X = scored_rows(t, False, row_mass=float(self.cfg.select.row_mass))  # the values as they were scored
            best = pairwise(X, self.protos, self.similarity).argmax(1) if many else np.zeros(len(t), np.int64)
            for j, h in enumerate(t.column("content_hash").to_pylist()):
                a, b = X.indptr[j], X.indptr[j + 1]
                for r in ranks.pop(h, ()):
                    row = explain_row(self.top_ids[r], X.indices[a:b], X.values[a:b], self.protos[int(best[j])], top_set)
                    if many:
                        row["cluster"] = int(best[j])
                    lines[r] = json.dumps(row, ensure_ascii=False)
        self.explain_read = dict(self.store.last_read)
        missing = sum(x is None for x in lines)
        if missing:
            raise RunError(f"{missing} selected rows have no embedding in {self.store.root}; this is a bug, please report it")
        return lines

    def _selected_of(self, table: pa.Table) -> pa.Table:
        """The rows of ``table`` (an index of source rows) that the selection kept."""
        return table.filter(pc.is_in(table.column("id"), value_set=pa.array(list(self.top_ids), pa.string())))

    # -------------------------------------------------------------- outputs

    def write_outputs(self) -> dict:
        t0 = time.perf_counter()
        out = self.out
        # the file name dictionary-encoded: one string per prepared part, not one per row
        names = _part_files(self.source_parts).to_pylist()
        uniq = list(dict.fromkeys(names))  # one entry per file (not per part): the same bytes for any unit size
        at = {u: i for i, u in enumerate(uniq)}
        code = np.asarray([at[n] for n in names], dtype=np.int32)
        files = pa.DictionaryArray.from_arrays(pa.array(code[self.scores.column("part").to_numpy()], pa.int32()),
                                               pa.array(uniq, pa.string()))
        write_parquet(pa.table({"id": self.scores.column("id"), "score": self.scores.column("score"),
                                "file": files, "row": self.scores.column("row")}), out / "scores.parquet", 65536)
        del files
        rej = pa.concat_tables([self.rejected[r].append_column("set", pa.array([r] * len(self.rejected[r]), pa.string()))
                                for r in ("source", "target")])
        write_parquet(rej.sort_by([("set", "ascending"), ("file", "ascending"), ("row", "ascending")]),
                            out / "rejected.parquet")
        self.selected = selected = self._selected_records()
        report.write_selection(selected, out)
        from .export import write_trainer_files

        self.trainer = write_trainer_files(selected, out, self.cfg.report.trainer_format)
        self.timings["write"] = time.perf_counter() - t0
        return report.manifest(self, selected)

    def _selected_records(self) -> list[dict]:
        idx = self.index["source"]
        rank = {rid: r for r, rid in enumerate(self.top_ids, start=1)}
        score = dict(zip(self.top_ids, self.top_scores))
        sel = self._selected_of(idx)
        recs = {}
        for pi, positions in _positions_by_part(sel):
            t = read_parquet(self.source_parts[pi]["part"], ["id", "record"], positions)
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
        self.source_parts, self.target_parts = [], []
        mem = procmem.StageMemory().start()  # the driver's peak memory per stage, in the manifest
        try:
            self.plan()  # before Ray starts: a bad path or setting fails in seconds, with nothing written
            mem.mark("plan")
            manifest = self._run_stages(mem)
        finally:
            mem.stop()
            if self.lock is not None:
                self.lock.release()
        return manifest

    def _run_stages(self, mem) -> dict:
        ray_cfg = self.cfg.ray
        started_here = executor.start(executor.address_of(ray_cfg), ray_cfg.num_cpus, ray_cfg.num_gpus,
                                      ray_cfg.log_to_driver)
        try:
            self.fingerprint()
            for stage in (self.prepare, self.dedupe, *((self.embed, self.prototype, self.score)
                                                       if self.cfg.select.method in ("mona", "rds")
                                                       else (self.score_with_selector,))):
                stage()
                mem.mark(stage.__name__)
                self._check_folders()
            manifest = self.write_outputs()
            mem.mark("write")
            if self.cfg.select.method == "mona" and self.cfg.report.explain and self.readout.kind == "sae":
                self.explain()
                mem.mark("explain")
                manifest["timings_s"]["explain"] = round(self.timings["explain"], 3)
                manifest["files"]["explain"] = "explain.md"
                manifest["explain_read"] = self.explain_read
            manifest["driver_memory_mb"] = mem.stages
            self.quarantined += self.store.quarantined
            manifest["quarantined"] = self.quarantined
            # written last: "complete" means every output above is in place
            write_json(manifest, self.out / "manifest.json")
            with _signals_held():  # a TERM now waits until the run is published and pruned
                self._check_folders()  # the lease too: checked here, not as of the last heartbeat
                publish.publish(self.root, self.out)  # one rename: readers switch to this run's selection
                publish.prune(self.root, int(self.cfg.run.keep_runs), active=self.out)
            return manifest
        finally:
            self.lock.release()  # first: a scheduler's SIGKILL may follow its SIGTERM within seconds
            executor.stop(started_here)


class _LiveProgress:
    """Moves a tqdm bar from the embedding actors' per-micro-batch reports (polled in a thread),
    and from finished units (exact); shows tokens/s."""

    def __init__(self, bar, progress, total: int, interval: float = 1.0):
        import threading

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
            n = min(self.total, max(self.done_units_rows, self.live_rows))
            self.bar.n = n
            el = time.perf_counter() - self._t0
            self.bar.set_postfix(tok_s=f"{self.live_tokens / max(el, 1e-9):,.0f}", refresh=False)
            self.bar.refresh()


def _part_files(parts: list[dict]) -> pa.Array:
    """The file of each prepared part (index ``part`` -> file name), as an Arrow array."""
    return pa.array([p["unit"].path for p in parts], pa.string())


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


@contextmanager
def _signals_held():
    """SIGINT and SIGTERM held (delivered when the block ends) while the published state changes."""
    import signal

    held = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)
