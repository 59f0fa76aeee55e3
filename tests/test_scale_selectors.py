"""selectors.scale: the baselines as Ray tasks over prepared parts give the in-memory selectors' scores.

Real Parquet parts (``id``, ``record`` as JSON text, plus a column the scorer must ignore),
row positions that skip rows (as the pipeline's duplicate rejection does), a one-row part,
an empty part, a local Ray; every score is compared, row for row by id, with
``get_selector(method, **opts).score`` on the same rows in the same order."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mona_ray.core.records import normalize_record
from mona_ray.selectors import get_selector
from mona_ray.selectors.bm25_parts import bm25_count_part, bm25_model, bm25_part_pass, bm25_part_scores, query_terms
from mona_ray.selectors.scale import score_distributed

TOPICS = [
    "cat dog mat park sat ran sleeps garden fence ball bark".split(),
    "add plus minus three five seven total apples costs dollars sum equals".split(),
    "python code function return list print loop variable string error".split(),
    "poem sea sky blue waves moon night stars wind silver".split(),
    "history war empire king battle century treaty rome".split(),
]


def _text(rnd: random.Random, lo: int, hi: int) -> str:
    topic = rnd.choice(TOPICS)
    words = rnd.choices(topic, k=rnd.randint(lo, hi)) + rnd.choices(["the", "a", "is", "of", "and", "Why?", "x2"], k=3)
    rnd.shuffle(words)
    return " ".join(words)


def _record(i: int, rnd: random.Random) -> dict:
    if i % 3 == 0:
        return {"id": f"s{i}", "conversations": [{"from": "human", "value": _text(rnd, 3, 15)},
                                                 {"from": "gpt", "value": _text(rnd, 5, 40)}]}
    rec = {"id": f"a{i}", "instruction": _text(rnd, 3, 12), "input": _text(rnd, 0, 6) if i % 4 == 0 else "",
           "output": _text(rnd, 4, 30)}
    if i % 17 == 0:
        rec.update(instruction="Is it?", input="", output="I.")  # stop words and 1-letter words only: no BM25 term
    return rec


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """Five prepared parts (one of one row, one with no positions) and the rows they select."""
    d = tmp_path_factory.mktemp("scale_parts")
    rnd = random.Random(7)
    sizes, parts, k = [40, 1, 33, 0, 57], [], 0
    for pi, n in enumerate(sizes):
        recs = [_record(k + j, rnd) for j in range(n)]
        k += n
        t = pa.table({"id": [r["id"] for r in recs], "content_hash": ["h"] * n,
                      "record": [json.dumps(r) for r in recs]},
                     schema=pa.schema([("id", pa.string()), ("content_hash", pa.string()), ("record", pa.string())]))
        path = d / f"part-{pi:05d}.parquet"
        pq.write_table(t, path, row_group_size=16)
        positions = [j for j in range(n) if j % 5 != 2] if n > 1 else list(range(n))  # every 5th row "rejected"
        parts.append((str(path), positions))
    ids, msgs = [], []
    for path, positions in parts:
        t = pq.read_table(path).take(pa.array(positions, pa.int64()))
        ids += t.column("id").to_pylist()
        msgs += [normalize_record(json.loads(r)) for r in t.column("record").to_pylist()]
    target = [normalize_record({"instruction": _text(rnd, 3, 10), "output": _text(rnd, 3, 20)}) for _ in range(9)]
    target.append([{"role": "user", "content": "zebra quantum"}])  # no term in the corpus: scores 0
    return {"parts": parts, "ids": ids, "msgs": msgs, "target": target}


def _check(pool, method, opts, exact=True, spread=True, **kw):
    info = {}
    got = score_distributed(method, opts, pool["parts"], pool["target"], progress=False, info=info, **kw)
    assert got.schema == pa.schema([("id", pa.string()), ("score", pa.float64())])
    assert got.column("id").to_pylist() == pool["ids"]  # parts order, then positions order
    want = get_selector(method, **opts).score(pool["msgs"], pool["target"], pool["ids"])
    s = got.column("score").to_numpy()
    if exact:
        np.testing.assert_array_equal(s, want)
    else:
        np.testing.assert_allclose(s, want, rtol=1e-6, atol=1e-6)
    assert not spread or np.ptp(want) > 0  # the comparison is not between constants
    return info, s


def test_random_equals_driver(ray_local, pool):
    _check(pool, "random", {"seed": 11})


@pytest.mark.parametrize("aggregate", ["mean", "max", "sum"])
def test_bm25_equals_driver_each_aggregate(ray_local, pool, aggregate):
    info, _ = _check(pool, "bm25", {"aggregate": aggregate})
    assert [p["pass"] for p in info["passes"]] == (
        ["count terms", "score"] if aggregate == "sum" else ["count terms", "best per query", "score"])


@pytest.mark.parametrize("opts", [{"method": "robertson"}, {"method": "atire", "k1": 1.2, "b": 0.5},
                                  {"method": "bm25l"}, {"method": "bm25+", "aggregate": "max"},
                                  {"stopwords": None, "k1": 0.9}])
def test_bm25_equals_driver_other_variants(ray_local, pool, opts):
    _check(pool, "bm25", opts)


@pytest.mark.parametrize("opts", [{}, {"min_example_length": 0}, {"num_buckets": 257, "ngrams": 1, "min_example_length": 20},
                                  {"gumbel": True, "seed": 3, "min_example_length": 30}])
def test_dsir_equals_driver(ray_local, pool, opts):
    """With the length filter (default 100 words: every row of this pool; 20 / 30: some), the
    rows it takes out score -inf in both paths, and ``info`` says how many and why."""
    m = opts.get("min_example_length", 100)
    info, s = _check(pool, "dsir", opts, spread=m != 100)
    n = int(np.isneginf(s).sum())
    assert (n == len(s)) if m == 100 else (0 < n < len(s)) if m else n == 0
    assert info.get("filter", {}).get("rows", 0) == n and (not n or f"fewer than {m} words" in info["filter"]["reason"])


def test_dense_equals_driver_tiny_encoder(ray_local, pool, tmp_path):
    """A tiny random BERT folder stands in for MiniLM (same SentenceEncoder code path)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = sorted({w for t in TOPICS for w in t})
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words))
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=5 + len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path)
    opts = {"model_path": str(tmp_path), "dtype": "float32", "batch_size": 8, "progress": False}
    _check(pool, "dense", opts, exact=False, num_actors=1)


def test_errors(ray_local, pool):
    with pytest.raises(NotImplementedError, match="nait needs the selection model's activations"):
        score_distributed("nait", {}, pool["parts"], pool["target"], progress=False)
    with pytest.raises(ValueError, match="no setting.*k3"):
        score_distributed("bm25", {"k3": 1}, pool["parts"], pool["target"], progress=False)
    with pytest.raises(ValueError, match="unknown selector"):
        score_distributed("lesss", {}, pool["parts"], pool["target"], progress=False)
    from mona_ray.core.records import InputError

    with pytest.raises(InputError, match="no rows"):
        score_distributed("dsir", {}, pool["parts"], [], progress=False)
    empty = score_distributed("bm25", {}, [(p, []) for p, _ in pool["parts"]], pool["target"], progress=False)
    assert empty.num_rows == 0 and empty.schema.names == ["id", "score"]


def test_bm25_memory_is_bounded_by_part_and_target(ray_local, pool):
    """The [n_target, n_source] matrix exists only per part inside a task ([n_target, part rows]);
    the driver receives per-part vectors sized by the query vocabulary, the target or the part."""
    n_src, n_tgt = len(pool["ids"]), len(pool["target"])
    info = {}
    score_distributed("bm25", {}, pool["parts"], pool["target"], progress=False, info=info, max_in_flight=2)
    biggest_part = max(len(p) for _, p in pool["parts"])
    n_terms = info["bm25"]["n_terms"]
    for p in info["passes"]:
        assert p["largest_result_array"] <= max(n_terms, n_tgt, biggest_part), p
    assert info["largest_driver_array"] < n_tgt * n_src
    # the per-part functions the tasks run, called here: their arrays are per part
    sel = get_selector("bm25")
    terms, queries = query_terms(sel, pool["target"])
    path, positions = pool["parts"][0]
    stats, counts = bm25_count_part(path, np.asarray(positions), terms, sel.stopwords)
    assert stats["df"].shape == (len(terms),) and stats["docs"] == len(positions)
    assert len(counts["dl"]) == len(positions) and counts["term"].max() < len(terms)
    model = bm25_model(sel, stats["docs"], stats["length"], stats["df"])
    queries = [q[stats["df"][q] > 0] for q in queries]
    assert bm25_part_scores(counts, model, queries).shape == (n_tgt, len(positions))
    assert bm25_part_pass(counts, model, queries, "mean", None).shape == (n_tgt,)
    ids, s = bm25_part_pass(counts, model, queries, "mean", np.ones(n_tgt))
    assert len(ids) == len(s) == len(positions)
    # the driver path, for contrast, holds the full matrix
    assert sel.query_scores(sel.prepare(pool["msgs"], pool["ids"]), pool["target"]).shape == (n_tgt, n_src)
