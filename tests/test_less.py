"""LESS's pieces (issue 32) against the code its authors run: peft's LoRA, TRAK's projector,
Hugging Face's learning-rate schedule, and their gradient collection and matching
(``collect_grad_reps.py``, ``matching.py``) written here from their code on peft + TRAK.
"""

from __future__ import annotations

import copy

import numpy as np
import peft
import pytest
import torch
import trak.projectors as trak_projectors

from _tiny_lm import make_rows

from mona_ray.core.records import normalize_record
from mona_ray.features import gradients as G
from mona_ray.scoring.less import checkpoint_weights, less_scores, unit_rows

SPEC = G.LoraSpec(rank=8, alpha=32.0, dropout=0.1)


@pytest.fixture(scope="module")
def lm(tiny_lm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32)
    return tiny_lm, tok, model


def rows_of(tok, n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    return [G.labelled(normalize_record(r), tok, 64) for r in make_rows(n, seed=seed)]


def peft_twin(tiny_lm, ours, params):
    """The same base model through ``peft.get_peft_model``, its adapters set to ours."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32)
    cfg = peft.LoraConfig(task_type=peft.TaskType.CAUSAL_LM, r=SPEC.rank, lora_alpha=SPEC.alpha,
                          lora_dropout=SPEC.dropout, target_modules=list(SPEC.modules))
    twin = peft.get_peft_model(base, cfg)
    theirs = [(n, p) for n, p in twin.named_parameters() if p.requires_grad]
    assert len(theirs) == len(params)
    with torch.no_grad():
        for (n_t, p_t), (n_o, p_o) in zip(theirs, params):
            # the same module and matrix, in the same order: ...layers.0.self_attn.q_proj.lora_A(.default).weight
            assert n_t.replace(".default", "").endswith(n_o), (n_t, n_o)
            p_t.copy_(p_o)
    twin.eval()
    return twin, theirs


def flat_grad(loss, params):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, [p for _, p in params])])


def test_lora_equals_peft(lm):
    tiny_lm, tok, base = lm
    model = copy.deepcopy(base)
    torch.manual_seed(0)
    params = G.add_lora(model, SPEC)
    with torch.no_grad():  # B starts at zero; make the adapters matter
        for _, p in params:
            p.normal_(0, 0.1)
    model.eval()
    twin, theirs = peft_twin(tiny_lm, model, params)
    ids, labels = rows_of(tok, 1, seed=5)[0]
    assert G.has_labels(labels) and labels.count(G.IGNORE) > 0  # the prompt is masked, the answer is not
    ours = G.row_loss(model, ids, labels)
    ref = twin(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(G.row_gradient(model, params, ids, labels), flat_grad(ref, theirs), rtol=1e-5, atol=1e-7)
    assert len(G.row_gradient(model, params, ids, labels)) == sum(p.numel() for _, p in theirs)


def test_labels_are_the_assistant_tokens(lm):
    _, tok, _ = lm
    msgs = [{"role": "user", "content": "add two and three"}, {"role": "assistant", "content": "five"}]
    ids, labels = G.labelled(msgs, tok, 64)
    shown = [tok.convert_ids_to_tokens(t) for t in labels if t != G.IGNORE]
    assert shown == ["five"]
    assert len(ids) == len(labels)


@pytest.mark.parametrize("grad_dim,proj_dim,block", [(257, 300, 128), (1000, 64, 128), (50, 512, 100)])
def test_projector_equals_trak(grad_dim, proj_dim, block):
    g = torch.randn(5, grad_dim, generator=torch.Generator().manual_seed(1))
    ref = trak_projectors.BasicProjector(grad_dim=grad_dim, proj_dim=proj_dim, seed=0,
                                         proj_type=trak_projectors.ProjectionType.rademacher, device="cpu",
                                         block_size=block, dtype=torch.float32)
    ours = G.RademacherProjector(grad_dim, proj_dim, seed=0, block_size=block)
    assert torch.equal(ours.project(g), ref.project(g, model_id=0))


def test_warmup_schedule_is_hugging_faces(lm):
    from transformers import get_linear_schedule_with_warmup

    _, tok, base = lm
    model = copy.deepcopy(base)
    torch.manual_seed(0)
    params = G.add_lora(model, SPEC)
    spec = G.WarmupSpec(epochs=3, accumulation=4, lr=1e-3, warmup_ratio=0.2)
    rows = rows_of(tok, 10, seed=3)
    ckpts = G.warm_up(model, params, rows, spec)
    per_epoch, total = 3, 9  # ceil(10 / 4) steps an epoch
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=spec.lr)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=total)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [c.mean_lr for c in ckpts] == pytest.approx([np.mean(lrs[e * per_epoch:(e + 1) * per_epoch])
                                                        for e in range(3)])
    assert [c.epoch for c in ckpts] == [1, 2, 3] and all(len(c.losses) == per_epoch for c in ckpts)
    assert ckpts[-1].losses[-1] < ckpts[0].losses[0]  # it learns
    assert ckpts[0].exp_avg.shape == ckpts[0].exp_avg_sq.shape == (sum(p.numel() for _, p in params),)
    assert not torch.equal(ckpts[0].lora[params[1][0]], ckpts[2].lora[params[1][0]])


# ----------------------------------------------------------------------------- the authors' pipeline


def authors_features(twin, theirs, rows, ckpt, proj_dim: int, adam: bool) -> torch.Tensor:
    """``collect_grads`` as written: batch size 1, ``model(**batch).loss.backward()``, Adam's
    direction from the checkpoint's moments (``obtain_gradients_with_adam``) or the plain gradient,
    16 rows at a time stacked in float16 and projected by TRAK's BasicProjector (seed 0, block 128,
    the model's dtype), then ``merge_and_normalize_info``'s unit rows."""
    with torch.no_grad():
        for n, p in theirs:
            key = next(k for k in ckpt.lora if n.replace(".default", "").endswith(k))
            p.copy_(ckpt.lora[key])
    dim = sum(p.numel() for _, p in theirs)
    proj = trak_projectors.BasicProjector(grad_dim=dim, proj_dim=proj_dim, seed=0,
                                          proj_type=trak_projectors.ProjectionType.rademacher, device="cpu",
                                          dtype=torch.float32, block_size=128, max_batch_size=16)
    full, out = [], []
    for ids, labels in rows:
        loss = twin(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                    labels=torch.tensor([labels])).loss
        loss.backward()
        g = torch.cat([p.grad.view(-1) for _, p in theirs if p.grad is not None])
        if adam:
            m = 0.9 * ckpt.exp_avg + 0.1 * g
            v = 0.999 * ckpt.exp_avg_sq + 0.001 * g ** 2
            g = m / torch.sqrt(v + 1e-08)
        full.append(g)
        twin.zero_grad()
        if len(full) == 16:
            out.append(proj.project(torch.stack(full).to(torch.float16), model_id=0).cpu())
            full = []
    if full:
        out.append(proj.project(torch.stack(full).to(torch.float16), model_id=0).cpu())
    return torch.nn.functional.normalize(torch.cat(out).float(), dim=1)


def test_less_equals_the_authors_pipeline(lm):
    """Warm-up checkpoints of ours; on them, the authors' feature collection and matching
    (``matching.py``: checkpoint weights renormalised, scores summed, mean over the target's rows)
    against ours: the same scores to float rounding, Spearman 1, the same top 20."""
    from scipy.stats import spearmanr

    tiny_lm, tok, base = lm
    model = copy.deepcopy(base)
    torch.manual_seed(0)
    params = G.add_lora(model, SPEC)
    source = rows_of(tok, 60, seed=1)
    target = rows_of(tok, 8, seed=2)
    warm = [source[i] for i in G.warmup_rows(len(source), G.WarmupSpec(share=0.2))]
    ckpts = G.warm_up(model, params, warm, G.WarmupSpec(epochs=2, accumulation=4, lr=1e-3))
    proj = G.RademacherProjector(sum(p.numel() for _, p in params), 512)
    ours_s, ours_t = [], []
    for c in ckpts:
        G.load_checkpoint(params, c)
        ours_s.append(G.gradient_features(model, params, source, proj, c).numpy())
        ours_t.append(G.gradient_features(model, params, target, proj, None).numpy())
    ours = less_scores(ours_s, ours_t, [c.mean_lr for c in ckpts])

    twin, theirs = peft_twin(tiny_lm, model, params)
    w = checkpoint_weights([c.mean_lr for c in ckpts])
    ref = 0
    for wi, c in zip(w, ckpts):
        tr = authors_features(twin, theirs, source, c, 512, adam=True)
        va = authors_features(twin, theirs, target, c, 512, adam=False)
        ref = ref + float(wi) * torch.matmul(tr, va.T)
    ref = ref.reshape(ref.shape[0], 1, -1).mean(-1).max(-1)[0].numpy()

    assert np.ptp(ours) > 100 * 1e-5  # rows score apart by far more than the tolerance
    assert np.allclose(ours, ref, atol=1e-5)
    assert spearmanr(ours, ref).statistic > 0.999
    assert set(np.argsort(-ours)[:20]) == set(np.argsort(-ref)[:20])
    assert np.allclose(np.linalg.norm(unit_rows(ours_s[0]), axis=1), 1)


def test_subtasks_take_the_best_subtask_mean():
    s = [np.eye(3, dtype=np.float32)]
    t = [np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)]
    got = less_scores(s, t, [1.0], groups=[0, 0, 1, 1])
    assert got.tolist() == [1.0, 0.5, 0.5]
    assert less_scores(s, t, [1.0]).tolist() == [0.5, 0.25, 0.25]
    with pytest.raises(ValueError, match="one of each per checkpoint"):
        less_scores(s, t, [1.0, 2.0])


class Identity:
    """No projection: the exact cosines the projectors approximate."""

    def __init__(self, dim):
        self.grad_dim = self.proj_dim = dim

    def project(self, g):
        return g.float()


def test_countsketch_approximates_as_well_as_trak(lm):
    """Both projectors at 2,048 dimensions against the unprojected gradients (7,168 weights):
    the same ranking up to the projection's noise, CountSketch no worse than TRAK's Rademacher."""
    from scipy.stats import spearmanr

    _, tok, base = lm
    model = copy.deepcopy(base)
    torch.manual_seed(0)
    params = G.add_lora(model, SPEC)
    source, target = rows_of(tok, 80, seed=1), rows_of(tok, 8, seed=2)
    (ckpt,) = G.warm_up(model, params, source[:16], G.WarmupSpec(epochs=1, accumulation=4, lr=1e-3))
    dim = sum(p.numel() for _, p in params)

    def scores(proj):
        return less_scores([G.gradient_features(model, params, source, proj, ckpt).numpy()],
                           [G.gradient_features(model, params, target, proj, None).numpy()], [1.0])

    exact = scores(Identity(dim))
    rho = {k: spearmanr(scores(G.projector(k, dim, 2048)), exact).statistic for k in G.PROJECTORS}
    assert rho["rademacher"] > 0.9 and rho["countsketch"] > 0.9, rho
    assert rho["countsketch"] > rho["rademacher"] - 0.03, rho
    with pytest.raises(ValueError, match="use one of rademacher, countsketch"):
        G.projector("gaussian", dim)
