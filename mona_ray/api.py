"""The Python API: ``mona_ray.select(...)`` runs the same job as ``python -m mona_ray.run``.

Example::

    import mona_ray

    sel = mona_ray.select(source="pool.jsonl", target="my_task.jsonl", overrides=["select.ratio=0.1"])
    df = sel.selected.to_pandas()        # the selected records, best first, with id, score, rank
    sel.scores                           # id, score, file, row of every scored source row

The config is the CLI's (``RunConfig`` in ``config/schema.py``, validated and typed the same way): ``overrides``
are the CLI's own override strings. Ray is started for the run (a fresh local instance) or
joined (``ray.address`` / ``RAY_ADDRESS``, or a Ray already initialised in this process), as
the CLI does. Errors are the CLI's, raised instead of printed: ``ConfigError`` for a bad
setting, ``InputError`` / ``RunError`` / ``ModelError`` / ``SAEError`` with the CLI's one-line
messages, ``OutputBusy`` when another run holds the output folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Union

PathLike = Union[str, os.PathLike]


@dataclass
class Selection:
    """A finished run, read from its own run folder (``runs/<run id>/``: a later refresh of the
    same output folder publishes another run and leaves this one as it is, until pruned)."""

    run_dir: Path
    manifest: dict = field(repr=False)

    @property
    def output_dir(self) -> Path:
        return Path(self.manifest["output_dir"])

    @property
    def selected(self):
        """The selected records, best first, as a pyarrow Table (``id``, ``score``, ``rank`` and
        every field of the original record)."""
        import pyarrow.parquet as pq

        return pq.read_table(self.run_dir / "selected.parquet")

    @property
    def scores(self):
        """Every scored source row: ``id, score, file, row`` (pyarrow Table)."""
        import pyarrow.parquet as pq

        return pq.read_table(self.run_dir / "scores.parquet")

    @property
    def explanation(self) -> dict | None:
        """``explain.json`` (the prototype's latents and why each selected row was chosen), or
        None when the run wrote none (baselines, ``report.explain=false``)."""
        path = self.run_dir / "explain.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None

    def to_pandas(self):
        return self.selected.to_pandas()

    def to_datasets(self):
        """The selection as a Hugging Face ``datasets.Dataset`` (needs the ``datasets`` package)."""
        try:
            import datasets
        except ImportError:
            raise ImportError("Selection.to_datasets needs the datasets package: pip install datasets") from None
        return datasets.Dataset(self.selected)

    def __len__(self) -> int:
        return int(self.manifest["counts"]["source"]["rows_selected"])


def _paths(x: PathLike | Iterable[PathLike]) -> list[str]:
    if isinstance(x, (str, os.PathLike)):
        return [os.fspath(x)]
    return [os.fspath(p) for p in x]


def select(source: PathLike | Iterable[PathLike] | None = None, target: PathLike | Iterable[PathLike] | None = None,
           overrides: Iterable[str] = (), output_dir: PathLike | None = None, quiet: bool = True) -> Selection:
    """Select from ``source`` the rows most like ``target`` (each a path, a folder, a glob or a
    list of them; None keeps the config's, the embedded demo's by default) and return the
    :class:`Selection`. ``output_dir`` is ``run.output_dir``; ``quiet=False`` prints the CLI's summary."""
    from .config import load_config, to_typed
    from .pipeline.cli import run

    cfg = to_typed(load_config(list(overrides)))
    if source is not None:
        cfg.source.paths = _paths(source)
    if target is not None:
        cfg.target.paths = _paths(target)
    if output_dir is not None:
        cfg.run.output_dir = os.fspath(output_dir)
    manifest = run(cfg, quiet=quiet)
    return Selection(Path(manifest["run_dir"]), manifest)
