"""The leave-task-out suite (issue 23): the builder's invariants on a made-up labelled pool, the
evaluation of a suite with a tiny random Llama (every target ranked over its own pool, exactly),
and the prototype-cut rules that decide from the target rows alone."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _tiny_lm import WORDS  # noqa: E402
from conftest import make_random_sae  # noqa: E402

from mona_ray.evaluation.suite import build_suite, fresh_round, load_suite, paired, pool_masks, split_halves  # noqa: E402

# domain -> category -> words: categories of a domain share half their words
VOCAB = {"math": {"m_add": WORDS[9:16], "m_mul": WORDS[12:20]},
         "code": {"c_py": WORDS[20:25], "c_js": WORDS[22:27]},
         "animals": {"a_cat": WORDS[0:5], "a_dog": WORDS[2:7], "a_bird": WORDS[4:9]},
         "poems": {"p_only": WORDS[27:]}}
CATS = {c: d for d, cs in VOCAB.items() for c in cs}


def _source_rows(per_category: int = 16, seed: int = 0) -> list[dict]:
    rnd = random.Random(seed)
    rows = []
    for d, cs in VOCAB.items():
        for c, w in cs.items():
            for i in range(per_category):
                rows.append({"id": f"{c}-{i}", "instruction": " ".join(rnd.choices(w, k=rnd.randint(4, 9))),
                             "input": "", "output": f"{i} " + " ".join(rnd.choices(w, k=rnd.randint(5, 12))),
                             "source": "made-up", "category": c, "domain": d})
    return rows


def _write(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="module")
def suite_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("suite_data")
    rows = _source_rows()
    src = _write(d / "pool.parquet", rows)
    scoring = _write(d / "pool_small.parquet", [r for r in rows if int(r["id"].split("-")[1]) % 2 == 0])
    pub = _write(d / "pub.parquet", [{"id": f"q{i}", "instruction": "add two and three", "input": "",
                                      "output": f"five {i}"} for i in range(5)])
    (d / "relevance.json").write_text(json.dumps({"pub": ["math"]}))
    return {"dir": d, "src": src, "scoring": scoring, "public": {"pub": str(pub)}, "relevance": d / "relevance.json"}


def _build(sd, out, seed=0, **kw):
    kw = {"n_rows": 4, "mixture_sizes": (3, 4), "rows_per_task": 2, "public": sd["public"],
          "relevance": sd["relevance"], **kw}
    return build_suite(sd["src"], sd["scoring"], out, seed, **kw)


def test_builder_leave_task_out_invariants(suite_data, tmp_path):
    doc = _build(suite_data, tmp_path / "s")
    suite = load_suite(tmp_path / "s" / "suite.json")
    pool = pq.read_table(suite_data["scoring"]).to_pylist()
    pool_ids = {r["id"] for r in pool}
    pool_text = {(r["instruction"], r["input"], r["output"]) for r in pool}
    tasks = {t: v for t, v in suite["targets"].items() if v["kind"] == "task"}
    # every category of a domain with another category is a target; the one-category domain is not
    assert sorted(v["categories"][0] for v in tasks.values()) == sorted(c for c in CATS if c != "p_only")
    assert "one category" in doc["skipped"]["p_only"]["reason"]
    for t, v in suite["targets"].items():
        rows = pq.read_table(v["path"]).to_pylist()
        assert len(rows) == v["rows"]
        if v["kind"] == "public":
            assert v["exclude_categories"] == [] and v["half"] == "confirmation" and v["relevant_domains"] == ["math"]
            continue
        # no target row is in the scoring pool, by id or by text
        assert not {r["id"] for r in rows} & pool_ids
        assert not {(r["instruction"], r["input"], r["output"]) for r in rows} & pool_text
        assert {r["category"] for r in rows} == set(v["exclude_categories"]) == set(v["categories"])
        assert set(v["relevant_domains"]) == {CATS[c] for c in v["categories"]}
        if v["kind"] == "task":
            assert len(rows) == 4 and v["relevant_domains"] == [v["domain"]]
        else:  # a mixture: rows_per_task rows of each task, the task targets' own held-out rows
            assert len(rows) == 2 * len(v["categories"])
            for c in v["categories"]:
                task_ids = {r["id"] for r in pq.read_table(tasks[f"task:{c}"]["path"]).to_pylist()}
                assert sum(r["id"] in task_ids for r in rows if r["category"] == c) == 2
    # each target's pool: the excluded categories are gone, and its relevant rows are exactly the pool rows
    # of its domains from other categories
    from mona_ray.evaluation.data import read_rows

    ps = read_rows(suite["pool"], "pool", "id", "domain")
    masks = pool_masks(suite, ps)
    cats = [CATS_BY_ID(i) for i in ps.ids]
    for t, v in suite["targets"].items():
        m = masks[t]
        kept = [c for c, k in zip(cats, m if m is not None else [True] * len(cats)) if k]
        assert not set(kept) & set(v["exclude_categories"])
        relevant = {c for c in kept if CATS[c] in v["relevant_domains"]}
        assert relevant == {c for c in CATS if CATS[c] in v["relevant_domains"]} - set(v["exclude_categories"])
        if v["kind"] == "task":
            assert relevant and v["categories"][0] not in relevant


def CATS_BY_ID(i: str) -> str:
    return i.rsplit("-", 1)[0]


def test_a_fresh_round_shares_no_row_with_the_earlier_round(tmp_path):
    rows = _source_rows(per_category=40, seed=1)
    rows.append(dict(rows[0], id="dup-of-m_add"))  # the same text under another id: must not come back
    src = _write(tmp_path / "pool.parquet", rows)
    scoring = _write(tmp_path / "pool_small.parquet", [r for r in rows if r["id"].split("-")[1].isdigit()
                                                       and int(r["id"].split("-")[1]) % 4 == 0])
    kw = {"n_rows": 4, "mixture_sizes": (3,), "rows_per_task": 2}
    build_suite(src, scoring, tmp_path / "r1", 0, **kw)
    doc = fresh_round(tmp_path / "r1" / "suite.json", tmp_path / "r2", 1, **kw)
    r1, r2 = load_suite(tmp_path / "r1" / "suite.json"), load_suite(tmp_path / "r2" / "suite.json")
    text = lambda r: (r["instruction"], r["input"], r["output"])  # noqa: E731
    old_pool = pq.read_table(scoring).to_pylist()
    new_pool = pq.read_table(r2["pool"]).to_pylist()
    old_targets = [r for v in r1["targets"].values() for r in pq.read_table(v["path"]).to_pylist()]
    new_targets = [r for v in r2["targets"].values() for r in pq.read_table(v["path"]).to_pylist()]
    seen = old_pool + old_targets
    # the new pool: the earlier pool's count per category, and no row of the earlier round, by id or text
    count = lambda rs: {c: sum(r["category"] == c for r in rs) for c in CATS}  # noqa: E731
    assert count(new_pool) == count(old_pool) and doc["pool_short"] == {}
    assert not {r["id"] for r in new_pool} & {r["id"] for r in seen}
    assert not {text(r) for r in new_pool} & {text(r) for r in seen}
    # new targets: in neither pool nor the earlier targets; all confirm; the same categories as before
    assert not {text(r) for r in new_targets} & {text(r) for r in seen + new_pool}
    assert {v["half"] for v in r2["targets"].values()} == {"confirmation"}
    assert sorted(t for t in r2["targets"] if t.startswith("task:")) == sorted(t for t in r1["targets"]
                                                                                 if t.startswith("task:"))
    assert r2["round_of"] == str((tmp_path / "r1" / "suite.json").resolve())


def test_a_fresh_round_of_a_fresh_round_shares_no_row_with_any_round_before(tmp_path):
    rows = _source_rows(per_category=60, seed=2)
    src = _write(tmp_path / "pool.parquet", rows)
    scoring = _write(tmp_path / "pool_small.parquet", [r for r in rows if r["id"].split("-")[1].isdigit()
                                                       and int(r["id"].split("-")[1]) % 6 == 0])
    kw = {"n_rows": 4, "mixture_sizes": (3,), "rows_per_task": 2}
    build_suite(src, scoring, tmp_path / "r1", 0, **kw)
    fresh_round(tmp_path / "r1" / "suite.json", tmp_path / "r2", 1, **kw)
    doc = fresh_round(tmp_path / "r2" / "suite.json", tmp_path / "r3", 2, **kw)
    text = lambda r: (r["instruction"], r["input"], r["output"])  # noqa: E731
    seen = []
    for r in ("r1", "r2"):
        s = load_suite(tmp_path / r / "suite.json")
        seen += pq.read_table(s["pool"]).to_pylist()
        seen += [x for v in s["targets"].values() for x in pq.read_table(v["path"]).to_pylist()]
    r3 = load_suite(tmp_path / "r3" / "suite.json")
    new = pq.read_table(r3["pool"]).to_pylist() + [x for v in r3["targets"].values() for x in pq.read_table(v["path"]).to_pylist()]
    assert doc["pool_short"] == {} and len(new) > 0
    assert not {r["id"] for r in new} & {r["id"] for r in seen}  # round 1 too, not only the round it is made from
    assert not {text(r) for r in new} & {text(r) for r in seen}
    assert str(scoring.resolve()) in r3["avoid"]


def test_paired_difference_on_known_numbers():
    res = {f"t{i}": {"selectors": {"a": {"ap": a}, "b": {"ap": b}}}
           for i, (a, b) in enumerate([(0.5, 0.4), (0.3, 0.3), (0.2, 0.4), (0.9, 0.5)])}
    p = paired(res, "a", "b")
    assert p["diff"] == pytest.approx((0.1 + 0.0 - 0.2 + 0.4) / 4) and (p["wins"], p["losses"], p["ties"]) == (2, 1, 1)
    assert p["ci95"][0] < p["diff"] < p["ci95"][1] and -0.2 <= p["ci95"][0] and p["ci95"][1] <= 0.4
    assert paired(res, "a", "b", targets=["t2"])["ci95"] == pytest.approx((-0.2, -0.2))


def test_builder_is_deterministic_and_split_is_stratified(suite_data, tmp_path):
    a = _build(suite_data, tmp_path / "a", seed=3)
    b = _build(suite_data, tmp_path / "b", seed=3)
    c = _build(suite_data, tmp_path / "c", seed=4)
    strip = lambda d: {t: {k: v for k, v in x.items()} for t, x in d["targets"].items()}  # noqa: E731
    assert strip(a) == strip(b)
    for t, v in a["targets"].items():
        assert pq.read_table(tmp_path / "a" / v["file"]).equals(pq.read_table(tmp_path / "b" / v["file"]))
    ids = lambda root, d: {t: sorted(pq.read_table(root / v["file"]).column("id").to_pylist())  # noqa: E731
                           for t, v in d["targets"].items()}
    assert ids(tmp_path / "a", a) != ids(tmp_path / "c", c)  # another seed, other rows
    # stratified: within each domain (and among the mixtures) the halves differ by at most one target
    for stratum in {v["domain"] for v in a["targets"].values() if v["kind"] != "public"}:
        halves = [v["half"] for v in a["targets"].values() if v["domain"] == stratum]
        assert abs(halves.count("selection") - halves.count("confirmation")) <= 1, stratum
    # the split function itself on a larger stratum set: even halves, seeded, and not all odd strata one way
    strata = {f"t{i}": f"d{i % 5}" for i in range(33)}
    h = split_halves(strata, 0)
    assert h == split_halves(strata, 0) and h != split_halves(strata, 1)
    for d in set(strata.values()):
        got = [h[t] for t in strata if strata[t] == d]
        assert abs(got.count("selection") - got.count("confirmation")) <= 1


def _eval_cfg(suite_json, store, out, lm, sae, *extra):
    from hydra import compose, initialize_config_dir

    from mona_ray.config import CONF_DIR

    ov = [f"data.suite={suite_json}", f"output_dir={out}", f"model.path={lm}", "model.dtype=float32",
          f"sae.path={sae}", "sae.hookpoint=layers.2", "render.max_length=64", "progress=false",
          "embed.rows_per_unit=32", f"embed.store_dir={store}", "k=[5,'10%']", "share_at='10%'", "curve_max='50%'",
          "selectors=[random,bm25,dsir,mona]", "mona.representations=[sae]", "mona.poolings=[mean]",
          "mona.similarities=[jaccard]", "mona.excludes=[special]", "mona.hookpoints=[layers.2]", "mona.ks=[]",
          "mona.aggregation_hookpoints=[layers.2,'layers.2/k=4']", "mona.rds=false",
          "mona.aggregations=[prototype/jaccard/1.0,clusters/jaccard/structure:0.65,clusters@0.1/jaccard/support,"
          "round_robin/jaccard/1.0]", *extra]
    with initialize_config_dir(config_dir=str(CONF_DIR / "eval"), version_base=None):
        from hydra import compose as _c  # noqa: F401
        return compose(config_name="default", overrides=ov)


def test_suite_evaluation_ranks_each_target_over_its_own_pool(suite_data, tmp_path, tiny_lm):
    """A suite run equals, for a leave-task-out target, a plain evaluation over a pool file without
    the target's category: every selector (BM25's and DSIR's pool statistics, the round robin's
    interleaving) sees exactly that pool. Excluded rows are NaN in scores.parquet."""
    from mona_ray.evaluation.evaluate import evaluate

    sae = make_random_sae(tmp_path / "sae", d_in=32, latents=128, k=8, hookpoint="layers.2", seed=0)
    _build(suite_data, tmp_path / "s")
    suite = load_suite(tmp_path / "s" / "suite.json")
    store = tmp_path / "store"
    doc = evaluate(_eval_cfg(tmp_path / "s" / "suite.json", store, tmp_path / "e", tiny_lm, sae))
    res = doc["results"]
    assert set(res) == set(suite["targets"])
    names = set(res["task:m_add"]["selectors"])
    assert {"random", "bm25", "dsir", "mona:sae/mean/jaccard/prototype", "mona:sae/mean/jaccard/k=4/prototype",
            "mona:sae/mean/jaccard/clusters/mass=structure:0.65", "mona:sae/mean/jaccard/clusters@0.1/mass=support",
            "mona:sae/mean/jaccard/round_robin"} <= names
    pool = pq.read_table(suite_data["scoring"]).to_pylist()
    scores = pq.read_table(tmp_path / "e" / "scores.parquet").to_pydict()
    for t, v in suite["targets"].items():
        kept = [r for r in pool if r["category"] not in v["exclude_categories"]]
        assert res[t]["pool_rows"] == len(kept)
        assert res[t]["n_relevant"] == sum(r["domain"] in v["relevant_domains"] for r in kept)
        col = np.asarray(scores[f"{t}/bm25"])
        excluded = np.isin([CATS_BY_ID(i) for i in scores["id"]], v["exclude_categories"])
        assert np.isnan(col[excluded]).all() and np.isfinite(col[~excluded]).all()
        assert res[t]["suite"]["half"] == v["half"]
    # the same target as a plain evaluation over a pool file without its category: identical metrics
    t = "task:m_add"
    reduced = _write(tmp_path / "reduced.parquet", [r for r in pool if r["category"] != "m_add"])
    (tmp_path / "rel.json").write_text(json.dumps({"m_add": ["math"]}))
    plain = evaluate(_eval_cfg("null", store, tmp_path / "p", tiny_lm, sae, f"data.pool={reduced}",
                               f"data.targets={{m_add: {suite['targets'][t]['path']}}}",
                               f"data.relevance={tmp_path / 'rel.json'}"))
    assert plain["model"]["pool_pass"]["rows_embedded"] == 0  # the suite run's store serves it
    for s, m in plain["results"]["m_add"]["selectors"].items():
        got = res[t]["selectors"][s]
        assert got["ap"] == m["ap"] and got["precision"] == m["precision"], s
    report = (tmp_path / "e" / "suite.md").read_text()
    assert "## selection half" in report and "## confirmation half" in report and "task:m_add" in report


def test_prototype_cut_rules_decide_from_the_target_rows():
    from mona_ray.scoring.cuts import sparsify_prototype
    from mona_ray.scoring.table import cut_prototypes, target_prototypes

    rng = np.random.default_rng(0)
    L = 64
    # two tasks on disjoint latents: clear cluster structure
    a = np.zeros((6, L)); a[:, :16] = rng.random((6, 16)) + 0.1
    b = np.zeros((6, L)); b[:, 32:48] = rng.random((6, 16)) + 0.1
    a[:, 16:20] = 0.01  # a thin tail a cut removes
    T2 = np.vstack([a, b])
    P, info = target_prototypes(T2, "clusters", 0.65, mass_rule="structure")
    assert info["clusters"] == 2
    labels = np.asarray(info["labels"])
    full = np.stack([T2[labels == q].mean(0) for q in range(2)])
    assert np.array_equal(P, np.stack([sparsify_prototype(p, 0.65) for p in full]))
    # one broad task: no structure, so "structure" keeps the one full prototype (the paper's formula)
    T1 = rng.random((12, L))
    P1, info1 = target_prototypes(T1, "clusters", 0.65, mass_rule="structure")
    assert info1["clusters"] == 1 and np.array_equal(P1, T1.mean(0, keepdims=True))
    fixed, _ = target_prototypes(T1, "clusters", 0.65)
    assert (fixed > 0).sum() < (P1 > 0).sum()
    # support: each prototype keeps as many latents as its median member row has, the largest ones
    S = np.zeros((5, L))
    for i, n in enumerate([3, 5, 7, 9, 11]):
        S[i, :n] = 1.0 + np.arange(n)[::-1]
    Ps = cut_prototypes(S.mean(0, keepdims=True), S, np.zeros(5, dtype=int), 1.0, "support")
    assert (Ps > 0).sum() == 7 and np.array_equal(np.flatnonzero(Ps[0]), np.arange(7))
    with pytest.raises(ValueError):
        cut_prototypes(S.mean(0, keepdims=True), S, np.zeros(5, dtype=int), 1.0, "shape")


@pytest.mark.parametrize("spec,ok", [("clusters/jaccard/0.65", True), ("clusters@0.4/jaccard/structure:0.5", True),
                                     ("prototype/jaccard/support", True), ("round_robin/jaccard/support", False),
                                     ("prototype@0.4/jaccard/1.0", False), ("clusters/jaccard/structure:1.5", False),
                                     ("clusters/jaccard/0", False), ("clusters/jaccard/shape", False)])
def test_aggregation_specs(spec, ok):
    from mona_ray.core.records import InputError
    from mona_ray.evaluation.evaluate import _aggregation

    if ok:
        _aggregation(spec)
    else:
        with pytest.raises(InputError):
            _aggregation(spec)


@pytest.mark.parametrize("rule, variant", [("structure", "mona:sae/mean/jaccard/clusters/mass=structure:0.65"),
                                           ("support", "mona:sae/mean/jaccard/clusters/mass=support")])
def test_pipeline_runs_the_cut_rules_as_the_evaluation_scores_them(suite_data, tmp_path, tiny_lm, rule, variant):
    """select.mass_rule reaches the pipeline: its scores.parquet equals the evaluation's variant, score for score."""
    from mona_ray.config import load_config
    from mona_ray.evaluation.evaluate import evaluate
    from mona_ray.pipeline.cli import run

    sae = make_random_sae(tmp_path / "sae", d_in=32, latents=128, k=8, hookpoint="layers.2", seed=0)
    _build(suite_data, tmp_path / "s")
    target = load_suite(tmp_path / "s" / "suite.json")["targets"]["mix:01:4tasks"]["path"]
    m = run(load_config([f"source.paths=[{suite_data['scoring']}]", f"target.paths=[{target}]", f"model.path={tiny_lm}",
                         "model.dtype=float32", f"sae.path={sae}", "sae.hookpoint=layers.2", "render.max_length=64",
                         f"run.output_dir={tmp_path / 'run'}", "report.explain=false", "embed.num_actors=1",
                         "select.aggregate=clusters", "select.prototype_mass=0.65", f"select.mass_rule={rule}"]),
            quiet=True)
    assert m["selection"]["aggregation"]["mass_rule"] == rule
    (tmp_path / "rel.json").write_text(json.dumps({"mix": ["math"]}))
    evaluate(_eval_cfg("null", tmp_path / "run" / "embeddings", tmp_path / "e", tiny_lm, sae,
                       f"data.pool={suite_data['scoring']}", f"data.targets={{mix: {target}}}",
                       f"data.relevance={tmp_path / 'rel.json'}", "selectors=[mona]",
                       "mona.aggregation_hookpoints=[layers.2]",
                       "mona.aggregations=[clusters/jaccard/structure:0.65,clusters/jaccard/support]"))
    ev = pq.read_table(tmp_path / "e" / "scores.parquet").to_pydict()
    got = dict(zip(ev["id"], ev[f"mix/{variant}"]))
    pipe = pq.read_table(tmp_path / "run" / "scores.parquet").to_pydict()
    assert len(pipe["id"]) == len(got) > 0
    assert all(got[i] == s for i, s in zip(pipe["id"], pipe["score"]))  # equal, not close


def test_rounds_pick_on_the_choosing_rounds_and_decide_on_the_fresh_one():
    from mona_ray.evaluation.rounds import choose, decide

    def res(aps: dict[str, list[float]]):
        n = len(next(iter(aps.values())))
        return {f"t{i}": {"base_rate": 0.1, "suite": {"domain": "d", "kind": "task"},
                          "selectors": {s: {"ap": v[i]} for s, v in aps.items()}} for i in range(n)}

    a, b, c = "mona:sae/mean/jaccard/x", "mona:sae/mean/idf-cosine/x", "mona:sae/mean/lr/x"
    r1 = res({a: [0.5, 0.5], b: [0.9, 0.1], c: [0.4, 0.4], "bm25": [1.0, 1.0]})  # a baseline is no candidate
    r2 = res({a: [0.5, 0.5, 0.5], b: [0.6, 0.6, 0.6], c: [0.4, 0.4, 0.4]})
    ch = choose([r1, r2])
    assert ch["targets"] == 5 and ch["pick"] == b and ch["ranking"] == [b, a, c]
    assert ch["mean"][b] == pytest.approx((0.9 + 0.1 + 1.8) / 5) and ch["per_round"][b] == pytest.approx([0.5, 0.6])
    better = res({a: [0.4, 0.5, 0.3, 0.6], b: [0.5, 0.6, 0.4, 0.7]})
    assert decide(b, a, better)["adopt"] is True
    mixed = res({a: [0.4, 0.5, 0.3, 0.6], b: [0.9, 0.1, 0.4, 0.7]})  # higher mean, interval spans zero
    d = decide(b, a, mixed)
    assert d["paired"]["diff"] > 0 and d["paired"]["ci95"][0] < 0 and d["adopt"] is False
