"""Every speed-up leaves the selection unchanged: the optimised embedding path (truncated
model, length-sorted token-budget micro-batches, chunked SAE encode, scatter-add pooling)
and the naive one (full model with its head, ``output_hidden_states=True``, fixed batches
in input order padded to the longest row) give the same codes and the same top-k, and so
do the fast and reference Jaccard kernels.
"""

import numpy as np
import pytest
import torch

from mona_ray import scoring
from mona_ray.scoring import kernels
from mona_ray.bench.forward import naive_embed
from mona_ray.bench.score import reference_jaccard
from mona_ray.features.engine import Batching, FeatureEngine
from mona_ray.features.readouts import Readout
from mona_ray.core.model import load_truncated
from mona_ray.core.sae import SAE

LAYER = 2


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path, safe_serialization=True)
    return path, model


def _sae(d=64, latents=256, k=6):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(latents, d, generator=g) / d ** 0.5
    return SAE(W_enc=W, b_enc=torch.randn(latents, generator=g) * 0.1, W_dec=W.clone(), b_dec=torch.zeros(d),
               k=k, hookpoint=f"layers.{LAYER}")


def _rows(n, seed):
    rng = np.random.default_rng(seed)
    ids = [rng.integers(1, 300, int(L)).tolist() for L in rng.integers(3, 60, n)]
    masks = [[0] + [1] * (len(x) - 1) for x in ids]  # first token (BOS-like) not pooled
    return ids, masks


def _sparse(pooled: np.ndarray) -> scoring.SparseRows:
    nz = [np.flatnonzero(r) for r in pooled]
    return scoring.SparseRows.from_lists(nz, [r[i] for r, i in zip(pooled, nz)])


def _select(src: np.ndarray, tgt: np.ndarray, k: int, kernel) -> tuple[np.ndarray, np.ndarray]:
    proto = scoring.prototype(_sparse(tgt), tgt.shape[1])
    s = kernel(_sparse(src), proto)
    return scoring.topk(s, [f"r{i:03d}" for i in range(len(src))], k)


def test_optimised_and_naive_paths_select_the_same_rows(tiny_checkpoint):
    path, full = tiny_checkpoint
    sae = _sae()
    lm = load_truncated(path, LAYER, "float32", "cpu")
    ro = Readout("sae", LAYER, "special", k=sae.k, sae="s")
    emb = FeatureEngine(lm, [ro], Batching(token_budget=200, max_batch_rows=8, sae_chunk_tokens=50), 0, saes={"s": sae})
    src_ids, src_masks = _rows(60, 0)
    tgt_ids, tgt_masks = _rows(8, 1)

    def fast(ids, masks):
        res = emb.run(ids, {"special": masks})
        assert not res.rejected
        out = np.zeros((len(ids), sae.num_latents), dtype=np.float32)
        for i, (idx, val) in enumerate(res.outputs[ro.name]):
            out[i, idx] = val
        return out, res

    def naive(ids, masks):
        sec, padded, pooled = naive_embed(full, LAYER, sae, ids, masks, batch_size=16, pad_id=0, sae_chunk_tokens=37)
        return pooled.numpy(), padded

    f_src, res = fast(src_ids, src_masks)
    f_tgt, _ = fast(tgt_ids, tgt_masks)
    n_src, naive_padded = naive(src_ids, src_masks)
    n_tgt, _ = naive(tgt_ids, tgt_masks)

    assert res.padded_tokens < naive_padded  # the point of the optimised path
    np.testing.assert_allclose(f_src, n_src, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(f_src > 0, n_src > 0)  # same active latents
    k = scoring.selection_size(len(src_ids), 0.1)
    fs, fi = _select(f_src, f_tgt, k, reference_jaccard)
    ns, ni = _select(n_src, n_tgt, k, reference_jaccard)
    assert list(fi) == list(ni)
    np.testing.assert_allclose(fs, ns, rtol=1e-5)
    # and the fast Jaccard kernel changes nothing at all
    ks, ki = _select(f_src, f_tgt, k, kernels.jaccard)
    assert list(ki) == list(fi) and np.array_equal(ks, fs)
