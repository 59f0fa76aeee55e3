"""The SAE trainer on a tiny random Llama: real model, real activations, real training."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _tiny_lm import make_rows, make_tiny_lm, write_rows
from mona_ray.config import load_config, to_typed
from mona_ray.sae_training import trainer as T
from mona_ray.core.sae import SAEError, load_sae
from mona_ray.sae_training.train import TrainSettings, load_checkpoint, lr_at, settings_fingerprint, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    return {"model": make_tiny_lm(d / "lm"), "data": write_rows(d / "rows.parquet", make_rows(600))}


def train_cfg(tiny, out, cache=None, *extra):
    overrides = [f"model.path={tiny['model']}", f"data.path={tiny['data']}", f"out_dir={out}",
                 "hookpoints=[layers.1,layers.2]", "model.dtype=float32", "model.device=cpu",
                 "render.max_length=64", "torch_threads=1", "sae.expansion_factor=4", "sae.k=4",
                 "train.batch_size=256", "train.steps=80", "train.checkpoint_every=40", "train.lr=0.003",
                 "train.lr_warmup_steps=5", "train.dead_tokens=5000", "collect.batch_tokens=1024",
                 "collect.shard_tokens=2000", "collect.tokens=8000", "heldout.tokens=2000",
                 "data.holdout_permille=100", f"cache_dir={cache if cache else 'null'}", *extra]
    return to_typed(load_config(overrides, "train_sae"))


def read_log(out, heldout=False):
    recs = [json.loads(line) for line in (Path(out) / "train_log.jsonl").read_text().splitlines()]
    return [r for r in recs if ("heldout" in r) == heldout]


def test_trains_two_layers_from_a_cache_and_resumes(tiny, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    cfg = train_cfg(tiny, out, cache, "train.steps=40")
    train(cfg)
    prog = json.loads((cache / "progress.json").read_text())
    assert prog["tokens"] >= 8000 and prog["shards"] >= 4
    assert sorted(p.name for p in (cache / "layers.1").iterdir()) == [f"shard_{i:05d}.safetensors"
                                                                      for i in range(prog["shards"])]
    # resume with more steps: starts at the checkpoint, the cache is not collected again
    states = train(train_cfg(tiny, out, cache))
    assert json.loads((cache / "progress.json").read_text()) == prog
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(10, 90, 10))
    ev = read_log(out, heldout=True)
    assert [r["step"] for r in ev] == [40, 80]
    assert (cache / "heldout_rows" / "layers.2" / "shard_00000.safetensors").exists()
    for h in ("layers.1", "layers.2"):
        first, last = log[0][h]["fvu"], log[-1][h]["fvu"]
        assert last < 0.7 * first, (h, first, last)
        assert ev[1]["heldout"][h]["fvu"] < ev[0]["heldout"][h]["fvu"] < 1
        assert ev[1]["heldout"][h]["l0"] <= 4
        assert states[h].step == 80 and states[h].tokens == 80 * 256
        sae = load_sae(out, "auto", h)
        assert sae.num_latents == 128 and sae.k == 4 and sae.dtype == torch.bfloat16 and sae.d_in == 32
        cfg_json = json.loads((out / h / "cfg.json").read_text())
        assert cfg_json["trained_steps"] == 80 and "provisional" not in cfg_json
        assert cfg_json["heldout"] == ev[1]["heldout"][h]
        assert torch.allclose(sae.W_dec.float().norm(dim=-1), torch.ones(128), atol=1e-2)
    ck = load_checkpoint(out, "layers.2", settings_fingerprint(cfg))
    assert ck.step == 80 and set(ck.opt) == {f"{p}.{m}" for p in ("W_enc", "b_enc", "W_dec", "b_dec") for m in "mv"}


def test_exported_sae_takes_raw_activations(tiny, tmp_path):
    """The saved SAE reproduces the training-space reconstruction on raw activations."""
    from mona_ray.sae_training import activations as A

    out, cache = tmp_path / "out", tmp_path / "cache"
    cfg = train_cfg(tiny, out, cache, "train.steps=30", "save_dtype=float32")
    states = train(cfg)
    x = A.load_shard(A.cached_shards(cache, "layers.2")[0]).float()[:500]
    st = states["layers.2"]
    xs = x * st.scale
    pre, idx = T.select(xs - st.params["b_dec"], st.params["W_enc"], st.params["b_enc"], 4, torch.float32)
    vals = torch.relu(pre.gather(1, idx))
    recon_train = T.decode_sparse(vals, idx, st.params["W_dec"]) + st.params["b_dec"]
    sae = load_sae(out, "sparsify", "layers.2")
    torch.testing.assert_close(sae.reconstruct(x), recon_train / st.scale, rtol=1e-4, atol=1e-4)


def test_warm_start_continues_from_an_exported_sae(tiny, tmp_path):
    """init_from maps an exported SAE back into the training space exactly (a vanishing lr
    leaves it unchanged), continues training from it, and refuses another width."""
    from mona_ray.sae_training import activations as A

    first, cache = tmp_path / "first", tmp_path / "cache"
    train(train_cfg(tiny, first, cache, "train.steps=30", "save_dtype=float32",
                    "hookpoints=[layers.2]"))
    x = A.load_shard(A.cached_shards(cache, "layers.2")[0]).float()[:500]
    src = load_sae(first, "sparsify", "layers.2")
    same = tmp_path / "same"
    train(train_cfg(tiny, same, cache, f"init_from={first}", "train.steps=1",
                    "train.lr=1e-12", "save_dtype=float32", "hookpoints=[layers.2]"))
    torch.testing.assert_close(load_sae(same, "sparsify", "layers.2").reconstruct(x), src.reconstruct(x),
                               rtol=1e-4, atol=1e-4)
    # continuing for 10 steps starts from the first SAE's quality, far below a fresh start's
    warm, fresh = tmp_path / "warm", tmp_path / "fresh"
    for out, extra in ((warm, [f"init_from={first}"]), (fresh, [])):
        train(train_cfg(tiny, out, cache, "train.steps=10", "train.checkpoint_every=10",
                        "hookpoints=[layers.2]", *extra))
    fvu = {o.name: read_log(o, heldout=True)[-1]["heldout"]["layers.2"]["fvu"] for o in (warm, fresh, first)}
    assert fvu["warm"] < fvu["fresh"] and fvu["warm"] < 1.5 * fvu["first"], fvu
    with pytest.raises(SAEError, match="init_from"):
        train(train_cfg(tiny, tmp_path / "wide", cache, f"init_from={first}",
                        "hookpoints=[layers.2]", "sae.expansion_factor=8"))
    # an SAE for another model (16-dimensional inputs; this model's are 32) is refused, not crashed on
    from mona_ray.core.sae import SAE, save_sparsify

    W = torch.randn(64, 16)
    save_sparsify(SAE(W_enc=W, b_enc=torch.zeros(64), W_dec=W.clone(), b_dec=torch.zeros(16), k=4,
                      hookpoint="layers.2"), tmp_path / "other")
    with pytest.raises(SAEError, match="16-dimensional inputs"):
        train(train_cfg(tiny, tmp_path / "other_out", cache, f"init_from={tmp_path / 'other'}",
                        "hookpoints=[layers.2]"))


def test_streamed_mode_and_provisional_flag(tiny, tmp_path):
    out = tmp_path / "out"
    train(train_cfg(tiny, out, None, "train.steps=20", "provisional=true",
                    "hookpoints=[layers.3]"))
    cfg_json = json.loads((out / "layers.3" / "cfg.json").read_text())
    assert cfg_json["provisional"] is True and cfg_json["trained_tokens"] == 20 * 256
    assert load_sae(out, hookpoint="layers.3").meta["provisional"] is True


def test_changed_settings_refuse_to_resume(tiny, tmp_path):
    out = tmp_path / "out"
    train(train_cfg(tiny, out, None, "train.steps=10", "hookpoints=[layers.1]"))
    with pytest.raises(SAEError, match="out_dir"):
        train(train_cfg(tiny, out, None, "train.steps=10", "hookpoints=[layers.1]",
                        "sae.k=8"))


def test_cli_trains_and_reports_bad_paths(tiny, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    base = [sys.executable, "-m", "mona_ray.train_sae", f"model.path={tiny['model']}",
            "model.dtype=float32", "model.device=cpu", "hookpoints=[layers.0]",
            "torch_threads=1",
            "sae.expansion_factor=2", "sae.k=2", "train.batch_size=128",
            "train.steps=5", "render.max_length=32"]
    r = subprocess.run(base + [f"data.path={tiny['data']}", f"out_dir={tmp_path / 'o'}"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "fvu" in r.stderr and (tmp_path / "o" / "layers.0" / "sae.safetensors").exists()
    r = subprocess.run(base + [f"data.path={tmp_path / 'missing.parquet'}",
                               f"out_dir={tmp_path / 'o2'}"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 2 and "data.path=" in r.stderr and "Traceback" not in r.stderr


def test_bad_model_path_names_the_override(tiny, tmp_path):
    with pytest.raises(SAEError, match="model.path='/nowhere'.*Set model.path="):
        train(train_cfg(tiny, tmp_path / "o", None, "model.path=/nowhere"))


def test_checkpoint_fingerprint_is_unchanged_by_the_typed_config():
    """Checkpoints written before the settings were renamed (sae_train.model -> model.path,
    max_length -> render.max_length) still resume: the values pinned here were computed with
    the untyped config."""
    assert settings_fingerprint(to_typed(load_config(["data.path=/data/pool.parquet", "out_dir=/o"], "train_sae"))) == \
        "9a90accf7be71da8"
    cfg = to_typed(load_config(["sae_train=smollm2", "data.path=/data/pool.parquet", "init_from=/w",
                                "render.system_prompt=hi", "render.max_length=64"], "train_sae"))
    assert settings_fingerprint(cfg) == "c887b08cad2a2eb0"


# ----------------------------------------------------------------------------- math


def test_sparse_encoder_gradient_equals_dense_autograd():
    g = torch.Generator().manual_seed(0)
    xc = torch.randn(7, 5, dtype=torch.double, generator=g).requires_grad_()
    W = torch.randn(13, 5, dtype=torch.double, generator=g).requires_grad_()
    b = torch.randn(13, dtype=torch.double, generator=g).requires_grad_()
    idx = torch.randint(0, 13, (7, 3), generator=g)
    w = torch.randn(7, 3, dtype=torch.double, generator=g)
    (T.encode_selected(xc, W, b, idx, (xc @ W.T + b).detach()) * w).sum().backward()
    sparse = [t.grad.clone() for t in (xc, W, b)]
    for t in (xc, W, b):
        t.grad = None
    ((xc @ W.T + b).gather(1, idx) * w).sum().backward()
    for a, t in zip(sparse, (xc, W, b)):
        torch.testing.assert_close(a, t.grad)


def test_decoder_constraint_and_auxk():
    torch.manual_seed(0)
    x = torch.randn(512, 8) * 2 + 1
    params, scale = T.init_params(x, 32, seed=0)
    torch.testing.assert_close(params["W_enc"], params["W_dec"])  # encoder = decoder transpose
    assert math.isclose((x * scale).pow(2).sum(-1).mean().item(), 8, rel_tol=1e-4)
    opt, since = {}, torch.zeros(32, dtype=torch.long)
    since[:10] = 10_000  # ten latents dead from the start: AuxK must be active and reach them
    before = params["W_enc"][:10].clone()
    st = T.train_step(params, opt, since, x * scale, 1, k=2, lr=1e-2, auxk_alpha=1 / 32, k_aux=4, dead_tokens=5000)
    assert st.auxk > 0 and st.dead_frac == pytest.approx(10 / 32)
    torch.testing.assert_close(params["W_dec"].norm(dim=-1), torch.ones(32))
    assert not torch.allclose(params["W_enc"][:10], before)


def test_parallel_gradient_is_removed():
    W = torch.nn.functional.normalize(torch.randn(6, 4), dim=-1).requires_grad_()
    W.grad = torch.randn(6, 4)
    T.remove_parallel_grad(W)
    assert W.grad.grad_fn is None  # outside autograd: otherwise every step's graph is kept alive
    torch.testing.assert_close((W.grad * W).detach().sum(-1), torch.zeros(6), atol=1e-6, rtol=0)


def test_lr_schedule_and_geometric_median():
    s = TrainSettings(steps=100, lr_warmup_steps=10, lr_decay_frac=0.2)
    assert lr_at(1, 1.0, s) == pytest.approx(0.1) and lr_at(50, 1.0, s) == 1.0
    assert lr_at(100, 1.0, s) == pytest.approx(1 / 20) and lr_at(90, 1.0, s) == pytest.approx(11 / 20)
    assert T.default_lr(2 ** 14) == pytest.approx(2e-4) and T.default_lr(4 * 2 ** 14) == pytest.approx(1e-4)
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]])
    gm = T.geometric_median(pts)
    assert gm.norm() < 1.0 < pts.mean(0).norm()  # robust to the outlier, unlike the mean


def test_shuffled_batches_skip_and_cover(tmp_path):
    from itertools import islice

    from mona_ray.sae_training import activations as A

    x = torch.arange(600, dtype=torch.float32)[:, None].repeat(1, 3)
    A.write_shard_set(tmp_path, 0, {"h": x[:250]}, torch.float32)
    A.write_shard_set(tmp_path, 1, {"h": x[250:]}, torch.float32)
    shards = [tmp_path / "h" / f"shard_{i:05d}.safetensors" for i in range(2)]
    full = list(islice(A.shuffled_batches(shards, 100, seed=3, shards_in_memory=1), 12))
    again = list(islice(A.shuffled_batches(shards, 100, seed=3, shards_in_memory=1, skip_batches=7), 5))
    for a, b in zip(full[7:], again):
        torch.testing.assert_close(a, b)
    first_pass = torch.cat(full[:5])[:, 0]  # one pass = 2 + 3 batches, each token at most once
    assert first_pass.unique().numel() == 500
    with pytest.raises(A.ActivationError, match="batch_size"):
        next(A.shuffled_batches(shards, 1000, seed=0))


def test_heldout_set_is_whole_rows(tiny, tmp_path):
    """The held-out metric uses every kept token of a prefix of the held-out rows, not the
    shortest rows that a token cut of a length-sorted stream would keep."""
    from mona_ray.sae_training import activations as A
    from mona_ray.core.model import load_tokenizer

    tok = load_tokenizer(tiny["model"])
    rows = A.read_rows(tiny["data"], "heldout", 100, 0)
    kept = [sum(t.keep) for t in A.tokenize_rows(rows, tok, 64)]
    chosen = A.rows_for_tokens(rows, tok, 300, 64)
    n = len(chosen)
    assert sum(kept[:n]) >= 300 > sum(kept[: n - 1]) and chosen == rows[:n]
    cache = tmp_path / "cache"
    train(train_cfg(tiny, tmp_path / "out", cache, "train.steps=1", "heldout.tokens=300",
                    "train.checkpoint_every=1"))
    got = A.load_shard(A.cached_shards(cache / "heldout_rows", "layers.1")[0])
    assert got.shape[0] == sum(kept[:n])
