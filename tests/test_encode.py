"""The feature engine: padding never enters the pool, batching never changes a row, failures are isolated,
every readout from one forward equals its reference."""

import numpy as np
import pytest
import torch

from mona_ray.features.engine import Batching, FeatureEngine, micro_batches
from mona_ray.features.readouts import Readout
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


SAE = Readout("sae", 2, "special", k=8, sae="s")


def engine(lm, sae, *readouts, **batching):
    return FeatureEngine(lm, list(readouts or [SAE]), Batching(**batching), pad_token_id=0, saes={"s": sae})


def run(eng, ids, masks):
    return eng.run(ids, {e: masks for e in eng.excludes})


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
    res = run(engine(lm, sae, token_budget=64, pad_multiple=16), ids, masks)
    assert res.padded_tokens > res.real_tokens  # padding really happened...
    assert res.n_pooled[SAE.name] == [5, 3, 18]
    for i in range(3):  # ...and never entered the pool (stored rows are means; sum = mean x n_pooled)
        got = dense(res.outputs[SAE.name][i], 128) * (res.n_pooled[SAE.name][i] if method == "sum" else 1)
        np.testing.assert_allclose(got, reference_pool(tiny_lm, sae, ids[i], masks[i], method), rtol=1e-5, atol=1e-6)


def test_a_row_gives_the_same_bits_alone_or_in_any_batch(parts):
    lm, sae = parts
    rng = np.random.default_rng(0)
    ids = [list(rng.integers(4, 40, size=n)) for n in (3, 7, 9, 12, 12, 15, 20, 31)]
    masks = [[1] * len(x) for x in ids]
    together = run(engine(lm, sae, token_budget=4096, pad_multiple=16), ids, masks)
    for i in range(len(ids)):
        alone = run(engine(lm, sae, token_budget=4096, pad_multiple=16), [ids[i]], [masks[i]])
        assert np.array_equal(alone.outputs[SAE.name][0][0], together.outputs[SAE.name][i][0])
        assert np.array_equal(alone.outputs[SAE.name][0][1], together.outputs[SAE.name][i][1])


def test_a_failing_row_is_rejected_alone_with_its_reason(parts):
    lm, sae = parts
    ids = [[5, 6, 7], [5, 10 ** 6, 7], [8, 9, 10]]  # the middle id is past the vocabulary: the embedding lookup fails
    res = run(engine(lm, sae, token_budget=4096, pad_multiple=4), ids, [[1] * 3] * 3)
    assert list(res.rejected) == [1]
    assert "embedding failed: IndexError" in res.rejected[1]
    assert res.outputs[SAE.name][0] is not None and res.outputs[SAE.name][2] is not None


def test_every_readout_in_one_pass_equals_its_reference(parts, tiny_lm):
    """SAE codes at two K and two exclusion rules, mlp_gate at two K, hidden (mean and
    position-weighted) and NAIT deltas, all from one forward, each against a recomputation from
    the full model's hidden states."""
    from transformers import AutoModelForCausalLM

    lm, sae = parts
    ids = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17, 18, 19, 20, 21, 22]]
    special = [[0, 1, 1, 1, 1, 0], [0, 1, 1], [0] + [1] * 8]
    none = [[1] * len(x) for x in ids]
    ro = [Readout("sae", 2, "special", k=8, sae="s"), Readout("sae", 2, "special", k=3, sae="s"),
          Readout("sae", 1, "none", k=8, sae="s"), Readout("mlp_gate", 2, "special", k=3),
          Readout("mlp_gate", 2, "special", k=6), Readout("hidden", 2, "special"),
          Readout("hidden", 2, "none", weighting="position"), Readout("nait", 2, "special", blocks=(0, 1, 2))]
    eng = FeatureEngine(lm, ro, Batching(token_budget=64, pad_multiple=16), 0, saes={"s": sae})
    res = eng.run(ids, {"special": special, "none": none})
    full = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32).eval()
    for i, x in enumerate(ids):
        with torch.inference_mode():
            hs = full(input_ids=torch.tensor([x]), output_hidden_states=True).hidden_states
            mlp_in = {}
            hk = full.model.layers[2].mlp.register_forward_pre_hook(lambda m, a: mlp_in.__setitem__("x", a[0][0]))
            full(input_ids=torch.tensor([x]))
            hk.remove()
            pre2 = torch.relu(sae.pre_acts(hs[3][0]))
            pre1 = torch.relu(sae.pre_acts(hs[2][0]))
            mlp = full.model.layers[2].mlp
            gate = mlp.act_fn(mlp.gate_proj(mlp_in["x"])).abs()
        sp, nn = torch.tensor(special[i], dtype=torch.bool), torch.tensor(none[i], dtype=torch.bool)

        def codes(acts, k, keep):
            top = acts.topk(k, dim=-1)
            return torch.zeros_like(acts).scatter(1, top.indices, top.values)[keep].mean(0).numpy()

        want = {ro[0].name: codes(pre2, 8, sp), ro[1].name: codes(pre2, 3, sp), ro[2].name: codes(pre1, 8, nn),
                ro[3].name: codes(gate, 3, sp), ro[4].name: codes(gate, 6, sp)}
        for name, ref in want.items():
            np.testing.assert_allclose(dense(res.outputs[name][i], len(ref)), ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(res.outputs[ro[5].name][i], hs[3][0][sp].mean(0).numpy(), rtol=1e-5, atol=1e-6)
        w = torch.arange(1, len(x) + 1, dtype=torch.float32)
        np.testing.assert_allclose(res.outputs[ro[6].name][i], (hs[3][0] * w[:, None]).sum(0).numpy() / w.sum().item(),
                                   rtol=1e-5, atol=1e-5)
        first = special[i].index(1)
        nait = torch.cat([hs[b + 1][0][-1] - hs[b + 1][0][first] for b in (0, 1, 2)]).numpy()
        np.testing.assert_allclose(res.outputs[ro[7].name][i], nait, rtol=1e-5, atol=1e-5)
    # the K of each readout is its own: mlp_gate K=3 pools at most 3 units per token
    assert all(len(res.outputs[ro[3].name][i][0]) <= 3 * len(x) for i, x in enumerate(ids))
    assert eng.width(ro[3]) == 64 and eng.width(ro[7]) == 3 * 32 and eng.width(ro[0]) == 128


def test_an_encode_call_never_exceeds_the_chunk(parts):
    """Explain's token codes come from the same per-row chunks: at most sae_chunk_tokens per call."""
    lm, sae = parts
    seen = []
    eng = FeatureEngine(lm, [SAE], Batching(token_budget=512, pad_multiple=16, sae_chunk_tokens=5), 0, saes={"s": sae},
                        token_hook=lambda r, rows, pos, vals, idx: seen.append((len(set(rows)), vals.shape[0])))
    ids = [list(range(4, 4 + n)) for n in (3, 12, 17)]
    run(eng, ids, [[1] * len(x) for x in ids])
    assert seen and all(rows == 1 and n <= 5 for rows, n in seen)
    assert sum(n for _, n in seen) == 3 + 12 + 17
