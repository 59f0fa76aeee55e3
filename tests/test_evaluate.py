"""The evaluation end to end on a tiny made-up pool (tiny random Llama + random SAEs), its
metrics by hand, and its input errors."""

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

from mona_ray.evaluation.metrics import average_precision, precision_recall_at, resolve_k  # noqa: E402
from mona_ray.core.records import InputError  # noqa: E402

TOPICS = {"animals": WORDS[:9], "math": WORDS[9:20], "code": WORDS[20:27], "poems": WORDS[27:]}


def _rows(n: int, seed: int, topics=TOPICS, prefix="p") -> list[dict]:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        dom = list(topics)[i % len(topics)]
        w = topics[dom]
        out.append({"id": f"{prefix}{i}", "instruction": " ".join(rnd.choices(w, k=rnd.randint(3, 8))), "input": "",
                    "output": " ".join(rnd.choices(w, k=rnd.randint(4, 12))), "domain": dom})
    return out


def _write(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _tiny_bert(path: Path) -> Path:
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS))
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=5 + len(WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def eval_inputs(tmp_path_factory, tiny_lm):
    d = tmp_path_factory.mktemp("eval")
    pool = _write(d / "pool.parquet", _rows(80, 1))
    math_t = _write(d / "math.parquet", [r for r in _rows(24, 2, prefix="m") if r["domain"] == "math"])
    code_t = _write(d / "code.parquet", [r for r in _rows(24, 3, prefix="c") if r["domain"] == "code"])
    (d / "relevance.json").write_text(json.dumps({"math": ["math"], "code": ["code"], "other": ["poems"]}))
    sae = make_random_sae(d / "sae", d_in=32, latents=128, k=8, hookpoint="layers.2", seed=0)
    make_random_sae(d / "sae", d_in=32, latents=128, k=8, hookpoint="layers.1", seed=1)
    return {"dir": d, "pool": pool, "math": math_t, "code": code_t, "relevance": d / "relevance.json", "sae": sae,
            "lm": tiny_lm, "bert": _tiny_bert(d / "bert")}


def _cfg(inp, out: Path, *extra):
    from hydra import compose, initialize_config_dir

    from mona_ray.config import CONF_DIR  # importing it registers the config resolver

    conf = CONF_DIR / "eval"
    ov = [f"data.pool={inp['pool']}", f"data.targets={{math: {inp['math']}, code: {inp['code']}}}",
          f"data.relevance={inp['relevance']}", f"output_dir={out}", f"cache_dir={inp['dir'] / 'cache'}",
          f"model.path={inp['lm']}", "model.dtype=float32", f"sae.path={inp['sae']}", "sae.hookpoint=layers.2",
          "render.max_length=64", "mona.hookpoints=[layers.1,layers.2]", "mona.ks=[4]", "k=[5,10,'10%']",
          "share_at='10%'", "curve_max='50%'", "figure4.latents=16", "progress=false", "embed.rows_per_unit=32",
          f"embed.store_dir={inp['dir'] / 'store'}",
          f"+text_selectors.dense.model_path={inp['bert']}",
          "text_selectors.dsir.min_example_length=0",  # every made-up row is under the package's 100 words
          *extra]
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        return compose(config_name="default", overrides=ov)


def test_evaluate_end_to_end_and_cached_rerun(eval_inputs, tmp_path):
    from mona_ray.evaluation.evaluate import evaluate

    doc = evaluate(_cfg(eval_inputs, tmp_path / "a"))
    out = tmp_path / "a"
    for f in ("results.md", "results.csv", "results.json", "precision_at_k.png", "figure4.png"):
        assert (out / f).stat().st_size > 0, f
    res = doc["results"]
    assert set(res) == {"math", "code"}
    assert res["math"]["n_relevant"] == 20 and res["math"]["base_rate"] == pytest.approx(0.25)
    sels = set(res["math"]["selectors"])
    assert {"random", "bm25", "dsir", "dense", "nait", "nait:zscore", "mona:sae/mean/jaccard",
            "mona:sae/mean/jaccard@layers.1", "mona:sae/mean/jaccard/k=4", "mona:sae/mean/jaccard/exclude=none",
            "mona:mlp_gate/sum/cosine", "mona:hidden/mean/euclidean"} <= sels
    assert len([s for s in sels if s.startswith("mona:")]) == 18 + 2 + 1 + 1 + 8  # + the aggregations at layers.2
    assert {"rds", "mona:sae/mean/jaccard/clusters@0.5", "mona:sae/mean/jaccard/clusters/mass=0.65", "mona:sae/mean/jaccard/clusters/mass=0.65/row_mass=0.75",
            "mona:sae/mean/cosine/round_robin"} <= sels
    # the topics have disjoint vocabularies: lexical selectors must be perfect at k = 10
    for t in ("math", "code"):
        assert res[t]["selectors"]["bm25"]["precision"]["10"] == 1.0
        assert res[t]["selectors"]["dsir"]["precision"]["10"] == 1.0
        assert list(res[t]["selectors"]["bm25"]["share"]) == [t]
        for m in res[t]["selectors"].values():
            assert 0 <= m["ap"] <= 1 and all(0 <= v <= 1 for v in m["precision"].values())
    assert doc["model"]["pool_pass"]["rows_embedded"] == 80
    assert set(doc["figure4"]["cosine"]) == {"sae", "mlp_gate", "hidden"}
    lines = (out / "results.csv").read_text().splitlines()
    assert len(lines) == 1 + 2 * len(sels) * (3 + 3 + 1)
    # another target set, same pool: no model pass over the pool again, identical pool scores
    doc2 = evaluate(_cfg(eval_inputs, tmp_path / "b", "selectors=[mona,nait]"))
    assert doc2["model"]["pool_pass"]["rows_embedded"] == 0
    for t in ("math", "code"):
        assert doc2["results"][t]["selectors"]["mona:sae/mean/jaccard"] == res[t]["selectors"]["mona:sae/mean/jaccard"]


def test_evaluation_scores_equal_a_pipeline_run(eval_inputs, tmp_path):
    """The evaluation measures the product: its mona ranking is the pipeline's scores.parquet,
    score for score, bit for bit; and over the pipeline's store it runs no model pass at all."""
    from mona_ray.config import load_config
    from mona_ray.evaluation.evaluate import evaluate
    from mona_ray.pipeline.cli import run

    inp = eval_inputs
    run(load_config([f"source.paths=[{inp['pool']}]", f"target.paths=[{inp['math']}]", f"model.path={inp['lm']}",
                     "model.dtype=float32", f"sae.path={inp['sae']}", "sae.hookpoint=layers.2", "render.max_length=64",
                     f"run.output_dir={tmp_path / 'run'}", "report.explain=false", "embed.num_actors=1",
                     "select.aggregate=prototype", "select.prototype_mass=1.0", "select.row_mass=1.0"]),
        quiet=True)  # the paper's mona
    pipe = pq.read_table(tmp_path / "run" / "scores.parquet").to_pydict()
    only_default = ["selectors=[mona]", "mona.representations=[sae]", "mona.poolings=[mean]",
                    "mona.similarities=[jaccard]", "mona.excludes=[special]", "mona.hookpoints=[layers.2]", "mona.ks=[]",
                    "mona.aggregations=[]", "mona.rds=false"]
    evaluate(_cfg(inp, tmp_path / "e", *only_default, f"embed.store_dir={tmp_path / 'own_store'}"))
    ev = pq.read_table(tmp_path / "e" / "scores.parquet").to_pydict()
    got = dict(zip(ev["id"], ev["math/mona:sae/mean/jaccard"]))
    assert len(pipe["id"]) == len(got) == 80
    assert all(got[i] == s for i, s in zip(pipe["id"], pipe["score"]))  # equal, not close
    shared = evaluate(_cfg(inp, tmp_path / "f", *only_default, f"embed.store_dir={tmp_path / 'run' / 'embeddings'}"))
    assert shared["model"]["pool_pass"]["rows_embedded"] == 0
    # the evaluation's model pass on Ray actors: the same units, the same bits
    on_ray = evaluate(_cfg(inp, tmp_path / "g", *only_default, f"embed.store_dir={tmp_path / 'ray_store'}",
                           "embed.executor=ray", "embed.num_actors=1"))
    assert on_ray["model"]["pool_pass"]["rows_embedded"] == 80
    ev = pq.read_table(tmp_path / "g" / "scores.parquet").to_pydict()
    assert dict(zip(ev["id"], ev["math/mona:sae/mean/jaccard"])) == got



@pytest.mark.parametrize("how, variant", [
    (["select.method=rds"], "rds"),  # select.prototype_mass left at its 0.65: hidden states are compared whole
    (["select.aggregate=clusters", "select.prototype_mass=0.65", "select.row_mass=0.75"],
     "mona:sae/mean/jaccard/clusters/mass=0.65/row_mass=0.75"),
])
def test_the_evaluations_aggregations_equal_pipeline_runs(eval_inputs, tmp_path, how, variant):
    """The aggregated variants the evaluation reports are the pipeline's selections: RDS+ (the
    round-robin interleaving: the run's selected rows, in order, are the evaluation's top rows)
    and the clusters with both masses (the run's scores.parquet, score for score)."""
    from mona_ray.config import load_config
    from mona_ray.evaluation.evaluate import evaluate
    from mona_ray.pipeline.cli import run

    inp = eval_inputs
    m = run(load_config([f"source.paths=[{inp['pool']}]", f"target.paths=[{inp['math']}]", f"model.path={inp['lm']}",
                         "model.dtype=float32", f"sae.path={inp['sae']}", "sae.hookpoint=layers.2",
                         "render.max_length=64", f"run.output_dir={tmp_path / 'run'}", "report.explain=false",
                         "embed.num_actors=1", "select.count=12", *how]), quiet=True)
    evaluate(_cfg(inp, tmp_path / "e", "selectors=[mona]", "mona.representations=[sae]", "mona.poolings=[mean]",
                  "mona.similarities=[jaccard]", "mona.excludes=[special]", "mona.hookpoints=[layers.2]", "mona.ks=[]",
                  "mona.aggregation_hookpoints=[layers.2]", "mona.aggregations=[clusters/jaccard/0.65/0.75]",
                  f"embed.store_dir={tmp_path / 'run' / 'embeddings'}"))
    ev = pq.read_table(tmp_path / "e" / "scores.parquet").to_pydict()
    got = dict(zip(ev["id"], ev[f"math/{variant}"]))
    if variant == "rds":
        chosen = [json.loads(x)["id"] for x in (tmp_path / "run" / "selected.jsonl").read_text().splitlines()]
        assert chosen == sorted(got, key=lambda i: -got[i])[:12]
        assert m["selection"]["aggregation"] == {"aggregate": "round_robin", "targets": 6, "mass": 1.0}
    else:
        assert m["selection"]["aggregation"]["mass"] == 0.65 and m["selection"]["aggregation"]["row_mass"] == 0.75
        pipe = pq.read_table(tmp_path / "run" / "scores.parquet").to_pydict()
        assert len(pipe["id"]) == len(got) == 80
        assert all(got[i] == s for i, s in zip(pipe["id"], pipe["score"]))  # equal, not close

def test_metrics_by_hand():
    rel = np.array([1, 0, 1, 0, 0, 1], dtype=bool)
    assert average_precision(rel) == pytest.approx((1 / 1 + 2 / 3 + 3 / 6) / 3)
    assert precision_recall_at(rel, 3) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    assert resolve_k("5%", 5060) == 253 and resolve_k(50, 20) == 20


def test_input_errors_name_the_problem(eval_inputs, tmp_path):
    from mona_ray.evaluation.evaluate import evaluate

    d = eval_inputs["dir"]
    nodomain = _write(d / "nodomain.parquet", [{k: v for k, v in r.items() if k != "domain"} for r in _rows(8, 4)])
    with pytest.raises(InputError, match="nodomain.parquet.*no 'domain' column"):
        evaluate(_cfg(eval_inputs, tmp_path, f"data.pool={nodomain}", "selectors=[random]"))
    (d / "rel_bad.json").write_text(json.dumps({"math": ["math"]}))
    with pytest.raises(InputError, match="target 'code' has no entry in the relevance map"):
        evaluate(_cfg(eval_inputs, tmp_path, f"data.relevance={d / 'rel_bad.json'}", "selectors=[random]"))
    (d / "rel_typo.json").write_text(json.dumps({"math": ["maths"], "code": ["code"]}))
    with pytest.raises(InputError, match=r"lists domain\(s\) \['maths'\] that no pool row has"):
        evaluate(_cfg(eval_inputs, tmp_path, f"data.relevance={d / 'rel_typo.json'}", "selectors=[random]"))
    (d / "empty.jsonl").write_text("")
    with pytest.raises(InputError, match="data.targets.code.*empty.jsonl.*no usable rows"):
        evaluate(_cfg(eval_inputs, tmp_path, f"data.targets={{math: {eval_inputs['math']}, code: {d / 'empty.jsonl'}}}",
                      "selectors=[random]"))
