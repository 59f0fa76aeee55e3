"""The embedding engine: padding never enters the pool, batching never changes a row, failures are isolated."""

import numpy as np
import pytest
import torch

from mona_ray.features.engine import Embedder, EmbedSettings, micro_batches
from mona_ray.core.model import load_truncated
from mona_ray.core.sae import load_sae


@pytest.fixture(scope="module")
def parts(tiny_lm, tiny_sae):
    lm = load_truncated(tiny_lm, 2, dtype="float32", device="cpu")
    sae = load_sae(tiny_sae, hookpoint="layers.2")
    return lm, sae


def reference_pool(tiny_lm, sae, ids, mask, method="mean"):
    """Naive path: full HF model, one row, hidden_states[3], the sparsify formula by hand."""
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32).eval()
    with torch.inference_mode():
        h = full(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[3][0]
    pre = torch.relu((h - sae.b_dec) @ sae.W_enc.T + sae.b_enc)
    top = pre.topk(sae.k, dim=-1)
    z = torch.zeros_like(pre).scatter(1, top.indices, top.values)
    z = z[torch.tensor(mask, dtype=torch.bool)]
    return (z.mean(0) if method == "mean" else z.sum(0)).numpy()


def dense(pair, width):
    out = np.zeros(width)
    out[pair[0]] = pair[1]
    return out


def test_micro_batches_respect_budget_and_equal_padded_lengths():
    lengths = [5, 40, 17, 33, 16, 90, 2]
    mbs = micro_batches(lengths, token_budget=64, max_rows=3, pad_multiple=16)
    assert sorted(i for mb in mbs for i in mb) == list(range(7))
    for mb in mbs:
        padded = {-(-lengths[i] // 16) * 16 for i in mb}
        assert len(padded) == 1
        assert len(mb) == 1 or len(mb) * padded.pop() <= 64
        assert len(mb) <= 3
    assert mbs[0] == [5]  # the longest row runs first, on its own


@pytest.mark.parametrize("method", ["mean", "sum"])
def test_pooled_codes_equal_the_naive_reference(parts, tiny_lm, method):
    lm, sae = parts
    ids = [[5, 9, 12, 7, 30, 8, 11], [14, 15, 16], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 31, 32, 33, 34, 35, 36, 37, 38]]
    masks = [[0, 1, 1, 1, 1, 0, 1], [1, 1, 1], [1] * 18]
    emb = Embedder(lm, sae, EmbedSettings(pooling=method, token_budget=64, pad_multiple=16), pad_token_id=0)
    res = emb.embed(ids, masks)
    assert res.padded_tokens > res.real_tokens  # padding really happened...
    for i in range(3):  # ...and never entered the pool
        np.testing.assert_allclose(dense(res.outputs["sae"][i], 128), reference_pool(tiny_lm, sae, ids[i], masks[i], method),
                                   rtol=1e-5, atol=1e-6)
    assert res.n_pooled == [5, 3, 18]


def test_a_row_gives_the_same_bits_alone_or_in_any_batch(parts):
    lm, sae = parts
    rng = np.random.default_rng(0)
    ids = [list(rng.integers(4, 40, size=n)) for n in (3, 7, 9, 12, 12, 15, 20, 31)]
    masks = [[1] * len(x) for x in ids]
    together = Embedder(lm, sae, EmbedSettings(token_budget=4096, pad_multiple=16), 0).embed(ids, masks)
    for i in range(len(ids)):
        alone = Embedder(lm, sae, EmbedSettings(token_budget=4096, pad_multiple=16), 0).embed([ids[i]], [masks[i]])
        assert np.array_equal(alone.outputs["sae"][0][0], together.outputs["sae"][i][0])
        assert np.array_equal(alone.outputs["sae"][0][1], together.outputs["sae"][i][1])


def test_a_failing_row_is_rejected_alone_with_its_reason(parts):
    lm, sae = parts
    ids = [[5, 6, 7], [5, 10 ** 6, 7], [8, 9, 10]]  # the middle id is past the vocabulary: the embedding lookup fails
    res = Embedder(lm, sae, EmbedSettings(token_budget=4096, pad_multiple=4), 0).embed(ids, [[1] * 3] * 3)
    assert list(res.rejected) == [1]
    assert "embedding failed: IndexError" in res.rejected[1]
    assert res.outputs["sae"][0] is not None and res.outputs["sae"][2] is not None


def test_all_representations_in_one_pass(parts):
    lm, sae = parts
    emb = Embedder(lm, sae, EmbedSettings(representations=("sae", "hidden", "mlp_gate"), mlp_k=5), 0)
    res = emb.embed([[5, 6, 7, 8]], [[1, 1, 1, 1]])
    assert res.outputs["hidden"][0].shape == (32,)
    idx, val = res.outputs["mlp_gate"][0]
    assert 5 <= len(idx) <= 20 and (val > 0).all()
