"""Selectors: each one's math on small hand-checked cases (real code, tiny inputs)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from mona_ray.core.records import InputError, normalize_record
from mona_ray.selectors import SELECTORS, get_selector
from mona_ray.selectors.bm25 import aggregate_scores
from mona_ray.selectors.dense import SentenceEncoder, centroid_cosine
from mona_ray.selectors.dsir import bucket_of, wordpunct
from mona_ray.selectors.nait import combine, nait_directions, project


def conv(text: str, answer: str = "") -> list[dict]:
    return [{"role": "user", "content": text}] + ([{"role": "assistant", "content": answer}] if answer else [])


# ----------------------------------------------------------------------------- registry


def test_registry_names_and_errors():
    assert set(SELECTORS) == {"nait", "bm25", "dsir", "dense", "random"}  # MoNA is the pipeline itself
    with pytest.raises(ValueError, match="unknown selector 'lesss'"):
        get_selector("lesss")
    with pytest.raises(ValueError, match="no setting.*k3.*k1, b"):
        get_selector("bm25", k3=1.0)
    with pytest.raises(InputError, match="no rows"):
        get_selector("random").score([conv("a")], [], ["x"])


# ----------------------------------------------------------------------------- BM25


def _bm25_by_hand(docs: list[list[str]], query: list[str], k1=1.5, b=0.75) -> list[float]:
    N = len(docs)
    avgdl = sum(map(len, docs)) / N
    out = []
    for d in docs:
        s = 0.0
        for t in set(query):
            df = sum(t in x for x in docs)
            if df == 0:
                continue
            idf = math.log(1 + (N - df + 0.5) / (df + 0.5))
            tf = d.count(t)
            s += idf * tf / (tf + k1 * (1 - b + b * len(d) / avgdl))
        out.append(s)
    return out


def test_bm25_matches_hand_computation_and_ranks():
    docs = ["cat sat mat", "dog ran park", "cat dog", "blue sky sea sky"]  # no stop words
    sel = get_selector("bm25")
    state = sel.prepare([conv(d) for d in docs], ["a", "b", "c", "d"])
    raw = sel.query_scores(state, [conv("cat mat"), conv("sky")])
    toks = [d.split() for d in docs]
    np.testing.assert_allclose(raw[0], _bm25_by_hand(toks, ["cat", "mat"]), rtol=1e-5)
    np.testing.assert_allclose(raw[1], _bm25_by_hand(toks, ["sky"]), rtol=1e-5)
    assert np.argsort(-raw[0]).tolist()[:2] == [0, 2]  # both terms beat one term
    # aggregation: each query normalised by its best document, then averaged
    agg = sel.score_prepared(state, [conv("cat mat"), conv("sky")])
    expected = (raw[0] / raw[0].max() + raw[1] / raw[1].max()) / 2
    np.testing.assert_allclose(agg, expected)
    assert agg.argmax() in (0, 3) and agg[1] == 0.0
    np.testing.assert_allclose(aggregate_scores(raw, "max"), np.maximum(raw[0] / raw[0].max(), raw[1] / raw[1].max()))
    np.testing.assert_allclose(aggregate_scores(raw, "sum"), raw.sum(0))


# ----------------------------------------------------------------------------- DSIR


def test_dsir_log_weights_match_hand_computation():
    src = ["a b a", "b c", "c c d"]
    tgt = ["a b", "a b b"]

    def grams(t):
        w = t.split()
        return w + [f"{x} {y}" for x, y in zip(w, w[1:])]

    distinct = {g for t in src + tgt for g in grams(t)}
    nb = 1 << 20
    assert len({bucket_of(g, nb) for g in distinct}) == len(distinct)  # no collisions: buckets = n-grams
    raw = Counter(g for t in src for g in grams(t))
    tc = Counter(g for t in tgt for g in grams(t))
    p_r = {g: c / sum(raw.values()) for g, c in raw.items()}
    p_t = {g: c / sum(tc.values()) for g, c in tc.items()}
    eps = 1e-8
    expected = [sum(math.log(p_t.get(g, 0) + eps) - math.log(p_r.get(g, 0) + eps) for g in grams(t)) for t in src]

    sel = get_selector("dsir", num_buckets=nb, min_example_length=0)  # 3-word rows: no length filter
    got = sel.score([conv(t) for t in src], [conv(t) for t in tgt], ["1", "2", "3"])
    np.testing.assert_allclose(got, expected, rtol=1e-9)
    assert got.argmax() == 0 and got.argmin() == 2
    # Gumbel-top-k resampling: seeded, reproducible, and a perturbation of the same weights
    g1, g2 = (get_selector("dsir", num_buckets=nb, gumbel=True, seed=1, min_example_length=0).score(
        [conv(t) for t in src], [conv(t) for t in tgt], list("123")) for _ in range(2))
    np.testing.assert_array_equal(g1, g2)
    assert not np.allclose(g1, got)
    # the package's length filter: rows under min_example_length words score -inf ("b c" under 3; all under 100, the default)
    np.testing.assert_array_equal(get_selector("dsir", num_buckets=nb, min_example_length=3).score(
        [conv(t) for t in src], [conv(t) for t in tgt], list("123")), [got[0], -np.inf, got[2]])
    assert np.isneginf(get_selector("dsir", num_buckets=nb).score([conv(t) for t in src], [conv(t) for t in tgt],
                                                                   list("123"))).all()


def test_wordpunct_tokenizer():
    assert wordpunct("Hello, World!! x=3.5") == ["hello", ",", "world", "!!", "x", "=", "3", ".", "5"]


# ----------------------------------------------------------------------------- random


def test_random_is_seeded_and_order_free():
    ids = [f"r{i}" for i in range(2000)]
    rows = [conv("x")] * len(ids)
    a = get_selector("random", seed=7).score(rows, [conv("t")], ids)
    b = get_selector("random", seed=7).score(rows[::-1], [conv("t")], ids[::-1])
    c = get_selector("random", seed=8).score(rows, [conv("t")], ids)
    np.testing.assert_array_equal(a, b[::-1])
    assert not np.array_equal(a, c)
    assert 0 <= a.min() and a.max() < 1 and abs(a.mean() - 0.5) < 0.03


# ----------------------------------------------------------------------------- dense


def test_centroid_cosine_by_hand():
    X = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0] / np.sqrt(2)])
    T = np.array([[1.0, 0.0], [0.6, 0.8]])  # centroid (0.8, 0.4)
    c = np.array([0.8, 0.4]) / np.linalg.norm([0.8, 0.4])
    np.testing.assert_allclose(centroid_cosine(X, T), X @ c / np.linalg.norm(X, axis=1))


def test_sentence_encoder_mean_pools_real_tokens(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = "cat dog sat ran mat park blue sky sea".split()
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words))
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=14, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path)
    texts = ["cat sat", "dog ran to the park under blue sky", "sea"]
    enc = SentenceEncoder(tmp_path, batch_size=8, dtype="float32")  # exact math; bf16 is the default
    got = enc(texts)
    fast = SentenceEncoder(tmp_path, batch_size=8)(texts)
    assert (fast * got).sum(1).min() > 0.999  # the bf16 default: the same directions
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    for i, t in enumerate(texts):  # one at a time, no padding: plain mean over tokens
        ids = enc.tok(t, return_tensors="pt")
        with torch.no_grad():
            h = enc.model(**ids).last_hidden_state[0].mean(0)
        np.testing.assert_allclose(got[i], (h / h.norm()).numpy(), atol=1e-5)


# ----------------------------------------------------------------------------- NAIT


def test_nait_direction_is_the_sign_fixed_first_pc():
    rng = np.random.default_rng(0)
    n, L, d = 60, 2, 6
    u = rng.normal(size=(L, d))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    w = rng.normal(size=(L, d))
    w -= (w * u).sum(1, keepdims=True) * u  # orthogonal to u
    mean = -3.0 * u + w  # the mean delta points AGAINST u
    t = rng.normal(size=n) * 5
    t -= t.mean()
    deltas = mean[None] + t[:, None, None] * u[None] + 0.01 * rng.normal(size=(n, L, d))
    dirs = nait_directions(deltas)
    np.testing.assert_allclose(np.linalg.norm(dirs, axis=1), 1.0)
    np.testing.assert_allclose(dirs, -u, atol=2e-3)  # the PC, flipped to agree with the mean
    one = nait_directions(deltas[:1])  # one example: the normalised delta itself
    np.testing.assert_allclose(one, deltas[0] / np.linalg.norm(deltas[0], axis=1, keepdims=True))


def test_nait_combine_sums_and_zscores_layers():
    proj = np.array([[1.0, 10.0], [2.0, 30.0]])
    tproj = np.array([[0.0, 10.0], [2.0, 30.0]])  # per-layer mean (1, 20), std (1, 10)
    np.testing.assert_allclose(combine(proj, tproj, "none"), [11.0, 32.0])
    np.testing.assert_allclose(combine(proj, tproj, "zscore"), [0.0 - 1.0, 1.0 + 1.0])


def _rows(n, seed):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from _tiny_lm import make_rows

    return [normalize_record(r) for r in make_rows(n, seed)]


def test_nait_deltas_match_hf_hidden_states(tiny_lm, tiny_sae):
    from transformers import LlamaForCausalLM

    from mona_ray.core.model import load_tokenizer
    from mona_ray.core.render import render, tokenize

    spec = dict(model_path=str(tiny_lm), hookpoint="layers.2", dtype="float32", max_length=64)
    src, tgt = _rows(20, 1), _rows(6, 2)
    sel = get_selector("nait", progress=False, **spec)
    deltas = sel.prepare(src, [str(i) for i in range(len(src))])
    assert deltas.shape == (20, 3, 32)
    tok = load_tokenizer(tiny_lm)
    full = LlamaForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32).eval()
    special = set(tok.all_special_ids)
    for i in (0, 7, 19):
        ids, _ = tokenize(render(src[i], tok), tok, 64)
        first = next(j for j, t in enumerate(ids) if t not in special)
        with torch.no_grad():
            hs = full(torch.tensor([ids]), output_hidden_states=True).hidden_states
        for l in range(3):  # hidden_states[l + 1] = output of block l (no final norm before the last block)
            ref = (hs[l + 1][0, -1] - hs[l + 1][0, first]).numpy()
            np.testing.assert_allclose(deltas[i, l], ref, atol=1e-4, rtol=1e-4)
    # streaming projections == full deltas projected == the formula by hand
    streamed = sel.score(src, tgt, [str(i) for i in range(len(src))])
    dirs = nait_directions(sel.prepare(tgt, ["t"] * len(tgt)))
    by_hand = np.einsum("nld,ld->n", deltas.astype(np.float64), dirs)
    np.testing.assert_allclose(streamed, by_hand, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sel.score_prepared(deltas, tgt), by_hand, rtol=1e-6)


# ----------------------------------------------------------------------------- the local executor of the engine


def test_local_embedder_fills_the_store_once_and_equals_the_engine(tiny_lm, tiny_sae, tmp_path):
    """The evaluation's path: rows rendered and tokenized as prepare does, every readout from one
    pass into its store; a second embedder over the same stores runs no model at all."""
    from mona_ray.core.model import fingerprint_model, load_tokenizer, load_truncated
    from mona_ray.core.records import content_hash
    from mona_ray.core.render import render, tokenize
    from mona_ray.core.sae import load_sae
    from mona_ray.features.engine import Batching, FeatureEngine
    from mona_ray.features.local import LocalEmbedder, Rendering, stores_for
    from mona_ray.features.readouts import Readout
    from mona_ray.features.spec import EngineJob, sae_ref

    ref = sae_ref(tiny_sae, "auto", "layers.2")
    ro = (Readout("sae", 2, "special", k=ref.k, sae=ref.key), Readout("sae", 2, "none", k=3, sae=ref.key),
          Readout("mlp_gate", 2, "special", k=5), Readout("hidden", 2, "special"))
    job = EngineJob(str(tiny_lm), "float32", "cpu", ro, saes=(ref,), batching=Batching(token_budget=256))
    rendering = Rendering("chat_template", None, 64)
    stores = stores_for(job, rendering, fingerprint_model(tiny_lm), tmp_path / "store")
    assert len({s.root for s in stores.values()}) == 4
    rows = _rows(30, 5)
    first = LocalEmbedder(job, rendering, stores, rows_per_unit=8, progress=False)
    assert first.embed(rows) == {} and first.stats["rows_embedded"] == len({content_hash(m) for m in rows})
    again = LocalEmbedder(job, rendering, stores_for(job, rendering, fingerprint_model(tiny_lm), tmp_path / "store"),
                          rows_per_unit=8, progress=False)
    assert again.embed(rows) == {} and again.stats["rows_embedded"] == 0
    tok = load_tokenizer(tiny_lm)
    eng = FeatureEngine(load_truncated(tiny_lm, 2, dtype="float32"), [ro[0]], Batching(), tok.pad_token_id,
                        saes={ref.key: load_sae(tiny_sae, hookpoint="layers.2")})
    enc = [tokenize(render(m, tok), tok, 64, "special") for m in rows[:5]]
    direct = eng.run([e[0] for e in enc], {"special": [e[1] for e in enc]}).outputs[ro[0].name]
    got = stores[ro[0].name].read_ordered([content_hash(m) for m in rows[:5]], ["indices", "values"])
    for (idx, val), i, v in zip(direct, got.column("indices").to_pylist(), got.column("values").to_pylist()):
        assert list(idx) == i and np.array_equal(val, np.asarray(v, np.float32))  # the same bits


def test_selector_from_pipeline_config():
    from mona_ray.config import load_config, to_typed
    from mona_ray.selectors import selector_from_config

    cfg = to_typed(load_config(["select.method=bm25", "+select.bm25.aggregate=max", "model.path=/m", "sae.path=/s",
                                "sae.hookpoint=layers.3"]))
    sel = selector_from_config(cfg)
    assert sel.name == "bm25" and sel.aggregate == "max"
    cfg.select.method = "nait"
    cfg.select.nait = {"layer_norm": "zscore"}
    nait = selector_from_config(cfg, progress=False)
    assert nait.layers == [0, 1, 2, 3] and nait.layer_norm == "zscore" and nait.model_path == "/m"
    cfg.select.method = "dsirr"
    with pytest.raises(ValueError, match="unknown selector 'dsirr'"):
        selector_from_config(cfg)
