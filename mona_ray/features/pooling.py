"""Pooling token-level codes into one vector per sample (pure torch, no Ray).

Token codes arrive as sparse TopK pairs ``(values [N, k], indices [N, k])`` together with
``seg [N]``, the sample each token belongs to. Pooling scatter-adds them into per-sample
accumulators ``[B, num_latents]`` in float32, then divides by the number of pooled
tokens (``mean``, the paper's default) or not (``sum``, the ablation; it favours long
samples). Accumulation uses ``index_put_(accumulate=True)``, which is deterministic on
CPU and, under ``torch.use_deterministic_algorithms``, on CUDA.
"""

from __future__ import annotations

import numpy as np
import torch


def scatter_codes(acc: torch.Tensor, seg: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> None:
    """``acc[seg[n], indices[n, j]] += values[n, j]`` for all n, j (in place, float32)."""
    rows = seg.unsqueeze(1).expand_as(indices).reshape(-1)
    acc.index_put_((rows, indices.reshape(-1)), values.reshape(-1).to(acc.dtype), accumulate=True)


def scatter_dense(acc: torch.Tensor, seg: torch.Tensor, x: torch.Tensor) -> None:
    """``acc[seg[n]] += x[n]`` (dense token vectors, e.g. raw hidden states)."""
    acc.index_add_(0, seg, x.to(acc.dtype))


def finish(acc: torch.Tensor, counts: torch.Tensor, method: str) -> torch.Tensor:
    if method == "mean":
        return acc / counts.clamp_min(1).to(acc.dtype).unsqueeze(1)
    if method == "sum":
        return acc
    raise ValueError(f"pool.method={method!r}: use mean or sum")


def to_sparse(pooled: torch.Tensor, value_dtype: str = "float32") -> list[tuple[np.ndarray, np.ndarray]]:
    """Per row: (int32 latent indices ascending, values) of the non-zero entries."""
    dt = np.float16 if value_dtype == "float16" else np.float32
    pooled = pooled.float().cpu()
    nz = pooled.nonzero()  # sorted by row, then column
    counts = torch.bincount(nz[:, 0], minlength=pooled.shape[0]).tolist()
    cols = nz[:, 1].numpy().astype(np.int32)
    vals = pooled[nz[:, 0], nz[:, 1]].numpy().astype(dt)
    out, at = [], 0
    for c in counts:
        out.append((cols[at:at + c], vals[at:at + c]))
        at += c
    return out
