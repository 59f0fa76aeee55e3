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

import json

import numpy as np
import pytest
import torch

from mona_ray.core.model import load_truncated
from mona_ray.features.engine import Batching, FeatureEngine
from mona_ray.features.readouts import Readout, rds_readout


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
