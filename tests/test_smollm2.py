"""The real embedded model and its shipped SAE through the real Ray pipeline (about 220 rows)."""

import json
from collections import Counter

import pyarrow.parquet as pq
import pytest

from mona_ray.config import asset_path, load_config
from mona_ray.pipeline.cli import run


@pytest.fixture(scope="module")
def demo_subset(tmp_path_factory):
    d = tmp_path_factory.mktemp("smol")
    pq.write_table(pq.read_table(asset_path("demo/source.parquet")).slice(0, 200), d / "source.parquet")
    pq.write_table(pq.read_table(asset_path("demo/target_gsm8k.parquet")).slice(0, 20), d / "target.parquet")
    return d


def test_demo_model_selects_math_for_gsm8k(ray_local, demo_subset, tmp_path):
    out = tmp_path / "out"
    cfg = load_config([f"source.paths=[{demo_subset / 'source.parquet'}]", f"target.paths=[{demo_subset / 'target.parquet'}]",
                       f"run.output_dir={out}", "select.count=10"])
    m = run(cfg, quiet=True)
    assert m["counts"]["source"]["rows_scored"] == 200 and m["counts"]["target"]["rows_usable"] == 20
    assert m["sae"]["num_latents"] == 9216 and cfg.sae.hookpoint == "layers.15"  # the default selector
    sel = [json.loads(x) for x in (out / "selected.jsonl").read_text().splitlines()]
    domains = Counter(r["domain"] for r in sel)
    base = Counter(pq.read_table(demo_subset / "source.parquet").column("domain").to_pylist())
    # math is about 1 row in 10 of this subset; MoNA's top 10 for GSM8K must be mostly math
    assert base["math"] / 200 < 0.15
    assert domains["math"] >= 6, domains
    assert m["throughput"]["padding_fraction"] < 0.2
    assert (out / "explain.md").exists()
