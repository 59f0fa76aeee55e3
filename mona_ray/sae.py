"""Sparse autoencoders: one encode interface, loaders for the public formats.

Every loader returns an :class:`SAE` whose :meth:`SAE.encode` maps residual-stream
vectors ``x [N, d_in]`` to sparse codes given as ``(values [N, k], indices [N, k])``.
For TopK SAEs ``k`` is the SAE's K (or the override); for ReLU / JumpReLU SAEs ``k`` is
the largest number of active latents in the chunk and the unused slots hold zeros.

EleutherAI sparsify layout (``<root>/<hookpoint>/cfg.json`` + ``sae.safetensors``):
``encoder.weight [L, d]``, ``encoder.bias [L]``, ``W_dec [L, d]``, ``b_dec [d]``;
encode = TopK_K(ReLU(W_enc (x - b_dec) + b_enc)). The input is cast to the SAE's dtype.

Weights are read with safetensors only; nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open


class SAEError(RuntimeError):
    """An SAE path, format or hookpoint that cannot be used; the message says what to change."""


@dataclass
class SAE:
    W_enc: torch.Tensor  # [L, d] (rows are latents, as torch.nn.Linear stores them)
    b_enc: torch.Tensor  # [L]
    W_dec: torch.Tensor  # [L, d]
    b_dec: torch.Tensor  # [d]
    k: int | None  # TopK's K; None for ReLU / JumpReLU SAEs
    hookpoint: str  # sparsify naming: "layers.N" = output of block N
    activation: str = "topk"  # topk | relu | jumprelu
    threshold: torch.Tensor | None = None  # jumprelu
    apply_b_dec_to_input: bool = True
    input_scale: float | None = None  # constant_norm_rescale factor, computed per input when None
    normalize: str = "none"  # none | constant_norm_rescale | layer_norm
    fingerprint: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def num_latents(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def to(self, device=None, dtype=None) -> "SAE":
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device=device, dtype=dtype))
        return self

    def _normalize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize == "layer_norm":
            mu = x.mean(-1, keepdim=True)
            x = x - mu
            return x / (x.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
        if self.normalize == "constant_norm_rescale":
            # SAELens: scale so that the mean squared norm equals d_in
            return x * (self.d_in ** 0.5) / x.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        return x

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Latent pre-activations W_enc (x - b_dec) + b_enc, in the SAE's dtype."""
        x = self._normalize_input(x.to(self.dtype))
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return torch.nn.functional.linear(x, self.W_enc, self.b_enc)

    def encode(self, x: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse codes of ``x [N, d_in]``: ``(values [N, k], indices [N, k])``."""
        pre = self.pre_acts(x)
        if self.activation == "topk":
            acts = torch.relu(pre)
            vals, idx = acts.topk(k or self.k, dim=-1, sorted=False)
            return vals, idx
        if self.activation == "jumprelu":
            acts = torch.where(pre > self.threshold, pre, torch.zeros_like(pre))
        else:
            acts = torch.relu(pre)
        if k is not None:  # an explicit K on a non-TopK SAE keeps the K largest
            return acts.topk(k, dim=-1, sorted=False)
        width = max(1, int((acts > 0).sum(-1).max()))
        return acts.topk(width, dim=-1, sorted=False)

    def decode(self, vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Reconstruction from sparse codes (used by SAE evaluation and training)."""
        out = torch.zeros(vals.shape[0], self.d_in, dtype=self.W_dec.dtype, device=vals.device)
        out = out + torch.einsum("nk,nkd->nd", vals.to(self.W_dec.dtype), self.W_dec[idx])
        return out + self.b_dec


def _file_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def find_sparsify_dir(path: str | Path, hookpoint: str | None) -> Path:
    """``path`` may be the hookpoint folder itself or the root holding ``<hookpoint>/``."""
    p = Path(path).expanduser()
    if (p / "cfg.json").exists() and (p / "sae.safetensors").exists():
        return p
    if hookpoint and (p / hookpoint / "cfg.json").exists():
        return p / hookpoint
    have = sorted(d.name for d in p.iterdir() if (d / "cfg.json").exists()) if p.is_dir() else []
    raise SAEError(
        f"sae.path={str(path)!r}: no sparsify SAE for hookpoint {hookpoint!r} there "
        f"(expected {p}/{hookpoint}/cfg.json and sae.safetensors"
        + (f"; hookpoints found: {', '.join(have)}" if have else "") + "). "
        "Set sae.path=/path/to/sae and sae.hookpoint=layers.N.")


def load_sparsify(path: str | Path, hookpoint: str | None = None, k: int | None = None) -> SAE:
    d = find_sparsify_dir(path, hookpoint)
    cfg = json.loads((d / "cfg.json").read_text())
    w = _read_safetensors(d / "sae.safetensors")
    missing = {"encoder.weight", "encoder.bias", "W_dec", "b_dec"} - set(w)
    if missing:
        raise SAEError(f"{d / 'sae.safetensors'}: not a sparsify SAE, missing tensors {sorted(missing)}")
    W_enc = w["encoder.weight"]
    d_in = cfg.get("d_in", W_enc.shape[1])
    num_latents = cfg.get("num_latents") or d_in * cfg.get("expansion_factor", W_enc.shape[0] // d_in)
    if W_enc.shape != (num_latents, d_in):
        raise SAEError(f"{d}: encoder.weight has shape {tuple(W_enc.shape)}, cfg.json says [{num_latents}, {d_in}]")
    hp = hookpoint or d.name
    return SAE(W_enc=W_enc, b_enc=w["encoder.bias"], W_dec=w["W_dec"], b_dec=w["b_dec"],
               k=int(k or cfg["k"]), hookpoint=hp, activation="topk",
               fingerprint=_file_fingerprint(d / "sae.safetensors"), meta={"format": "sparsify", "dir": str(d), "cfg": cfg})


def save_sparsify(sae: SAE, root: str | Path, extra_cfg: dict | None = None) -> Path:
    """Write ``sae`` in sparsify layout under ``root/<hookpoint>/`` (atomic per file)."""
    from safetensors.torch import save_file

    d = Path(root) / sae.hookpoint
    d.mkdir(parents=True, exist_ok=True)
    cfg = {"k": sae.k, "d_in": sae.d_in, "num_latents": sae.num_latents,
           "expansion_factor": sae.num_latents // sae.d_in, "normalize_decoder": True,
           "multi_topk": False, "skip_connection": False, **(extra_cfg or {})}
    tensors = {"encoder.weight": sae.W_enc, "encoder.bias": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    tmp = d / "sae.safetensors.tmp"
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(d / "sae.safetensors")
    (d / "cfg.json.tmp").write_text(json.dumps(cfg, indent=2))
    (d / "cfg.json.tmp").replace(d / "cfg.json")
    return d


LOADERS = {"sparsify": load_sparsify}


def detect_format(path: str | Path, hookpoint: str | None) -> str:
    p = Path(path).expanduser()
    for cand in (p, p / hookpoint if hookpoint else p):
        if (cand / "sae.safetensors").exists():
            return "sparsify"
        if (cand / "sae_weights.safetensors").exists():
            return "saelens"
    raise SAEError(f"sae.path={str(path)!r}: no sae.safetensors (sparsify) or sae_weights.safetensors (SAELens) "
                   f"found for hookpoint {hookpoint!r}. Set sae.path=/path/to/sae.")


def load_sae(path: str | Path, format: str = "auto", hookpoint: str | None = None, k: int | None = None,
             device: str = "cpu", dtype: torch.dtype | None = None) -> SAE:
    """Load an SAE in any supported format; ``k`` overrides the SAE's own K."""
    fmt = detect_format(path, hookpoint) if format == "auto" else format
    if fmt not in LOADERS:
        raise SAEError(f"sae.format={fmt!r} is not supported; use one of auto, {', '.join(LOADERS)}")
    sae = LOADERS[fmt](path, hookpoint=hookpoint, k=k)
    return sae.to(device=device, dtype=dtype)
