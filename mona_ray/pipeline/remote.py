"""The feature engine on Ray actors for conversations the driver holds (the evaluation's
``embed.executor=ray``): the same units and the same per-unit function as in-process
(``features.local.embed_unit``), spread over an actor pool, one model per actor."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace

import numpy as np

from ..features.local import LocalEmbedder, embed_unit, plan_units


class UnitEmbedActor:
    """One engine per actor; embeds a unit per call and writes its parts."""

    def __init__(self, job, rendering, roots: dict[str, str]):
        from ..features.spec import load_engine

        self.job, self.rendering, self.roots = job, rendering, roots
        self.engine, self.tok = load_engine(job)

    def __call__(self, batch: dict) -> dict:
        out = [embed_unit(self.engine, self.tok, self.job, self.rendering, json.loads(u), self.roots)
               for u in batch["unit"]]
        return {"done": np.asarray([json.dumps(o) for o in out])}


class RayEmbedder(LocalEmbedder):
    """:class:`~mona_ray.features.local.LocalEmbedder` with its units run by ``num_actors`` Ray
    actors (a GPU each when the job's device is ``cuda``)."""

    def __init__(self, *args, num_actors: int = 1, actor_num_cpus: float = 0.5, ray_address: str | None = None, **kw):
        super().__init__(*args, **kw)
        self.num_actors, self.actor_num_cpus, self.ray_address = int(num_actors), float(actor_num_cpus), ray_address

    def embed(self, conversations, desc: str = "features") -> dict[str, str]:
        import ray
        from tqdm.auto import tqdm

        units = plan_units(conversations, self.stores, self.rows_per_unit)
        rejected: dict[str, str] = {}
        if not units:
            return rejected
        if not ray.is_initialized():
            ray.init(address=self.ray_address or "local", include_dashboard=False, log_to_driver=False)
            ray.data.DataContext.get_current().enable_progress_bars = False
        roots = {name: str(s.root) for name, s in self.stores.items()}
        gpu = {"num_gpus": 1} if self.job.device.startswith("cuda") else {}
        job = self.job
        if not gpu and not job.torch_threads:  # as the pipeline: the node's cores shared by its actors
            job = replace(job, torch_threads=max(1, (os.cpu_count() or 1) // self.num_actors))
        ds = ray.data.from_items([{"unit": json.dumps(u)} for u in units], override_num_blocks=len(units)).map_batches(
            UnitEmbedActor, fn_constructor_args=(job, self.rendering, roots), batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=self.num_actors), num_cpus=self.actor_num_cpus, **gpu)
        bar = tqdm(total=sum(len(u["hashes"]) for u in units), desc=f"{desc} ({self.num_actors} actors)", unit="row",
                   disable=not self.progress, file=sys.stderr, dynamic_ncols=True)
        for row in ds.iter_rows():
            done = json.loads(row["done"])
            self._count(done, rejected)
            bar.update(done["rows"] + len(done["rejected"]))
        bar.close()
        for s in self.stores.values():
            s.add_parts(s.parts())
        return rejected
