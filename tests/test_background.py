"""Scores that weigh latents by the source pool (select.background, issue 30): the pure math against
straightforward dense formulas, and the real Ray pipeline against an independent computation."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import tiny_overrides
from mona_ray.config import load_config
from mona_ray.core.model import load_tokenizer
from mona_ray.core.sae import load_sae
from mona_ray.pipeline.cli import run
from mona_ray.pipeline.driver import RunError
from mona_ray.scoring.background import LR_SMOOTHING, Background, PoolStats
from mona_ray.scoring.sparse import SparseRows
from mona_ray.scoring.table import score_rows_against, similarities_of

from test_pipeline import naive_embedding


def _sparse(D: np.ndarray) -> SparseRows:
    nz = [np.flatnonzero(r) for r in D]
    return SparseRows.from_lists(nz, [r[i] for r, i in zip(D, nz)])


def _rows(seed=0, n=60, L=40):
    rng = np.random.default_rng(seed)
    D = (rng.random((n, L)) * (rng.random((n, L)) < 0.3)).astype(np.float32)
    D[:, 0] = rng.random(n).astype(np.float32) + 0.5  # a latent every row has (the chat template's)
    return D


def _table(D: np.ndarray) -> pa.Table:
    X = _sparse(D)
    cut = [X.row(i) for i in range(len(X))]
    return pa.table({"n_pooled": pa.array(np.ones(len(D), np.int64)),
                     "indices": pa.array([c[0].tolist() for c in cut], pa.list_(pa.int32())),
                     "values": pa.array([c[1].tolist() for c in cut], pa.list_(pa.float32()))})


def test_pool_stats_add_up_over_any_split():
    D = _rows()
    whole = PoolStats.of(_sparse(D), D.shape[1])
    parts = PoolStats.of(_sparse(D[:17]), D.shape[1]) + PoolStats.of(_sparse(D[17:]), D.shape[1])
    assert whole.rows == parts.rows == len(D)
    np.testing.assert_array_equal(whole.df, (D > 0).sum(0))
    np.testing.assert_array_equal(whole.df, parts.df)
    np.testing.assert_allclose(whole.mass, D.astype(np.float64).sum(0))
    np.testing.assert_allclose(parts.mass, whole.mass)
    np.testing.assert_allclose(whole.var(), D.astype(np.float64).var(0), atol=1e-12)


def test_each_background_equals_its_dense_formula():
    D = _rows().astype(np.float64)
    st = PoolStats.of(_sparse(D.astype(np.float32)), D.shape[1])
    p = D[:5].mean(0)
    X = _sparse(D.astype(np.float32))
    Z = D.astype(np.float32).astype(np.float64)
    # idf: generalized Jaccard of the weighted vectors; the shared latent 0 weighs (almost) nothing
    w = np.log((len(D) + 1) / ((D > 0).sum(0) + 1))
    assert w[0] == pytest.approx(np.log((len(D) + 1) / (len(D) + 1)))
    got = Background.of("idf", st).similarities(X, p, "jaccard")[:, 0]
    np.testing.assert_allclose(got, np.minimum(Z * w, p * w).sum(1) / np.maximum(Z * w, p * w).sum(1), rtol=1e-12)
    cos = Background.of("idf", st).similarities(X, p, "cosine")[:, 0]
    np.testing.assert_allclose(cos, (Z * w) @ (p * w) / np.linalg.norm(Z * w, axis=1) / np.linalg.norm(p * w), rtol=1e-12)
    # contrast: the prototype's excess over the pool's mean
    pc_ = np.maximum(p - Z.mean(0), 0)
    got = Background.of("contrast", st).similarities(X, p, "jaccard")[:, 0]
    np.testing.assert_allclose(got, np.minimum(Z, pc_).sum(1) / np.maximum(Z, pc_).sum(1), rtol=1e-12)
    # lr: the mean log-ratio of the row's mass
    q = Z.sum(0) / Z.sum() + 1e-12
    lr = np.log(((1 - LR_SMOOTHING) * p / p.sum() + LR_SMOOTHING * q) / q)
    got = Background.of("lr", st).similarities(X, p, "jaccard")[:, 0]
    np.testing.assert_allclose(got, Z @ lr / Z.sum(1), rtol=1e-9)
    # lda: Fisher's discriminant with the pool's diagonal covariance, shrunk by its mean
    var = Z.var(0)
    got = Background.of("lda", st).similarities(X, p, "jaccard")[:, 0]
    np.testing.assert_allclose(got, Z @ ((p - Z.mean(0)) / (var + var.mean())), rtol=1e-9)


def test_none_is_the_papers_score_bit_for_bit_and_dense_readouts_are_refused():
    D = _rows(1)
    t = _table(D)
    P = D[:4].astype(np.float64).mean(0)[None, :]
    st = PoolStats.of(_sparse(D), D.shape[1])
    np.testing.assert_array_equal(score_rows_against(t, P, "jaccard", False, background=Background.of("none", st)),
                                  score_rows_against(t, P, "jaccard", False))
    # a row's score does not depend on the batch it is scored in
    bg = Background.of("idf", st)
    np.testing.assert_array_equal(score_rows_against(t, P, "jaccard", False, batch_rows=7, background=bg),
                                  score_rows_against(t, P, "jaccard", False, batch_rows=4096, background=bg))
    with pytest.raises(ValueError, match="SAE codes only"):
        similarities_of(D.astype(np.float64), P, "jaccard", True, bg)
    with pytest.raises(ValueError, match="select.background='bogus'"):
        Background.of("bogus", st)


def _run(tiny_lm, tiny_sae, data, out, *extra):
    return run(load_config(tiny_overrides(tiny_lm, tiny_sae, data, out, *extra)), quiet=True)


def test_idf_run_equals_the_naive_computation_and_reuses_its_statistics(ray_local, tiny_lm, tiny_sae, tiny_data,
                                                                        tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    m = _run(tiny_lm, tiny_sae, tiny_data, out, "select.background=idf")
    full = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32).eval()
    sae, tok = load_sae(tiny_sae, hookpoint="layers.2"), load_tokenizer(tiny_lm)
    src = pq.read_table(tiny_data["source"]).to_pylist()
    tgt = [json.loads(line) for line in tiny_data["target"].read_text().splitlines()]
    Z = np.stack([naive_embedding(full, sae, tok, r) for r in src])
    p = np.mean([naive_embedding(full, sae, tok, r) for r in tgt], axis=0)
    w = np.log((len(Z) + 1) / ((Z > 0).sum(0) + 1))  # the rarity of each latent among the 90 source rows
    jac = np.minimum(Z * w, p * w).sum(1) / np.maximum(Z * w, p * w).sum(1)
    want = sorted(zip(-jac, [r["id"] for r in src]))[:10]
    got = [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines()]
    assert [g["id"] for g in got] == [i for _, i in want]
    np.testing.assert_allclose([g["score"] for g in got], [-s for s, _ in want], rtol=1e-5)

    bg = m["selection"]["background"]
    assert bg["kind"] == "idf" and bg["rows"] == bg["of_rows"] == 90 and bg["cached"] is False
    assert m["timings_s"]["background"] >= 0
    ex = json.loads((out / "explain.json").read_text())
    assert ex["background"] == "idf"
    tops = ex["prototype"]["top_latents"]
    assert [t["weight"] for t in tops] == sorted((t["weight"] for t in tops), reverse=True)  # ranked by weight
    np.testing.assert_allclose([t["weight"] for t in tops], [(p * w)[t["latent"]] for t in tops], rtol=1e-5)
    assert "weight" in (out / "explain.md").read_text()

    again = _run(tiny_lm, tiny_sae, tiny_data, out, "select.background=idf", "run.overwrite=true")
    assert again["selection"]["background"]["cached"] is True
    assert [json.loads(x)["id"] for x in (out / "selected.jsonl").read_text().splitlines()] == [i for _, i in want]


def test_a_large_pool_reads_its_statistics_from_whole_parts_drawn_the_same_way_each_time(
        ray_local, tiny_lm, tiny_sae, tiny_data, tmp_path):
    a = _run(tiny_lm, tiny_sae, tiny_data, tmp_path / "a", "select.background=lda", "select.background_rows=40")
    b = _run(tiny_lm, tiny_sae, tiny_data, tmp_path / "b", "select.background=lda", "select.background_rows=40",
             f"embed.store_dir={tmp_path / 'a' / 'embeddings'}")
    bg_a, bg_b = a["selection"]["background"], b["selection"]["background"]
    assert 0 < bg_a["rows"] < 90 == bg_a["of_rows"]  # a sample of whole parts of 16 rows
    assert bg_a["parts"] < 90 // 16 + 1
    assert (bg_b["rows"], bg_b["parts"], bg_b["cache"], bg_b["cached"]) == (bg_a["rows"], bg_a["parts"], bg_a["cache"], True)
    assert (tmp_path / "a" / "selected.jsonl").read_text() == (tmp_path / "b" / "selected.jsonl").read_text()


def test_background_needs_sparse_codes(tiny_lm, tiny_sae, tiny_data, tmp_path):
    with pytest.raises(RunError, match="select.background=idf weighs sparse codes"):
        _run(tiny_lm, tiny_sae, tiny_data, tmp_path / "out", "select.background=idf", "select.method=bm25")
