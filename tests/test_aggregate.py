"""Aggregation over target examples: per-target scoring (``similarity.pairwise``), round robin,
clusters, the support-bias cuts; and the pieces only ``bench score`` uses (``bench.aggregations``)."""

from __future__ import annotations

import numpy as np
import pytest

from mona_ray.bench import aggregations as bag
from mona_ray.scoring import SparseRows, score, selection_size, topk
from mona_ray.scoring import clusters, cuts, round_robin as rrm, similarity

L = 64


def _rand_rows(rng, n, width=L, density=0.4):
    idx, val = [], []
    for i in range(n):
        k = 0 if i % 17 == 5 else int(rng.integers(1, int(width * density) + 1))  # some empty rows
        idx.append(np.sort(rng.choice(width, k, replace=False)))
        val.append(rng.gamma(1.0, 1.0, k).astype(np.float32))
    return SparseRows.from_lists(idx, val)


# ----------------------------------------------------------------------------- pairwise


@pytest.mark.parametrize("chunk_nnz,block_rows", [(7, 1), (200, 13), (1 << 15, 512)])
def test_pairwise_equals_score_per_column(chunk_nnz, block_rows):
    rng = np.random.default_rng(0)
    rows = _rand_rows(rng, 120)
    T = _rand_rows(rng, 6).to_dense(L)
    T[2] = 0.0  # an all-zero target scores 0 everywhere, as scoring does
    for sim in ("jaccard", "cosine", "euclidean"):
        S = similarity.pairwise(rows, T, sim, layout="rows", chunk_nnz=chunk_nnz, block_rows=block_rows)
        assert S.shape == (len(rows), len(T))
        ref = np.stack([score(rows, T[j], sim) for j in range(len(T))], axis=1)
        if sim == "jaccard":  # the same operations on the same numbers: bitwise
            assert np.array_equal(S.view(np.int64), ref.view(np.int64))
            by_targets = similarity.pairwise(rows, T, sim, layout="targets", block_rows=block_rows)
            np.testing.assert_allclose(by_targets, ref, rtol=1e-12, atol=1e-15)
            sparse_t = np.stack([cuts.sparsify_prototype(t, 0.5) for t in T])  # auto picks the targets kernel
            ref_s = np.stack([score(rows, t, sim) for t in sparse_t], axis=1)
            np.testing.assert_allclose(similarity.pairwise(rows, sparse_t, sim, block_rows=block_rows), ref_s, rtol=1e-12, atol=1e-15)
        else:  # a dense GEMM: equal to float64 rounding
            np.testing.assert_allclose(S, ref, rtol=1e-12, atol=1e-12)
            fast = similarity.pairwise(rows, T, sim, block_rows=block_rows, gemm_dtype=np.float32)
            np.testing.assert_allclose(fast, ref, rtol=1e-5, atol=1e-5)


def test_idf_weights_and_doc_freq():
    rows = SparseRows.from_lists([[0, 1], [0, 2], [0]], [[1, 1], [1, 1], [1]])
    df = bag.doc_freq(rows, 4)
    assert df.tolist() == [3, 1, 1, 0]
    w = bag.idf_weights(df, 3)
    assert w[0] == 0.0 and w[3] > w[1] > 0  # a latent in every row weighs nothing
    assert np.allclose(bag.idf_weights(df, 3, smooth=True), w + 1)
    # bench score's -idf: weighted Jaccard is Jaccard of the weighted rows and prototype (w >= 0)
    rng = np.random.default_rng(1)
    rows, p, w = _rand_rows(rng, 50), _rand_rows(rng, 10).to_dense(L).mean(0), rng.random(L)
    Z = rows.to_dense(L)
    brute = (np.minimum(Z, p) * w).sum(1) / (np.maximum(Z, p) * w).sum(1)
    weighted = SparseRows(rows.indptr, rows.indices, rows.values * w[rows.indices])
    np.testing.assert_allclose(score(weighted, p * w), np.nan_to_num(brute), rtol=1e-12)


def test_sparsify_rows_cuts_each_row_as_sparsify_prototype_cuts_a_prototype():
    rows = SparseRows.from_lists([[3, 0, 7, 5], [], [2], [1, 4, 6]],
                                 [[0.1, 0.4, 0.2, 0.3], [], [5.0], [0.25, 0.5, 0.25]])
    cut = cuts.sparsify_rows(rows, 0.5)
    # row 0: 0.4 + 0.3 reach half of 1.0; row 3: 0.5 alone is half; stored order kept; ties by latent
    assert cut.indptr.tolist() == [0, 2, 2, 3, 4]
    assert cut.indices.tolist() == [0, 5, 2, 4] and cut.values.tolist() == pytest.approx([0.4, 0.3, 5.0, 0.5])
    cut = cuts.sparsify_rows(rows, 0.7)
    assert cut.indices.tolist() == [0, 5, 2, 1, 4]  # row 3: 0.5 + 0.25 (latent 1 before 6 on the tie)
    assert cuts.sparsify_rows(rows, 1.0) is rows
    rng = np.random.default_rng(0)
    dense = rng.random((50, 40)) * (rng.random((50, 40)) < 0.3)
    idx = [np.flatnonzero(d) for d in dense]
    rows = SparseRows.from_lists(idx, [d[i] for d, i in zip(dense, idx)])
    for mass in (0.3, 0.65, 0.9):
        want = np.stack([cuts.sparsify_prototype(d, mass) for d in dense.astype(np.float32).astype(np.float64)])
        np.testing.assert_array_equal(cuts.sparsify_rows(rows, mass).to_dense(40), want)
    wide = SparseRows(rows.indptr, rows.indices, np.concatenate([d[i] for d, i in zip(dense, idx)]))  # float64 values
    for mass in (0.3, 0.65, 0.9):
        want = np.stack([cuts.sparsify_prototype(d, mass) for d in dense])
        np.testing.assert_array_equal(cuts.sparsify_rows(wide, mass).to_dense(40), want)
    with pytest.raises(ValueError):
        cuts.sparsify_rows(rows, 0)


def test_sparsify_prototype_keeps_the_heaviest_latents():
    p = np.array([0.1, 0.4, 0.0, 0.3, 0.2])
    assert cuts.sparsify_prototype(p, 0.5).tolist() == [0, 0.4, 0, 0.3, 0]  # 0.7 >= 0.5; 0.4 alone is not
    assert cuts.sparsify_prototype(p, 0.4).tolist() == [0, 0.4, 0, 0, 0]
    assert np.array_equal(cuts.sparsify_prototype(p, 1.0), p)
    q = np.array([0.25, 0.25, 0.25, 0.25])  # ties: by latent index
    assert cuts.sparsify_prototype(q, 0.5).tolist() == [0.25, 0.25, 0, 0]


# ----------------------------------------------------------------------------- round robin


def _lists(*lists):
    return [(np.asarray(s, float), np.asarray(i, dtype=object)) for i, s in lists]


def test_round_robin_interleaves_and_skips_taken_rows():
    c = _lists((["a", "b", "c", "d"], [4, 3, 2, 1]), (["a", "e", "b", "f"], [9, 8, 7, 6]))
    ids, src, sc = rrm.round_robin(c, 4)
    # list 0 takes a; list 1's best (a) is taken, so it takes e; then b; list 1 skips b, takes f
    assert ids.tolist() == ["a", "e", "b", "f"]
    assert src.tolist() == [0, 1, 0, 1] and sc.tolist() == [4, 8, 3, 6]
    # RDS+'s code: a turn whose next row is taken adds nothing
    ids, src, _ = rrm.round_robin(c, 4, skip_taken=False)
    assert ids.tolist() == ["a", "b", "e", "c"] and src.tolist() == [0, 0, 1, 0]
    # stops at k, and when every list is exhausted
    assert rrm.round_robin(c, 1)[0].tolist() == ["a"]
    assert sorted(rrm.round_robin(c, 100)[0].tolist()) == ["a", "b", "c", "d", "e", "f"]
    # quotas: list 0 takes at most one row
    ids, src, _ = rrm.round_robin(c, 3, quotas=[1, 2])
    assert ids.tolist() == ["a", "e", "b"] and src.tolist() == [0, 1, 1]


def test_round_robin_needs_only_k_candidates_per_list():
    rng = np.random.default_rng(2)
    n, m = 300, 9
    S = np.round(rng.random((n, m)), 2)  # many ties: broken by id
    ids = np.array([f"r{i:04d}" for i in rng.permutation(n)], dtype=object)
    for k in (1, 7, 40, 150):
        full = rrm.candidates_from_scores(S, ids, n)
        cut = rrm.candidates_from_scores(S, ids, k)
        for skip in (True, False):
            assert rrm.round_robin(cut, k, skip_taken=skip)[0].tolist() == rrm.round_robin(full, k, skip_taken=skip)[0].tolist()
        q = bag.allocate([5, 3, 1, 1, 1, 1, 1, 1, 1], k)
        assert rrm.round_robin(cut, k, quotas=q)[0].tolist() == rrm.round_robin(full, k, quotas=q)[0].tolist()
        assert len(rrm.round_robin(cut, k, quotas=q)[0]) == k


def test_best_k_equals_scoring_topk():
    rng = np.random.default_rng(6)
    for n, k in ((0, 3), (1, 1), (50, 7), (400, 399), (400, 400), (400, 1000)):
        s = np.round(rng.random(n), 1)  # long runs of equal scores
        ids = np.array([f"x{v}" for v in rng.permutation(n * 3)[:n]], dtype=object)
        a, b = bag.best_k(s, ids, k), topk(s, ids, k)
        assert np.array_equal(a[0], b[0]) and a[1].tolist() == b[1].tolist()


def test_per_target_topk_streamed_and_merged_equals_in_memory():
    rng = np.random.default_rng(3)
    n, m, k = 500, 5, 37
    S = np.round(rng.random((n, m)), 3)
    ids = np.array([f"id{i:05d}" for i in range(n)], dtype=object)
    parts = []
    for a, b in ((0, 120), (120, 121), (121, 400), (400, 500)):  # one task per part, blocks inside
        acc = bag.PerTargetTopK(m, k)
        for x in range(a, b, 50):
            y = min(b, x + 50)
            acc.add(S[x:y], ids[x:y])
        parts.append(acc.result())
    merged = bag.merge_candidates(parts, k)
    ref = rrm.candidates_from_scores(S, ids, k)
    for (s1, i1), (s2, i2) in zip(merged, ref):
        assert np.array_equal(s1, s2) and i1.tolist() == i2.tolist()


# ----------------------------------------------------------------------------- clusters


def test_allocate_largest_remainder():
    assert bag.allocate([1, 1, 1], 10).tolist() == [4, 3, 3]
    assert bag.allocate([5, 3, 2], 7).tolist() == [4, 2, 1]  # exact 3.5, 2.1, 1.4
    for k in (0, 1, 13, 100):
        q = bag.allocate([7, 1, 30, 2], k)
        assert q.sum() == k and (q >= 0).all()
    assert bag.allocate([2, 6], 3).tolist() == [1, 2]  # tie in remainder (0.75 vs 2.25): exact rounding


def test_choose_clusters_is_deterministic_and_finds_structure():
    rng = np.random.default_rng(4)
    A = np.zeros((12, 40))
    A[:6, :10] = rng.random((6, 10)) + 1
    A[6:, 20:30] = rng.random((6, 10)) + 1
    labels = bag.choose_clusters(A, seed=0)
    assert len(np.unique(labels)) == 2 and len(set(labels[:6])) == 1 and labels[0] != labels[6]
    assert np.array_equal(labels, bag.choose_clusters(A, seed=0))
    # one coherent blob: no substantial structure, a single cluster (= the prototype)
    blob = 1 + 0.05 * rng.random((20, 40))
    assert (bag.choose_clusters(blob, seed=0) == 0).all()
    P, sizes = clusters.cluster_prototypes(A, labels)
    assert sizes.tolist() == [6, 6] and np.allclose(P[0], A[:6].mean(0))


# ----------------------------------------------------------------------------- the two-task case


def _two_task(seed=0):
    """Targets: half on latents 0-9, half on 10-19. Pool: rows of each kind, 'spread' rows with
    the same L1 mass thinly over 0-19, and unrelated rows on 20-39."""
    rng = np.random.default_rng(seed)
    idx, val, kind = [], [], []

    def add(lat, scale, what):
        idx.append(np.asarray(lat))
        val.append((scale * (1 + 0.1 * rng.standard_normal(len(lat)))).astype(np.float32))
        kind.append(what)

    for _ in range(20):
        add(np.arange(10), 1.0, "A")
        add(np.arange(10, 20), 1.0, "B")
        add(np.arange(20), 0.5, "spread")
        add(np.arange(20, 40), 0.5, "other")
        add(np.arange(20, 40), 0.5, "other")
    pool = SparseRows.from_lists(idx, val)
    tgt = [np.zeros(L) for _ in range(10)]
    for t in range(10):
        lat = np.arange(10) if t < 5 else np.arange(10, 20)
        tgt[t][lat] = 1 + 0.1 * rng.standard_normal(10)
    ids = np.array([f"p{i:03d}" for i in range(len(kind))], dtype=object)
    return pool, np.stack(tgt), ids, np.array(kind)


def test_two_tasks_prototype_jaccard_fails_round_robin_and_clusters_serve_both():
    pool, T, ids, kind = _two_task()
    k = 20
    # the paper: one prototype, generalized Jaccard -> the spread rows
    p = T.mean(0)
    _, sel = topk(score(pool, p, "jaccard"), ids, k)
    got = kind[np.searchsorted(ids, sel)]
    assert (got == "spread").sum() >= 15
    # round robin over the target rows
    S = similarity.pairwise(pool, T, "jaccard")
    rr, _, _ = rrm.round_robin(rrm.candidates_from_scores(S, ids, k), k)
    got = kind[np.searchsorted(ids, rr)]
    assert (got == "A").sum() == 10 and (got == "B").sum() == 10
    # clusters: two found, each gets half of the selection
    labels = bag.choose_clusters(T, seed=0)
    P, sizes = clusters.cluster_prototypes(T, labels)
    assert len(P) == 2
    Sc = similarity.pairwise(pool, P, "jaccard")
    cl, _, _ = rrm.round_robin(rrm.candidates_from_scores(Sc, ids, k), k, quotas=bag.allocate(sizes, k))
    got = kind[np.searchsorted(ids, cl)]
    assert (got == "A").sum() == 10 and (got == "B").sum() == 10
    # the best-cluster score ranks both kinds above the spread rows
    best = Sc.max(axis=1)
    _, top = topk(best, ids, 40)
    assert set(kind[np.searchsorted(ids, top)]) == {"A", "B"}
    # cosine against the one two-task prototype prefers the spread rows too: here only the
    # aggregation over target examples helps
    _, sel = topk(score(pool, p, "cosine"), ids, k)
    assert (kind[np.searchsorted(ids, sel)] == "spread").sum() >= 15


def test_selection_size_matches_candidates_budget():
    pool, T, ids, _ = _two_task()
    k = selection_size(len(ids), 0.05)
    S = similarity.pairwise(pool, T, "cosine")
    out, _, _ = rrm.round_robin(rrm.candidates_from_scores(S, ids, k), k)
    assert len(out) == k == len(set(out.tolist()))


def test_dense_pairwise_matches_scoring_dense_similarity():
    from mona_ray.scoring import dense_similarity

    rng = np.random.default_rng(5)
    X, T = rng.standard_normal((30, 8)), rng.standard_normal((4, 8))
    for sim in ("jaccard", "cosine", "euclidean"):
        ref = np.stack([dense_similarity(X, T[j], sim) for j in range(4)], 1)
        np.testing.assert_allclose(similarity.dense_pairwise(X, T, sim), ref, rtol=1e-12, atol=1e-12)
