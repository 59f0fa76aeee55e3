"""``bench less``: what LESS's gradient features cost per row, beside MoNA's model pass, on the same rows.

One process, one device, the same ``--rows`` rows of the source set (the demo's by default),
rendered and truncated as the pipeline renders them (``render.*`` of the base config):

1. **embed**: the embedding pass's model work, the truncated forward up to ``sae.hookpoint``
   in the pipeline's micro-batches (``forward.bare_forward``: the embed stage's ceiling);
2. **warm-up**: one training row of LESS's warm-up (the full model with LoRA adapters on
   ``q/k/v/o_proj``, rank ``--rank``, forward and backward in train mode, plus an AdamW step
   every 32 rows);
3. **gradient**: one source row's feature before projection (forward and backward in eval
   mode, the flat adapter gradient, Adam's direction);
4. **projection** to ``--proj-dim`` dimensions, 16 rows at a time: ``countsketch`` in full;
   TRAK's ``rademacher`` (LESS's own) timed on its first block of 128 columns and scaled to all
   of them (it draws ``adapter weights x proj_dim`` random signs per chunk of rows).

Per source row, LESS costs ``checkpoints x (gradient + projection)``, plus its share of the
warm-up (``share x epochs x warm-up``); the report gives that total against the embed pass.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from .common import BenchError, peak_rss_mb, reset_peak_rss, table
from .embed import _compose


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", type=int, default=32, help="source rows (default: %(default)s)")
    p.add_argument("--source", default=None, help="Parquet source file (default: the demo source set)")
    p.add_argument("--rank", type=int, default=128, help="LoRA rank (LESS's default: %(default)s)")
    p.add_argument("--proj-dim", type=int, default=8192, help="projected dimensions (LESS's default: %(default)s)")
    p.add_argument("--checkpoints", type=int, default=4, help="warm-up checkpoints (LESS: one per epoch, 4)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="config overrides (model.path=..., render.max_length=...)")


def _rows(args, cfg, tok):
    from importlib.resources import files

    import pyarrow.parquet as pq

    from ..core.records import normalize_record
    from ..features.gradients import labelled

    src = args.source or str(files("mona_ray") / "assets" / "demo" / "source.parquet")
    t = pq.read_table(src).to_pylist()
    if args.rows > len(t):
        raise BenchError(f"--rows={args.rows}: {src} has only {len(t)} rows")
    pick = np.sort(np.random.default_rng(args.seed).choice(len(t), args.rows, replace=False))
    msgs = [normalize_record(t[i]) for i in pick]
    r = cfg.render
    return [labelled(m, tok, int(r.max_length), r.mode, r.system_prompt) for m in msgs]


def run(args) -> tuple[dict, str]:
    import torch
    from transformers import AutoModelForCausalLM

    from ..core.model import load_tokenizer, load_truncated, parse_hookpoint, resolve_model_path
    from ..features import gradients as G
    from .forward import bare_forward

    if args.rows < 1 or args.rank < 1 or args.proj_dim < 1 or args.checkpoints < 1:
        raise BenchError("--rows, --rank, --proj-dim and --checkpoints must be positive")
    cfg = _compose(list(args.overrides))
    dtype = getattr(torch, args.dtype)
    path = resolve_model_path(str(cfg.model.path))
    tok = load_tokenizer(path)
    lab = _rows(args, cfg, tok)
    ids = [x for x, _ in lab]  # the pipeline's token ids: the same rendering, truncation and no special tokens added
    tokens = sum(len(x) for x in ids)
    out = {"rows": args.rows, "tokens": tokens, "model": str(cfg.model.path), "dtype": args.dtype,
           "rank": args.rank, "proj_dim": args.proj_dim, "checkpoints": args.checkpoints,
           "max_length": int(cfg.render.max_length), "hookpoint": cfg.sae.hookpoint}

    # 1. the embed pass's forward, as the pipeline batches it
    lm = load_truncated(path, parse_hookpoint(cfg.sae.hookpoint), dtype=args.dtype, device="cpu")
    e = cfg.embed
    bare_forward(lm, [ids[:2]], int(e.token_budget), int(e.max_batch_rows))  # warm
    sec, _ = bare_forward(lm, [ids], int(e.token_budget), int(e.max_batch_rows), int(e.pad_multiple))
    out["embed_s_per_row"] = sec / args.rows
    del lm

    # 2-4. LESS
    reset_peak_rss()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    torch.manual_seed(args.seed)
    params = G.add_lora(model, G.LoraSpec(rank=args.rank, alpha=4.0 * args.rank))
    dim = sum(p.numel() for _, p in params)
    out["adapter_weights"] = dim
    opt = torch.optim.AdamW([p for _, p in params], lr=2e-5, weight_decay=0.0)
    model.train()
    G.row_loss(model, *lab[0]).backward()  # warm
    opt.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    for i, row in enumerate(lab):
        if G.has_labels(row[1]):
            (G.row_loss(model, *row) / 32).backward()
        if (i + 1) % 32 == 0 or i + 1 == len(lab):
            opt.step()
            opt.zero_grad(set_to_none=True)
    out["warmup_s_per_row"] = (time.perf_counter() - t0) / args.rows
    m, v = (torch.cat([opt.state[p][k].reshape(-1) for _, p in params]) for k in ("exp_avg", "exp_avg_sq"))
    model.eval()
    t0 = time.perf_counter()
    grads = []
    for row in lab:
        if G.has_labels(row[1]):
            grads.append(G.adam_direction(G.row_gradient(model, params, *row), m, v).to(torch.float16))
    out["gradient_s_per_row"] = (time.perf_counter() - t0) / args.rows
    chunk = torch.stack(grads[:16])
    cs = G.CountSketchProjector(dim, args.proj_dim, seed=0)
    t0 = time.perf_counter()
    cs.project(chunk)
    out["countsketch_s_per_row"] = (time.perf_counter() - t0) / len(chunk)
    rad = G.RademacherProjector(dim, min(args.proj_dim, 128), seed=0)  # its first block of 128 columns
    t0 = time.perf_counter()
    rad.project(chunk)
    blocks = -(-args.proj_dim // 128)
    out["rademacher_s_per_row"] = (time.perf_counter() - t0) / len(chunk) * blocks
    out["rademacher_timed_blocks"] = f"1 of {blocks}"
    out["less_peak_rss_mb"] = peak_rss_mb()
    share_epochs = 0.05 * 4
    for proj in ("countsketch", "rademacher"):
        per_row = (args.checkpoints * (out["gradient_s_per_row"] + out[f"{proj}_s_per_row"])
                   + share_epochs * out["warmup_s_per_row"])
        out[f"less_{proj}_s_per_row"] = per_row
        out[f"less_{proj}_vs_embed"] = per_row / out["embed_s_per_row"]
    rows = [{"stage": k.removesuffix("_s_per_row"), "s_per_row": out[k],
             "rows_per_s": 1 / out[k] if out[k] else None}
            for k in ("embed_s_per_row", "warmup_s_per_row", "gradient_s_per_row", "countsketch_s_per_row",
                      "rademacher_s_per_row", "less_countsketch_s_per_row", "less_rademacher_s_per_row")]
    text = table(rows, [("stage", "stage"), ("s_per_row", "s / row"), ("rows_per_s", "rows / s")])
    text += (f"\n{args.rows} rows, {tokens} tokens, {dim:,} adapter weights (rank {args.rank}), {args.checkpoints} "
             f"checkpoints: LESS costs {out['less_countsketch_s_per_row'] / out['embed_s_per_row']:.0f}x the "
             f"embed pass per row with countsketch, {out['less_rademacher_s_per_row'] / out['embed_s_per_row']:.0f}x "
             f"with TRAK's rademacher; peak RSS {out['less_peak_rss_mb']:.0f} MB")
    return out, text
