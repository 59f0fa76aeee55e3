"""SAE evaluation on a tiny random Llama: exact SAEs give FVU 0 and delta CE 0; a useless
one gives FVU >= 1 and a CE increase; the CLI prints the table and writes JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _tiny_lm import make_rows, make_tiny_lm, write_rows
from mona_ray.sae_training import activations as A
from mona_ray.sae_training.evaluate import evaluate, format_table, load_full_model, token_ce
from mona_ray.core.model import load_tokenizer
from mona_ray.core.sae import SAE, save_sparsify

ROOT = Path(__file__).resolve().parents[1]
D = 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    model = make_tiny_lm(d / "lm", hidden=D)
    return {"model": model, "data": write_rows(d / "rows.parquet", make_rows(400)),
            "lm": load_full_model(model, "float32", "cpu"), "tok": load_tokenizer(model)}


def exact_sae(hookpoint):
    """2d latents [I; -I]: ReLU(x) and ReLU(-x); with K = d every non-zero coordinate is kept,
    so the reconstruction is exact."""
    eye = torch.eye(D)
    W = torch.cat([eye, -eye])
    return SAE(W_enc=W.clone(), b_enc=torch.zeros(2 * D), W_dec=W.clone(), b_dec=torch.zeros(D), k=D,
               hookpoint=hookpoint)


def zero_sae(hookpoint):
    return SAE(W_enc=torch.zeros(2 * D, D), b_enc=torch.zeros(2 * D), W_dec=torch.zeros(2 * D, D),
               b_dec=torch.zeros(D), k=4, hookpoint=hookpoint)


def test_exact_and_zero_saes(tiny):
    rows = A.read_rows(tiny["data"], "heldout", 100, 0)
    m_exact, m_zero = evaluate(tiny["lm"], tiny["tok"], {"layers.1": exact_sae("layers.1"),
                                                         "layers.2": zero_sae("layers.2")}, rows, 64, 512)
    assert m_exact.tokens > 200 and m_exact.tokens == m_zero.tokens
    assert m_exact.fvu < 1e-10 and abs(m_exact.delta_ce) < 1e-5
    assert m_exact.ce_clean == m_zero.ce_clean > 0
    assert 0 < m_exact.l0 <= D and m_exact.dead_frac < 0.5
    assert m_zero.fvu >= 1 and m_zero.delta_ce > 0.01 and m_zero.l0 == 0 and m_zero.dead_frac == 1
    assert "layers.1" in format_table([m_exact, m_zero])


def test_token_ce_ignores_padding():
    logits = torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    att = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    total, n = token_ce(logits, ids, att)
    ref = torch.nn.functional.cross_entropy(logits[0, :4], ids[0, 1:], reduction="sum") + \
        torch.nn.functional.cross_entropy(logits[1, :2], ids[1, 1:3], reduction="sum")
    assert n == 6 and total == pytest.approx(float(ref), rel=1e-5)


def test_cli_writes_table_and_json(tiny, tmp_path):
    save_sparsify(exact_sae("layers.1"), tmp_path / "sae")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "eval.json"
    r = subprocess.run([sys.executable, "-m", "mona_ray.eval_sae", f"model.path={tiny['model']}",
                        f"sae.path={tmp_path / 'sae'}", "hookpoints=[blocks.2.hook_resid_pre]",
                        f"data.path={tiny['data']}", "data.holdout_permille=100", "model.dtype=float32",
                        "render.max_length=64", f"out={out}"], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "FVU" in r.stdout and "layers.1" in r.stdout
    res = json.loads(out.read_text())
    (m,) = res["metrics"]
    assert m["hookpoint"] == "layers.1" and m["fvu"] < 1e-10 and abs(m["delta_ce"]) < 1e-5
    r = subprocess.run([sys.executable, "-m", "mona_ray.eval_sae", f"model.path={tiny['model']}",
                        f"sae.path={tmp_path / 'nothing'}", f"data.path={tiny['data']}"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 2 and "sae.path=" in r.stderr and "Traceback" not in r.stderr
