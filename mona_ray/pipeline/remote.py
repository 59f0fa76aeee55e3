"""The feature engine on Ray actors for conversations the driver holds (the evaluation's
``embed.executor=ray``): the same units and the same per-unit function as in-process
(``features.local.embed_unit``), spread over an actor pool by the executor, one model per actor."""

from __future__ import annotations

import os
import sys
from dataclasses import replace

from ..core import executor
from ..features.local import LocalEmbedder, embed_unit, plan_units
from ..features.spec import engine_memory


class UnitEmbedActor:
    """One engine per actor; embeds a unit per call and writes its parts."""

    def __init__(self, job, rendering, roots: dict[str, str]):
        from ..features.spec import load_engine

        self.job, self.rendering, self.roots = job, rendering, roots
        self.engine, self.tok = load_engine(job)

    def embed(self, unit: dict) -> dict:
        return embed_unit(self.engine, self.tok, self.job, self.rendering, unit, self.roots)


class RayEmbedder(LocalEmbedder):
    """:class:`~mona_ray.features.local.LocalEmbedder` with its units run by ``num_actors`` Ray
    actors (a GPU each when the job's device is ``cuda``)."""

    def __init__(self, *args, num_actors: int = 1, actor_num_cpus: float = 0.5, ray_address: str | None = None, **kw):
        super().__init__(*args, **kw)
        self.num_actors, self.actor_num_cpus, self.ray_address = int(num_actors), float(actor_num_cpus), ray_address

    def embed(self, conversations, desc: str = "features") -> dict[str, str]:
        from tqdm.auto import tqdm

        units = plan_units(conversations, self.stores, self.rows_per_unit)
        rejected: dict[str, str] = {}
        if not units:
            return rejected
        executor.start(self.ray_address)  # joined, or started for the rest of the evaluation
        roots = {name: str(s.root) for name, s in self.stores.items()}
        gpu = self.job.device.startswith("cuda")
        job = self.job
        if not gpu and not job.torch_threads:  # as the pipeline: the node's cores shared by its actors
            job = replace(job, torch_threads=max(1, (os.cpu_count() or 1) // self.num_actors))
        results = executor.map_items(units, actor=(UnitEmbedActor, (job, self.rendering, roots), "embed"),
                                     size=self.num_actors, num_cpus=self.actor_num_cpus, num_gpus=1 if gpu else 0,
                                     memory=engine_memory(job, self.rendering.max_length))
        bar = tqdm(total=sum(len(u["hashes"]) for u in units), desc=f"{desc} ({self.num_actors} actors)", unit="row",
                   disable=not self.progress, file=sys.stderr, dynamic_ncols=True)
        for done in results:
            self._count(done, rejected)
            bar.update(done["rows"] + len(done["rejected"]))
        bar.close()
        for s in self.stores.values():
            s.add_parts(s.parts())
        return rejected
