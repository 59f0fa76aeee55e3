"""TopK SAE training math (Gao et al. 2024, "Scaling and evaluating sparse autoencoders";
the recipe EleutherAI sparsify follows).

* Latents: z = TopK_K(ReLU(W_enc (x - b_dec) + b_enc)); reconstruction x_hat = W_dec^T z + b_dec.
* Loss: FVU = |x - x_hat|^2 / |x - mean(x)|^2 over the batch, plus AuxK: the residual
  e = x - x_hat is reconstructed from the top ``k_aux`` pre-activations of the DEAD latents
  only, weighted by min(1, n_dead / k_aux) and ``auxk_alpha`` (1/32). ``k_aux`` = d_in / 2.
* Dead latent: not among any token's top K for ``dead_tokens`` training tokens.
* Decoder rows have unit norm: the gradient component parallel to each row is removed
  before the Adam step and the rows are renormalised after it.
* Init: random unit decoder rows, encoder = decoder (the transpose, in our [L, d]
  layout), b_enc = 0, b_dec = geometric median of the first batch.
* Adam (betas 0.9 / 0.999, eps 1e-8), lr = 2e-4 / sqrt(num_latents / 2^14) unless set.
* Inputs are multiplied by one constant ``scale`` so that their mean squared norm is d_in
  (hyperparameters then carry across models and layers); :func:`export` folds the scale
  back into b_enc and b_dec, so the saved SAE takes raw activations.

Everything here is plain tensors and pure functions, so a checkpoint is a safetensors
file plus a small JSON (no pickles). TopK makes the encoder's gradient sparse (only the
K selected latents of each token receive one), so the backward pass is written out with
sparse products instead of a dense [N, L] gradient: a CPU step costs about one dense
forward matmul.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.sae import SAE, SAEError

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def default_lr(num_latents: int) -> float:
    return 2e-4 / math.sqrt(num_latents / 2 ** 14)


def geometric_median(x: torch.Tensor, iters: int = 50, tol: float = 1e-5) -> torch.Tensor:
    """Weiszfeld's algorithm on the rows of ``x`` [N, d]."""
    x = x.float()
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=-1).clamp_min(1e-8)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() <= tol * y.norm().clamp_min(1e-8):
            return y_new
        y = y_new
    return y


def input_scale(x: torch.Tensor) -> float:
    """The constant that gives ``x`` unit mean squared norm per dimension."""
    return math.sqrt(x.shape[1] / x.float().pow(2).sum(-1).mean().item())


def init_params(first_batch: torch.Tensor, num_latents: int, seed: int, b_dec_init: str = "geometric_median"
                ) -> tuple[dict[str, torch.Tensor], float]:
    """Parameters in the normalised space and the input ``scale``."""
    x = first_batch.float()
    d = x.shape[1]
    scale = input_scale(x)
    x = x * scale
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(num_latents, d, generator=g)
    W_dec /= W_dec.norm(dim=-1, keepdim=True)
    if b_dec_init == "geometric_median":
        b_dec = geometric_median(x)
    elif b_dec_init == "mean":
        b_dec = x.mean(0)
    elif b_dec_init == "zeros":
        b_dec = torch.zeros(d)
    else:
        raise ValueError(f"train.b_dec_init={b_dec_init!r}: use geometric_median, mean or zeros")
    params = {"W_enc": W_dec.clone(), "b_enc": torch.zeros(num_latents), "W_dec": W_dec, "b_dec": b_dec}
    return params, scale


def params_from_sae(first_batch: torch.Tensor, sae: SAE) -> tuple[dict[str, torch.Tensor], float]:
    """Warm start: the parameters of an exported (raw-input) ``sae`` in the normalised space
    of this data, the inverse of :func:`export` (biases times ``scale``, weights as they are;
    decoder rows renormalised)."""
    if first_batch.shape[1] != sae.d_in:
        raise SAEError(f"init_from: the {sae.hookpoint} SAE reads {sae.d_in}-dimensional inputs, "
                       f"the model's activations there have {first_batch.shape[1]}")
    scale = input_scale(first_batch)
    W_dec = sae.W_dec.detach().float().clone()
    W_dec /= W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    params = {"W_enc": sae.W_enc.detach().float().clone(), "b_enc": sae.b_enc.detach().float() * scale,
              "W_dec": W_dec, "b_dec": sae.b_dec.detach().float() * scale}
    return params, scale


def _csr(idx: torch.Tensor, vals: torch.Tensor, num_latents: int) -> torch.Tensor:
    """The [L, N] sparse matrix with ``vals[n, j]`` at (``idx[n, j]``, n)."""
    n, k = idx.shape
    rows = idx.reshape(-1)
    order = torch.argsort(rows, stable=True)
    crow = torch.zeros(num_latents + 1, dtype=torch.long, device=idx.device)
    crow[1:] = torch.bincount(rows, minlength=num_latents).cumsum(0)
    cols = torch.arange(n, device=idx.device).repeat_interleave(k)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, cols[order], vals.reshape(-1)[order], (num_latents, n),
                                       check_invariants=False)


class _SparseEncode(torch.autograd.Function):
    """Pre-activations of the selected latents, W_enc[idx] . xc + b_enc[idx].

    The forward takes their values from the dense selection pass (``pre``); the backward
    is sparse: dW_enc = G xc with G the [L, N] matrix of the K gradients per token,
    db_enc = row sums of G, dxc = G^T W_enc."""

    @staticmethod
    def forward(ctx, xc, W_enc, b_enc, idx, pre):
        ctx.save_for_backward(xc, W_enc, idx)
        return pre.gather(1, idx).to(xc.dtype)

    @staticmethod
    def backward(ctx, g):
        xc, W_enc, idx = ctx.saved_tensors
        L = W_enc.shape[0]
        G = _csr(idx, g, L)
        grad_W = G @ xc
        grad_b = torch.zeros(L, dtype=g.dtype, device=g.device).index_add_(0, idx.reshape(-1), g.reshape(-1))
        grad_xc = None
        if ctx.needs_input_grad[0]:
            grad_xc = F.embedding_bag(idx, W_enc, per_sample_weights=g, mode="sum")
        return grad_xc, grad_W, grad_b, None, None


def encode_selected(xc: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, idx: torch.Tensor,
                    pre: torch.Tensor) -> torch.Tensor:
    return _SparseEncode.apply(xc, W_enc, b_enc, idx, pre)


def select(xc: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int,
           select_dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense pre-activations (no gradient; ``select_dtype`` for speed) and the top-k indices."""
    with torch.no_grad():
        pre = F.linear(xc.to(select_dtype), W_enc.to(select_dtype), b_enc.to(select_dtype))
        idx = pre.topk(k, dim=-1, sorted=False).indices
    return pre, idx


def decode_sparse(vals: torch.Tensor, idx: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """sum_j vals[n, j] W_dec[idx[n, j]] (no bias), differentiable in vals and W_dec."""
    return F.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum")


@dataclass
class StepStats:
    loss: float
    fvu: float
    auxk: float
    dead_frac: float
    l0: float


def forward_loss(params: dict[str, torch.Tensor], x: torch.Tensor, k: int, dead: torch.Tensor | None,
                 auxk_alpha: float, k_aux: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, fvu, auxk_loss, top-k indices) for a normalised batch ``x``."""
    W_enc, b_enc, W_dec, b_dec = params["W_enc"], params["b_enc"], params["W_dec"], params["b_dec"]
    xc = x - b_dec
    pre, idx = select(xc.detach(), W_enc, b_enc, k)
    vals = torch.relu(encode_selected(xc, W_enc, b_enc, idx, pre))
    recon = decode_sparse(vals, idx, W_dec) + b_dec
    total_var = (x - x.mean(0)).pow(2).sum()
    err = x - recon
    fvu = err.pow(2).sum() / total_var
    auxk = torch.zeros((), dtype=x.dtype)
    n_dead = int(dead.sum()) if dead is not None else 0
    if n_dead > 0 and auxk_alpha > 0:
        kk = min(k_aux, n_dead)
        masked = pre.masked_fill(~dead[None], float("-inf"))
        aidx = masked.topk(kk, dim=-1, sorted=False).indices
        avals = torch.relu(encode_selected(xc.detach(), W_enc, b_enc, aidx, pre))
        e_hat = decode_sparse(avals, aidx, W_dec)
        auxk = min(n_dead / k_aux, 1.0) * (e_hat - err.detach()).pow(2).sum() / total_var
    loss = fvu + auxk_alpha * auxk
    return loss, fvu, auxk, idx


@torch.no_grad()  # the update must not join the autograd graph (W_dec requires grad here)
def remove_parallel_grad(W_dec: torch.Tensor) -> None:
    """Project each decoder row's gradient onto the row's orthogonal complement."""
    g = W_dec.grad
    if g is not None:
        g -= (g * W_dec).sum(-1, keepdim=True) * W_dec


@torch.no_grad()
def adam_step(params: dict[str, torch.Tensor], state: dict[str, torch.Tensor], step: int, lr: float) -> None:
    """One Adam update (``step`` counts from 1); ``state`` holds ``<name>.m`` / ``<name>.v``."""
    b1, b2 = ADAM_BETAS
    for name, p in params.items():
        if p.grad is None:
            continue
        m = state.setdefault(f"{name}.m", torch.zeros_like(p))
        v = state.setdefault(f"{name}.v", torch.zeros_like(p))
        m.mul_(b1).add_(p.grad, alpha=1 - b1)
        v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
        denom = (v / (1 - b2 ** step)).sqrt_().add_(ADAM_EPS)
        p.addcdiv_(m, denom, value=-lr / (1 - b1 ** step))
        p.grad = None


@torch.no_grad()
def normalize_decoder(W_dec: torch.Tensor) -> None:
    W_dec /= W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def train_step(params: dict[str, torch.Tensor], opt_state: dict[str, torch.Tensor], since_fired: torch.Tensor,
               x: torch.Tensor, step: int, k: int, lr: float, auxk_alpha: float, k_aux: int,
               dead_tokens: int) -> StepStats:
    """One optimisation step on a normalised batch; updates everything in place."""
    dead = since_fired >= dead_tokens
    for p in params.values():
        p.requires_grad_(True)
    loss, fvu, auxk, idx = forward_loss(params, x, k, dead, auxk_alpha, k_aux)
    loss.backward()
    remove_parallel_grad(params["W_dec"])
    adam_step(params, opt_state, step, lr)
    normalize_decoder(params["W_dec"])
    for p in params.values():
        p.requires_grad_(False)
    fired = torch.zeros_like(since_fired, dtype=torch.bool)
    fired[idx.reshape(-1)] = True
    since_fired += x.shape[0]
    since_fired[fired] = 0
    return StepStats(loss=float(loss.detach()), fvu=float(fvu.detach()), auxk=float(auxk.detach()),
                     dead_frac=float(dead.float().mean()), l0=float(k))


@torch.no_grad()
def heldout_metrics(params: dict[str, torch.Tensor], scale: float, x: torch.Tensor, k: int,
                    chunk: int = 4096) -> dict[str, float]:
    """FVU, mean L0 and the fraction of latents never fired on raw held-out activations ``x``."""
    x = x.float() * scale
    num_latents = params["W_enc"].shape[0]
    fired = torch.zeros(num_latents, dtype=torch.bool)
    sse, l0 = 0.0, 0.0
    for c in range(0, x.shape[0], chunk):
        xb = x[c: c + chunk]
        pre, idx = select(xb - params["b_dec"], params["W_enc"], params["b_enc"], k, torch.float32)
        vals = torch.relu(pre.gather(1, idx))
        recon = decode_sparse(vals, idx, params["W_dec"]) + params["b_dec"]
        sse += float((xb - recon).double().pow(2).sum())
        l0 += float((vals > 0).sum())
        fired[idx[vals > 0]] = True
    total = float((x.double() - x.double().mean(0)).pow(2).sum())
    return {"fvu": sse / total, "l0": l0 / x.shape[0], "dead_frac": 1 - float(fired.float().mean())}


def export(params: dict[str, torch.Tensor], scale: float, k: int, hookpoint: str,
           dtype: torch.dtype = torch.bfloat16) -> SAE:
    """An :class:`SAE` that takes RAW activations: with x_n = scale * x,
    z_n = W_enc (x_n - b) + c = scale * (W_enc (x - b / scale) + c / scale), and TopK is
    invariant to the positive factor, so z = z_n / scale uses b_dec = b / scale,
    b_enc = c / scale and the same (unit-norm) W_dec rows; x_hat = x_hat_n / scale."""
    return SAE(W_enc=params["W_enc"].detach().to(dtype).contiguous(),
               b_enc=(params["b_enc"].detach() / scale).to(dtype),
               W_dec=params["W_dec"].detach().to(dtype).contiguous(),
               b_dec=(params["b_dec"].detach() / scale).to(dtype),
               k=k, hookpoint=hookpoint, activation="topk")
