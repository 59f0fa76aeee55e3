"""The benchmarks run end to end at tiny sizes and write sane JSON (no timing asserts)."""

import json

import numpy as np
import pytest
import torch

from mona_ray import scoring
from mona_ray.bench.__main__ import main
from mona_ray.bench.flops import model_flops, peak_tflops
from mona_ray.bench.synth import Generator, RowPool, SynthSpec


def test_score_tiny(tmp_path, capsys):
    out = tmp_path / "score.json"
    rc = main(["score", "--sizes", "500,1500", "--block-rows", "256", "--latents", "512", "--nnz", "60",
               "--pool-rows", "600", "--compare-blocks", "2", "--quality-rows", "400", "--out", str(out)])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert rep["benchmark"] == "score" and rep["machine"]["cpu"]
    res = rep["results"]
    assert [r["rows"] for r in res] == [500, 1500]
    for r in res:
        assert r["selected"] == scoring.selection_size(r["rows"], 0.05)
        assert 30 < r["nnz_per_row"] < 90
        assert r["score_topk_s"] > 0 and r["peak_rss_mb"] > 0
    assert rep["kernels"]["bitwise_equal"] is True
    f16 = rep["float16"]
    assert f16["rows"] == 400 and 0 <= f16["overlap"] <= 1 and f16["bytes_per_row_float16"] < f16["bytes_per_row_float32"]
    assert "peak RSS MB" in capsys.readouterr().out


def test_gpu_tiny_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    assert main(["gpu", "--tiny", "--repeats", "1", "--out", str(out)]) == 0
    r = json.loads(out.read_text())["result"]
    assert r["device"] == "cpu" and r["blocks_run"] == 3
    assert r["real_tokens"] <= r["padded_tokens"]
    assert r["bare_tokens_per_s"] > 0 and r["inner_loop_tokens_per_s"] > 0
    assert r["inner_loop_mfu"] is None  # no peak is known for a CPU unless --peak-tflops is given
    assert r["model_gflop_per_token"] > 0 and r["sae_gflop_per_token"] > 0


@pytest.mark.parametrize("argv, msg", [
    (["score", "--sizes", "10,x"], "--sizes"),
    (["score", "--sizes", "100", "--nnz", "0"], "--nnz"),
    (["score", "--sizes", "100", "--block-rows", "900", "--pool-rows", "100"], "--block-rows"),
    (["gpu", "--tiny", "--layer", "99"], "--layer"),
    (["gpu", "--tiny", "--sae-k", "9999"], "--sae-k"),
    (["gpu", "--tiny", "--dtype", "int3"], "dtype"),
    (["embed", "--rows", "0"], "--rows"),
])
def test_bad_flags_give_one_line_errors(argv, msg, tmp_path, capsys):
    assert main(argv + ["--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err
    assert not (tmp_path / "x.json").exists()


def test_flops_match_a_hand_count():
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8)
    per_token = 2 * (2 * 4096 ** 2 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    f = model_flops(cfg, 31, [1])  # one token: attention to itself only
    assert f == 31 * (per_token + 4 * 4096)
    assert 13.5e9 < f < 13.6e9  # ~2 x 6.76e9 parameters in 31 blocks
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312 and peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert peak_tflops("NVIDIA H100 PCIe") == 756 and peak_tflops("Tesla T4") is None


def test_synthetic_rows_are_valid_csr_and_blocks_stream():
    gen = Generator(SynthSpec(num_latents=300, nnz=40, seed=1))
    rows = gen.rows(gen.source_affinity(50, np.random.default_rng(0)), np.random.default_rng(0))
    assert rows.indptr[0] == 0 and rows.indptr[-1] == len(rows.indices) == len(rows.values)
    for i in range(len(rows)):
        idx, val = rows.row(i)
        assert np.all(np.diff(idx) > 0) and np.all(val > 0) and idx.max() < 300
    pool = RowPool(gen, 120)
    blk = pool.block(30, np.random.default_rng(2))
    assert len(blk) == 30 and blk.indptr[0] == 0 and blk.indptr[-1] == len(blk.values)
    with pytest.raises(ValueError):
        pool.block(500, np.random.default_rng(0))
