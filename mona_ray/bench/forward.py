"""Reference loops the benchmarks compare the pipeline against (plain PyTorch, no Ray).

* :func:`bare_forward`: the truncated model alone over the feature engine's own micro-batches
  (length-sorted, token budget): the ceiling for the embedding stage on this device.
* :func:`naive_embed`: how embedding is commonly done (DEITA-style embedders, HF
  examples): the full causal LM with its head and every block, ``output_hidden_states=True``,
  fixed-size batches in input order padded to the longest row, then the same SAE encode
  and mean pooling of the hooked block's output. Same rows, same tokens, same pooling
  mask, so its pooled codes are comparable with the pipeline's.
"""

from __future__ import annotations

import time

import torch

from ..features import pooling
from ..features.engine import micro_batches, pad_batch
from ..core.model import TruncatedLM
from ..core.sae import SAE


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def bare_forward(lm: TruncatedLM, groups: list[list[list[int]]], token_budget: int, max_rows: int,
                 pad_multiple: int = 1, pad_id: int = 0) -> tuple[float, int]:
    """Seconds and padded tokens for the truncated forward over each group's micro-batches.

    ``groups``: the rows of each unit the pipeline embeds in one engine call (micro-batches
    never span units there, so they do not here either).
    """
    sync(lm.device)
    t0 = time.perf_counter()
    padded = 0
    with torch.inference_mode():
        for ids in groups:
            lengths = [len(x) for x in ids]
            for mb in micro_batches(lengths, token_budget, max_rows, pad_multiple):
                inp, att, _ = pad_batch(ids, mb, pad_multiple, pad_id)
                padded += inp.numel()
                lm(inp.to(lm.device, non_blocking=True), att.to(lm.device, non_blocking=True))
    sync(lm.device)
    return time.perf_counter() - t0, padded


def naive_embed(model, layer: int, sae: SAE, ids: list[list[int]], masks: list[list[int]], batch_size: int,
                pad_id: int = 0, sae_chunk_tokens: int = 4096) -> tuple[float, int, torch.Tensor]:
    """Full model, ``output_hidden_states=True``, fixed batches padded to the longest row.

    Returns (seconds, padded tokens, pooled codes [rows, num_latents] float32 on the CPU).
    ``hidden_states[layer + 1]`` is the output of block ``layer`` (for any block but the last).
    """
    device = next(model.parameters()).device
    out = torch.zeros(len(ids), sae.num_latents, dtype=torch.float32)
    padded = 0
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for a in range(0, len(ids), batch_size):
            rows = ids[a:a + batch_size]
            inp, att, pools = pad_batch(ids, list(range(a, a + len(rows))), 1, pad_id, {"m": masks})
            pool = pools["m"]
            padded += inp.numel()
            res = model(input_ids=inp.to(device), attention_mask=att.to(device), output_hidden_states=True)
            h = res.hidden_states[layer + 1]
            pos = pool.to(device).nonzero()
            seg = pos[:, 0]
            acc = torch.zeros(len(rows), sae.num_latents, dtype=torch.float32, device=device)
            for c in range(0, pos.shape[0], sae_chunk_tokens):
                p = pos[c:c + sae_chunk_tokens]
                vals, idx = sae.encode(h[p[:, 0], p[:, 1]])
                pooling.scatter_codes(acc, seg[c:c + sae_chunk_tokens], vals, idx)
            out[a:a + len(rows)] = pooling.finish(acc, torch.bincount(seg, minlength=len(rows)), "mean").cpu()
    sync(device)
    return time.perf_counter() - t0, padded, out
