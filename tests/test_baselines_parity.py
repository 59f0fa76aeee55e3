"""The baselines as published (issue 23, item 3): each one against a small, independent
reimplementation of the authors' algorithm, written here from their code in plain numpy/python.

* RDS+ (Ivison et al. 2025, arXiv 2503.01807; hamishivi/automated-instruction-selection):
  ``compute_influence_cosinesim.py --pooling weighted_mean`` pools ``hidden_states[-1]`` (the
  last block through the final norm) with weights ``arange(T) + 1`` normalised to sum 1, takes
  cosines, and ``get_top_influences.py --selection_method max`` interleaves the targets in file
  order, each popping its next best row and spending its turn when that row is already taken.
* DSIR (Xie et al. 2023; p-lambda/dsir ``data-selection``): hashed unigram+bigram features,
  log-importance weights, rows under ``min_example_length`` words dropped before selecting.
"""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest
import torch

from conftest import make_random_sae

from mona_ray.core.model import load_truncated
from mona_ray.features.engine import Batching, FeatureEngine
from mona_ray.features.readouts import Readout


# ----------------------------------------------------------------------------- RDS+ readout


@pytest.fixture(scope="module")
def normed_lm(tmp_path_factory):
    """The tiny random Llama with a final norm that is not the identity (random weights), so the
    norm is visible in the readout."""
    from safetensors.torch import load_file, save_file

    from _tiny_lm import make_tiny_lm

    path = make_tiny_lm(tmp_path_factory.mktemp("normed_lm"), layers=3, hidden=32, seed=3)
    f = next(path.glob("*.safetensors"))
    w = load_file(str(f))
    w["model.norm.weight"] = 0.5 + torch.rand(w["model.norm.weight"].shape, generator=torch.Generator().manual_seed(1))
    save_file(w, str(f), metadata={"format": "pt"})
    return path


def published_pooling(full, ids: list[int]) -> np.ndarray:
    """The authors' weighted_mean, at their batch size 1: HF's hidden_states[-1], weights
    (t + 1) / sum_s (s + 1) over every position."""
    with torch.inference_mode():
        h = full(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1]
    w = torch.arange(h.size(1)).unsqueeze(0) + 1
    w = w / w.sum(dim=1, keepdim=True)
    return torch.sum(h * w.unsqueeze(-1), dim=1)[0].numpy()


def test_final_norm_readout_is_hf_last_hidden_state_pooled_with_rds_weights(normed_lm):
    from transformers import AutoModelForCausalLM

    from mona_ray.features.readouts import rds_readout

    full = AutoModelForCausalLM.from_pretrained(normed_lm, dtype=torch.float32).eval()
    n_layers = full.config.num_hidden_layers
    r = rds_readout(n_layers)
    assert (r.kind, r.block, r.exclude, r.weighting, r.final_norm) == ("hidden", n_layers - 1, "none", "position", True)
    lm = load_truncated(normed_lm, r.block, dtype="float32", device="cpu")
    rows = [[2, 7, 9, 12, 30, 8, 3], [2, 5, 3], [2, 11, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 3], [9]]
    block = Readout("hidden", r.block, "none", weighting="position")  # the same block without the norm
    eng = FeatureEngine(lm, [r, block], Batching(pad_multiple=16), pad_token_id=0)
    res = eng.run(rows, {"none": [[1] * len(x) for x in rows]})
    assert not res.rejected
    for i, ids in enumerate(rows):
        want = published_pooling(full, ids)
        np.testing.assert_allclose(res.outputs[r.name][i], want, rtol=1e-5, atol=1e-6)
        assert not np.allclose(res.outputs[block.name][i], want, atol=1e-3)  # the norm matters
    # a final-norm readout is refused where the model has no final norm after it
    with pytest.raises(ValueError, match="final norm"):
        FeatureEngine(load_truncated(normed_lm, 1, dtype="float32", device="cpu"),
                      [Readout("hidden", 1, "none", weighting="position", final_norm=True)])


def test_final_norm_is_in_the_name_and_fingerprint_only_when_set():
    a = Readout("hidden", 3, "none", weighting="position")
    b = Readout("hidden", 3, "none", weighting="position", final_norm=True)
    assert "final_norm" not in a.spec() and b.spec()["final_norm"] is True  # earlier stores keep their fingerprint
    assert a.name != b.name and b.name.startswith("hidden@layers.3+norm")
    with pytest.raises(ValueError, match="hidden readouts only"):
        Readout("sae", 3, sae="s", final_norm=True)


# ----------------------------------------------------------------------------- RDS+ selection


def authors_round_robin(influences: dict, output_size: int) -> tuple[list, list]:
    """get_top_influences.py, ``--selection_method max``, transliterated: ``influences`` is
    {test index: {train index: cosine}} with the test examples in file order. Each round every
    test example pops its best remaining train row; a row already saved is dropped again (the
    turn is spent); train rows of equal score keep their index order (a stable sort)."""
    ranked = {t: sorted(inf.items(), key=lambda x: x[1], reverse=True) for t, inf in influences.items()}
    saved, scores = [], []
    while len(saved) < output_size:
        for t in ranked:
            inst, score = ranked[t].pop(0)
            if inst not in saved:
                saved.append(inst)
                scores.append(score)
    return saved[:output_size], scores[:output_size]


# A hand-made score matrix: rows r0..r4 against three targets, given in FILE order z, a, m (so the
# id order is a, m, z). Worked by hand for k = 4:
#   published (file order, a taken row spends the turn): z r0 | a r0 taken | m r1 | z r1 taken | a r2 |
#       m r0 taken | z r4                                                              -> r0 r1 r2 r4
#   skip to the next free row, file order:  z r0 | a r2 | m r1 | z r4                  -> r0 r2 r1 r4
#   spend the turn, id order (a, m, z):     a r0 | m r1 | z - | a r2 | m - | z - | a - | m r3 -> r0 r1 r2 r3
#   skip, id order (the variant before issue 23): a r0 | m r1 | z r4 | a r2            -> r0 r1 r4 r2
HAND_IDS = ["r0", "r1", "r2", "r3", "r4"]
HAND_TARGETS = ["z", "a", "m"]  # file order
HAND_S = np.array([[0.90, 0.95, 0.85],
                   [0.80, 0.60, 0.90],
                   [0.10, 0.70, 0.05],
                   [0.20, 0.50, 0.80],
                   [0.30, 0.40, 0.10]])


def test_round_robin_rule_and_target_order_on_a_hand_made_matrix():
    from mona_ray.bench.aggregations import PerTargetTopK
    from mona_ray.scoring.round_robin import round_robin

    def ours(cols, skip):  # as the pipeline does it: per-target top-k lists, then the interleaving
        top = PerTargetTopK(len(cols), 4)
        top.add(HAND_S[:, cols], np.asarray(HAND_IDS, dtype=object))
        return list(round_robin(top.result(), 4, skip_taken=skip)[0])

    file_order, id_order = [0, 1, 2], sorted(range(3), key=lambda j: HAND_TARGETS[j])
    want, want_scores = authors_round_robin({t: dict(zip(HAND_IDS, HAND_S[:, j])) for t, j in enumerate(file_order)}, 4)
    assert want == ["r0", "r1", "r2", "r4"] and want_scores == [0.90, 0.90, 0.70, 0.30]  # by hand, above
    top = PerTargetTopK(3, 4)
    top.add(HAND_S, np.asarray(HAND_IDS, dtype=object))
    ids, _, sc = round_robin(top.result(), 4, skip_taken=False)
    assert list(ids) == want and list(sc) == want_scores
    # the input tells the rules apart: each other variant picks differently
    assert ours(file_order, True) == ["r0", "r2", "r1", "r4"]
    assert ours(id_order, False) == ["r0", "r1", "r2", "r3"]
    assert ours(id_order, True) == ["r0", "r1", "r4", "r2"]


def _chat_rows(n: int, seed: int, prefix: str) -> list[dict]:
    from _tiny_lm import WORDS

    rnd = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        w = list(rnd.choice(WORDS, size=int(rnd.integers(3, 14))))
        a = list(rnd.choice(WORDS, size=int(rnd.integers(2, 10))))
        rows.append({"id": f"{prefix}{i}", "messages": [{"role": "user", "content": " ".join(w)},
                                                        {"role": "assistant", "content": " ".join(a)}]})
    return rows


@pytest.fixture(scope="module")
def rds_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("rds_parity")
    source = _chat_rows(40, 11, "s")
    targets = _chat_rows(6, 12, "t")
    for r, new in zip(targets, ["t5", "t10", "t0", "t3", "t21", "t1"]):  # file order is not id order
        r["id"] = new
    (d / "source.jsonl").write_text("".join(json.dumps(r) + "\n" for r in source))
    (d / "target.jsonl").write_text("".join(json.dumps(r) + "\n" for r in targets))
    # RDS+ reads no SAE, but a run checks sae.path at sae.hookpoint whatever the method (see the report)
    sae = make_random_sae(d / "sae", d_in=32, latents=64, k=4, hookpoint="layers.2")
    return {"dir": d, "source": source, "targets": targets, "sae": sae}


def published_rds(model_dir, source: list[dict], targets: list[dict], k: int, max_length: int = 64):
    """RDS+ end to end as the authors' code computes it: each conversation rendered with the
    model's chat template, hidden_states[-1] pooled with (t + 1) weights, unit-normalised,
    cosines, their round robin over the targets in file order."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)

    def emb(rows):
        out = []
        for r in rows:
            text = tok.apply_chat_template(r["messages"], tokenize=False)
            ids = tok(text, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
            out.append(published_pooling(full, ids))
        X = np.stack(out).astype(np.float64)
        return X / np.linalg.norm(X, axis=1, keepdims=True)

    S = emb(targets) @ emb(source).T  # [targets, source rows]
    influences = {t: {j: float(S[t, j]) for j in range(len(source))} for t in range(len(targets))}
    saved, scores = authors_round_robin(influences, k)
    return [source[j]["id"] for j in saved], scores, S


def test_rds_run_selects_what_the_published_algorithm_selects(ray_local, normed_lm, rds_inputs, tmp_path):
    """``select.method=rds`` (defaults) through the real pipeline on files equals the authors'
    algorithm reimplemented above: the same rows in the same order, with the same cosines. On
    this input the published order differs from skipping taken rows and from taking the targets
    in id order, so the rule and the order are both checked, not only the readout."""
    from mona_ray.config import load_config
    from mona_ray.pipeline.cli import run
    from mona_ray.scoring.round_robin import candidates_from_scores, round_robin

    k = 8
    want, want_scores, S = published_rds(normed_lm, rds_inputs["source"], rds_inputs["targets"], k)
    sids = np.asarray([r["id"] for r in rds_inputs["source"]], dtype=object)
    by_id = sorted(range(len(rds_inputs["targets"])), key=lambda t: rds_inputs["targets"][t]["id"])
    assert list(round_robin(candidates_from_scores(S.T, sids, k), k, skip_taken=True)[0]) != want
    assert authors_round_robin({t: dict(enumerate(S[j])) for t, j in enumerate(by_id)}, k)[0] != \
        [sids.tolist().index(i) for i in want]

    d = rds_inputs["dir"]

    def go(out, *extra):
        return run(load_config([f"source.paths=[{d / 'source.jsonl'}]", f"target.paths=[{d / 'target.jsonl'}]",
                                f"model.path={normed_lm}", "model.dtype=float32", "render.max_length=64",
                                "select.method=rds", f"sae.path={rds_inputs['sae']}",
                                "sae.hookpoint=layers.2",  # the last block: the variant before read it without the norm
                                f"run.output_dir={tmp_path / out}", f"select.count={k}", "embed.num_actors=1", *extra]),
                   quiet=True)

    go("out")
    sel = [json.loads(x) for x in (tmp_path / "out" / "selected.jsonl").read_text().splitlines()]
    assert [r["id"] for r in sel] == want
    np.testing.assert_allclose([r["score"] for r in sel], want_scores, rtol=1e-5, atol=1e-6)
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert man["readout"]["final_norm"] is True and man["readout"]["block"] == 2
    # the variant before issue 23 stays one setting away, and selects differently here
    m = go("old", "select.rds_variant=hooked_block")
    assert "final_norm" not in m["readout"]
    assert [json.loads(x)["id"] for x in (tmp_path / "old" / "selected.jsonl").read_text().splitlines()] != want


# ----------------------------------------------------------------------------- DSIR


_WORDPUNCT = re.compile(r"\w+|[^\w\s]+")  # nltk's WordPunctTokenizer pattern, which data-selection uses


def sha256_bucket(s: str, num_buckets: int) -> int:  # data-selection's hash_buckets
    return int(hashlib.sha256(s.encode("utf-8")).hexdigest(), 16) % num_buckets


def blake2b_bucket(s: str, num_buckets: int) -> int:  # mona_ray's choice (documented in selectors/dsir.py)
    return int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest(), "little") % num_buckets


def package_dsir(raw: list[str], target: list[str], k: int, bucket, num_buckets: int = 10000, n: int = 2,
                 min_example_length: int = 100):
    """data-selection 1.0.3's HashedNgramDSIR, top_k=True, reimplemented: get_ngram_counts,
    fit_importance_estimator (raw probabilities from every raw row, target from all its rows),
    importance = log_diff . features, the length filter from get_perexample_metadata and
    perexample_metadata_filter, then top-k among the rows that pass. Returns (log weights,
    mask of rows that pass, chosen row indices)."""
    def counts(line):
        words = _WORDPUNCT.findall(line.lower())
        c = np.zeros(num_buckets, dtype=np.int64)
        for w in words:
            c[bucket(w, num_buckets)] += 1
        for i in range(2, n + 1):
            for ng in zip(*[words[j:] for j in range(i)]):
                c[bucket(" ".join(ng), num_buckets)] += 1
        return c

    F = np.stack([counts(t) for t in raw])
    raw_probs = F.sum(0) / F.sum()
    tc = sum(counts(t) for t in target)
    log_diff = np.log(tc / tc.sum() + 1e-8) - np.log(raw_probs + 1e-8)
    w = F @ log_diff
    length = (F.sum(1) + n * (n - 1) / 2) // n
    mask = length >= min_example_length
    kept = np.where(mask)[0]
    chosen = kept[np.argpartition(-w[mask], k)[:k]]
    return w, mask, set(chosen.tolist())


CAT = ["the cat sat on the mat .", "a cat naps in the sun .", "my cat likes warm milk ."]  # 20 words
ENGINE = ["the engine needs new oil .", "a truck has four big wheels .", "my van burns cheap diesel fuel ."]


def dsir_rows() -> tuple[list[dict], list[dict]]:
    """Three target rows about a cat; a pool of long cat rows (the three cat sentences five times
    and two engine sentences: 113-114 words), short cat rows (the cat sentences once: 20 words, every
    n-gram a target n-gram) and long engine rows. The known answer at k = 3: with the length
    filter, the long cat rows; without it, the short ones (the engine n-grams sink the long cat rows)."""
    target = [{"id": f"t{i}", "messages": [{"role": "user", "content": " ".join(CAT[i:] + CAT[:i] + CAT)}]}
              for i in range(3)]
    pool = ([{"id": f"L{i}", "messages": [{"role": "user", "content": " ".join(CAT * 5 + ENGINE[i:i + 2])}]} for i in range(2)]
            + [{"id": "L2", "messages": [{"role": "user", "content": " ".join(CAT * 5 + ENGINE[:1] + ENGINE[2:])}]}]
            + [{"id": f"S{i}", "messages": [{"role": "user", "content": " ".join(CAT[i:] + CAT[:i])}]} for i in range(3)]
            + [{"id": f"D{i}", "messages": [{"role": "user", "content": " ".join((ENGINE[i % 3:] + ENGINE[:i % 3]) * 6)}]}
               for i in range(6)])
    order = [3, 6, 0, 9, 4, 1, 10, 7, 2, 11, 5, 8]  # file order mixes them
    return [pool[i] for i in order], target


def test_dsir_run_selects_what_the_package_selects(ray_local, tiny_lm, tiny_sae, tmp_path):
    """``select.method=dsir`` through the pipeline on files (defaults: the package's length filter
    at 100 words) against data-selection reimplemented: the same chosen rows under either hash,
    the same log weights where the hash is the same (ours), the filtered rows scored -inf and
    recorded; with the filter off (+select.dsir.min_example_length=0) the short rows win."""
    import pyarrow.parquet as pq

    from mona_ray.config import load_config
    from mona_ray.pipeline.cli import run

    pool, target = dsir_rows()
    texts = [r["messages"][0]["content"] for r in pool]
    t_texts = [r["messages"][0]["content"] for r in target]
    ids = [r["id"] for r in pool]
    words = [len(_WORDPUNCT.findall(t)) for t in texts]
    assert {i: w for i, w in zip(ids, words) if i[0] != "D"} == {"L0": 113, "L1": 114, "L2": 113, "S0": 20, "S1": 20, "S2": 20}
    long_cat, short_cat = {"L0", "L1", "L2"}, {"S0", "S1", "S2"}
    for bucket in (sha256_bucket, blake2b_bucket):  # the known answer holds under the package's hash and ours
        assert {ids[j] for j in package_dsir(texts, t_texts, 3, bucket)[2]} == long_cat
        assert {ids[j] for j in package_dsir(texts, t_texts, 3, bucket, min_example_length=0)[2]} == short_cat
    w, mask, _ = package_dsir(texts, t_texts, 3, blake2b_bucket)

    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pool))
    (tmp_path / "target.jsonl").write_text("".join(json.dumps(r) + "\n" for r in target))

    def go(out, *extra):
        return run(load_config([f"source.paths=[{tmp_path / 'pool.jsonl'}]", f"target.paths=[{tmp_path / 'target.jsonl'}]",
                                f"model.path={tiny_lm}", "model.dtype=float32", f"sae.path={tiny_sae}",
                                "sae.hookpoint=layers.2", "select.method=dsir", "select.count=3",
                                f"run.output_dir={tmp_path / out}", *extra]), quiet=True)

    m = go("on")
    sel = [json.loads(x)["id"] for x in (tmp_path / "on" / "selected.jsonl").read_text().splitlines()]
    assert set(sel) == long_cat
    sc = dict(zip(*pq.read_table(tmp_path / "on" / "scores.parquet", columns=["id", "score"]).to_pydict().values()))
    assert len(sc) == len(pool)  # no row dropped: the filtered ones are scored, lowest
    for i, j in zip(ids, range(len(ids))):
        if mask[j]:
            assert sc[i] == pytest.approx(w[j], rel=1e-12, abs=1e-9)
        else:
            assert sc[i] == -np.inf
    filt = m["selection"]["filter"]
    assert filt["rows"] == 3 and "fewer than 100 words" in filt["reason"]
    from mona_ray.pipeline.report import summary

    recs = [json.loads(x) for x in (tmp_path / "on" / "selected.jsonl").read_text().splitlines()]
    assert "  filtered                     3   scored -inf: fewer than 100 words" in summary(m, recs)
    assert m["counts"]["source"]["rows_scored"] == len(pool) and m["invariant_rows_in_eq_scored_plus_rejected"]

    m = go("off", "+select.dsir.min_example_length=0")
    assert {json.loads(x)["id"] for x in (tmp_path / "off" / "selected.jsonl").read_text().splitlines()} == short_cat
    assert "filter" not in m["selection"]
