"""Forward hooks that read what the Embedder's forward pass computes anyway.

The Embedder builds and runs its own micro-batches; :class:`Tap` learns which rows are in
each one from the batch's token ids (a forward pre-hook on the base model), then, from
forward hooks on the blocks (and pre-hooks on their MLPs), computes NAIT deltas, extra SAE
encodings and copies of activations to cache, for those rows. The pooled-code math is
the Embedder's (``pooling.py``), shared through :func:`encode_pooled`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..features import pooling
from ..core.sae import SAE


def encode_pooled(h_tokens: torch.Tensor, seg: torch.Tensor, n_rows: int, width: int, codes_fn,
                  chunk_tokens: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Sum-pooled TopK codes: tokens ``[n_tok, d]`` with their row ``seg [n_tok]`` -> per row
    ``(indices, values)``; ``codes_fn(x) -> (values, indices)``. The Embedder's math (``pooling.py``)."""
    acc = torch.zeros(n_rows, width, dtype=torch.float32, device=h_tokens.device)
    for a in range(0, h_tokens.shape[0], chunk_tokens):
        vals, idx = codes_fn(h_tokens[a:a + chunk_tokens])
        pooling.scatter_codes(acc, seg[a:a + chunk_tokens], vals, idx)
    return pooling.to_sparse(acc)


def sae_codes(sae: SAE, k: int | None):
    return lambda x: sae.encode(x, k or sae.k)


def resid_name(layer: int) -> str:
    return f"resid@layers.{layer}"


def mlpin_name(layer: int) -> str:
    return f"mlpin@layers.{layer}"


def _to_store(t: torch.Tensor) -> np.ndarray:
    """Residuals as stored: bf16 as its raw 16 bits (NumPy has no bf16), else as is."""
    t = t.detach().cpu().contiguous()
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _from_store(a: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.view(torch.bfloat16) if a.dtype == np.int16 else t


class Tap:
    """Forward hooks that compute the non-Embedder products of whatever batch runs."""

    def __init__(self, lm, key_to_rows: dict[tuple, list[int]], ex_masks: dict[str, list[list[int]]],
                 nait_pos: list[tuple[int, int]] | None, nait_layers: list[int], nait_dirs: np.ndarray | None,
                 variants: list[tuple[object, SAE, int]], n_rows: int, chunk_tokens: int,
                 resid_layers: Sequence[int] = (), mlpin_layers: Sequence[int] = ()):
        self.lm, self.key_to_rows, self.ex_masks = lm, key_to_rows, ex_masks
        self.nait_pos, self.nait_layers, self.variants, self.chunk_tokens = nait_pos, nait_layers, variants, chunk_tokens
        self.dirs = None if nait_dirs is None else torch.as_tensor(nait_dirs, dtype=torch.float32)
        self.batch_rows: list[list[int]] = []
        self.att = None
        self.nait = None
        if nait_pos is not None:
            shape = (n_rows, len(nait_layers)) if nait_dirs is not None else (n_rows, len(nait_layers), lm.hidden_size)
            self.nait = np.zeros(shape, dtype=np.float32)
        self.var_out = {v.name: [None] * n_rows for v, _, _ in variants}
        self.kept = {name: [None] * n_rows for name in [resid_name(x) for x in resid_layers] +
                     [mlpin_name(x) for x in mlpin_layers]}
        self.handles = [lm.model.register_forward_pre_hook(self._pre, with_kwargs=True)]
        by_layer: dict[int, list] = {}
        for li, layer in enumerate(nait_layers):
            by_layer.setdefault(layer, []).append(("nait", li))
        for v, sae, layer in variants:
            by_layer.setdefault(layer, []).append(("sae", (v, sae)))
        for layer in resid_layers:
            by_layer.setdefault(layer, []).append(("keep", resid_name(layer)))
        for layer in mlpin_layers:
            self.handles.append(lm.block(layer).mlp.register_forward_pre_hook(
                lambda _m, args, name=mlpin_name(layer): self._keep(args[0], name)))
        for layer, jobs in by_layer.items():
            self.handles.append(lm.block(layer).register_forward_hook(
                lambda _m, _i, out, jobs=jobs: self._block(out[0] if isinstance(out, (tuple, list)) else out, jobs)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def _pre(self, _mod, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None).cpu()
        att = self.lm.batch_mask.cpu()  # the real mask (TruncatedLM may run without one)
        self.batch_rows = []
        self.att = att.bool()
        for b in range(ids.shape[0]):
            key = tuple(ids[b][att[b].bool()].tolist())
            self.batch_rows.append(self.key_to_rows.get(key, []))

    @torch.inference_mode()
    def _block(self, h: torch.Tensor, jobs) -> None:
        for kind, job in jobs:
            if kind == "nait" and self.nait is not None:
                li = job
                for b, rows in enumerate(self.batch_rows):
                    if not rows:
                        continue
                    first, last = self.nait_pos[rows[0]]
                    d = (h[b, last].float() - h[b, first].float()).cpu()
                    val = (d @ self.dirs[li]).item() if self.dirs is not None else d.numpy()
                    for r in rows:
                        self.nait[r, li] = val
            elif kind == "sae":
                self._encode_variant(h, *job)
            elif kind == "keep":
                self._keep(h, job)

    def _encode_variant(self, h: torch.Tensor, v, sae: SAE) -> None:
        B, T = h.shape[:2]
        mask = torch.zeros((B, T), dtype=torch.bool)
        for b, rows in enumerate(self.batch_rows):
            if rows:
                m = self.ex_masks[v.exclude][rows[0]]
                mask[b, :len(m)] = torch.as_tensor(m, dtype=torch.bool)
        pos = mask.to(h.device).nonzero()
        per_row = encode_pooled(h[pos[:, 0], pos[:, 1]], pos[:, 0], B, sae.num_latents, sae_codes(sae, v.k),
                                self.chunk_tokens)
        for b, rows in enumerate(self.batch_rows):
            for r in rows:
                self.var_out[v.name][r] = per_row[b]

    @torch.inference_mode()
    def _keep(self, h: torch.Tensor, name: str) -> None:
        for b, rows in enumerate(self.batch_rows):
            if rows:
                x = h[b][self.att[b].to(h.device)].detach().cpu().clone()
                for r in rows:
                    self.kept[name][r] = x
