"""The real Ray pipeline on a tiny model: exact selection, determinism, refresh, outputs."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import tiny_overrides
from mona_ray.core import records
from mona_ray.core.render import render, tokenize
from mona_ray.pipeline import report
from mona_ray.core.model import load_tokenizer
from mona_ray.pipeline.driver import RunError
from mona_ray.config import load_config
from mona_ray.pipeline.cli import run
from mona_ray.core.sae import load_sae
from mona_ray.features.spec import PROCESS_BYTES


def run_tiny(tiny_lm, tiny_sae, data, out, *extra):
    return run(load_config(tiny_overrides(tiny_lm, tiny_sae, data, out, *extra)), quiet=True)


def naive_embedding(full, sae, tok, rec, exclude="special", max_length=64):
    """Independent path: full HF model on one row, hidden_states[3], the sparsify formula, a plain mean."""
    r = render(records.normalize_record(rec), tok)
    ids, mask = tokenize(r, tok, max_length, exclude)
    with torch.inference_mode():
        h = full(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[3][0]
    pre = torch.relu((h - sae.b_dec) @ sae.W_enc.T + sae.b_enc)
    top = pre.topk(sae.k, dim=-1)
    z = torch.zeros_like(pre).scatter(1, top.indices, top.values)[torch.tensor(mask, dtype=torch.bool)]
    return z.mean(0).double().numpy()


@pytest.fixture(scope="module")
def first_run(ray_local, tiny_lm, tiny_sae, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    return out, run_tiny(tiny_lm, tiny_sae, tiny_data, out)


def test_selection_equals_the_naive_computation(first_run, tiny_lm, tiny_sae, tiny_data):
    from transformers import AutoModelForCausalLM

    out, manifest = first_run
    full = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32).eval()
    sae = load_sae(tiny_sae, hookpoint="layers.2")
    tok = load_tokenizer(tiny_lm)
    src = pq.read_table(tiny_data["source"]).to_pylist()
    tgt = [json.loads(line) for line in tiny_data["target"].read_text().splitlines()]
    proto = np.mean([naive_embedding(full, sae, tok, r) for r in tgt], axis=0)
    Z = np.stack([naive_embedding(full, sae, tok, r) for r in src])
    jac = np.minimum(Z, proto).sum(1) / np.maximum(Z, proto).sum(1)
    want = sorted(zip(-jac, [r["id"] for r in src]))[:10]

    got = [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines()]
    assert [g["id"] for g in got] == [i for _, i in want]
    np.testing.assert_allclose([g["score"] for g in got], [-s for s, _ in want], rtol=1e-5)
    assert [g["rank"] for g in got] == list(range(1, 11))
    assert got[0]["instruction"] == next(r for r in src if r["id"] == got[0]["id"])["instruction"]  # full record kept

    scores = pq.read_table(out / "scores.parquet")
    assert len(scores) == len(src)
    np.testing.assert_allclose(
        dict(zip(scores.column("id").to_pylist(), scores.column("score").to_pylist()))[want[0][1]], -want[0][0], rtol=1e-5)
    sel_pq = pq.read_table(out / "selected.parquet")
    assert sel_pq.column("id").to_pylist() == [g["id"] for g in got]


def test_manifest_counts_and_files(first_run):
    out, m = first_run
    assert m["status"] == "complete"
    assert m["counts"]["source"]["rows_in"] == 90 == m["counts"]["source"]["rows_scored"] + m["counts"]["source"]["rows_rejected"]
    assert m["counts"]["source"]["rows_selected"] == 10
    assert m["counts"]["embedded_now"] == 102  # 90 source + 12 target, all new
    assert m["throughput"]["real_tokens"] > 0 and 0 <= m["throughput"]["padding_fraction"] < 1
    assert m["throughput"]["tokens_per_s_units"] > 0  # steady-state actor throughput (start-up excluded)
    compute = dict(m["compute"])
    assert compute.pop("actor_memory_bytes") > PROCESS_BYTES  # declared to Ray: the worker, weights, a micro-batch
    assert compute == {"device": "cpu", "dtype": "float32", "dtype_reason": "set: model.dtype=float32"}
    assert m["units"]["embed"] == len(list((out / m["files"]["embeddings"]).glob("part-*.parquet"))) >= 102 // 16
    assert sum(m["embed_rows_per_actor"].values()) == 102
    for f in ("selected.jsonl", "selected.parquet", "scores.parquet", "rejected.parquet", "prototype.safetensors"):
        assert (out / f).exists(), f
    assert json.loads((out / "manifest.json").read_text())["fingerprints"]["embedding"] == m["fingerprints"]["embedding"]


@pytest.mark.parametrize("layer", [2, 3])
def test_declared_actor_memory_counts_the_weights_the_actor_loads(tiny_lm, layer):
    """The weights in the memory an embedding actor declares to Ray are those of the model cut
    after ``layer`` (read from the checkpoint's headers, no weights read): exactly the loaded
    parameters, plus the final norm when it is loaded only to be dropped (layer < last)."""
    from mona_ray.core.model import load_truncated
    from mona_ray.features.spec import _weights_elements

    lm = load_truncated(tiny_lm, layer, "float32", "cpu")
    params = sum(p.numel() for p in lm.model.parameters())
    params += sum(p.numel() for p in lm.final_norm.parameters()) if lm.final_norm is not None else lm.hidden_size
    assert _weights_elements(str(tiny_lm), layer) == params


def test_byte_identical_with_other_actor_counts_and_unit_sizes(first_run, tiny_lm, tiny_sae, tiny_data, tmp_path):
    out1, _ = first_run
    out2 = tmp_path / "out2"
    m2 = run_tiny(tiny_lm, tiny_sae, tiny_data, out2, "embed.rows_per_unit=7", "embed.num_actors=2",
                  "select.score_batch_rows=13", "embed.token_budget=100")
    assert m2["counts"]["embedded_now"] == 102  # a fresh store: everything embedded again, differently batched
    for f in ("selected.jsonl", "selected.parquet", "scores.parquet"):
        assert (out1 / f).read_bytes() == (out2 / f).read_bytes(), f


def test_finished_run_is_kept_unless_overwrite(first_run, tiny_lm, tiny_sae, tiny_data):
    out, m = first_run
    with pytest.raises(RunError, match="already holds a finished run.*run.overwrite=true"):
        run_tiny(tiny_lm, tiny_sae, tiny_data, out)
    before = (out / "selected.jsonl").read_bytes()
    m2 = run_tiny(tiny_lm, tiny_sae, tiny_data, out, "run.overwrite=true")
    assert m2["counts"]["embedded_now"] == 0 and m2["counts"]["reused_from_store"] == 102
    assert (out / "selected.jsonl").read_bytes() == before


def test_refresh_embeds_only_new_rows_and_rescoring_covers_all(ray_local, tiny_lm, tiny_sae, tiny_data, tmp_path):
    import sys

    sys.path.insert(0, str(tiny_data["dir"]))
    from _tiny_lm import make_rows, write_rows

    store = tmp_path / "store"
    folder = tmp_path / "src"
    folder.mkdir()
    write_rows(folder / "a.parquet", make_rows(40, seed=5))
    data = {**tiny_data, "source": folder}
    m1 = run_tiny(tiny_lm, tiny_sae, data, tmp_path / "r1", f"embed.store_dir={store}")
    assert m1["counts"]["embedded_now"] == 40 + 12
    new = [{**r, "id": f"new{i}"} for i, r in enumerate(make_rows(15, seed=6))]
    write_rows(folder / "b.parquet", new)
    m2 = run_tiny(tiny_lm, tiny_sae, data, tmp_path / "r2", f"embed.store_dir={store}")
    assert m2["counts"]["embedded_now"] == 15
    assert m2["counts"]["source"]["rows_scored"] == 55
    m3 = run_tiny(tiny_lm, tiny_sae, data, tmp_path / "r3", f"embed.store_dir={store}", "sae.k=4")
    assert m3["counts"]["embedded_now"] == 55 + 12  # a fingerprinted setting changed: everything again
    assert m3["fingerprints"]["embedding"] != m2["fingerprints"]["embedding"]


def test_explanation_written(first_run):
    out, m = first_run
    doc = json.loads((out / "explain.json").read_text())
    assert [r["id"] for r in doc["selected"]] == [json.loads(x)["id"] for x in (out / "selected.jsonl").read_text().splitlines()]
    got = [json.loads(x)["score"] for x in (out / "selected.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([r["score"] for r in doc["selected"]], got, rtol=1e-9)  # contributions add up to the score
    assert doc["prototype"]["top_latents"] and "explain.md" in m["files"]["explain"]
    # the rows' marks (computed on the driver) name exactly the prototype's top latents (the Ray task's)
    top = {x["latent"] for x in doc["prototype"]["top_latents"]}
    shared = [s for r in doc["selected"] for s in r["top_shared"]]
    assert any(s["prototype_top"] for s in shared) and all(s["prototype_top"] == (s["latent"] in top) for s in shared)
    # explain decodes only the selected rows, from only the store parts that hold them
    parts = sorted((out / m["files"]["embeddings"]).glob("part-*.parquet"))
    assert m["explain_read"]["rows"] == 10 and 1 <= m["explain_read"]["parts"] <= len(parts)


@pytest.mark.parametrize("method", ["bm25", "random"])
def test_baseline_selectors_run_through_the_same_pipeline(ray_local, tiny_lm, tiny_sae, tiny_data, tmp_path, method):
    out = tmp_path / method
    m = run_tiny(tiny_lm, tiny_sae, tiny_data, out, f"select.method={method}")
    sel = [json.loads(x) for x in (out / "selected.jsonl").read_text().splitlines()]
    assert len(sel) == 10 and m["counts"]["embedded_now"] == 0
    assert [s["score"] for s in sel] == sorted((s["score"] for s in sel), reverse=True)
    assert len(pq.read_table(out / "scores.parquet")) == 90
    assert m["selection"]["method"] == method
    text = report.summary(m, sel)
    assert f"Selection finished (baseline: {method})" in text
    line = next(x for x in text.splitlines() if "cutoff score" in x)
    assert f"(method {method}, cutoff score" in line and "similarity" not in line  # no SAE similarity in a baseline


@pytest.mark.parametrize("rep", ["hidden", "mlp_gate"])
def test_ablation_representations_run_through_the_pipeline(ray_local, tiny_lm, tiny_sae, tiny_data, tmp_path, rep):
    out = tmp_path / rep
    m = run_tiny(tiny_lm, tiny_sae, tiny_data, out, f"embed.representation={rep}", "embed.mlp_k=8")
    sel = [json.loads(x) for x in (out / "selected.jsonl").read_text().splitlines()]
    assert len(sel) == 10 and m["counts"]["source"]["rows_scored"] == 90
    scores = [s["score"] for s in sel]
    assert scores == sorted(scores, reverse=True) and all(np.isfinite(scores))


def test_mlp_k_reaches_the_actor_and_the_width_comes_from_the_model(ray_local, tiny_lm, tiny_sae, tiny_data, tmp_path):
    """embed.mlp_k changes the stored codes (K gate units per token, no more), and a run whose
    codes touch far fewer gate units than the MLP has still scores: the width is the model's
    intermediate size (64), not the largest index seen in the data."""
    from safetensors.numpy import load_file

    nnz = {}
    for k in (1, 8):
        out = tmp_path / f"k{k}"
        m = run_tiny(tiny_lm, tiny_sae, tiny_data, out, "embed.representation=mlp_gate", f"embed.mlp_k={k}",
                     "report.explain=false")
        assert m["readout"]["k"] == k and m["readout"]["width"] == 64
        parts = sorted((out / m["files"]["embeddings"]).glob("part-*.parquet"))
        t = pq.read_table(parts[0]).to_pydict()
        nnz[k] = [len(i) for i in t["indices"]]
        assert all(n <= k * p for n, p in zip(nnz[k], t["n_pooled"]))  # at most K units per pooled token
        assert load_file(str(out / "prototype.safetensors"))["prototype"].shape == (64,)
    assert min(nnz[8]) > max(nnz[1]) or sum(nnz[8]) > sum(nnz[1])
    assert max(nnz[1]) < 64  # K=1 touches only some of the 64 gate units: no width guessed from the data
