"""Interpretability: the prototype's latents with their top target tokens, and each selected
row's contributions, checked against independent recomputation (tiny model, random SAE)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _tiny_lm import make_rows  # noqa: E402

from mona_ray.features.engine import Batching, FeatureEngine  # noqa: E402
from mona_ray.features.interpret import explain, write_explain  # noqa: E402
from mona_ray.features.readouts import Readout  # noqa: E402
from mona_ray.core.model import load_tokenizer, load_truncated  # noqa: E402
from mona_ray.core.records import normalize_record  # noqa: E402
from mona_ray.core.render import render, tokenize  # noqa: E402
from mona_ray.core.sae import load_sae  # noqa: E402
from mona_ray.scoring import SparseRows, jaccard  # noqa: E402


def test_explain_matches_recomputation(tiny_lm, tiny_sae, tmp_path):
    tok = load_tokenizer(tiny_lm)
    lm = load_truncated(tiny_lm, 2, dtype="float32")
    sae = load_sae(tiny_sae, hookpoint="layers.2")
    enc = [tokenize(render(normalize_record(r), tok), tok, 64, "special") for r in make_rows(6, seed=9)]
    ids, masks = [e[0] for e in enc], [e[1] for e in enc]
    rng = np.random.default_rng(0)
    proto = np.where(rng.random(128) < 0.3, rng.random(128), 0.0)
    selected = []
    for i in range(4):
        li = np.sort(rng.choice(128, size=20, replace=False)).astype(np.int32)
        selected.append((f"s{i}", li, rng.random(20).astype(np.float32)))
    ro = Readout("sae", 2, "special", k=sae.k, sae="s")
    engine = FeatureEngine(lm, [ro], Batching(token_budget=256, sae_chunk_tokens=7), tok.pad_token_id, saes={"s": sae})
    doc = explain(engine, ro, tok, ids, masks, proto, selected, top_latents=5, tokens_per_latent=3)

    lat = doc["prototype"]["top_latents"]
    assert [x["latent"] for x in lat] == np.argsort(-proto, kind="stable")[:5].tolist()
    checked = 0
    for x in lat:
        for t in x["top_tokens"]:  # the activation recomputed from the single row
            r, pos = t["row"], t["position"]
            assert masks[r][pos] == 1
            with torch.no_grad():
                h = lm(torch.tensor([ids[r]]), torch.ones(1, len(ids[r]), dtype=torch.long))[0, pos:pos + 1]
            vals, idx = sae.encode(h)
            hit = (idx[0] == x["latent"]).nonzero()
            assert len(hit) == 1 and abs(float(vals[0, hit[0, 0]]) - t["activation"]) < 1e-4
            checked += 1
        acts = [t["activation"] for t in x["top_tokens"]]
        assert acts == sorted(acts, reverse=True)
    assert checked > 0
    rows = SparseRows.from_lists([s[1] for s in selected], [s[2] for s in selected])
    np.testing.assert_allclose([r["score"] for r in doc["selected"]], jaccard(rows, proto), rtol=1e-6)
    for (rid, li, val), r in zip(selected, doc["selected"]):
        mins = np.minimum(val.astype(np.float64), proto[li])
        assert r["shared_latents"] == int((mins > 0).sum())
        assert r["top_shared"][0]["contribution"] == mins.max()
        assert r["top_shared"][0]["latent"] == li[mins.argmax()]
        assert abs(r["sum_min"] - mins.sum()) < 1e-9
    j, m = write_explain(doc, tmp_path)
    assert "s0" in m.read_text() and j.stat().st_size > 0


def test_explain_row_top_shared_is_the_full_ranking_cut():
    """The shared latents a row lists are the full ranking (contribution desc, ties by latent)
    cut at ``shared_per_row``, also when the cut falls inside a run of ties."""
    from mona_ray.features.interpret import explain_row

    rng = np.random.default_rng(3)
    proto = rng.random(4000)
    proto[rng.random(4000) < 0.5] = 0.0
    idx = np.sort(rng.choice(4000, size=1500, replace=False)).astype(np.int32)
    val = rng.random(1500).astype(np.float32)
    proto[idx[::7]] = val[::7] = 0.9  # ~200 equal terms near the top: the cuts at 40 and 5 fall among them
    for per_row in (1, 5, 10, 40, 5000):
        row = explain_row("r", idx, val, proto, {int(idx[0])}, shared_per_row=per_row)
        c = np.minimum(val.astype(np.float64), proto[idx])
        ranked = sorted((float(-x), int(i)) for x, i in zip(c, idx) if x > 0)[:per_row]
        assert [(-t["contribution"], t["latent"]) for t in row["top_shared"]] == ranked
        assert row["shared_latents"] == int((c > 0).sum())
        assert abs(row["sum_min"] - c.sum()) < 1e-9


def test_groups_of_one_sort():
    from mona_ray.features.store import groups_of

    keys = np.array([3, 1, 3, 0, 1, 3])
    order, groups = groups_of(keys)
    assert [(k, order[a:b].tolist()) for k, a, b in groups] == [(0, [3]), (1, [1, 4]), (3, [0, 2, 5])]
    order, groups = groups_of(keys, within=np.array([9, 5, 1, 0, 2, 4]))
    assert [(k, order[a:b].tolist()) for k, a, b in groups] == [(0, [3]), (1, [4, 1]), (3, [2, 5, 0])]
    order, groups = groups_of(np.zeros(0, np.int32))
    assert groups == [] and len(order) == 0


def test_a_fresh_store_object_reads_rows_written_before(tmp_path):
    """A store folder written earlier (a resumed run, a second evaluation) is read by a new
    FeatureStore whose first call is a read: the part list must be loaded before it is used."""
    from mona_ray.features.store import FeatureStore, rows_table

    first = FeatureStore(tmp_path)
    for key, hs in (("a", ["h1", "h2"]), ("b", ["h3"])):
        outs = [(np.array([i, i + 5], np.int32), np.array([1.0 + i, 0.5], np.float32)) for i in range(len(hs))]
        first.write(key, rows_table(hs, [4] * len(hs), [3] * len(hs), outs))
    fresh = FeatureStore(tmp_path)
    t = fresh.read_ordered(["h3", "h1", "h3"], ["indices", "values"])
    assert t.column("content_hash").to_pylist() == ["h3", "h1", "h3"]
    assert t.column("indices").to_pylist() == [[0, 5], [0, 5], [0, 5]]
    assert FeatureStore(tmp_path).read(["h2"], ["values"]).column("values").to_pylist() == [[2.0, 0.5]]


def test_one_pass_explains_every_cluster_as_its_own_pass(tiny_lm, tiny_sae):
    """explain_prototypes (the overall prototype and each cluster's, one model pass over the
    target rows) gives each group exactly what explain_prototype gives on that group's rows alone."""
    from mona_ray.features.interpret import explain_prototype, explain_prototypes

    tok = load_tokenizer(tiny_lm)
    lm = load_truncated(tiny_lm, 2, dtype="float32")
    sae = load_sae(tiny_sae, hookpoint="layers.2")
    enc = [tokenize(render(normalize_record(r), tok), tok, 64, "special") for r in make_rows(7, seed=3)]
    ids, masks = [e[0] for e in enc], [e[1] for e in enc]
    ro = Readout("sae", 2, "special", k=sae.k, sae="s")
    engine = FeatureEngine(lm, [ro], Batching(token_budget=256, sae_chunk_tokens=7), tok.pad_token_id, saes={"s": sae})
    rng = np.random.default_rng(1)
    protos = [rng.random(128) for _ in range(3)]
    groups = [list(range(7)), [5, 0, 3], [6, 1, 4, 2]]  # the clusters' rows in any order, as the driver passes them
    docs = explain_prototypes(engine, ro, tok, ids, masks, protos, groups, top_latents=40, tokens_per_latent=3)
    alone = [explain_prototype(engine, ro, tok, [ids[i] for i in g], [masks[i] for i in g], p,
                               top_latents=40, tokens_per_latent=3) for p, g in zip(protos, groups)]
    assert docs == alone
    assert [d["target_rows"] for d in docs] == [7, 3, 4]
    for d, g in zip(docs, groups):  # something fired, and rows are numbered within the group
        toks = [t for x in d["top_latents"] for t in x["top_tokens"]]
        assert toks and max(t["row"] for t in toks) < len(g)
