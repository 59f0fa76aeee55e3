"""The cache-blocked Jaccard kernel gives exactly what the straightforward formula gives (the
reference ``bench score`` times it against), and the streaming top-k what the global one gives."""

import numpy as np
import pytest

from mona_ray import scoring
from mona_ray.scoring import kernels
from mona_ray.bench.score import reference_jaccard
from mona_ray.bench.synth import Generator, SynthSpec, concat


def _rows(seed=0, n=300, latents=500, nnz=120, dtype=np.float32):
    gen = Generator(SynthSpec(num_latents=latents, nnz=nnz, seed=seed))
    rng = np.random.default_rng(seed)
    rows = gen.rows(gen.source_affinity(n, rng), rng)
    # an empty row, a row of one entry, and all-zero values must be handled too
    empty = scoring.SparseRows(np.zeros(2, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32))
    one = scoring.SparseRows(np.array([0, 1]), np.array([3], np.int32), np.array([0.5], np.float32))
    zero = scoring.SparseRows(np.array([0, 2]), np.array([1, 7], np.int32), np.zeros(2, np.float32))
    rows = concat([rows, empty, one, zero])
    rows.values = rows.values.astype(dtype)
    proto = gen.rows(gen.target_affinity(20, rng), rng)
    return rows, scoring.prototype(proto, latents)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("chunk", [1, 64, 1000, 1 << 16])
def test_jaccard_is_bitwise_equal_to_reference(dtype, chunk):
    rows, proto = _rows(dtype=dtype)
    ref = reference_jaccard(rows, proto)
    fast = kernels.jaccard(rows, proto, chunk_nnz=chunk)
    assert fast.dtype == ref.dtype
    assert np.array_equal(fast.view(np.int64), ref.view(np.int64))


def test_jaccard_of_a_row_does_not_depend_on_its_block():
    rows, proto = _rows(seed=3)
    whole = kernels.jaccard(rows, proto, chunk_nnz=500)
    cut = 137
    head = scoring.SparseRows(rows.indptr[:cut + 1], rows.indices, rows.values)
    tail_ip = rows.indptr[cut:] - rows.indptr[cut]
    tail = scoring.SparseRows(tail_ip, rows.indices[rows.indptr[cut]:], rows.values[rows.indptr[cut]:])
    parts = np.concatenate([kernels.jaccard(head, proto, 777), kernels.jaccard(tail, proto, 90)])
    assert np.array_equal(parts.view(np.int64), whole.view(np.int64))


def test_running_topk_equals_global_topk_with_ties():
    rng = np.random.default_rng(0)
    n, k = 5000, 250
    scores = np.round(rng.random(n), 2)  # many exact ties, decided by id
    ids = np.array([f"id{i:05d}" for i in rng.permutation(n)], dtype=object)
    ref_s, ref_i = scoring.topk(scores, ids, k)
    run = scoring.RunningTopK(k)
    for a in range(0, n, 333):
        run.add(scores[a:a + 333], ids[a:a + 333])
    got_s, got_i = run.result()
    assert np.array_equal(got_s, ref_s)
    assert list(got_i) == list(ref_i)
    assert run.kept == k


def test_running_topk_fewer_rows_than_k():
    run = scoring.RunningTopK(10)
    assert len(run.result()[0]) == 0
    run.add([0.5, 0.7, 0.5], ["b", "a", "a2"])
    s, i = run.result()
    assert list(i) == ["a", "a2", "b"] and list(s) == [0.7, 0.5, 0.5]
    with pytest.raises(ValueError):
        scoring.RunningTopK(0)
