"""Shared fixtures: a tiny random Llama + random sparsify SAE on disk, and one Ray instance."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from _tiny_lm import make_rows, make_tiny_lm, write_rows  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> Path:
    return make_tiny_lm(tmp_path_factory.mktemp("tiny_lm"), layers=4, hidden=32)


def make_random_sae(root: Path, d_in: int, latents: int, k: int, hookpoint: str, seed: int = 0) -> Path:
    from mona_ray.core.sae import SAE, save_sparsify

    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(latents, d_in, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    sae = SAE(W_enc=W_dec.clone(), b_enc=0.1 * torch.randn(latents, generator=g), W_dec=W_dec,
              b_dec=0.1 * torch.randn(d_in, generator=g), k=k, hookpoint=hookpoint)
    save_sparsify(sae, root)
    return root


@pytest.fixture(scope="session")
def tiny_sae(tmp_path_factory) -> Path:
    return make_random_sae(tmp_path_factory.mktemp("tiny_sae"), d_in=32, latents=128, k=8, hookpoint="layers.2")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("tiny_data")
    src = write_rows(d / "source.parquet", make_rows(90, seed=1))
    tgt = [{"id": f"t{i}", "instruction": r["instruction"], "input": "", "output": r["output"]}
           for i, r in enumerate(make_rows(12, seed=2))]
    tgt_path = d / "target.jsonl"
    tgt_path.write_text("".join(json.dumps(r) + "\n" for r in tgt))
    return {"source": src, "target": tgt_path, "dir": d}


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray


def tiny_overrides(tiny_lm, tiny_sae, data, out, *extra) -> list[str]:
    return [f"model.path={tiny_lm}", f"sae.path={tiny_sae}", "sae.hookpoint=layers.2", "model.dtype=float32",
            f"source.paths=[{data['source']}]", f"target.paths=[{data['target']}]", f"run.output_dir={out}",
            "embed.rows_per_unit=16", "render.max_length=64", "select.count=10",
            "select.aggregate=prototype", "select.prototype_mass=1.0", "select.row_mass=1.0", *extra]  # the paper's formula, checked by hand
