"""The feature engine in this process, for conversations held in memory (the evaluation, NAIT).

:func:`embed_conversations` fills the feature stores of a job's readouts with every row they
do not hold yet: it renders and tokenizes exactly as the pipeline's prepare stage does
(``render.render`` + ``render.tokenize_many``), runs the engine over units of
``rows_per_unit`` rows and writes one part per readout and unit, named after its content.
The rows land in the same folders, under the same fingerprints, as a pipeline run's, so a
pipeline run and an evaluation reuse each other's work. Ray is not needed; the pipeline's
actors are the distributed executor of the same engine.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from ..core import records
from ..core.render import render, tokenize_many
from ..core.io import sha
from .spec import EngineJob, load_engine
from .store import FeatureStore, embedding_fingerprint, rows_table, write_store_part


@dataclass(frozen=True)
class Rendering:
    """How conversations become tokens (``render.*``); part of every store fingerprint."""

    mode: str = "chat_template"
    system_prompt: str | None = None
    max_length: int = 512

    @classmethod
    def of(cls, render) -> "Rendering":
        """From a ``render`` config section (``RenderConfig``)."""
        return cls(render.mode, render.system_prompt, int(render.max_length))

    def spec(self) -> dict:
        return {"mode": self.mode, "system_prompt": self.system_prompt, "max_length": self.max_length}


def stores_for(job: EngineJob, rendering: Rendering, model_fp: str, store_dir) -> dict[str, FeatureStore]:
    """The store folder of each of the job's readouts (the pipeline computes the same names)."""
    saes = {s.key: s for s in job.saes}
    out = {}
    for r in job.readouts:
        fp = embedding_fingerprint(model_fp, job.dtype, rendering.spec(), r.spec(),
                                   saes[r.sae].fingerprint if r.kind == "sae" else None,
                                   job.batching.pad_multiple, job.batching.sae_chunk_tokens, job.batching.value_dtype)
        out[r.name] = FeatureStore(Path(store_dir).expanduser().resolve() / fp)
    return out


def plan_units(conversations: list[list[dict]], stores: dict[str, FeatureStore], rows_per_unit: int
               ) -> list[dict]:
    """The rows some store does not hold yet, each content once, in units of ``rows_per_unit``
    (sorted by content hash, so a unit's rows and name depend only on what is missing)."""
    first: dict[str, list[dict]] = {}
    for m in conversations:
        first.setdefault(records.content_hash(m), m)
    todo = sorted(set().union(*(s.missing(first) for s in stores.values())))
    units = []
    for a in range(0, len(todo), rows_per_unit):
        hashes = todo[a:a + rows_per_unit]
        units.append({"key": sha(hashes, 24), "hashes": hashes, "rows": [first[h] for h in hashes]})
    return units


def embed_unit(engine, tok, job: EngineJob, rendering: Rendering, unit: dict, store_roots: dict[str, str]) -> dict:
    """Tokenize and embed one unit and write one part per readout; returns its rejected rows
    (``{content_hash: reason}``) and counts. The same function runs here and in Ray actors."""
    hashes, rows = unit["hashes"], unit["rows"]
    ids, masks, bad = tokenize_rows(rows, tok, rendering, engine.excludes)
    ok = [i for i in range(len(rows)) if i not in bad]
    res = engine.run([ids[i] for i in ok], {e: [masks[e][i] for i in ok] for e in engine.excludes})
    rejected = {hashes[i]: why for i, why in bad.items()}
    rejected.update({hashes[ok[j]]: why for j, why in res.rejected.items()})
    good = [j for j in range(len(ok)) if j not in res.rejected]
    for r in job.readouts:  # written, not indexed: the caller records the new parts once
        write_store_part(rows_table([hashes[ok[j]] for j in good], [res.n_tokens[j] for j in good],
                                    [res.n_pooled[r.name][j] for j in good], [res.outputs[r.name][j] for j in good],
                                    job.batching.value_dtype),
                         FeatureStore(Path(store_roots[r.name])).part_path(unit["key"]))
    return {"rejected": rejected, "rows": len(good), "tokens": res.real_tokens, "forward_seconds": res.forward_seconds}


class LocalEmbedder:
    """Fills the stores in this process; loads the job's engine on first use and keeps it."""

    def __init__(self, job: EngineJob, rendering: Rendering, stores: dict[str, FeatureStore], rows_per_unit: int = 256,
                 progress: bool = True):
        self.job, self.rendering, self.stores = job, rendering, stores
        self.rows_per_unit, self.progress = int(rows_per_unit), progress
        self._engine = self._tok = None
        self.stats = {"rows_embedded": 0, "tokens": 0, "forward_seconds": 0.0}

    def _load(self):
        if self._engine is None:
            self._engine, self._tok = load_engine(self.job)
        return self._engine, self._tok

    def embed(self, conversations: list[list[dict]], desc: str = "features") -> dict[str, str]:
        """Store every conversation's features for every readout; returns ``{content_hash: reason}``
        for rows that have none (no tokens, or the engine rejected them)."""
        from tqdm.auto import tqdm

        units = plan_units(conversations, self.stores, self.rows_per_unit)
        rejected: dict[str, str] = {}
        if not units:
            return rejected
        engine, tok = self._load()
        roots = {name: str(s.root) for name, s in self.stores.items()}
        bar = tqdm(total=sum(len(u["hashes"]) for u in units), desc=desc, unit="row", disable=not self.progress,
                   file=sys.stderr, dynamic_ncols=True)
        for u in units:
            done = embed_unit(engine, tok, self.job, self.rendering, u, roots)
            self._count(done, rejected)
            bar.update(len(u["hashes"]))
        bar.close()
        for s in self.stores.values():
            s.add_parts(s.parts())
        return rejected

    def _count(self, done: dict, rejected: dict) -> None:
        rejected.update(done["rejected"])
        self.stats["rows_embedded"] += done["rows"]
        self.stats["tokens"] += done["tokens"]
        self.stats["forward_seconds"] += done["forward_seconds"]


def tokenize_rows(conversations: list[list[dict]], tok, rendering: Rendering, excludes) -> tuple[list, dict, dict]:
    """``(ids, {exclude: masks}, {row: reason})``, as the pipeline's prepare stage tokenizes."""
    rendered, bad = [], {}
    for i, m in enumerate(conversations):
        try:
            rendered.append(render(m, tok, rendering.mode, rendering.system_prompt))
        except Exception as e:  # noqa: BLE001 - one row never stops the run
            bad[i] = f"cannot render: {type(e).__name__}: {e}"
            rendered.append(render([{"role": "user", "content": ""}], tok, "plain"))
    ids, masks = None, {}
    for e in excludes:
        enc = tokenize_many(rendered, tok, rendering.max_length, e)
        ids = [x[0] for x in enc] if ids is None else ids
        masks[e] = [x[1] for x in enc]
    return ids, masks, bad
