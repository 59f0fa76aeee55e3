"""The per-unit work of each pipeline stage, as plain functions and one actor class.

``pipeline.py`` hands these to Ray Data; nothing here imports Ray, so each stage can be
called (and tested) on its own. Every file a stage writes is written to a temporary
name and renamed into place, and its name is derived from its content or its input
unit, never from a random id: a retried or resumed task rewrites the same file with
the same bytes, so output can neither be lost half-written nor duplicated.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..core import records

PREPARED_SCHEMA = pa.schema([
    ("id", pa.string()), ("content_hash", pa.string()), ("file", pa.string()), ("row", pa.int64()),
    ("n_tokens", pa.int32()), ("input_ids", pa.list_(pa.int32())), ("pool_mask", pa.list_(pa.int8())),
    ("record", pa.string()),
])
REJECTED_SCHEMA = pa.schema([
    ("file", pa.string()), ("row", pa.int64()), ("id", pa.string()), ("stage", pa.string()), ("reason", pa.string()),
])
EMBEDDING_SCHEMA = pa.schema([
    ("content_hash", pa.string()), ("n_tokens", pa.int32()), ("n_pooled", pa.int32()),
    ("indices", pa.list_(pa.int32())), ("values", pa.list_(pa.float32())),
])


def write_atomic(table: pa.Table, path: str | Path, row_group_size: int = 1024) -> None:
    """Write Parquet to ``path`` via a unique temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    pq.write_table(table, tmp, compression="zstd", row_group_size=row_group_size)
    os.replace(tmp, path)


def rejected_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=REJECTED_SCHEMA)


# ----------------------------------------------------------------------------- prepare


@dataclass(frozen=True)
class RenderSettings:
    model_dir: str
    mode: str = "chat_template"
    system_prompt: str | None = None
    max_length: int = 512
    exclude: str = "special"
    trust_remote_code: bool = False


@lru_cache(maxsize=4)
def _tokenizer(model_dir: str, trust_remote_code: bool):
    from ..core.model import load_tokenizer

    return load_tokenizer(model_dir, trust_remote_code=trust_remote_code)


def _record_json(rec) -> str:
    return json.dumps(rec, ensure_ascii=False, default=str)


def safe_text(x) -> str | None:
    """A string Arrow can store: lone surrogates and other unencodable code points escaped."""
    if x is None:
        return None
    return str(x).encode("utf-8", "backslashreplace").decode("utf-8")


def unicode_problem(messages: list[dict]) -> str | None:
    """Why a conversation's text is not valid Unicode (a lone surrogate such as ``\\ud800``), or None."""
    for i, m in enumerate(messages):
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError as e:
            return (f"message {i} has an invalid code point {m['content'][e.start]!r} at character {e.start} "
                    "(a lone surrogate escape): not valid Unicode text")
    return None


def _render_record(rec, unit: records.ReadUnit, row: int, tok, rs: RenderSettings) -> dict:
    """One record up to its rendered text (tokens follow in one batch); raises when unusable."""
    msgs = records.normalize_record(rec)
    bad = unicode_problem(msgs)
    if bad:
        raise records.RecordError(bad)
    blob = _record_json(rec)
    blob.encode("utf-8")  # a lone surrogate in a field we do not render (metadata) cannot be stored either
    return {"id": records.record_id(rec, unit.path, row), "content_hash": records.content_hash(msgs),
            "file": unit.path, "row": row, "record": blob,
            "_rendered": records.render(msgs, tok, rs.mode, rs.system_prompt)}


def _tokenize_rows(rows: list[dict], tok, rs: RenderSettings) -> list[tuple[dict, BaseException | None]]:
    """Tokenize rendered rows in one call; if that call fails, row by row, so that one bad text
    rejects only itself."""
    try:
        encs = records.tokenize_many([r["_rendered"] for r in rows], tok, rs.max_length, rs.exclude)
        out = [(r, None, e) for r, e in zip(rows, encs)]
    except Exception:  # noqa: BLE001 - find the row(s) that broke the batch
        out = []
        for r in rows:
            try:
                out.append((r, None, records.tokenize(r["_rendered"], tok, rs.max_length, rs.exclude)))
            except Exception as e:  # noqa: BLE001
                out.append((r, e, None))
    done = []
    for r, err, enc in out:
        r = {k: v for k, v in r.items() if k != "_rendered"}
        if err is None:
            r["input_ids"], r["pool_mask"] = enc
            r["n_tokens"] = len(enc[0])
        done.append((r, err))
    return done


def _reason(e: BaseException) -> str:
    if isinstance(e, records.RecordError):
        return str(e)
    return safe_text(f"{type(e).__name__}: {e}")[:500]


def prepare_unit(unit: records.ReadUnit, rs: RenderSettings, out_path: str, rejected_path: str) -> dict:
    """Read, validate, render and tokenize one unit; write its prepared and rejected parts.

    No record can stop the unit: any exception while handling one record rejects that record
    with the exception's type and message; if reading itself fails mid-unit, the unit's
    remaining rows are rejected with the reason.
    """
    tok = _tokenizer(rs.model_dir, rs.trust_remote_code)
    ok, bad, rendered = [], [], []
    last = unit.start - 1
    try:
        for row, rec in records.read_unit(unit):
            last = max(last, row)
            if isinstance(rec, records.RecordError):
                bad.append({"file": unit.path, "row": row, "id": None, "stage": "read", "reason": safe_text(rec)})
                continue
            try:
                rendered.append(_render_record(rec, unit, row, tok, rs))
            except Exception as e:  # noqa: BLE001 - one record never stops the run
                rid = rec.get("id") if isinstance(rec, dict) and not isinstance(rec.get("id"), (dict, list)) else None
                bad.append({"file": unit.path, "row": row, "id": safe_text(rid), "stage": "validate",
                            "reason": _reason(e)})
    except Exception as e:  # noqa: BLE001 - a reader failure rejects what it could not read
        why = f"cannot read file: {_reason(e)}"
        rest = range(last + 1, unit.stop) if unit.stop >= 0 else [-1]
        bad += [{"file": unit.path, "row": r, "id": None, "stage": "read", "reason": why} for r in rest]
    for r, err in _tokenize_rows(rendered, tok, rs):
        if err is None:
            ok.append(r)
        else:
            bad.append({"file": unit.path, "row": r["row"], "id": safe_text(r["id"]), "stage": "validate",
                        "reason": f"cannot tokenize: {_reason(err)}"})
    write_atomic(pa.Table.from_pylist(ok, schema=PREPARED_SCHEMA), out_path, row_group_size=256)
    write_atomic(rejected_table(bad), rejected_path)
    return {"unit": unit.key, "rows_ok": len(ok), "rows_rejected": len(bad)}


# ----------------------------------------------------------------------------- embed


@dataclass(frozen=True)
class EmbedJob:
    model_dir: str
    sae_path: str
    sae_format: str
    hookpoint: str
    k: int | None
    dtype: str  # resolved on the driver (never "auto"): every actor computes in the same dtype
    device: str
    representation: str
    pooling: str
    value_dtype: str
    token_budget: int
    pad_multiple: int
    max_batch_rows: int
    sae_chunk_tokens: int
    torch_threads: int
    trust_remote_code: bool = False
    attn_implementation: str = "sdpa"
    mlp_k: int | None = None


class EmbedActor:
    """Holds the model and the SAE; embeds one unit per call and writes its part file.

    Only the small summary row goes back through Ray; the sparse rows go straight to
    Parquet, so nothing large crosses the object store. With a ``progress`` actor handle,
    every micro-batch reports its rows and tokens to it as it finishes (fire and forget),
    so the driver's bar moves within a unit.
    """

    def __init__(self, job: EmbedJob, progress=None):
        import torch

        from ..features.engine import Embedder, EmbedSettings
        from ..core.model import load_tokenizer, load_truncated, parse_hookpoint, resolve_device
        from ..core.sae import load_sae

        if job.torch_threads > 0:
            torch.set_num_threads(job.torch_threads)
        device = resolve_device(job.device)
        layer = parse_hookpoint(job.hookpoint)
        self.lm = load_truncated(job.model_dir, layer, job.dtype, device, job.trust_remote_code,
                                 job.attn_implementation)
        sae = None
        if job.representation == "sae":
            # the SAE computes in the model's dtype, whatever dtype its weights are stored in
            sae = load_sae(job.sae_path, job.sae_format, job.hookpoint, job.k, device=device, dtype=self.lm.dtype)
        tok = load_tokenizer(job.model_dir, job.trust_remote_code)
        self.embedder = Embedder(self.lm, sae, EmbedSettings(
            token_budget=job.token_budget, pad_multiple=job.pad_multiple, max_batch_rows=job.max_batch_rows,
            sae_chunk_tokens=job.sae_chunk_tokens, pooling=job.pooling, k=job.k, mlp_k=job.mlp_k,
            value_dtype=job.value_dtype, representations=(job.representation,)), tok.pad_token_id)
        self.job = job
        self.progress = progress
        self.name = f"{os.uname().nodename}:{os.getpid()}"

    def __call__(self, batch: dict) -> dict:
        out = [self.embed_unit(json.loads(u)) for u in batch["unit"]]
        return {k: np.asarray([o[k] for o in out]) for k in out[0]}

    def _report(self, rows: int, tokens: int) -> None:
        if self.progress is not None:
            self.progress.add.remote(rows, tokens)

    def embed_unit(self, unit: dict) -> dict:
        t0 = time.perf_counter()
        table = pq.read_table(unit["prepared"], columns=["content_hash", "input_ids", "pool_mask", "id", "file", "row"])
        table = table.take(pa.array(unit["rows"], type=pa.int64()))
        ids = table.column("input_ids").to_pylist()
        masks = table.column("pool_mask").to_pylist()
        res = self.embedder.embed(ids, masks, on_batch=self._report)
        rep = self.job.representation
        good = [i for i in range(len(ids)) if i not in res.rejected]
        hashes = table.column("content_hash").to_pylist()
        if rep == "hidden":  # dense vectors stored densely in the same columns
            vecs = [res.outputs[rep][i] for i in good]
            idx = [np.arange(len(v), dtype=np.int32) for v in vecs]
            vals = [np.asarray(v, dtype=np.float32) for v in vecs]
        else:
            idx = [res.outputs[rep][i][0] for i in good]
            vals = [res.outputs[rep][i][1].astype(np.float32) for i in good]
        emb = pa.table({
            "content_hash": pa.array([hashes[i] for i in good], pa.string()),
            "n_tokens": pa.array([res.n_tokens[i] for i in good], pa.int32()),
            "n_pooled": pa.array([res.n_pooled[i] for i in good], pa.int32()),
            "indices": pa.array(idx, pa.list_(pa.int32())),
            "values": pa.array(vals, pa.list_(pa.float16() if self.job.value_dtype == "float16" else pa.float32())),
        })
        write_atomic(emb, unit["out"], row_group_size=512)
        files, rows, rids = (table.column(c).to_pylist() for c in ("file", "row", "id"))
        rejected = [{"file": files[i], "row": rows[i], "id": rids[i], "stage": "embed", "reason": r}
                    for i, r in sorted(res.rejected.items())]
        return {"unit": unit["key"], "rows": len(good), "real_tokens": res.real_tokens,
                "padded_tokens": res.padded_tokens, "forward_seconds": res.forward_seconds,
                "unit_seconds": time.perf_counter() - t0, "rejected": json.dumps(rejected), "actor": self.name}


class Progress:
    """A tiny Ray actor the embedding actors report micro-batches to (rows, tokens)."""

    def __init__(self):
        self.rows = 0
        self.tokens = 0

    def add(self, rows: int, tokens: int) -> None:
        self.rows += rows
        self.tokens += tokens

    def get(self) -> tuple[int, int]:
        return self.rows, self.tokens


def explain_task(job: EmbedJob, target_ids, target_masks, proto) -> dict:
    """Load the run's model and SAE and explain the prototype (``interpret.explain_prototype``)."""
    from ..features.interpret import explain_prototype

    actor = EmbedActor(job)
    tok = _tokenizer(job.model_dir, job.trust_remote_code)
    return explain_prototype(actor.lm, actor.embedder.sae, tok, target_ids, proto, target_masks=target_masks,
                             k=job.k, token_budget=job.token_budget, sae_chunk_tokens=job.sae_chunk_tokens)


# ----------------------------------------------------------------------------- score


def score_rows(emb: pa.Table, proto, similarity: str, batch_rows: int, dense: bool = False) -> pa.Table:
    """(content_hash, score) for embedding rows, scored in slices of ``batch_rows`` rows.

    A row's score never depends on the slice it lands in (per-row reductions only)."""
    from ..scoring import SparseRows, dense_similarity, score

    out = []
    for start in range(0, len(emb), batch_rows):
        blk = emb.slice(start, batch_rows)
        rows = SparseRows.from_arrow(blk.column("indices"), blk.column("values"))
        if dense:  # raw hidden states: signed, stored densely; the sparse shortcuts assume z >= 0
            s = dense_similarity(rows.values.reshape(len(rows), -1), proto, similarity)
        else:
            s = score(rows, proto, similarity)
        out.append(pa.table({"content_hash": blk.column("content_hash"), "score": pa.array(s, pa.float64())}))
    return pa.concat_tables(out) if out else pa.table({"content_hash": pa.array([], pa.string()),
                                                       "score": pa.array([], pa.float64())})


def score_parts(batch: pa.Table, proto, similarity: str, batch_rows: int, dense: bool = False) -> pa.Table:
    """Score this run's rows held by some store parts: ``batch`` is ``(id, content_hash, part)``
    for the rows wanted; returns ``(id, score)``. Reads each part once, only the needed columns."""
    import ray

    from ..features.store import first_per_key

    if isinstance(proto, ray.ObjectRef):
        proto = ray.get(proto)
    scored = []
    for part in pc.unique(batch.column("part")).to_pylist():
        want = batch.filter(pc.equal(batch.column("part"), part)).column("content_hash")
        emb = pq.read_table(part, columns=["content_hash", "indices", "values"])
        emb = emb.filter(pc.is_in(emb.column("content_hash"), value_set=pc.unique(want)))
        scored.append(score_rows(first_per_key(emb, "content_hash", "content_hash"), proto, similarity,
                                 batch_rows, dense))
    scores = pa.concat_tables(scored)
    return batch.select(["id", "content_hash"]).join(scores, "content_hash").select(["id", "score"])
