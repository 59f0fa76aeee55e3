"""The truncated model returns exactly the sparsify hookpoint; bad paths fail clearly."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from mona_ray.core.model import ModelError, load_tokenizer, load_truncated, parse_hookpoint, resolve_model_path


def test_hookpoint_names():
    assert parse_hookpoint("layers.30") == 30
    assert parse_hookpoint("model.layers.2") == 2
    with pytest.raises(ModelError, match="layers.N"):
        parse_hookpoint("blocks.3.hook_resid_post")


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_layers_n_is_hidden_states_n_plus_1(tiny_lm, layer):
    full = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32).eval()
    lm = load_truncated(tiny_lm, layer, dtype="float32", device="cpu")
    assert len(lm.model.layers) == layer + 1  # later blocks are never built
    ids = torch.tensor([[5, 9, 12, 7, 30, 8]])
    att = torch.ones_like(ids)
    with torch.inference_mode():
        hs = full(input_ids=ids, attention_mask=att, output_hidden_states=True).hidden_states
        torch.testing.assert_close(lm(ids, att), hs[layer + 1], rtol=0, atol=1e-6)


def test_last_layer_is_the_block_output_not_the_final_norm(tiny_lm):
    full = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32).eval()
    last = full.config.num_hidden_layers - 1
    seen = {}
    full.model.layers[last].register_forward_hook(lambda m, i, o: seen.setdefault("out", o[0] if isinstance(o, tuple) else o))
    ids = torch.tensor([[5, 9, 12, 7]])
    att = torch.ones_like(ids)
    with torch.inference_mode():
        hs = full(input_ids=ids, attention_mask=att, output_hidden_states=True).hidden_states
        got = load_truncated(tiny_lm, last, dtype="float32", device="cpu")(ids, att)
    torch.testing.assert_close(got, seen["out"], rtol=0, atol=1e-6)
    assert not torch.allclose(got, hs[last + 1])  # HF's last entry has the final norm applied


def test_out_of_range_layer_and_missing_path(tiny_lm, tmp_path):
    with pytest.raises(ModelError, match=r"out of range.*0\.\.3"):
        load_truncated(tiny_lm, 4, device="cpu")
    with pytest.raises(ModelError, match=r"model\.path=.*set model\.path="):
        resolve_model_path(str(tmp_path / "nope"))


def test_tokenizer_has_pad(tiny_lm):
    assert load_tokenizer(tiny_lm).pad_token_id is not None


def test_right_padded_batch_runs_causal_only_and_matches_the_masked_forward(tiny_lm):
    """A right-padded batch runs without its padding mask (SDPA's causal path); at real
    positions it gives what the full model gives with the mask, and what each row gives
    alone, unpadded. A mask that is not right padding is passed through."""
    from mona_ray.core.model import right_padded

    full = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32).eval()
    lm = load_truncated(tiny_lm, 2, dtype="float32", device="cpu")
    rows = [[5, 9, 12, 7, 30, 8, 11, 4], [6, 3, 17], [21, 22, 23, 24, 25]]
    T = 8
    ids = torch.zeros((3, T), dtype=torch.long)
    att = torch.zeros((3, T), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = torch.tensor(r)
        att[b, :len(r)] = 1
    assert right_padded(att) and not right_padded(att.flip(1))
    seen = []
    lm.model.register_forward_pre_hook(lambda m, a, kw: seen.append((kw["attention_mask"], lm.batch_mask)),
                                       with_kwargs=True)
    with torch.inference_mode():
        got = lm(ids, att)
        masked = full(input_ids=ids, attention_mask=att, output_hidden_states=True).hidden_states[3]
        for b, r in enumerate(rows):
            real = att[b].bool()
            torch.testing.assert_close(got[b][real], masked[b][real], rtol=0, atol=1e-6)
            torch.testing.assert_close(got[b][real], lm(ids[b:b + 1, :len(r)], att[b:b + 1, :len(r)])[0],
                                       rtol=0, atol=1e-6)
        assert seen[0][0] is None and seen[0][1] is att  # no mask to the model; hooks still see it
        assert lm.batch_mask is None  # cleared after the call
        left = att.flip(1)  # left padding: the mask is needed and is passed through
        lm(ids.flip(1), left)
        assert seen[-1][0] is left


def test_auto_dtype_is_bf16_only_where_it_is_native():
    """The decision, not the machine: emulated bf16 (AVX2-only CPUs) is slower than fp32."""
    from mona_ray.core.model import choose_auto_dtype

    assert choose_auto_dtype("cpu")[0] == torch.float32
    dt, why = choose_auto_dtype("cpu", cpu_bf16=False, cpu_amx=False)
    assert dt == torch.float32 and "without native bf16" in why
    assert choose_auto_dtype("cpu", cpu_bf16=True)[0] == torch.bfloat16
    assert choose_auto_dtype("cpu", cpu_amx=True) == (torch.bfloat16, "auto: CPU with native bf16 (AMX)")
    assert choose_auto_dtype("cuda", cuda_bf16=True)[0] == torch.bfloat16
    assert choose_auto_dtype("cuda", cuda_bf16=False)[0] == torch.float32


def test_sae_stored_in_bf16_computes_in_the_models_dtype(tiny_lm, tiny_sae, tmp_path):
    from mona_ray.core.sae import load_sae, save_sparsify
    from mona_ray.features.engine import Batching
    from mona_ray.features.readouts import Readout
    from mona_ray.features.spec import EngineJob, sae_ref
    from mona_ray.pipeline.stages import EmbedActor

    bf16 = load_sae(tiny_sae, hookpoint="layers.2").to(dtype=torch.bfloat16)
    save_sparsify(bf16, tmp_path / "sae_bf16")
    assert load_sae(tmp_path / "sae_bf16", hookpoint="layers.2").dtype == torch.bfloat16  # stored in bf16
    ref = sae_ref(tmp_path / "sae_bf16", "sparsify", "layers.2")
    job = EngineJob(model_dir=str(tiny_lm), dtype="float32", device="cpu",
                    readouts=(Readout("sae", 2, "special", k=ref.k, sae=ref.key),), saes=(ref,),
                    batching=Batching(token_budget=256, max_batch_rows=8, sae_chunk_tokens=64), torch_threads=1)
    actor = EmbedActor(job)
    assert actor.engine.lm.dtype == torch.float32 and actor.engine.saes[ref.key].dtype == torch.float32
