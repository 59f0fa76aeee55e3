"""Model + SAE encoding: token ids -> pooled sparse codes, one batch of rows at a time.

The :class:`Embedder` is plain PyTorch (no Ray); the Ray actor in ``pipeline.py`` only
wraps it. For a group of rows it

1. sorts rows by length and packs rows of equal padded length into micro-batches under
   a padded-token budget (``micro_batches``), so padding stays small, very long rows run
   on their own, and a row's result never depends on its neighbours;
2. runs the model only up to the hooked block (``model.TruncatedLM``);
3. gathers each row's real, poolable token positions and SAE-encodes them in chunks of
   ``sae_chunk_tokens`` so memory stays bounded even at 131k latents;
4. scatter-adds the TopK codes into per-sample accumulators and pools (``pooling.py``).

A micro-batch that raises (a CUDA OOM on a long batch, say) is split in half and
retried; a single row that still fails is reported back as rejected with its reason,
instead of killing the job.

"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from . import pooling
from ..core.model import TruncatedLM
from ..core.sae import SAE

REPRESENTATIONS = ("sae", "hidden", "mlp_gate")


@dataclass
class EmbedSettings:
    token_budget: int = 8192  # padded tokens per micro-batch
    pad_multiple: int = 16  # rows are padded to a multiple of this (and batched only with equal lengths)
    max_batch_rows: int = 64
    sae_chunk_tokens: int = 4096
    pooling: str = "mean"
    k: int | None = None  # override of the SAE's K
    value_dtype: str = "float32"  # float32 | float16 for stored values
    representations: tuple[str, ...] = ("sae",)
    mlp_k: int | None = None  # K for the polysemantic mlp_gate ablation (default: the SAE's K)


@dataclass
class EmbedResult:
    outputs: dict[str, list]  # representation -> per-row (indices, values) or dense vector
    n_tokens: list[int]
    n_pooled: list[int]
    rejected: dict[int, str] = field(default_factory=dict)  # row position -> reason
    real_tokens: int = 0
    padded_tokens: int = 0
    forward_seconds: float = 0.0


def padded_length(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple if multiple > 1 else n


def micro_batches(lengths: list[int], token_budget: int, max_rows: int, pad_multiple: int = 1) -> list[list[int]]:
    """Group row positions into micro-batches of one padded length each, longest first.

    A row of ``n`` tokens is always padded to the same length (``n`` rounded up to
    ``pad_multiple``), whatever rows it is batched with, and rows of different padded
    lengths never share a micro-batch. The tensor a row goes through therefore depends on
    that row alone, so its embedding does not change with the unit size, the number of
    actors or a resume (checked bit for bit in tests on CPU). Each micro-batch holds at
    most ``token_budget`` padded tokens (at least one row) and ``max_rows`` rows.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    cur_len = None
    for i in order:
        p = padded_length(lengths[i], pad_multiple)
        if cur and (p != cur_len or (len(cur) + 1) * p > token_budget or len(cur) >= max_rows):
            batches.append(cur)
            cur = []
        cur.append(i)
        cur_len = p
    if cur:
        batches.append(cur)
    return batches


class Embedder:
    def __init__(self, lm: TruncatedLM, sae: SAE | None, settings: EmbedSettings, pad_token_id: int = 0):
        self.lm, self.sae, self.s = lm, sae, settings
        self.pad_token_id = pad_token_id
        unknown = set(settings.representations) - set(REPRESENTATIONS)
        if unknown:
            raise ValueError(f"unknown representation(s) {sorted(unknown)}; use {', '.join(REPRESENTATIONS)}")
        if "sae" in settings.representations and sae is None:
            raise ValueError("representation 'sae' needs an SAE")
        self.k = settings.k or (sae.k if sae is not None else None)
        self.mlp_k = settings.mlp_k or self.k or 32
        self._mlp_in: torch.Tensor | None = None
        if "mlp_gate" in settings.representations:
            mlp = lm.block(lm.layer).mlp
            mlp.register_forward_pre_hook(lambda mod, args: setattr(self, "_mlp_in", args[0]))
        if lm.device.startswith("cuda"):
            torch.use_deterministic_algorithms(True, warn_only=True)

    # ------------------------------------------------------------------ public

    def embed(self, ids: list[list[int]], masks: list[list[int]], on_batch=None) -> EmbedResult:
        """Embed rows; ``on_batch(rows, real_tokens)`` is called after every micro-batch (progress)."""
        n = len(ids)
        res = EmbedResult(outputs={r: [None] * n for r in self.s.representations},
                          n_tokens=[len(x) for x in ids], n_pooled=[int(sum(m)) for m in masks])
        empty = [i for i in range(n) if not ids[i]]
        for i in empty:
            res.rejected[i] = "no tokens after rendering"
        live = [i for i in range(n) if ids[i]]
        lengths = [len(ids[i]) for i in live]
        for mb in micro_batches(lengths, self.s.token_budget, self.s.max_batch_rows, self.s.pad_multiple):
            self._run_with_retry([live[j] for j in mb], ids, masks, res)
            if on_batch is not None:
                on_batch(len(mb), sum(lengths[j] for j in mb))
        return res

    # ------------------------------------------------------------------ internals

    def _run_with_retry(self, rows: list[int], ids, masks, res: EmbedResult) -> None:
        try:
            self._run(rows, ids, masks, res)
        except Exception as e:  # noqa: BLE001 - any failure of our batch is retried smaller
            if self.lm.device.startswith("cuda"):
                torch.cuda.empty_cache()
            if len(rows) == 1:
                res.rejected[rows[0]] = f"embedding failed: {type(e).__name__}: {str(e)[:300]}"
                return
            half = len(rows) // 2
            self._run_with_retry(rows[:half], ids, masks, res)
            self._run_with_retry(rows[half:], ids, masks, res)

    def _run(self, rows: list[int], ids, masks, res: EmbedResult) -> None:
        dev = self.lm.device
        B, T = len(rows), padded_length(max(len(ids[i]) for i in rows), self.s.pad_multiple)
        inp = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        att = torch.zeros((B, T), dtype=torch.long)
        pool = torch.zeros((B, T), dtype=torch.bool)
        for b, i in enumerate(rows):
            L = len(ids[i])
            inp[b, :L] = torch.as_tensor(ids[i], dtype=torch.long)
            att[b, :L] = 1
            pool[b, :L] = torch.as_tensor(masks[i], dtype=torch.bool)
        if dev.startswith("cuda"):
            inp, att, pool = (t.pin_memory().to(dev, non_blocking=True) for t in (inp, att, pool))
        t0 = time.perf_counter()
        with torch.inference_mode():
            h = self.lm(inp, att)  # [B, T, d], output of the hooked block
            pos = pool.nonzero()  # real, poolable positions (padding is never in `pool`)
            seg = pos[:, 0]
            counts = torch.bincount(seg, minlength=B)
            outs = {}
            if "sae" in self.s.representations:
                outs["sae"] = self._pool_sparse(h, pos, seg, B, self.sae.num_latents,
                                                lambda x: self.sae.encode(x, self.k))
            if "mlp_gate" in self.s.representations:
                mlp = self.lm.block(self.lm.layer).mlp
                x = self._mlp_in
                width = mlp.gate_proj.out_features

                def gate_codes(xc):
                    a = mlp.act_fn(mlp.gate_proj(xc)).abs()
                    return a.topk(self.mlp_k, dim=-1, sorted=False)

                outs["mlp_gate"] = self._pool_sparse(x, pos, seg, B, width, gate_codes)
            if "hidden" in self.s.representations:
                acc = torch.zeros(B, h.shape[-1], dtype=torch.float32, device=h.device)
                pooling.scatter_dense(acc, seg, h[pos[:, 0], pos[:, 1]])
                outs["hidden"] = pooling.finish(acc, counts, self.s.pooling)
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        res.forward_seconds += time.perf_counter() - t0
        res.real_tokens += int(att.sum())
        res.padded_tokens += B * T
        for name, pooled in outs.items():
            per_row = (list(pooled.float().cpu().numpy()) if name == "hidden"
                       else pooling.to_sparse(pooled, self.s.value_dtype))
            for b, i in enumerate(rows):
                res.outputs[name][i] = per_row[b]

    def _pool_sparse(self, h, pos, seg, B, width, codes_fn) -> torch.Tensor:
        """Encode each row's pooled tokens on their own, in chunks of ``sae_chunk_tokens``.

        Per row, because a GEMM's result for one input row can change with the number of
        rows in the call (seen on CPU BLAS at small M): encoding a sample's tokens apart
        keeps its codes independent of the other rows in the micro-batch.
        """
        acc = torch.zeros(B, width, dtype=torch.float32, device=h.device)
        step = self.s.sae_chunk_tokens
        bounds = torch.searchsorted(seg, torch.arange(B + 1, device=seg.device)).tolist()
        for b in range(B):
            for a in range(bounds[b], bounds[b + 1], step):
                p = pos[a:min(a + step, bounds[b + 1])]
                vals, idx = codes_fn(h[p[:, 0], p[:, 1]])
                pooling.scatter_codes(acc, seg[a:a + len(p)], vals, idx)
        counts = torch.bincount(seg, minlength=B)
        return pooling.finish(acc, counts, self.s.pooling)
