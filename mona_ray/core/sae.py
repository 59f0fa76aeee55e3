"""Sparse autoencoders: one encode interface, loaders for the public formats.

Every loader returns an :class:`SAE` whose :meth:`SAE.encode` maps residual-stream
vectors ``x [N, d_in]`` to sparse codes given as ``(values [N, k], indices [N, k])``.
For TopK SAEs ``k`` is the SAE's K (or the override); for ReLU / JumpReLU SAEs ``k`` is
the largest number of active latents in the chunk and the unused slots hold zeros.

EleutherAI sparsify layout (``<root>/<hookpoint>/cfg.json`` + ``sae.safetensors``):
``encoder.weight [L, d]``, ``encoder.bias [L]``, ``W_dec [L, d]``, ``b_dec [d]``;
encode = TopK_K(ReLU(W_enc (x - b_dec) + b_enc)). The input is cast to the SAE's dtype.

SAELens layout (``<dir>/cfg.json`` + ``sae_weights.safetensors``): ``W_enc [d_in, d_sae]``
(transposed here into the [L, d] layout), ``b_enc``, ``W_dec [d_sae, d_in]``, ``b_dec``,
``threshold`` (JumpReLU). Encode, as SAELens ``SAE.encode`` computes it:
x' = norm_in(x) - b_dec * apply_b_dec_to_input; pre = x' W_enc + b_enc; then
standard: ReLU(pre); topk: ReLU(TopK_K(pre)) (pre scaled by |W_dec rows| first when
``rescale_acts_by_decoder_norm``); jumprelu: ReLU(pre) * (pre > threshold).
norm_in: ``none`` / ``expected_average_only_in`` (identity at inference: the factor is
folded into the weights), ``constant_norm_rescale`` (x * sqrt(d_in) / |x| per token),
``layer_norm`` ((x - mean) / (std + 1e-5), std with Bessel's correction). Configs are
read both in the flat pre-6.0 form (``hook_point``/``hook_name``, ``activation_fn_str``,
``activation_fn_kwargs.k``) and in the 6.x form (``architecture``, ``k``, ``metadata``).
Hook names map onto sparsify hookpoints: ``blocks.N.hook_resid_post`` = ``layers.N``,
``blocks.N.hook_resid_pre`` = ``layers.{N-1}`` (the input of block N is the output of
block N-1; ``blocks.0.hook_resid_pre`` is the embeddings and cannot be used).

Weights are read with safetensors only; nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import re
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
    normalize: str = "none"  # none | constant_norm_rescale | layer_norm (SAELens run-time normalisation)
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

    def _normalize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple | None]:
        """SAELens run-time input normalisation; returns the input and what undoes it."""
        if self.normalize == "layer_norm":
            mu = x.mean(-1, keepdim=True)
            x = x - mu
            std = x.std(-1, keepdim=True)
            return x / (std + 1e-5), (mu, std)
        if self.normalize == "constant_norm_rescale":
            coeff = (self.d_in ** 0.5) / x.norm(dim=-1, keepdim=True)
            return x * coeff, (None, 1 / coeff)
        return x, None

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Latent pre-activations W_enc (x - b_dec) + b_enc, in the SAE's dtype."""
        x, _ = self._normalize_input(x.to(self.dtype))
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return torch.nn.functional.linear(x, self.W_enc, self.b_enc)

    def encode(self, x: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse codes of ``x [N, d_in]``: ``(values [N, k], indices [N, k])``."""
        pre = self.pre_acts(x)
        acts = torch.relu(pre)
        if self.activation == "topk":
            return acts.topk(k or self.k, dim=-1, sorted=False)
        if self.activation == "jumprelu":
            acts = acts * (pre > self.threshold).to(acts.dtype)
        if k is not None:  # an explicit K on a non-TopK SAE keeps the K largest
            return acts.topk(k, dim=-1, sorted=False)
        width = max(1, int((acts > 0).sum(-1).max()))
        return acts.topk(width, dim=-1, sorted=False)

    def decode(self, vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """W_dec^T z + b_dec from sparse codes, in the SAE's (normalised) input space."""
        out = torch.nn.functional.embedding_bag(idx, self.W_dec, per_sample_weights=vals.to(self.W_dec.dtype),
                                                mode="sum")
        return out + self.b_dec

    def reconstruct(self, x: torch.Tensor, k: int | None = None,
                    codes: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The SAE's reconstruction of ``x`` in the input's own space (normalisation undone);
        ``codes``: ``encode(x, k)`` when the caller already has it."""
        x = x.to(self.dtype)
        _, undo = self._normalize_input(x)
        out = self.decode(*(codes if codes is not None else self.encode(x, k)))
        if undo is not None:
            mu, scale = undo
            out = out * scale + (mu if mu is not None else 0)
        return out


def file_fingerprint(path: Path) -> str:
    """sha256 of a weight file (first 16 hex digits): the SAE's identity in manifests."""
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
    if hookpoint:
        hookpoint = to_sparsify_hookpoint(hookpoint)
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
    hp = to_sparsify_hookpoint(hookpoint) if hookpoint else d.name
    return SAE(W_enc=W_enc, b_enc=w["encoder.bias"], W_dec=w["W_dec"], b_dec=w["b_dec"],
               k=int(k or cfg["k"]), hookpoint=hp, activation="topk",
               fingerprint=file_fingerprint(d / "sae.safetensors"),
               meta={"format": "sparsify", "dir": str(d), "cfg": cfg, "provisional": bool(cfg.get("provisional", False))})


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


# ----------------------------------------------------------------------------- SAELens

_SAELENS_WEIGHTS = "sae_weights.safetensors"
_HOOK_RE = re.compile(r"blocks\.(\d+)\.hook_resid_(pre|post)")


def to_sparsify_hookpoint(name: str) -> str:
    """``layers.N`` stays; ``blocks.N.hook_resid_post`` -> ``layers.N``;
    ``blocks.N.hook_resid_pre`` -> ``layers.{N-1}`` (the input of block N)."""
    name = str(name).strip()
    m = re.fullmatch(r"(?:model\.)?layers\.(\d+)", name)
    if m:
        return f"layers.{int(m.group(1))}"
    m = _HOOK_RE.fullmatch(name)
    if not m:
        raise SAEError(f"hook {name!r} is not a residual-stream hookpoint: use layers.N (sparsify: the output of "
                       "block N), blocks.N.hook_resid_post or blocks.N.hook_resid_pre (SAELens)")
    n, kind = int(m.group(1)), m.group(2)
    if kind == "post":
        return f"layers.{n}"
    if n == 0:
        raise SAEError(f"hook {name!r} is the embedding output (the input of block 0), which mona_ray does not "
                       "hook; use an SAE trained on a later residual stream")
    return f"layers.{n - 1}"


def saelens_config(raw: dict, where: Path) -> dict:
    """Flat pre-6.0 or 6.x ``cfg.json`` -> ``{architecture, d_in, d_sae, k, hook_name, ...}``."""
    meta = raw.get("metadata") or {}
    cfg = {**meta, **{k: v for k, v in raw.items() if k != "metadata"}}
    for old, new in (("hook_point", "hook_name"), ("activation_fn_str", "activation_fn")):
        if old in cfg and new not in cfg:
            cfg[new] = cfg[old]
    act = cfg.get("activation_fn", "relu")
    kwargs = cfg.get("activation_fn_kwargs") or {}
    arch = cfg.get("architecture")
    if arch is None:
        arch = "topk" if act == "topk" else "standard"
    if arch == "topk" and cfg.get("k") is None:
        cfg["k"] = kwargs.get("k")
    if arch not in ("standard", "topk", "jumprelu"):
        raise SAEError(f"{where}: SAELens architecture {arch!r} is not supported (standard, topk, jumprelu)")
    if arch == "standard" and act not in ("relu", None):
        raise SAEError(f"{where}: activation_fn {act!r} is not supported for standard SAEs (relu only)")
    if arch == "topk" and not cfg.get("k"):
        raise SAEError(f"{where}: topk SAE without k in cfg.json")
    norm = cfg.get("normalize_activations")
    if norm is None or norm is False:
        norm = "none"
    elif norm is True:
        norm = "expected_average_only_in"
    if norm not in ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm"):
        raise SAEError(f"{where}: normalize_activations={norm!r} is not supported")
    if cfg.get("reshape_activations", "none") not in ("none", None) or "hook_z" in str(cfg.get("hook_name", "")):
        raise SAEError(f"{where}: attention hook_z SAEs are not supported; use a residual-stream SAE")
    return {"architecture": arch, "d_in": cfg.get("d_in"), "d_sae": cfg.get("d_sae"), "k": cfg.get("k"),
            "hook_name": cfg.get("hook_name"), "normalize": norm,
            "apply_b_dec_to_input": bool(cfg.get("apply_b_dec_to_input", True)),
            "rescale_acts_by_decoder_norm": bool(cfg.get("rescale_acts_by_decoder_norm", False)),
            "dtype": cfg.get("dtype")}


def find_saelens_dir(path: str | Path, hookpoint: str | None) -> Path:
    """``path`` may be the SAE folder itself or a release folder holding one folder per hook."""
    p = Path(path).expanduser()
    if (p / "cfg.json").exists() and (p / _SAELENS_WEIGHTS).exists():
        return p
    found = []
    if p.is_dir():
        for d in sorted(p.iterdir()):
            if (d / "cfg.json").exists() and (d / _SAELENS_WEIGHTS).exists():
                raw = json.loads((d / "cfg.json").read_text())
                hook = (raw.get("metadata") or {}).get("hook_name") or raw.get("hook_name") or raw.get("hook_point")
                found.append((d, hook))
    want = to_sparsify_hookpoint(hookpoint) if hookpoint else None
    for d, hook in found:
        try:
            if want and hook and to_sparsify_hookpoint(hook) == want:
                return d
        except SAEError:
            continue
    raise SAEError(
        f"sae.path={str(path)!r}: no SAELens SAE for hookpoint {hookpoint!r} there (expected cfg.json and "
        f"{_SAELENS_WEIGHTS} in that folder or in a subfolder whose hook_name is {hookpoint!r})"
        + (f"; hooks found: {', '.join(str(h) for _, h in found)}" if found else "")
        + ". Set sae.path=/path/to/sae and sae.hookpoint=layers.N.")


def load_saelens(path: str | Path, hookpoint: str | None = None, k: int | None = None) -> SAE:
    d = find_saelens_dir(path, hookpoint)
    cfg = saelens_config(json.loads((d / "cfg.json").read_text()), d)
    w = _read_safetensors(d / _SAELENS_WEIGHTS)
    need = {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"threshold"} if cfg["architecture"] == "jumprelu" else set())
    if need - set(w):
        raise SAEError(f"{d / _SAELENS_WEIGHTS}: not a SAELens {cfg['architecture']} SAE, "
                       f"missing tensors {sorted(need - set(w))}")
    W_enc, W_dec = w["W_enc"].T.contiguous(), w["W_dec"]
    d_in, d_sae = w["W_enc"].shape
    if (cfg["d_in"] or d_in) != d_in or (cfg["d_sae"] or d_sae) != d_sae or W_dec.shape != (d_sae, d_in):
        raise SAEError(f"{d}: W_enc {tuple(w['W_enc'].shape)} / W_dec {tuple(W_dec.shape)} do not match "
                       f"cfg.json d_in={cfg['d_in']}, d_sae={cfg['d_sae']}")
    b_enc = w["b_enc"]
    if cfg["rescale_acts_by_decoder_norm"]:  # TopK on pre * |W_dec row|: fold the norms in
        n = W_dec.norm(dim=-1)
        W_enc, b_enc, W_dec = W_enc * n[:, None], b_enc * n, W_dec / n[:, None]
    hook = cfg["hook_name"]
    hp = to_sparsify_hookpoint(hook) if hook else (to_sparsify_hookpoint(hookpoint) if hookpoint else None)
    if hookpoint and hp != to_sparsify_hookpoint(hookpoint):
        raise SAEError(f"{d}: this SAE reads {hook} (= {hp}), not sae.hookpoint={hookpoint!r}; "
                       f"set sae.hookpoint={hp}")
    act = cfg["architecture"] if cfg["architecture"] != "standard" else "relu"
    sae = SAE(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=w["b_dec"],
              k=int(k or cfg["k"]) if act == "topk" else (int(k) if k else None), hookpoint=hp, activation=act,
              threshold=w.get("threshold"), apply_b_dec_to_input=cfg["apply_b_dec_to_input"],
              normalize="none" if cfg["normalize"] == "expected_average_only_in" else cfg["normalize"],
              fingerprint=file_fingerprint(d / _SAELENS_WEIGHTS),
              meta={"format": "saelens", "dir": str(d), "cfg": cfg, "hook_name": hook})
    dtype = _DTYPES.get(str(cfg.get("dtype") or "").replace("torch.", ""))
    return sae.to(dtype=dtype) if dtype is not None else sae


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}

LOADERS = {"sparsify": load_sparsify, "saelens": load_saelens}


def detect_format(path: str | Path, hookpoint: str | None) -> str:
    p = Path(path).expanduser()
    cands = [p] + ([p / hookpoint] if hookpoint else [])
    for cand in cands:
        if (cand / "sae.safetensors").exists():
            return "sparsify"
        if (cand / _SAELENS_WEIGHTS).exists():
            return "saelens"
    if p.is_dir() and any((d / _SAELENS_WEIGHTS).exists() for d in p.iterdir() if d.is_dir()):
        return "saelens"
    raise SAEError(f"sae.path={str(path)!r}: no sae.safetensors (sparsify) or {_SAELENS_WEIGHTS} (SAELens) "
                   f"found for hookpoint {hookpoint!r}. Set sae.path=/path/to/sae.")


def load_sae(path: str | Path, format: str = "auto", hookpoint: str | None = None, k: int | None = None,
             device: str = "cpu", dtype: torch.dtype | None = None) -> SAE:
    """Load an SAE in any supported format; ``k`` overrides the SAE's own K."""
    fmt = detect_format(path, hookpoint) if format == "auto" else format
    if fmt not in LOADERS:
        raise SAEError(f"sae.format={fmt!r} is not supported; use one of auto, {', '.join(LOADERS)}")
    sae = LOADERS[fmt](path, hookpoint=hookpoint, k=k)
    return sae.to(device=device, dtype=dtype)
