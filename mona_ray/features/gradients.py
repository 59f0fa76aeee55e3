"""LESS's gradient features (Xia et al. 2024, arXiv 2402.04333; princeton-nlp/LESS), in plain torch.

LESS describes a row by the gradient of its loss with respect to LoRA adapters of the model,
taken at checkpoints of a short warm-up on a random share of the source, projected to a few
thousand dimensions. This module holds each piece, written from the authors' code
(``less/train``, ``less/data_selection/collect_grad_reps.py``, ``get_info.py``) and checked
against it (``tests/test_less.py``: peft's LoRA, TRAK's projector):

* :func:`add_lora`: LoRA adapters on ``q/k/v/o_proj`` (their defaults: rank 128, alpha 512,
  dropout 0.1), the base model frozen; the same modules, initialisation and parameter order as
  ``peft.get_peft_model``;
* :func:`labelled`: a conversation's token ids and labels (the assistant's tokens; the rest
  ``-100``), as their training data marks the response;
* :func:`warm_up`: their training recipe (AdamW, no weight decay, linear schedule with 3%
  warm-up, batch 1 with 32 steps of gradient accumulation), saving the adapters, Adam's moments
  and the epoch's mean learning rate at the end of every epoch (a :class:`Checkpoint`);
* :func:`row_gradient`: one row's loss gradient over the adapters (the model in eval mode, no
  dropout), and :func:`adam_direction`: the update Adam would take from it (their
  ``obtain_gradients_with_adam``: the checkpoint's moments advanced by one step, no bias
  correction);
* :class:`RademacherProjector`: TRAK's ``BasicProjector`` (Rademacher entries generated in
  blocks of 128 columns from seed ``seed + 1000 * block``), the same matrix bit for bit; it
  draws ``grad_dim x proj_dim`` random signs for every chunk of rows (a GPU's work: ~1.2e11 for
  SmolLM2-135M's 14.7M adapter weights at 8,192 dimensions). :class:`CountSketchProjector` is
  the CPU's: each weight adds its gradient, signed, to one hashed dimension (a sparse JL
  transform, inner products unbiased with the dense one's variance), ``grad_dim`` operations
  a row.

Scoring the features (cosines, weighted over checkpoints) is :mod:`mona_ray.scoring.less`.
No Ray here.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.render import in_spans, render

IGNORE = -100  # the label of a token the loss skips (Hugging Face's convention)


@dataclass(frozen=True)
class LoraSpec:
    """The adapters LESS trains and differentiates (their ``base_training_args.sh``)."""

    rank: int = 128
    alpha: float = 512.0
    dropout: float = 0.1
    modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class WarmupSpec:
    """The warm-up's training recipe (their ``base_training_args.sh`` and ``warmup_lora_train.sh``)."""

    share: float = 0.05  # of the source rows, drawn at random with ``seed``
    epochs: int = 4
    lr: float = 2e-5
    warmup_ratio: float = 0.03
    accumulation: int = 32  # per-device batch 1, gradient accumulation 32
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    seed: int = 0


class LoraLinear(nn.Module):
    """``base(x) + B(A(dropout(x))) * alpha / rank``: peft's LoRA ``Linear`` (the base frozen,
    ``A`` Kaiming-uniform with ``a = sqrt(5)``, ``B`` zero, so the model starts unchanged)."""

    def __init__(self, base: nn.Linear, spec: LoraSpec):
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, spec.rank, bias=False, dtype=base.weight.dtype,
                                device=base.weight.device)
        self.lora_B = nn.Linear(spec.rank, base.out_features, bias=False, dtype=base.weight.dtype,
                                device=base.weight.device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.scaling = spec.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling


def add_lora(model: nn.Module, spec: LoraSpec = LoraSpec()) -> list[tuple[str, nn.Parameter]]:
    """Freeze ``model`` and wrap every ``nn.Linear`` named one of ``spec.modules`` in a
    :class:`LoraLinear`; the adapters' parameters, in module order (per layer ``q, k, v, o``,
    each ``A`` then ``B``: the order of a peft model's trainable parameters, hence of the flat
    gradient). ``ValueError`` when no module matches."""
    for p in model.parameters():
        p.requires_grad_(False)
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name.rpartition(".")[2] in spec.modules]
    if not targets:
        raise ValueError(f"no linear module named {', '.join(spec.modules)} in {type(model).__name__}: "
                         "set the LoRA target modules")
    for name, m in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, LoraLinear(m, spec))
    return lora_parameters(model)


def lora_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The adapters' parameters of a model :func:`add_lora` wrapped, in module order."""
    return [(n, p) for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def labelled(messages: list[dict], tokenizer, max_length: int, mode: str = "chat_template",
             system_prompt: str | None = None) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation (at most ``max_length``) and their labels: the id
    for a token inside an assistant message's content, ``-100`` elsewhere (prompt, template)."""
    r = render(messages, tokenizer, mode, system_prompt)
    enc = tokenizer(r.text, add_special_tokens=False, truncation=True, max_length=max_length,
                    return_offsets_mapping=True)
    answer = [span for span, role in zip(r.spans, r.roles) if role == "assistant"]
    labels = [t if x else IGNORE for x, t in zip(in_spans(enc["offset_mapping"], answer), enc["input_ids"])]
    return list(enc["input_ids"]), labels


def row_loss(model: nn.Module, ids: list[int], labels: list[int]) -> torch.Tensor:
    """The causal LM loss of one row: mean cross-entropy over its labelled tokens (the next-token
    shift as Hugging Face's ``labels=`` computes it)."""
    device = next(model.parameters()).device
    logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, :-1].float()
    target = torch.tensor(labels[1:], device=device)
    return nn.functional.cross_entropy(logits, target, ignore_index=IGNORE)


def has_labels(labels: list[int]) -> bool:
    """Whether a row has a token its loss counts (the first token is never predicted)."""
    return any(t != IGNORE for t in labels[1:])


def row_gradient(model: nn.Module, params: list[tuple[str, nn.Parameter]], ids: list[int],
                 labels: list[int]) -> torch.Tensor:
    """The flat gradient of :func:`row_loss` over ``params`` (in their order)."""
    loss = row_loss(model, ids, labels)
    grads = torch.autograd.grad(loss, [p for _, p in params])
    return torch.cat([g.reshape(-1) for g in grads])


def adam_direction(g: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                   betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.Tensor:
    """The step Adam would take from gradient ``g`` at a checkpoint with moments ``exp_avg``,
    ``exp_avg_sq``: ``m' / sqrt(v' + eps)`` with ``m' = b1 m + (1 - b1) g``,
    ``v' = b2 v + (1 - b2) g^2`` (LESS's ``obtain_gradients_with_adam``: eps inside the root,
    no bias correction)."""
    b1, b2 = betas
    m = b1 * exp_avg + (1 - b1) * g
    v = b2 * exp_avg_sq + (1 - b2) * g * g
    return m / torch.sqrt(v + eps)


class RademacherProjector:
    """``G @ R`` for a ``grad_dim x proj_dim`` matrix of +-1 entries that is never held whole:
    TRAK's ``BasicProjector`` (``ProjectionType.rademacher``), which LESS uses where its CUDA
    kernel is missing. Columns come in blocks of ``block_size``; block ``i`` is drawn by
    ``bernoulli_(0.5)`` from a ``torch.Generator`` seeded ``seed + 1000 * i + 100000 * model_id``,
    then mapped to +-1, so the matrix equals TRAK's for the same arguments. Memory: one block,
    ``grad_dim x block_size`` values of ``dtype``."""

    def __init__(self, grad_dim: int, proj_dim: int = 8192, seed: int = 0, block_size: int = 128,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", model_id: int = 0):
        self.grad_dim, self.proj_dim, self.dtype, self.device = int(grad_dim), int(proj_dim), dtype, device
        self.block_size = min(int(proj_dim), int(block_size))
        self.seeds = [seed + 1000 * i + 100000 * model_id for i in range(math.ceil(proj_dim / self.block_size))]
        self._block = torch.empty(self.grad_dim, self.block_size, dtype=dtype, device=device)
        self._drawn = None  # the seed of the block in self._block

    def _draw(self, seed: int) -> torch.Tensor:
        if self._drawn != seed:
            g = torch.Generator(device=self.device).manual_seed(seed)
            self._block.bernoulli_(p=0.5, generator=g)
            self._block.mul_(2.0).sub_(1.0)
            self._drawn = seed
        return self._block

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        """``[n, grad_dim]`` -> ``[n, proj_dim]`` in ``dtype``."""
        grads = grads.to(device=self.device, dtype=self.dtype)
        if grads.shape[-1] != self.grad_dim:
            raise ValueError(f"gradients of {grads.shape[-1]} values; the projector takes {self.grad_dim}")
        out = torch.zeros(grads.shape[0], self.proj_dim, dtype=self.dtype, device=self.device)
        for i, seed in enumerate(self.seeds):
            st, ed = i * self.block_size, min((i + 1) * self.block_size, self.proj_dim)
            out[:, st:ed] = grads @ self._draw(seed)[:, : ed - st]
        return out


class CountSketchProjector:
    """``G @ S`` for a sparse ``grad_dim x proj_dim`` sketch with one +-1 per row: weight ``j``
    adds ``sign[j] * g[j]`` to dimension ``bucket[j]`` (both drawn from ``seed``). Inner products
    are preserved in expectation, with the variance of a dense Rademacher projection of the same
    size (Charikar et al. 2002; Weinberger et al. 2009), at ``grad_dim`` operations a row
    instead of ``grad_dim x proj_dim``. Memory: ``bucket`` (int64) and ``sign`` for every weight."""

    def __init__(self, grad_dim: int, proj_dim: int = 8192, seed: int = 0, device: str | torch.device = "cpu"):
        self.grad_dim, self.proj_dim, self.device = int(grad_dim), int(proj_dim), device
        g = torch.Generator().manual_seed(seed)
        self.bucket = torch.randint(0, self.proj_dim, (self.grad_dim,), generator=g).to(device)
        self.sign = (torch.randint(0, 2, (self.grad_dim,), generator=g) * 2 - 1).to(device=device, dtype=torch.float32)

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        """``[n, grad_dim]`` -> ``[n, proj_dim]`` (float32)."""
        grads = grads.to(device=self.device, dtype=torch.float32)
        if grads.shape[-1] != self.grad_dim:
            raise ValueError(f"gradients of {grads.shape[-1]} values; the projector takes {self.grad_dim}")
        out = torch.zeros(grads.shape[0], self.proj_dim, dtype=torch.float32, device=self.device)
        return out.index_add_(1, self.bucket, grads * self.sign)


PROJECTORS = {"rademacher": RademacherProjector, "countsketch": CountSketchProjector}


def projector(kind: str, grad_dim: int, proj_dim: int = 8192, seed: int = 0, device="cpu"):
    """A projector by name: ``rademacher`` (TRAK's, LESS's own), ``countsketch`` (the CPU's)."""
    if kind not in PROJECTORS:
        raise ValueError(f"projector {kind!r}: use one of {', '.join(PROJECTORS)}")
    return PROJECTORS[kind](grad_dim, proj_dim, seed=seed, device=device)


# ----------------------------------------------------------------------------- the warm-up


@dataclass
class Checkpoint:
    """The warm-up at the end of one epoch: the adapters' weights, Adam's moments (flat, in
    parameter order) and the mean learning rate over the epoch's optimizer steps (LESS weighs
    each checkpoint's scores by it)."""

    epoch: int
    lora: dict[str, torch.Tensor]
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    mean_lr: float
    losses: list[float] = field(default_factory=list)  # the mean loss of each optimizer step


def warmup_rows(n: int, spec: WarmupSpec) -> list[int]:
    """The source rows the warm-up trains on: ``max(1, round(share * n))`` drawn at random with
    ``spec.seed``, in draw order."""
    k = max(1, min(n, round(spec.share * n)))
    return random.Random(spec.seed).sample(range(n), k)


def linear_schedule(step: int, total: int, warmup: int) -> float:
    """Hugging Face's ``get_linear_schedule_with_warmup`` factor at optimizer step ``step``."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def warm_up(model: nn.Module, params: list[tuple[str, nn.Parameter]], rows: list[tuple[list[int], list[int]]],
            spec: WarmupSpec = WarmupSpec(), on_step=None) -> list[Checkpoint]:
    """Train the adapters ``params`` on ``rows`` (``(ids, labels)``, in the order given, each epoch
    shuffled with ``spec.seed``) as LESS's warm-up does; a :class:`Checkpoint` per epoch.
    Each optimizer step averages the losses of up to ``spec.accumulation`` rows; an epoch's last
    step takes the rows that remain. ``on_step(step, total, loss)`` reports progress."""
    rows = [r for r in rows if has_labels(r[1])]
    if not rows:
        raise ValueError("no warm-up row has an assistant token to learn")
    tensors = [p for _, p in params]
    opt = torch.optim.AdamW(tensors, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=0.0)
    per_epoch = math.ceil(len(rows) / spec.accumulation)
    total = per_epoch * spec.epochs
    warmup = math.ceil(total * spec.warmup_ratio)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: linear_schedule(s, total, warmup))
    order = random.Random(spec.seed)
    step, out = 0, []
    model.train()
    try:
        for epoch in range(1, spec.epochs + 1):
            idx = list(range(len(rows)))
            order.shuffle(idx)
            lrs, losses = [], []
            for b in range(0, len(idx), spec.accumulation):
                batch = idx[b: b + spec.accumulation]
                total_loss = 0.0
                for i in batch:
                    loss = row_loss(model, *rows[i]) / len(batch)
                    loss.backward()
                    total_loss += float(loss.detach())
                lrs.append(opt.param_groups[0]["lr"])
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                losses.append(total_loss)
                if on_step is not None:
                    on_step(step, total, total_loss)
            state = [opt.state[p] for p in tensors]
            out.append(Checkpoint(epoch, {n: p.detach().clone() for n, p in params},
                                  torch.cat([s["exp_avg"].reshape(-1) for s in state]).clone(),
                                  torch.cat([s["exp_avg_sq"].reshape(-1) for s in state]).clone(),
                                  float(sum(lrs) / len(lrs)), losses))
    finally:
        model.eval()
    return out


def load_checkpoint(params: list[tuple[str, nn.Parameter]], ckpt: Checkpoint) -> None:
    """Set the adapters to a checkpoint's weights."""
    with torch.no_grad():
        for n, p in params:
            p.copy_(ckpt.lora[n])


def gradient_features(model: nn.Module, params: list[tuple[str, nn.Parameter]],
                      rows: list[tuple[list[int], list[int]]], proj, ckpt: Checkpoint | None = None,
                      chunk: int = 16) -> torch.Tensor:
    """One projected gradient per row, ``[len(rows), proj_dim]`` (float32, not normalised):
    Adam's direction at ``ckpt`` (the source side of LESS) or, with ``ckpt=None``, the plain
    gradient (the target side), projected by ``proj`` (:func:`projector`). Full gradients are
    projected ``chunk`` rows at a time and never kept; they pass through float16 first, as LESS's
    ``collect_grads`` does. A row without a labelled token gets a zero row (its cosine is 0)."""
    model.eval()
    out, pending = [], []

    def flush():
        if pending:
            out.append(proj.project(torch.stack(pending).to(torch.float16)).float())
            pending.clear()

    for ids, labels in rows:
        if not has_labels(labels):
            g = torch.zeros(proj.grad_dim)
        else:
            g = row_gradient(model, params, ids, labels)
            if ckpt is not None:
                g = adam_direction(g, ckpt.exp_avg, ckpt.exp_avg_sq)
        pending.append(g.detach())
        if len(pending) == chunk:
            flush()
    flush()
    return torch.cat(out) if out else torch.zeros(0, proj.proj_dim)
