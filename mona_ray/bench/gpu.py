"""``bench gpu``: the embedding actor's inner loop on a Llama-3-8B-shaped model.

The model is built from a config (no weights are downloaded; random weights run at the
same speed), cut at the hookpoint exactly as ``model.load_truncated`` cuts a real
checkpoint (blocks 0..N, no final norm, no LM head), and paired with a random TopK SAE
of the paper's shape (131,072 latents, K = 192). Rows of token ids with an
OpenHermes-like length distribution go through ``features.engine.FeatureEngine`` (length-sorted
token-budget micro-batches, SDPA, bf16, chunked SAE encode, scatter-add pooling,
sparse output) — the same object the Ray actor calls.

Reported: tokens/s and model FLOPs utilisation of (a) the bare truncated forward on the
same micro-batches and (b) the full inner loop (forward + SAE + pooling + sparse
output), with FLOPs counted as in ``flops.py`` and the device's bf16 peak from
``flops.PEAK_BF16_TFLOPS`` or ``--peak-tflops``. ``--tiny`` shrinks everything to run
on a CPU in seconds (a smoke test of this code path, not a measurement).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ..features.engine import Batching, FeatureEngine, micro_batches
from ..features.readouts import Readout
from ..core.model import TruncatedLM, resolve_dtype
from ..core.sae import SAE
from . import flops
from .forward import bare_forward, sync
from .common import BenchError, table

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tiny", action="store_true", help="tiny model/SAE/rows on CPU: a smoke test of the code path")
    p.add_argument("--layer", type=int, default=None, help="hookpoint layers.N (default: 30, the paper's; tiny: 2)")
    p.add_argument("--latents", type=int, default=None, help="SAE width (default: 131072; tiny: 512)")
    p.add_argument("--sae-k", type=int, default=None, help="SAE TopK K (default: 192; tiny: 8)")
    p.add_argument("--rows", type=int, default=None, help="rows per timed pass (default: 1024; tiny: 16)")
    p.add_argument("--mean-len", type=int, default=None, help="mean tokens per row (default: 500; tiny: 48)")
    p.add_argument("--max-len", type=int, default=None, help="truncation length (default: 2048; tiny: 128)")
    p.add_argument("--token-budget", type=int, default=None, help="padded tokens per micro-batch (default: 65536; tiny: 512)")
    p.add_argument("--max-batch-rows", type=int, default=256)
    p.add_argument("--pad-multiple", type=int, default=None,
                   help="rows are padded to a multiple of this and batched only with equal lengths (default: "
                        "the pipeline's embed.pad_multiple default)")
    p.add_argument("--sae-chunk-tokens", type=int, default=None, help="tokens per SAE chunk (default: 8192; tiny: 256)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes after one warm-up pass (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu (default: auto; tiny: cpu)")
    p.add_argument("--dtype", default="bfloat16", help="model and SAE dtype (default: %(default)s)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device bf16 dense peak in TFLOP/s (default: from the table for A100/H100/H200)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; tiny: 1)")
    p.add_argument("--seed", type=int, default=0)


def _settings(args) -> dict:
    big = dict(layer=30, latents=131072, sae_k=192, rows=1024, mean_len=500, max_len=2048,
               token_budget=65536, sae_chunk_tokens=8192)
    tiny = dict(layer=2, latents=512, sae_k=8, rows=16, mean_len=48, max_len=128, token_budget=512,
                sae_chunk_tokens=256)
    base = tiny if args.tiny else big
    s = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in base.items()}
    for k, v in s.items():
        if v < (0 if k == "layer" else 1):
            raise BenchError(f"--{k.replace('_', '-')}={v} must be {'non-negative' if k == 'layer' else 'positive'}")
    if args.repeats < 1:
        raise BenchError(f"--repeats={args.repeats} must be positive")
    arch = TINY if args.tiny else LLAMA3_8B
    if s["layer"] >= arch["num_hidden_layers"]:
        raise BenchError(f"--layer={s['layer']}: the model has blocks 0..{arch['num_hidden_layers'] - 1}")
    if s["sae_k"] > s["latents"]:
        raise BenchError(f"--sae-k={s['sae_k']} exceeds --latents={s['latents']}")
    if s["max_len"] > s["token_budget"]:
        raise BenchError(f"--max-len={s['max_len']} exceeds --token-budget={s['token_budget']}: a longest row must fit a micro-batch")
    device = args.device
    if device == "auto":
        device = "cpu" if args.tiny else ("cuda" if torch.cuda.is_available() else None)
        if device is None:
            raise BenchError("no CUDA device here; this benchmark needs a GPU (use --tiny for a CPU smoke test, "
                             "or --device cpu to run the full shape on the CPU, very slowly)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError(f"--device={device}: no CUDA device is available")
    s["device"] = device
    threads = args.threads if args.threads is not None else (1 if args.tiny else None)
    if threads is not None:
        if threads < 1:
            raise BenchError(f"--threads={threads} must be positive")
        torch.set_num_threads(threads)
    try:
        s["dtype"] = resolve_dtype(args.dtype, device)
    except Exception as e:  # ModelError: unknown dtype name
        raise BenchError(str(e)) from None
    return s


def build_model(arch: dict, layer: int, dtype: torch.dtype, device: str, seed: int) -> TruncatedLM:
    """A random Llama cut after block ``layer``, as ``model.load_truncated`` cuts a checkpoint."""
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(**{**arch, "num_hidden_layers": layer + 1}, attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaModel(cfg)
    finally:
        torch.set_default_dtype(prev)
    model.norm = torch.nn.Identity()
    model.eval().requires_grad_(False)
    return TruncatedLM(model=model, layer=layer, num_layers=arch["num_hidden_layers"], hidden_size=cfg.hidden_size,
                       dtype=dtype, device=device)


def random_sae(d: int, latents: int, k: int, layer: int, dtype: torch.dtype, device: str, seed: int) -> SAE:
    g = torch.Generator(device=device).manual_seed(seed)
    W = (torch.randn(latents, d, generator=g, device=device, dtype=torch.float32) / d ** 0.5).to(dtype)
    zeros = dict(device=device, dtype=dtype)
    return SAE(W_enc=W, b_enc=torch.zeros(latents, **zeros), W_dec=W, b_dec=torch.zeros(d, **zeros), k=k,
               hookpoint=f"layers.{layer}")


def synthetic_rows(n: int, mean_len: int, max_len: int, vocab: int, seed: int) -> list[list[int]]:
    """Token rows with a log-normal length distribution (median ~0.7x mean), truncated at max_len."""
    rng = np.random.default_rng(seed)
    sigma = 0.8
    lengths = np.clip(rng.lognormal(np.log(mean_len) - sigma ** 2 / 2, sigma, n), 8, max_len).astype(int)
    return [rng.integers(0, vocab, int(n_)).tolist() for n_ in lengths]


def run(args) -> tuple[dict, str]:
    threads = torch.get_num_threads()
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # the caller's setting (tests run in one process)


def _run(args) -> tuple[dict, str]:
    s = _settings(args)
    arch = TINY if args.tiny else LLAMA3_8B
    dev, dt = s["device"], s["dtype"]
    t0 = time.perf_counter()
    lm = build_model(arch, s["layer"], dt, dev, args.seed)
    sae = random_sae(arch["hidden_size"], s["latents"], s["sae_k"], s["layer"], dt, dev, args.seed + 1)
    build_s = time.perf_counter() - t0
    settings = Batching(token_budget=s["token_budget"], max_batch_rows=args.max_batch_rows,
                        sae_chunk_tokens=s["sae_chunk_tokens"],
                        **({"pad_multiple": args.pad_multiple} if args.pad_multiple is not None else {}))
    readout = Readout("sae", s["layer"], "none", k=s["sae_k"], sae="sae")
    engine = FeatureEngine(lm, [readout], settings, pad_token_id=0, saes={"sae": sae})
    ids = synthetic_rows(s["rows"], s["mean_len"], s["max_len"], arch["vocab_size"], args.seed + 2)
    masks = [[1] * len(x) for x in ids]
    lengths = [len(x) for x in ids]
    real = sum(lengths)
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    engine.run(ids, {"none": masks})  # warm-up: kernels, allocator, SDPA backend selection
    bare = (lm, [ids], s["token_budget"], args.max_batch_rows, settings.pad_multiple)
    n_mb = len(micro_batches(lengths, s["token_budget"], args.max_batch_rows, settings.pad_multiple))
    bare_forward(*bare)
    t_loop, t_bare, padded = [], [], 0
    for _ in range(args.repeats):
        sync(dev)
        a = time.perf_counter()
        res = engine.run(ids, {"none": masks})
        sync(dev)
        t_loop.append(time.perf_counter() - a)
        padded = res.padded_tokens
        t_bare.append(bare_forward(*bare)[0])
    cfg = lm.model.config
    f_model = flops.model_flops(cfg, s["layer"] + 1, lengths)
    f_sae = flops.sae_flops(arch["hidden_size"], s["latents"], real)
    peak = args.peak_tflops
    device_name = torch.cuda.get_device_name(torch.device(dev)) if dev.startswith("cuda") else "cpu"
    if peak is None and dev.startswith("cuda"):
        peak = flops.peak_tflops(device_name)
    loop_s, bare_s = float(np.median(t_loop)), float(np.median(t_bare))

    def mfu(f, sec):
        return f / sec / (peak * 1e12) if peak else None

    result = {
        "device": device_name, "dtype": str(dt).replace("torch.", ""), "peak_tflops": peak,
        "model": "tiny Llama" if args.tiny else "Llama-3-8B shape (random weights)",
        "blocks_run": s["layer"] + 1, "hookpoint": f"layers.{s['layer']}", "sae_latents": s["latents"], "sae_k": s["sae_k"],
        "rows": s["rows"], "real_tokens": real, "padded_tokens": padded, "padding_fraction": 1 - real / padded,
        "token_budget": s["token_budget"], "pad_multiple": settings.pad_multiple, "micro_batches": n_mb,
        "mean_padded_tokens_per_micro_batch": padded / n_mb, "model_build_s": build_s, "repeats": args.repeats,
        "model_gflop_per_token": f_model / real / 1e9, "sae_gflop_per_token": f_sae / real / 1e9,
        "bare_forward_s": bare_s, "bare_tokens_per_s": real / bare_s, "bare_mfu": mfu(f_model, bare_s),
        "inner_loop_s": loop_s, "inner_loop_tokens_per_s": real / loop_s, "inner_loop_mfu": mfu(f_model + f_sae, loop_s),
        "inner_loop_over_bare": bare_s / loop_s,
        "peak_device_memory_gb": torch.cuda.max_memory_allocated() / 2 ** 30 if dev.startswith("cuda") else None,
    }
    rows = [{"what": "bare truncated forward", "tok_s": result["bare_tokens_per_s"], "mfu": result["bare_mfu"],
             "gflop": result["model_gflop_per_token"], "sec": bare_s},
            {"what": "inner loop (forward+SAE+pool)", "tok_s": result["inner_loop_tokens_per_s"],
             "mfu": result["inner_loop_mfu"], "gflop": result["model_gflop_per_token"] + result["sae_gflop_per_token"],
             "sec": loop_s}]
    text = [f"gpu: {result['model']}, {result['hookpoint']} ({result['blocks_run']} blocks), SAE {s['latents']:,} latents "
            f"K={s['sae_k']}, {result['dtype']} on {device_name}" + (" [--tiny: smoke test, not a measurement]" if args.tiny else ""),
            f"{s['rows']:,} rows, {real:,} real tokens, padding {result['padding_fraction']:.1%}, "
            f"{n_mb} micro-batches (budget {s['token_budget']:,}, pad multiple {settings.pad_multiple}, mean "
            f"{padded / n_mb:,.0f} padded tokens), median of {args.repeats}",
            table(rows, [("what", "stage"), ("sec", "seconds"), ("tok_s", "tokens/s"), ("gflop", "GFLOP/token"),
                         ("mfu", f"MFU (peak {peak:g} TFLOP/s)" if peak else "MFU (no peak known)")])]
    return {"params": {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in s.items()}, "result": result}, "\n".join(text)
