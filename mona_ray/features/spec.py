"""What an engine is built from, resolved once and passed as plain data (to Ray actors too).

:func:`sae_ref` finds an SAE and reads its metadata without its weights; :class:`EngineJob`
holds everything an actor or a local run needs to build a :class:`~.engine.FeatureEngine`
(model folder, resolved dtype and device, SAEs, readouts, batching), and
:func:`load_engine` builds it. :func:`readout_width` gives a readout's width from the model's
config and the SAE's metadata, so the driver never guesses it from the data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..core.sae import SAEError, detect_format, file_fingerprint, find_sparsify_dir
from .engine import Batching
from .readouts import Readout


@dataclass(frozen=True)
class SaeRef:
    """An SAE located on disk: where, which format, and what the store's fingerprint needs."""

    path: str  # resolved folder (a sparsify/SAELens root)
    format: str  # sparsify | saelens
    hookpoint: str  # layers.N
    k: int  # the K it is used with (sae.k, else its own)
    num_latents: int
    fingerprint: str  # of its weights file
    provisional: bool = False
    hub: str = ""  # resolved from the hub: the reference at its commit (a node without ``path`` fetches it)

    @property
    def key(self) -> str:
        return f"{self.path}:{self.hookpoint}"


def sae_ref(path, fmt: str, hookpoint: str, k: int | None = None) -> SaeRef:
    """Locate the SAE for ``hookpoint`` under ``path`` and read its metadata (weights only for SAELens)."""
    p = Path(str(path)).expanduser()
    if not p.exists():
        raise SAEError(f"sae.path={str(path)!r} does not exist. Set sae.path=/path/to/sae (a sparsify or SAELens folder).")
    fmt = detect_format(p, hookpoint) if fmt == "auto" else fmt
    if fmt == "sparsify":
        d = find_sparsify_dir(p, hookpoint)
        c = json.loads((d / "cfg.json").read_text())
        return SaeRef(str(p.resolve()), fmt, hookpoint, int(k or c["k"]),
                      int(c.get("num_latents") or c["d_in"] * c["expansion_factor"]),
                      file_fingerprint(d / "sae.safetensors"), bool(c.get("provisional", False)))
    from ..core.sae import load_sae

    sae = load_sae(p, fmt, hookpoint, k)
    return SaeRef(str(p.resolve()), fmt, hookpoint, int(sae.k), int(sae.num_latents), sae.fingerprint,
                  bool(sae.meta.get("provisional", False)))


def _text_config(model_dir, trust_remote_code: bool = False):
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    return c.get_text_config() if hasattr(c, "get_text_config") else c


def num_layers(model_dir, trust_remote_code: bool = False) -> int:
    """Blocks in the model at ``model_dir`` (from its config): what ``rds_readout`` needs."""
    return int(_text_config(model_dir, trust_remote_code).num_hidden_layers)


def readout_width(r: Readout, model_dir, sae: SaeRef | None = None, trust_remote_code: bool = False) -> int:
    """Values per row of readout ``r``: the SAE's latents, the MLP's gate units or the hidden size."""
    if r.kind == "sae":
        if sae is None:
            raise ValueError(f"readout {r.name} needs its SAE's metadata")
        return int(sae.num_latents)
    c = _text_config(model_dir, trust_remote_code)
    if r.kind == "mlp_gate":
        return int(c.intermediate_size)
    if r.kind == "nait":
        return len(r.blocks) * int(c.hidden_size)
    return int(c.hidden_size)


@dataclass(frozen=True)
class EngineJob:
    model_dir: str
    dtype: str  # resolved (never "auto"): every actor computes in the same dtype
    device: str  # cpu | cuda
    readouts: tuple[Readout, ...]
    saes: tuple[SaeRef, ...] = ()
    batching: Batching = Batching()
    torch_threads: int = 0  # 0: torch's default
    trust_remote_code: bool = False
    attn_implementation: str = "sdpa"
    model_hub: str = ""  # resolved from the hub: the reference at its commit (a node without model_dir fetches it)

    @property
    def layer(self) -> int:
        """The block the model is cut after: the deepest any readout reads."""
        return max(r.block for r in self.readouts)


PROCESS_BYTES = 768 << 20  # a worker with torch and transformers imported, before any weights (measured: ~0.6 GiB)
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def _weights_elements(model_dir: str, layer: int) -> int:
    """Elements of the tensors a model cut after ``layer`` loads (the embeddings, blocks
    0..layer, the norms; never ``lm_head``), read from its safetensors headers: no weights read."""
    import re
    import struct

    n = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        for name, t in header.items():
            m = re.search(r"\blayers\.(\d+)\.", name)
            if name == "__metadata__" or "lm_head" in name or (m and int(m.group(1)) > layer):
                continue
            count = 1
            for d in t["shape"]:
                count *= int(d)
            n += count
    return n


def engine_memory(job: EngineJob, max_length: int) -> int:
    """Bytes one engine (an embedding actor, the explain task) holds at its peak, estimated from
    the model and SAE sizes, so a cluster schedules by it (Ray's ``memory=``): the weights it
    loads (read from the checkpoint's headers) and its SAEs at the compute dtype, one
    micro-batch's activations (``token_budget`` tokens through a block; on CPU also the
    attention scores of rows up to ``max_length`` tokens; the SAE's pre-activations of one
    encode chunk), plus the worker process itself."""
    c = _text_config(job.model_dir, job.trust_remote_code)
    b = _DTYPE_BYTES.get(job.dtype, 4)
    hidden, inter = int(c.hidden_size), int(getattr(c, "intermediate_size", 4 * c.hidden_size) or 4 * c.hidden_size)
    weights = _weights_elements(job.model_dir, job.layer) * b
    saes = sum((2 * s.num_latents * hidden + s.num_latents + hidden) * b for s in job.saes)
    tokens = int(job.batching.token_budget)
    acts = tokens * (6 * hidden + 3 * inter) * b
    if not job.device.startswith("cuda"):  # CPU attention materialises [rows, heads, L, L] scores (fp32)
        acts += tokens * min(int(max_length), tokens) * int(c.num_attention_heads) * 4
    encode = 2 * min(tokens, int(job.batching.sae_chunk_tokens)) * max((s.num_latents for s in job.saes), default=0) * 4
    return int(PROCESS_BYTES + weights + saes + acts + encode)


def load_engine(job: EngineJob, token_hook=None):
    """``(engine, tokenizer)`` for ``job``: the truncated model, its SAEs (cast to the model's
    compute dtype, whatever dtype they are stored in) and the readouts."""
    import torch

    from ..core.hub import here
    from ..core.model import load_tokenizer, load_truncated, resolve_device
    from ..core.sae import load_sae
    from .engine import FeatureEngine

    if job.torch_threads > 0:
        torch.set_num_threads(job.torch_threads)
    device = resolve_device(job.device)
    model_dir = here(job.model_dir, job.model_hub)  # a cluster node without the driver's cache fetches the same commit
    lm = load_truncated(model_dir, job.layer, job.dtype, device, job.trust_remote_code, job.attn_implementation)
    saes = {s.key: load_sae(here(s.path, s.hub, "sae", s.hookpoint), s.format, s.hookpoint, s.k, device=device,
                            dtype=lm.dtype) for s in job.saes}
    tok = load_tokenizer(model_dir, job.trust_remote_code)
    return FeatureEngine(lm, list(job.readouts), job.batching, tok.pad_token_id, saes=saes,
                         token_hook=token_hook), tok


def representation_readout(representation: str, hookpoint: str, exclude: str, sae: SaeRef | None,
                           mlp_k: int | None = None, weighting: str = "mean") -> Readout:
    """The readout of one representation setting (``embed.representation``), as the pipeline and
    the evaluation both build it: ``sae`` at the SAE's K, ``mlp_gate`` at ``embed.mlp_k`` (else the
    SAE's K), ``hidden`` dense."""
    from ..core.model import parse_hookpoint

    block = parse_hookpoint(hookpoint)
    if representation == "sae":
        if sae is None:
            raise SAEError("embed.representation=sae needs an SAE: set sae.path")
        return Readout("sae", block, exclude, k=sae.k, sae=sae.key)
    if representation == "mlp_gate":
        k = mlp_k or (sae.k if sae is not None else None)
        if not k:
            raise ValueError("embed.representation=mlp_gate needs its K: set embed.mlp_k (or sae.path, whose K is the default)")
        return Readout("mlp_gate", block, exclude, k=int(k))
    if representation == "hidden":
        return Readout("hidden", block, exclude, weighting=weighting)
    raise ValueError(f"embed.representation={representation!r}: use sae, mlp_gate or hidden")
