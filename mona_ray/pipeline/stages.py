"""The per-unit work of each pipeline stage, as plain functions and one actor class over
small typed units (:class:`PrepareUnit` -> :class:`Prepared`, :class:`EmbedUnit` ->
:class:`Embedded`, a score group as an Arrow table).

``steps.py`` hands these to the executor (``core/executor.py``, the one module that talks to
Ray); nothing here imports Ray, so each stage can be called (and tested) on its own. Every file a stage writes is written to a temporary
name and renamed into place, and its name is derived from its content or its input
unit, never from a random id: a retried or resumed task rewrites the same file with
the same bytes, so output can neither be lost half-written nor duplicated.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..core import records
from ..core.readers import ReadUnit, read_unit
from ..core.render import render, tokenize, tokenize_many
from ..core.io import read_parquet, write_part
from ..features.local import Rendering
from ..features.spec import EngineJob, load_engine
from ..features.store import first_per_key, read_wanted, rows_table, write_store_part

PREPARED_SCHEMA = pa.schema([
    ("id", pa.string()), ("content_hash", pa.string()), ("file", pa.string()), ("row", pa.int64()),
    ("n_tokens", pa.int32()), ("input_ids", pa.list_(pa.int32())), ("pool_mask", pa.list_(pa.int8())),
    ("record", pa.string()),
])
REJECTED_SCHEMA = pa.schema([
    ("file", pa.string()), ("row", pa.int64()), ("id", pa.string()), ("stage", pa.string()), ("reason", pa.string()),
])


def rejected_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=REJECTED_SCHEMA)


# ----------------------------------------------------------------------------- prepare


@dataclass(frozen=True)
class RenderSettings:
    """What a prepare task needs: the tokenizer's folder, the rendering and the exclusion rule."""

    model_dir: str
    rendering: Rendering
    exclude: str = "special"
    trust_remote_code: bool = False
    model_hub: str = ""  # resolved from the hub: the reference at its commit (a node without model_dir fetches it)


@lru_cache(maxsize=4)
def _tokenizer(model_dir: str, trust_remote_code: bool, model_hub: str = ""):
    from ..core.hub import here
    from ..core.model import load_tokenizer

    return load_tokenizer(here(model_dir, model_hub), trust_remote_code=trust_remote_code)


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


def _render_record(rec, unit: ReadUnit, row: int, tok, rs: RenderSettings) -> dict:
    """One record up to its rendered text (tokens follow in one batch); raises when unusable."""
    msgs = records.normalize_record(rec)
    bad = unicode_problem(msgs)
    if bad:
        raise records.RecordError(bad)
    blob = _record_json(rec)
    blob.encode("utf-8")  # a lone surrogate in a field we do not render (metadata) cannot be stored either
    return {"id": records.record_id(rec, unit.path, row), "content_hash": records.content_hash(msgs),
            "file": unit.path, "row": row, "record": blob,
            "_rendered": render(msgs, tok, rs.rendering.mode, rs.rendering.system_prompt)}


def _tokenize_rows(rows: list[dict], tok, rs: RenderSettings) -> list[tuple[dict, BaseException | None]]:
    """Tokenize rendered rows in one call; if that call fails, row by row, so that one bad text
    rejects only itself."""
    try:
        encs = tokenize_many([r["_rendered"] for r in rows], tok, rs.rendering.max_length, rs.exclude)
        out = [(r, None, e) for r, e in zip(rows, encs)]
    except Exception:  # noqa: BLE001 - find the row(s) that broke the batch
        out = []
        for r in rows:
            try:
                out.append((r, None, tokenize(r["_rendered"], tok, rs.rendering.max_length, rs.exclude)))
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


@dataclass(frozen=True)
class PrepareUnit:
    """One input unit to read, validate, render and tokenize, and the two parts it writes."""

    unit: ReadUnit
    part: str
    rejected: str


@dataclass(frozen=True)
class Prepared:
    unit: str
    rows_ok: int
    rows_rejected: int


def prepare(task: PrepareUnit, rs: RenderSettings) -> Prepared:
    """:func:`prepare_unit` for one :class:`PrepareUnit`."""
    return prepare_unit(task.unit, rs, task.part, task.rejected)


def prepare_unit(unit: ReadUnit, rs: RenderSettings, out_path: str, rejected_path: str) -> Prepared:
    """Read, validate, render and tokenize one unit; write its prepared and rejected parts.

    No record can stop the unit: any exception while handling one record rejects that record
    with the exception's type and message; if reading itself fails mid-unit, the unit's
    remaining rows are rejected with the reason.
    """
    tok = _tokenizer(rs.model_dir, rs.trust_remote_code, rs.model_hub)
    ok, bad, rendered = [], [], []
    last = unit.start - 1
    try:
        for row, rec in read_unit(unit):
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
    write_part(pa.Table.from_pylist(ok, schema=PREPARED_SCHEMA), out_path, row_group_size=256)
    write_part(rejected_table(bad), rejected_path)  # last: a unit is done when both parts check
    return Prepared(unit.key, len(ok), len(bad))


# ----------------------------------------------------------------------------- embed


@dataclass(frozen=True)
class EmbedUnit:
    """Rows of one prepared part to embed: ``rows`` (positions in ``prepared``), ``out``
    ({readout name: the store part to write}), ``key`` (named after the rows' content)."""

    key: str
    prepared: str
    rows: tuple[int, ...]
    out: dict = field(hash=False)


@dataclass(frozen=True)
class Embedded:
    """What an embedded unit reports: rows written, token and time counts, rows it could not embed."""

    unit: str
    rows: int
    real_tokens: int
    padded_tokens: int
    forward_seconds: float
    unit_seconds: float
    rejected: list = field(hash=False)  # rejected-table rows (file, row, id, stage, reason)
    actor: str = ""


class EmbedActor:
    """Holds the model, its SAEs and the feature engine; embeds one :class:`EmbedUnit` per call
    and writes one part per readout into that readout's store folder.

    Only the small :class:`Embedded` summary goes back; the features go straight to Parquet,
    so nothing large crosses the object store. With a ``progress`` counter (anything with
    ``report(rows, tokens)``: the executor's :class:`~mona_ray.core.executor.Counter`), every
    micro-batch reports its rows and tokens as it finishes, so the driver's bar moves within a unit.
    """

    def __init__(self, job: EngineJob, progress=None):
        self.engine, _ = load_engine(job)
        self.job = job
        self.progress = progress
        self.name = f"{os.uname().nodename}:{os.getpid()}"

    def _report(self, rows: int, tokens: int) -> None:
        if self.progress is not None:
            self.progress.report(rows, tokens)

    def embed_unit(self, unit: EmbedUnit) -> Embedded:
        t0 = time.perf_counter()
        table = read_parquet(unit.prepared, ["content_hash", "input_ids", "pool_mask", "id", "file", "row"], list(unit.rows))
        ids = table.column("input_ids").to_pylist()
        mask = table.column("pool_mask").to_pylist()
        # the prepared mask is the run's pool.exclude; "none" (RDS+) pools every real token
        masks = {e: [[1] * len(x) for x in ids] if e == "none" else mask for e in self.engine.excludes}
        res = self.engine.run(ids, masks, on_batch=self._report)
        good = [i for i in range(len(ids)) if i not in res.rejected]
        hashes = table.column("content_hash").to_pylist()
        for r in self.job.readouts:
            write_store_part(rows_table([hashes[i] for i in good], [res.n_tokens[i] for i in good],
                                        [res.n_pooled[r.name][i] for i in good], [res.outputs[r.name][i] for i in good],
                                        self.job.batching.value_dtype), unit.out[r.name])
        files, rows, rids = (table.column(c).to_pylist() for c in ("file", "row", "id"))
        rejected = [{"file": files[i], "row": rows[i], "id": rids[i], "stage": "embed", "reason": r}
                    for i, r in sorted(res.rejected.items())]
        return Embedded(unit.key, len(good), res.real_tokens, res.padded_tokens, res.forward_seconds,
                        time.perf_counter() - t0, rejected, self.name)


def explain_task(job: EngineJob, target_ids, target_masks, protos, groups, weights=None) -> list[dict]:
    """Load the run's model and SAE and explain each prototype on its group of target rows
    (``interpret.explain_prototypes``: the overall prototype, then one per cluster), in one
    model pass over the target rows; ``weights``: each prototype's latents as the score weighs them."""
    from ..features.interpret import explain_prototypes

    engine, tok = load_engine(job)
    return explain_prototypes(engine, job.readouts[0], tok, target_ids, target_masks, protos, groups, weights=weights)


# ----------------------------------------------------------------------------- score


def pool_stats_parts(batch: pa.Table, paths, width: int, pooling: str) -> pa.Table:
    """The pool statistics (``scoring.background.PoolStats``) of this run's rows held by some store
    parts (``batch`` as for :func:`score_parts`), as one Arrow row: the driver adds them up."""
    from ..scoring.background import PoolStats
    from ..scoring.table import rows_of

    st = PoolStats.empty(width)
    for emb in read_wanted(paths, batch, ["content_hash", "n_pooled", "indices", "values"]):
        st = st + PoolStats.of(rows_of(first_per_key(emb, "content_hash", "content_hash"), False, pooling), width)
    return pa.table({"rows": pa.array([st.rows], pa.int64()), "df": pa.array([st.df], pa.list_(pa.int64())),
                     "mass": pa.array([st.mass], pa.list_(pa.float64())), "sq": pa.array([st.sq], pa.list_(pa.float64()))})


def score_parts(batch: pa.Table, protos, paths, similarity: str, pooling: str, batch_rows: int,
                dense: bool = False, candidates: int = 0, row_mass: float = 1.0, background=None) -> pa.Table:
    """Score this run's rows held by some store parts: ``batch`` is ``(id, row_at, content_hash,
    part)`` for the rows wanted (``row_at``: the row's position in the driver's index; ``part``
    numbers ``paths``). Returns ``(id, row_at, score, target)``: every row with ``target = -1``
    and its best score over the prototypes ``protos [c, L]``; with ``candidates = k``
    (round-robin) also, per prototype ``j``, its ``k`` best rows with ``target = j`` (``row_at = -1``).
    ``row_mass < 1``: each row is cut to its largest latents carrying that share of its mass
    before it is compared (``select.row_mass``). ``background``: the pool's latent weighting
    (``select.background``). Reads each part once, only the needed columns."""
    from ..scoring import topk
    from ..scoring.table import score_rows_against, similarities_of

    hashes, scores, per = [], [], []
    for emb in read_wanted(paths, batch, ["content_hash", "n_pooled", "indices", "values"]):
        emb = first_per_key(emb, "content_hash", "content_hash")
        hashes.append(emb.column("content_hash"))
        if candidates:
            from ..scoring.table import scored_rows

            S = similarities_of(scored_rows(emb, dense, pooling, row_mass), protos, similarity, dense, background)
            scores.append(S.max(axis=1))
            per.append(S)
        else:
            scores.append(score_rows_against(emb, protos, similarity, dense, pooling, batch_rows, row_mass,
                                             background))
    h = pa.concat_arrays([c.combine_chunks() for c in hashes]) if hashes else pa.array([], pa.string())
    out = pa.table({"content_hash": h, "score": pa.array(np.concatenate(scores) if scores else [], pa.float64())})
    rows = batch.select(["id", "row_at", "content_hash"]).join(out, "content_hash").select(["id", "row_at", "score"])
    rows = rows.append_column("target", pa.array(np.full(len(rows), -1, np.int32)))
    if not candidates:
        return rows
    S = np.concatenate(per) if per else np.zeros((0, len(protos)))
    at = pc.index_in(batch.column("content_hash"), value_set=h).to_numpy(zero_copy_only=False)
    ids = batch.column("id").to_numpy(zero_copy_only=False)
    extra = []
    for j in range(S.shape[1]):  # this task's best `candidates` rows per prototype
        s_j, i_j = topk(S[at, j], ids, candidates)
        extra.append(pa.table({"id": pa.array(list(i_j), pa.string()), "row_at": pa.array(np.full(len(s_j), -1, np.int64)),
                               "score": pa.array(s_j, pa.float64()), "target": pa.array(np.full(len(s_j), j, np.int32))}))
    return pa.concat_tables([rows, *extra])
