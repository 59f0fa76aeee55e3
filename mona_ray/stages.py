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
import pyarrow.parquet as pq

from . import records

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
    from .model import load_tokenizer

    return load_tokenizer(model_dir, trust_remote_code=trust_remote_code)


def _record_json(rec) -> str:
    return json.dumps(rec, ensure_ascii=False, default=str)


def prepare_unit(unit: records.ReadUnit, rs: RenderSettings, out_path: str, rejected_path: str) -> dict:
    """Read, validate, render and tokenize one unit; write its prepared and rejected parts."""
    tok = _tokenizer(rs.model_dir, rs.trust_remote_code)
    ok, bad = [], []
    for row, rec in records.read_unit(unit):
        if isinstance(rec, records.RecordError):
            bad.append({"file": unit.path, "row": row, "id": None, "stage": "read", "reason": str(rec)})
            continue
        try:
            msgs = records.normalize_record(rec)
            rid = records.record_id(rec, unit.path, row)
            rendered = records.render(msgs, tok, rs.mode, rs.system_prompt)
            ids, mask = records.tokenize(rendered, tok, rs.max_length, rs.exclude)
        except records.RecordError as e:
            rid = rec.get("id") if isinstance(rec, dict) else None
            bad.append({"file": unit.path, "row": row, "id": None if rid is None else str(rid),
                        "stage": "validate", "reason": str(e)})
            continue
        ok.append({"id": rid, "content_hash": records.content_hash(msgs),
                   "file": unit.path, "row": row, "n_tokens": len(ids), "input_ids": ids,
                   "pool_mask": mask, "record": _record_json(rec)})
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
    dtype: str
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


class EmbedActor:
    """Holds the model and the SAE; embeds one unit per call and writes its part file.

    Only the small summary row goes back through Ray; the sparse rows go straight to
    Parquet, so nothing large crosses the object store.
    """

    def __init__(self, job: EmbedJob):
        import torch

        from .encode import Embedder, EmbedSettings
        from .model import load_tokenizer, load_truncated, parse_hookpoint, resolve_device
        from .sae import load_sae

        if job.torch_threads > 0:
            torch.set_num_threads(job.torch_threads)
        device = resolve_device(job.device)
        layer = parse_hookpoint(job.hookpoint)
        self.lm = load_truncated(job.model_dir, layer, job.dtype, device, job.trust_remote_code,
                                 job.attn_implementation)
        sae = None
        if job.representation == "sae":
            sae = load_sae(job.sae_path, job.sae_format, job.hookpoint, job.k, device=device)
        tok = load_tokenizer(job.model_dir, job.trust_remote_code)
        self.embedder = Embedder(self.lm, sae, EmbedSettings(
            token_budget=job.token_budget, pad_multiple=job.pad_multiple, max_batch_rows=job.max_batch_rows,
            sae_chunk_tokens=job.sae_chunk_tokens, pooling=job.pooling, k=job.k,
            value_dtype=job.value_dtype, representations=(job.representation,)), tok.pad_token_id)
        self.job = job

    def __call__(self, batch: dict) -> dict:
        out = [self.embed_unit(json.loads(u)) for u in batch["unit"]]
        return {k: np.asarray([o[k] for o in out]) for k in out[0]}

    def embed_unit(self, unit: dict) -> dict:
        t0 = time.perf_counter()
        table = pq.read_table(unit["prepared"], columns=["content_hash", "input_ids", "pool_mask", "id", "file", "row"])
        table = table.take(pa.array(unit["rows"], type=pa.int64()))
        ids = table.column("input_ids").to_pylist()
        masks = table.column("pool_mask").to_pylist()
        res = self.embedder.embed(ids, masks)
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
                "unit_seconds": time.perf_counter() - t0, "rejected": json.dumps(rejected)}


def explain_task(job: EmbedJob, target_ids, target_masks, proto, selected) -> dict:
    """Load the run's model and SAE and explain the selection (``interpret.explain``)."""
    from .interpret import explain

    actor = EmbedActor(job)
    tok = _tokenizer(job.model_dir, job.trust_remote_code)
    return explain(actor.lm, actor.embedder.sae, tok, target_ids, proto, selected, target_masks=target_masks,
                   k=job.k, token_budget=job.token_budget)


# ----------------------------------------------------------------------------- score


def score_block(batch: pa.Table, proto, similarity: str, current, dense: bool = False) -> pa.Table:
    """Score one block of embedding rows against the prototype and keep the block's top-k.

    ``current``: table (content_hash, id) of the rows in this run; embeddings of other
    content (older data in a shared cache) are skipped. Returns (id, content_hash, score)
    for every current row; ``block_topk`` then cuts each block to its best rows.
    """
    import ray

    from .scoring import SparseRows, score

    if isinstance(proto, ray.ObjectRef):
        proto = ray.get(proto)
    if isinstance(current, ray.ObjectRef):
        current = ray.get(current)
    rows = SparseRows.from_arrow(batch.column("indices"), batch.column("values"))
    if dense:  # raw hidden states: signed, stored densely; the sparse shortcuts assume z >= 0
        from .scoring import dense_similarity

        s = dense_similarity(rows.values.reshape(len(rows), -1), proto, similarity)
    else:
        s = score(rows, proto, similarity)
    scored = pa.table({"content_hash": batch.column("content_hash"), "score": pa.array(s, pa.float64())})
    return scored.join(current, "content_hash", join_type="inner")


def score_parts(batch: pa.Table, proto, similarity: str, current, batch_rows: int, dense: bool = False) -> pa.Table:
    """Read store part files (one per call) and score them in slices of ``batch_rows`` rows."""
    out = []
    for path in batch.column("path").to_pylist():
        t = pq.read_table(path, columns=["content_hash", "indices", "values"])
        for start in range(0, len(t), batch_rows):
            out.append(score_block(t.slice(start, batch_rows), proto, similarity, current, dense))
    return pa.concat_tables(out) if out else pa.table({"content_hash": pa.array([], pa.string()),
                                                       "score": pa.array([], pa.float64()), "id": pa.array([], pa.string())})


def block_topk(batch: pa.Table, k: int) -> pa.Table:
    from .scoring import topk

    s, ids = topk(batch.column("score").to_numpy(), batch.column("id").to_pylist(), k)
    return pa.table({"id": pa.array(list(ids), pa.string()), "score": pa.array(s, pa.float64())})
