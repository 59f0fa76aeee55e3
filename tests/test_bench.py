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
    (["width", "--phases", "store"], "--nnz"),
    (["width", "--phases", "store,x"], "--phases"),
    (["width", "--nnz", "10", "--encodings", "int8"], "--encodings"),
    (["less", "--rank", "0"], "--rank"),
])
def test_bad_flags_give_one_line_errors(argv, msg, tmp_path, capsys):
    assert main(argv + ["--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err
    assert not (tmp_path / "x.json").exists()


def test_less_tiny(tiny_lm, tmp_path, capsys):
    out = tmp_path / "less.json"
    assert main(["less", "--rows", "12", "--rank", "4", "--proj-dim", "300", "--checkpoints", "2", "--out", str(out),
                 f"model.path={tiny_lm}", "sae.hookpoint=layers.2", "render.max_length=64"]) == 0
    r = json.loads(out.read_text())
    assert r["rows"] == 12 and r["tokens"] <= 12 * 64
    assert r["adapter_weights"] == 4 * (2 * (32 * 4 + 4 * 32) + 2 * (32 * 4 + 4 * 16))  # 4 layers: q, o 32->32; k, v 32->16
    assert r["rademacher_timed_blocks"] == "1 of 3"
    for k in ("embed", "warmup", "gradient", "countsketch", "rademacher"):
        assert r[f"{k}_s_per_row"] > 0
    assert r["less_countsketch_s_per_row"] == pytest.approx(2 * (r["gradient_s_per_row"] + r["countsketch_s_per_row"])
                                                            + 0.2 * r["warmup_s_per_row"])
    assert "the embed pass per row" in capsys.readouterr().out


def test_flops_match_a_hand_count():
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8)
    per_token = 2 * (2 * 4096 ** 2 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    f = model_flops(cfg, 31, [1])  # one token: attention to itself only
    assert f == 31 * (per_token + 4 * 4096)
    assert 13.5e9 < f < 13.6e9  # ~2 x 6.76e9 parameters in 31 blocks
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312 and peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert peak_tflops("NVIDIA H100 PCIe") == 756 and peak_tflops("Tesla T4") is None


def test_width_store_and_encode_tiny(tmp_path, capsys):
    """``bench width``: every store layout selects what today's layout selects (float32 bit for bit),
    and the batched encode is compared with the engine's row-by-row one."""
    out = tmp_path / "width.json"
    assert main(["width", "--phases", "store,encode", "--latents", "2048", "--sae-k", "16", "--nnz", "150",
                 "--store-rows", "600", "--part-rows", "256", "--pool-rows", "300", "--encode-rows", "4", "--hidden", "32",
                 "--work-dir", str(tmp_path / "w"), "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    (st,) = rep["store"]
    assert 100 < st["nnz_per_row"] < 200 and st["density"] == st["nnz_per_row"] / 2048
    enc = {r["encoding"]: r for r in st["encodings"]}
    assert set(enc) == {"int32-f32", "delta-f32", "delta-bss-f32", "delta-bss-f32-zstd3", "int32-f16", "delta-bss-f16"}
    for name, r in enc.items():
        assert r["rows"] == 600 and r["explained"] == 30 and len(r["write_s_runs"]) == 2
        assert r["bytes_per_row"] > 0 and r["write_s"] > 0 and r["score_s"] > 0 and r["explain_s"] > 0
        if name.endswith("f32") and name != "int32-f32":  # a layout: the same bits, the same selection
            sel = r["selection_vs_int32-f32"]
            assert sel["ids_identical_in_order"] and sel["max_abs_score_diff"] == 0.0
    assert enc["delta-bss-f32"]["bytes_per_row"] < enc["int32-f32"]["bytes_per_row"]
    assert not list((tmp_path / "w").glob("store-*"))  # the parts are removed
    assert {p["encoding"] for p in rep["projection"]} == set(enc) and rep["projection"][0]["rows"] == 1_000_000
    e = rep["encode"]
    assert e["rows"] == 4 and e["sae"] == {"latents": 2048, "k": 16, "d_in": 32} and isinstance(e["bitwise_equal"], bool)
    assert "selection vs int32-f32" in capsys.readouterr().out


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


def test_pipeline_bench_end_to_end(ray_local, tmp_path):
    """``bench pipeline`` runs the real job on OpenHermes-shaped rows (tiny model, SmolLM2's tokenizer)."""
    import math

    out = tmp_path / "pipeline.json"
    assert main(["pipeline", "--rows", "300", "--format", "json", "--actors", "1", "--work-dir", str(tmp_path / "work"),
                 "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    r = rep["result"]
    c = r["counts"]
    assert r["rows"] == 300 and r["format"] == "json" and r["actors"] == 1
    assert c["rows_in"] == 300 and c["rows_scored"] + c["rows_rejected"] == c["rows_in"] and r["invariant_ok"]
    assert c["rows_selected"] == math.ceil(0.05 * c["rows_scored"])
    assert c["target"]["rows_in"] == 100
    for stage in ("plan", "prepare", "embed", "prototype", "score", "write"):
        assert r["timings_s"][stage] > 0, stage
    assert r["pipeline_wall_s"] >= r["stage_sum_s"] > 0 and r["rows_per_s"] > 0
    assert r["driver_peak_rss_mb"] > 0 and r["generate_s"] > 0 and not r["generation_reused"]
    mem = r["driver_memory_mb_by_stage"]
    assert {"plan", "prepare", "embed", "score", "write"} <= set(mem)
    assert all(0 < m["anon"] <= m["rss"] for m in mem.values()) and r["driver_peak_private_mb"] <= r["driver_peak_rss_mb"]
    assert r["throughput"]["real_tokens"] > 0
    assert r["workers_peak_rss_mb"] > 0 and r["workers_peak_rss_top"][0]["peak_rss_mb"] == round(r["workers_peak_rss_mb"], 1)
    assert r["run_dir"] is None and not list((tmp_path / "work" / "runs").iterdir())  # removed without --keep
    # the tiny model carries the embedded model's tokenizer and chat template
    from transformers import AutoConfig, AutoTokenizer

    model_dir = r["model"]["path"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert AutoConfig.from_pretrained(model_dir).vocab_size == len(tok) and tok.chat_template
    assert "<|im_start|>user" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_pipeline_bench_source_formats_hold_the_same_records(tmp_path):
    import pyarrow.parquet as pq

    from mona_ray.bench.pipeline import generate_source
    from mona_ray.core.records import normalize_record

    recs = {}
    for fmt in ("json", "jsonl", "parquet"):
        path = tmp_path / f"openhermes2_5.{fmt}"
        stats = generate_source(path, 1000, fmt, seed=3, math_fraction=0.05)
        assert stats["rows"] == 1000 and stats["bytes"] == path.stat().st_size
        if fmt == "json":
            recs[fmt] = json.loads(path.read_text())
        elif fmt == "jsonl":
            recs[fmt] = [json.loads(x) for x in path.read_text().splitlines()]
        else:
            assert pq.ParquetFile(path).metadata.num_row_groups == 1
            recs[fmt] = pq.read_table(path).to_pylist()
    rows = recs["json"]
    assert rows == recs["jsonl"] == recs["parquet"] and len(rows) == 1000
    assert all(set(r) == {"conversations", "source", "category"} for r in rows)  # no id, as in OpenHermes-2.5
    first = [r["conversations"][0]["from"] for r in rows]
    assert 50 < first.count("system") < 150 and set(first) == {"system", "human"}
    assert 10 < stats["math_rows"] < 90 and 0 < stats["multi_turn_rows"] < 30
    for r in rows:
        roles = [m["role"] for m in normalize_record(r)]
        talk = roles[1:] if roles[0] == "system" else roles
        assert talk == ["user", "assistant"] * (len(talk) // 2) and talk
    text = sum(len(m["value"]) for r in rows for m in r["conversations"])
    assert 1200 < text / 1000 < 2500  # OpenHermes-2.5: about 1.5-2 KB of text per record
    assert any("\n" in m["value"] for r in rows for m in r["conversations"])


@pytest.mark.parametrize("argv, msg", [
    (["pipeline", "--rows", "0"], "--rows"),
    (["pipeline", "--format", "csv"], "--format"),
    (["pipeline", "--actors", "0"], "--actors"),
])
def test_pipeline_bench_bad_flags(argv, msg, tmp_path, capsys):
    assert main(argv + ["--work-dir", str(tmp_path / "w"), "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "w").exists()
