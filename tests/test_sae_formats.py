"""Each supported SAE format: a small random SAE written in that format's own layout, and
our encoding checked against that format's formula, written out here independently."""

import json

import pytest
import torch
from safetensors.torch import save_file

from mona_ray.core.sae import SAEError, detect_format, load_sae, to_sparsify_hookpoint

D, L = 16, 64


def dense(vals, idx, n=L):
    return torch.zeros(vals.shape[0], n, dtype=torch.float64).scatter_add_(1, idx, vals.double())


def rand_x(n=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g) * 3 + 1


def rand_weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(D, L, generator=g) / D ** 0.5, "b_enc": torch.randn(L, generator=g) * 0.3,
            "W_dec": torch.randn(L, D, generator=g) / D ** 0.5, "b_dec": torch.randn(D, generator=g) * 0.5,
            "threshold": torch.rand(L, generator=g) * 0.8 - 0.2}  # some negative thresholds


def topk_dense(acts, k):
    v, i = acts.topk(k, dim=-1)
    return torch.zeros_like(acts).scatter_(1, i, v)


# ----------------------------------------------------------------------------- sparsify


def write_sparsify(root, hookpoint, w, k, dtype=torch.float32):
    d = root / hookpoint
    d.mkdir(parents=True)
    (d / "cfg.json").write_text(json.dumps({"expansion_factor": L // D, "normalize_decoder": True, "num_latents": 0,
                                            "k": k, "multi_topk": False, "skip_connection": False, "d_in": D}))
    save_file({"encoder.weight": w["W_enc"].T.contiguous().to(dtype), "encoder.bias": w["b_enc"].to(dtype),
               "W_dec": w["W_dec"].to(dtype), "b_dec": w["b_dec"].to(dtype)}, str(d / "sae.safetensors"))


def test_sparsify_topk_matches_formula(tmp_path):
    w = rand_weights()
    write_sparsify(tmp_path, "layers.3", w, k=5)
    sae = load_sae(tmp_path, "auto", "layers.3")
    x = rand_x()
    # sparsify: top-k of ReLU(encoder(x - b_dec))
    pre = torch.relu((x.double() - w["b_dec"].double()) @ w["W_enc"].double() + w["b_enc"].double())
    expect = topk_dense(pre, 5)
    vals, idx = sae.encode(x)
    assert vals.shape == (40, 5)
    torch.testing.assert_close(dense(vals, idx), expect, rtol=1e-5, atol=1e-5)
    # K override and the hookpoint written the SAELens way both work
    sae7 = load_sae(tmp_path, "sparsify", "blocks.3.hook_resid_post", k=7)
    assert sae7.k == 7 and sae7.hookpoint == "layers.3"
    torch.testing.assert_close(dense(*sae7.encode(x)), topk_dense(pre, 7), rtol=1e-5, atol=1e-5)


def test_sparsify_casts_input_to_file_dtype(tmp_path):
    w = rand_weights()
    write_sparsify(tmp_path, "layers.0", w, k=4, dtype=torch.bfloat16)
    sae = load_sae(tmp_path / "layers.0")
    assert sae.dtype == torch.bfloat16
    vals, idx = sae.encode(rand_x().double())
    assert vals.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- SAELens


def write_saelens(d, w, cfg, keys=("W_enc", "b_enc", "W_dec", "b_dec")):
    d.mkdir(parents=True, exist_ok=True)
    (d / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: w[k].contiguous() for k in keys}, str(d / "sae_weights.safetensors"))


def old_cfg(**kw):
    base = {"d_in": D, "d_sae": L, "hook_point": "blocks.4.hook_resid_pre", "hook_point_layer": 4,
            "model_name": "tiny", "dtype": "float32", "device": "cpu", "activation_fn_str": "relu",
            "apply_b_dec_to_input": True, "normalize_activations": "none", "sae_lens_training_version": "3.0.0"}
    base.update(kw)
    return base


def v6_cfg(architecture, meta=None, **kw):
    base = {"d_in": D, "d_sae": L, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
            "normalize_activations": "none", "reshape_activations": "none", "architecture": architecture,
            "metadata": {"model_name": "tiny", "hook_name": "blocks.4.hook_resid_post", "sae_lens_version": "6.5.0",
                         **(meta or {})}}
    base.update(kw)
    return base


def saelens_pre(x, w, apply_b_dec=True, norm="none"):
    """SAELens: norm_in(x) - b_dec * apply_b_dec_to_input, then @ W_enc + b_enc."""
    x = x.double()
    if norm == "constant_norm_rescale":
        x = x * D ** 0.5 / x.norm(dim=-1, keepdim=True)
    elif norm == "layer_norm":
        x = x - x.mean(-1, keepdim=True)
        x = x / (x.std(-1, keepdim=True) + 1e-5)
    if apply_b_dec:
        x = x - w["b_dec"].double()
    return x @ w["W_enc"].double() + w["b_enc"].double()


@pytest.mark.parametrize("norm", ["none", "constant_norm_rescale", "layer_norm"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_saelens_standard_old_flat_cfg(tmp_path, norm, apply_b_dec):
    w = rand_weights()
    write_saelens(tmp_path / "sae", w, old_cfg(normalize_activations=norm, apply_b_dec_to_input=apply_b_dec))
    sae = load_sae(tmp_path / "sae", hookpoint="layers.3")
    assert sae.activation == "relu" and sae.k is None and sae.hookpoint == "layers.3"
    x = rand_x()
    expect = torch.relu(saelens_pre(x, w, apply_b_dec, norm))
    torch.testing.assert_close(dense(*sae.encode(x)), expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", ["none", "constant_norm_rescale", "layer_norm"])
def test_saelens_reconstruct_undoes_normalisation(tmp_path, norm):
    w = rand_weights()
    write_saelens(tmp_path / "sae", w, old_cfg(normalize_activations=norm))
    sae = load_sae(tmp_path / "sae")
    x = rand_x().double()
    feats = torch.relu(saelens_pre(x, w, True, norm))
    out = feats @ w["W_dec"].double() + w["b_dec"].double()
    if norm == "constant_norm_rescale":
        out = out / (D ** 0.5 / x.norm(dim=-1, keepdim=True))
    elif norm == "layer_norm":
        mu = x.mean(-1, keepdim=True)
        out = out * (x - mu).std(-1, keepdim=True) + mu
    torch.testing.assert_close(sae.reconstruct(x).double(), out, rtol=1e-4, atol=1e-4)


def test_saelens_topk_v6_with_metadata(tmp_path):
    w = rand_weights()
    write_saelens(tmp_path / "sae", w, v6_cfg("topk", k=6))
    sae = load_sae(tmp_path / "sae", "saelens", "layers.4")
    assert sae.k == 6 and sae.activation == "topk" and sae.hookpoint == "layers.4"
    x = rand_x()
    # SAELens TopK: top-k of the pre-activations, then ReLU on them
    pre = saelens_pre(x, w)
    v, i = pre.topk(6, dim=-1)
    expect = torch.zeros_like(pre).scatter_(1, i, torch.relu(v))
    torch.testing.assert_close(dense(*sae.encode(x)), expect, rtol=1e-5, atol=1e-5)


def test_saelens_topk_old_cfg_kwargs_and_decoder_norm_rescaling(tmp_path):
    w = rand_weights()
    write_saelens(tmp_path / "a", w, old_cfg(activation_fn_str="topk", activation_fn_kwargs={"k": 4}))
    sae = load_sae(tmp_path / "a")
    assert sae.k == 4 and sae.activation == "topk"
    # rescale_acts_by_decoder_norm: TopK on pre * |W_dec row|; decode divides the norms back out
    write_saelens(tmp_path / "b", w, v6_cfg("topk", k=4, rescale_acts_by_decoder_norm=True))
    sae = load_sae(tmp_path / "b")
    x = rand_x()
    pre = saelens_pre(x, w) * w["W_dec"].double().norm(dim=-1)
    v, i = pre.topk(4, dim=-1)
    feats = torch.zeros_like(pre).scatter_(1, i, torch.relu(v))
    torch.testing.assert_close(dense(*sae.encode(x)), feats, rtol=1e-5, atol=1e-5)
    out = (feats / w["W_dec"].double().norm(dim=-1)) @ w["W_dec"].double() + w["b_dec"].double()
    torch.testing.assert_close(sae.reconstruct(x).double(), out, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cfg_style", ["v6", "old"])
def test_saelens_jumprelu(tmp_path, cfg_style):
    w = rand_weights()
    cfg = v6_cfg("jumprelu") if cfg_style == "v6" else old_cfg(architecture="jumprelu")
    write_saelens(tmp_path / "sae", w, cfg, keys=("W_enc", "b_enc", "W_dec", "b_dec", "threshold"))
    sae = load_sae(tmp_path / "sae")
    x = rand_x()
    pre = saelens_pre(x, w)
    # SAELens JumpReLU: ReLU(pre) * (pre > threshold); a negative threshold never lets a negative through
    expect = torch.relu(pre) * (pre > w["threshold"].double())
    got = dense(*sae.encode(x))
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
    assert (got >= 0).all() and (w["threshold"] < 0).any()


def test_saelens_expected_average_only_in_is_identity_at_inference(tmp_path):
    w = rand_weights()
    write_saelens(tmp_path / "sae", w, old_cfg(normalize_activations=True))  # old bool form
    x = rand_x()
    torch.testing.assert_close(dense(*load_sae(tmp_path / "sae").encode(x)), torch.relu(saelens_pre(x, w)),
                               rtol=1e-5, atol=1e-5)


def test_saelens_cfg_dtype_is_applied(tmp_path):
    w = rand_weights()
    write_saelens(tmp_path / "sae", w, v6_cfg("topk", k=3, dtype="torch.bfloat16"))
    assert load_sae(tmp_path / "sae").dtype == torch.bfloat16


def test_saelens_release_folder_picks_the_hook(tmp_path):
    w0, w1 = rand_weights(0), rand_weights(1)
    write_saelens(tmp_path / "blocks.2.hook_resid_pre", w0, old_cfg(hook_point="blocks.2.hook_resid_pre"))
    write_saelens(tmp_path / "blocks.5.hook_resid_post", w1, v6_cfg("jumprelu", meta={
        "hook_name": "blocks.5.hook_resid_post"}), keys=("W_enc", "b_enc", "W_dec", "b_dec", "threshold"))
    assert detect_format(tmp_path, "layers.1") == "saelens"
    a = load_sae(tmp_path, hookpoint="layers.1")
    b = load_sae(tmp_path, hookpoint="blocks.5.hook_resid_post")
    assert a.hookpoint == "layers.1" and b.hookpoint == "layers.5" and b.activation == "jumprelu"
    torch.testing.assert_close(a.W_enc, w0["W_enc"].T)
    with pytest.raises(SAEError, match="hooks found"):
        load_sae(tmp_path, hookpoint="layers.7")


def test_saelens_hookpoint_mismatch_and_unsupported(tmp_path):
    w = rand_weights()
    write_saelens(tmp_path / "a", w, old_cfg())
    with pytest.raises(SAEError, match=r"set sae.hookpoint=layers.3"):
        load_sae(tmp_path / "a", hookpoint="layers.4")
    write_saelens(tmp_path / "b", w, old_cfg(hook_point="blocks.0.hook_resid_pre"))
    with pytest.raises(SAEError, match="embedding"):
        load_sae(tmp_path / "b")
    write_saelens(tmp_path / "c", w, v6_cfg("gated"))
    with pytest.raises(SAEError, match="gated"):
        load_sae(tmp_path / "c")
    write_saelens(tmp_path / "d", w, v6_cfg("jumprelu"))  # no threshold tensor
    with pytest.raises(SAEError, match="threshold"):
        load_sae(tmp_path / "d")


# ----------------------------------------------------------------------------- hookpoints and errors


def test_hookpoint_names():
    assert to_sparsify_hookpoint("layers.7") == "layers.7"
    assert to_sparsify_hookpoint("model.layers.7") == "layers.7"
    assert to_sparsify_hookpoint("blocks.7.hook_resid_post") == "layers.7"
    assert to_sparsify_hookpoint("blocks.7.hook_resid_pre") == "layers.6"
    with pytest.raises(SAEError, match="embedding"):
        to_sparsify_hookpoint("blocks.0.hook_resid_pre")
    with pytest.raises(SAEError, match="not a residual-stream"):
        to_sparsify_hookpoint("blocks.3.hook_mlp_out")


def test_resid_pre_of_block_n_is_output_of_block_n_minus_1():
    """Pins the mapping on a real (tiny) Llama: the input of block N is the output of block N-1."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    got = {}
    h1 = model.model.layers[2].register_forward_pre_hook(
        lambda m, args, kwargs: got.__setitem__("pre3", (args[0] if args else kwargs["hidden_states"]).clone()),
        with_kwargs=True)
    h2 = model.model.layers[1].register_forward_hook(
        lambda m, i, o: got.__setitem__("post1", (o[0] if isinstance(o, tuple) else o).clone()))
    with torch.no_grad():
        model(torch.randint(0, 50, (2, 9)))
    h1.remove(), h2.remove()
    assert to_sparsify_hookpoint("blocks.2.hook_resid_pre") == "layers.1"
    torch.testing.assert_close(got["pre3"], got["post1"])


def test_missing_paths_name_the_override(tmp_path):
    with pytest.raises(SAEError, match=r"sae.path=.*Set sae.path="):
        load_sae(tmp_path / "nowhere", hookpoint="layers.3")
    with pytest.raises(SAEError, match=r"sae.format='gguf' is not supported"):
        load_sae(tmp_path, format="gguf", hookpoint="layers.3")
    (tmp_path / "layers.3").mkdir()
    with pytest.raises(SAEError, match=r"sae.path="):
        load_sae(tmp_path, format="sparsify", hookpoint="layers.3")
