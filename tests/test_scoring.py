"""Scoring and selection math against dense references on random data."""

import numpy as np
import pytest

from mona_ray import scoring
from mona_ray.scoring import SparseRows


def random_rows(rng, n, width, max_nnz):
    idx, val = [], []
    for _ in range(n):
        k = int(rng.integers(0, max_nnz + 1))
        idx.append(np.sort(rng.choice(width, k, replace=False)).astype(np.int32))
        val.append(rng.random(k).astype(np.float32))
    return SparseRows.from_lists(idx, val)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_jaccard_cosine_euclidean_match_dense_formulas(seed):
    rng = np.random.default_rng(seed)
    rows = random_rows(rng, 50, 40, 12)
    proto = rng.random(40) * (rng.random(40) < 0.6)
    D = rows.to_dense(40)
    jac = np.array([np.minimum(d, proto).sum() / np.maximum(d, proto).sum() for d in D])
    cos = np.array([d @ proto / (np.linalg.norm(d) * np.linalg.norm(proto)) if d.any() else 0.0 for d in D])
    euc = -np.linalg.norm(D - proto, axis=1)
    np.testing.assert_allclose(scoring.jaccard(rows, proto), jac, rtol=1e-12)
    np.testing.assert_allclose(scoring.cosine(rows, proto), cos, rtol=1e-12)
    np.testing.assert_allclose(scoring.neg_euclidean(rows, proto), euc, rtol=1e-9)
    for name, ref in (("jaccard", jac), ("cosine", cos), ("euclidean", euc)):
        np.testing.assert_allclose(scoring.dense_similarity(D, proto, name), ref, rtol=1e-9, atol=1e-12)


def test_scores_do_not_depend_on_the_block_a_row_is_in():
    rng = np.random.default_rng(3)
    rows = random_rows(rng, 200, 300, 80)
    proto = rng.random(300)
    whole = scoring.jaccard(rows, proto)
    for cut in (1, 37, 199):
        a = SparseRows(rows.indptr[: cut + 1], rows.indices[: rows.indptr[cut]], rows.values[: rows.indptr[cut]])
        off = rows.indptr[cut]
        b = SparseRows(rows.indptr[cut:] - off, rows.indices[off:], rows.values[off:])
        assert np.array_equal(np.concatenate([scoring.jaccard(a, proto), scoring.jaccard(b, proto)]), whole)


def test_prototype_is_the_mean_and_needs_rows():
    rows = SparseRows.from_lists([[0, 2], [2]], [[1.0, 2.0], [4.0]])
    np.testing.assert_array_equal(scoring.prototype(rows, 4), [0.5, 0, 3.0, 0])
    with pytest.raises(ValueError, match="zero target rows"):
        scoring.prototype(SparseRows.from_lists([], []), 4)


def test_topk_merge_equals_a_global_sort_with_id_tiebreak():
    rng = np.random.default_rng(4)
    scores = np.round(rng.random(500), 2)  # many ties
    ids = np.array([f"row{i:04d}" for i in rng.permutation(500)], dtype=object)
    k = 37
    want = sorted(zip(-scores, ids))[:k]
    blocks = np.array_split(np.arange(500), 9)
    parts = [scoring.topk(scores[b], ids[b], k) for b in blocks]
    s, i = scoring.merge_topk(parts, k)
    assert list(zip(-s, i)) == want


def test_selection_size():
    assert scoring.selection_size(1000, 0.05) == 50
    assert scoring.selection_size(1001, 0.05) == 51
    assert scoring.selection_size(10, 0.01) == 1
    assert scoring.selection_size(10, None, count=25) == 10
    with pytest.raises(ValueError):
        scoring.selection_size(10, 0)
