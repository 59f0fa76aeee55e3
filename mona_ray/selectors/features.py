"""Model features for the model-based selectors, from ONE forward pass per batch of rows.

One pass of the model (cut after the main hookpoint) yields, per row:

* ``sae`` / ``mlp_gate`` / ``hidden``: the pooled representations the pipeline uses,
  computed by the product's own :class:`~mona_ray.encode.Embedder` with ``pooling="sum"``
  (pooled-token counts are kept, so mean pooling is ``sum / n_pooled``: the pooling
  ablation costs nothing);
* SAE *variants* (:class:`SaeVariant`): another SAE at another block (the layer
  ablation), another K, or another token exclusion rule, encoded from the same forward
  pass by a forward hook on that block;
* ``nait``: per block, the residual-stream delta between a row's last token and its
  first non-special token (see ``nait.py``), or its projections on given directions.

Rows are matched to batch rows by their token ids (a forward pre-hook reads the batch
the Embedder builds), so the hooks never depend on how the Embedder orders, pads or
splits its micro-batches. Every product is cached on disk per chunk of rows, keyed by
the rows' content and a fingerprint of every setting that changes it (``cache.py``):
re-running for another target, ratio, pooling or similarity never re-runs the model,
and adding a product later runs the model only for what is missing.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..features import pooling
from ..core.model import EMBEDDED_MODEL, fingerprint_model, load_tokenizer, load_truncated, parse_hookpoint, resolve_model_path
from ..core.records import content_hash, render, tokenize
from ..core.sae import SAE, load_sae
from ..scoring import SparseRows
from .cache import ChunkCache, chunks, fingerprint
from .tap import Tap, _from_store, _to_store, encode_pooled, mlpin_name, resid_name, sae_codes

EMBEDDER_PRODUCTS = ("sae", "mlp_gate", "hidden")
FEATURES_VERSION = 1


@dataclass(frozen=True)
class ModelSpec:
    """Everything that decides a row's model features (mirrors the pipeline's config keys)."""

    model_path: str = EMBEDDED_MODEL  # model.path
    dtype: str = "auto"  # model.dtype
    device: str = "auto"  # model.device
    sae_path: str | None = None  # sae.path
    sae_format: str = "auto"  # sae.format
    hookpoint: str = "layers.28"  # sae.hookpoint: the model is cut after this block
    k: int | None = None  # sae.k
    mlp_k: int | None = None  # embed.mlp_k
    render_mode: str = "chat_template"  # render.mode
    system_prompt: str | None = None  # render.system_prompt
    max_length: int = 512  # render.max_length
    exclude: str = "special"  # pool.exclude
    token_budget: int = 8192  # embed.token_budget
    pad_multiple: int = 16  # embed.pad_multiple
    max_batch_rows: int = 64  # embed.max_batch_rows
    sae_chunk_tokens: int = 4096  # embed.sae_chunk_tokens


@dataclass(frozen=True)
class SaeVariant:
    """An extra SAE encoding from the same pass: another block, K or token-exclusion rule."""

    hookpoint: str
    k: int | None = None  # None: the SAE's own K
    exclude: str = "special"
    sae_path: str | None = None  # None: the spec's sae_path (a root holding <hookpoint>/)

    @property
    def name(self) -> str:
        return f"sae@{self.hookpoint}:k={self.k or 'sae'}:exclude={self.exclude}"

    @property
    def source(self) -> str:
        return resid_name(parse_hookpoint(self.hookpoint))


@dataclass(frozen=True)
class MlpGateVariant:
    """The polysemantic ablation at any K: TopK_K of |act_fn(W_gate x)| at the MLP of block
    ``hookpoint``, encoded from its cached MLP inputs (``keep_mlp_inputs``)."""

    hookpoint: str
    k: int
    exclude: str = "special"

    @property
    def name(self) -> str:
        return f"mlp_gate@{self.hookpoint}:k={self.k}:exclude={self.exclude}"

    @property
    def source(self) -> str:
        return mlpin_name(parse_hookpoint(self.hookpoint))


@dataclass
class Features:
    """Per-row features of one set of rows (sums + pooled-token counts; see ``pooled``)."""

    n_rows: int
    sparse: dict[str, SparseRows] = field(default_factory=dict)  # summed codes
    dense: dict[str, np.ndarray] = field(default_factory=dict)  # summed vectors [n, d]
    n_pooled: dict[str, np.ndarray] = field(default_factory=dict)  # per product, tokens pooled per row
    width: dict[str, int] = field(default_factory=dict)  # number of latents / dimensions
    nait: np.ndarray | None = None  # [n, layers, d] deltas, or [n, layers] projections
    nait_layers: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)  # row -> reason (features are empty)

    def pooled(self, product: str, method: str = "mean"):
        """``SparseRows`` (sparse products) or a dense ``[n, d]`` array, sum- or mean-pooled."""
        if method not in pooling.POOLINGS:
            raise ValueError(f"pool.method={method!r}: use mean or sum")
        n = np.maximum(self.n_pooled[product], 1).astype(np.float64)
        if product in self.dense:
            X = self.dense[product].astype(np.float64)
            return X if method == "sum" else X / n[:, None]
        rows = self.sparse[product]
        if method == "sum":
            return rows
        per = np.repeat(n, np.diff(rows.indptr))
        return SparseRows(rows.indptr, rows.indices, (rows.values.astype(np.float64) / per).astype(np.float32))


def _sparse_arrays(per_row: list) -> dict[str, np.ndarray]:
    rows = SparseRows.from_lists([r[0] for r in per_row], [r[1] for r in per_row])
    return {"indptr": rows.indptr, "indices": rows.indices, "values": rows.values}


def _concat_sparse(parts: list[dict]) -> SparseRows:
    indptr = [np.zeros(1, np.int64)]
    off = 0
    for p in parts:
        indptr.append(p["indptr"][1:] + off)
        off += int(p["indptr"][-1])
    return SparseRows(np.concatenate(indptr), np.concatenate([p["indices"] for p in parts]).astype(np.int32),
                      np.concatenate([p["values"] for p in parts]).astype(np.float32))


class FeatureExtractor:
    """Computes (and caches) the requested products for lists of conversations.

    ``products``: any of ``sae``, ``mlp_gate``, ``hidden``. ``variants``: extra SAE
    encodings. ``nait_layers``: blocks whose last-minus-first-token deltas to keep
    (``None``: no NAIT features). ``keep_residuals``: blocks whose residual stream is kept
    for every real token (cached in the model's dtype); SAE variants at those blocks are
    then encoded from the cache, so a new SAE costs an encode, not a model pass. All
    blocks used must be at or before the spec's hookpoint, where the model is cut.
    """

    def __init__(self, spec: ModelSpec, products: Sequence[str] = ("sae",), variants: Sequence = (),
                 nait_layers: Sequence[int] | None = None, cache_dir: str | Path | None = None,
                 chunk_rows: int = 256, progress: bool = True, keep_residuals: Sequence[int] = (),
                 keep_mlp_inputs: Sequence[int] = ()):
        unknown = set(products) - set(EMBEDDER_PRODUCTS)
        if unknown:
            raise ValueError(f"unknown representation(s) {sorted(unknown)}; use {', '.join(EMBEDDER_PRODUCTS)}")
        self.spec, self.products, self.variants = spec, tuple(products), tuple(variants)
        self.layer = parse_hookpoint(spec.hookpoint)
        self.nait_layers = None if nait_layers is None else [int(x) for x in nait_layers]
        self.resid_layers = sorted({int(x) for x in keep_residuals})
        self.mlpin_layers = sorted({int(x) for x in keep_mlp_inputs})
        for v in self.variants:
            if isinstance(v, MlpGateVariant) and parse_hookpoint(v.hookpoint) not in self.mlpin_layers:
                raise ValueError(f"{v.name} is encoded from cached MLP inputs: add block "
                                 f"{parse_hookpoint(v.hookpoint)} to keep_mlp_inputs")
        for lay in ((self.nait_layers or []) + [parse_hookpoint(v.hookpoint) for v in self.variants]
                    + self.resid_layers + self.mlpin_layers):
            if not 0 <= lay <= self.layer:
                raise ValueError(f"block {lay} is after the hookpoint {spec.hookpoint} where the model is cut; "
                                 f"set sae.hookpoint to layers.{lay} or later")
        self.cache = ChunkCache(cache_dir)
        self.chunk_rows, self.progress = chunk_rows, progress
        self._loaded = None
        self._embedders: dict[tuple, object] = {}
        self.stats = {"rows_embedded": 0, "tokens": 0, "forward_seconds": 0.0}

    # ------------------------------------------------------------------ loading

    def _load(self):
        if self._loaded is None:
            s = self.spec
            path = resolve_model_path(s.model_path)
            tok = load_tokenizer(path)
            lm = load_truncated(path, self.layer, dtype=s.dtype, device=s.device)
            saes = {}
            if "sae" in self.products or (s.sae_path and "mlp_gate" in self.products):
                saes[(s.sae_path, s.hookpoint)] = self._sae(s.sae_path, s.hookpoint, lm)
            for v in self.variants:
                if isinstance(v, MlpGateVariant):
                    continue
                key = (v.sae_path or s.sae_path, v.hookpoint)
                if key not in saes:
                    saes[key] = self._sae(key[0], v.hookpoint, lm)
            self._loaded = (path, tok, lm, saes, fingerprint_model(path))
        return self._loaded

    def _sae(self, path, hookpoint, lm) -> SAE:
        if path is None:
            raise ValueError("an SAE is needed (representation sae or an SAE variant) but sae.path is not set")
        return load_sae(path, self.spec.sae_format, hookpoint=hookpoint, device=lm.device)

    def model_info(self) -> dict:
        path, _, lm, saes, fp = self._load()
        return {"model_path": str(path), "model_fingerprint": fp, "dtype": str(lm.dtype), "device": lm.device,
                "hookpoint": self.spec.hookpoint,
                "saes": {f"{p}:{h}": {"fingerprint": s.fingerprint, "k": s.k, "num_latents": s.num_latents,
                                      "provisional": bool(s.meta.get("cfg", {}).get("provisional", False))}
                         for (p, h), s in saes.items()}}

    def _product_keys(self, nait_dirs: np.ndarray | None) -> dict[str, str]:
        path, _, lm, saes, model_fp = self._load()
        s = self.spec
        base = {"v": FEATURES_VERSION, "model": model_fp, "dtype": s.dtype, "device_kind": lm.device.split(":")[0],
                "render": [s.render_mode, s.system_prompt, s.max_length], "hookpoint": s.hookpoint,
                "pad_multiple": s.pad_multiple}
        keys = {}
        for p in self.products:
            extra = {"exclude": s.exclude}
            if p == "sae":
                extra.update(sae=saes[(s.sae_path, s.hookpoint)].fingerprint, k=s.k)
            if p == "mlp_gate":
                extra.update(mlp_k=self._mlp_k())
            keys[p] = f"{p}-" + fingerprint({**base, **extra, "product": p})
        for v in self.variants:
            if isinstance(v, MlpGateVariant):
                keys[v.name] = "mlpvariant-" + fingerprint({**base, "variant": asdict(v)})
                continue
            sae = saes[(v.sae_path or s.sae_path, v.hookpoint)]
            keys[v.name] = "variant-" + fingerprint({**base, "variant": asdict(v), "sae": sae.fingerprint})
        for layer in self.resid_layers:
            keys[resid_name(layer)] = "resid-" + fingerprint({**base, "layer": layer})
        for layer in self.mlpin_layers:
            keys[mlpin_name(layer)] = "mlpin-" + fingerprint({**base, "layer": layer})
        if self.nait_layers is not None:
            keys["nait"] = "nait-" + fingerprint({**base, "layers": self.nait_layers,
                                                  "dirs": None if nait_dirs is None else fingerprint(nait_dirs.tolist())})
        return keys

    # ------------------------------------------------------------------ extraction

    def extract(self, rows: Sequence[list[dict]], desc: str = "features",
                nait_dirs: np.ndarray | None = None) -> Features:
        """Features of ``rows`` (conversations). ``nait_dirs [layers, d]``: keep only the
        NAIT deltas' projections on these directions (``[n, layers]``) instead of the deltas."""
        from tqdm.auto import tqdm

        keys = self._product_keys(nait_dirs)
        hashes = [content_hash(m) for m in rows]
        parts: dict[str, list[dict]] = {k: [] for k in keys}
        rejected: dict[int, str] = {}
        bar = tqdm(total=len(rows), desc=desc, unit="row", disable=not self.progress, file=sys.stderr,
                   dynamic_ncols=True)
        for a, b, ck in chunks(hashes, self.chunk_rows):
            got = {p: self.cache.load(key, ck) for p, key in keys.items()}
            missing = [p for p, v in got.items() if v is None]
            later = [v for v in self.variants if v.name in missing and v.source in keys]
            forward = [p for p in missing if p not in {v.name for v in later}]
            if forward:
                fresh = self._compute(rows[a:b], forward, nait_dirs)
                for p in forward:
                    got[p] = fresh[p]
                    self.cache.save(keys[p], ck, fresh[p], meta={"product": p, "spec": asdict(self.spec)})
            if later:
                fresh = self._variants_from_kept(rows[a:b], later, got)
                for v in later:
                    got[v.name] = fresh[v.name]
                    self.cache.save(keys[v.name], ck, fresh[v.name], meta={"product": v.name, "spec": asdict(self.spec)})
            for p in keys:
                parts[p].append(got[p])
            rej = got[next(iter(keys))].get("rejected")
            if rej is not None:
                for r in rej.tolist():
                    rejected[a + int(r)] = "no features (no tokens, or embedding failed)"
            bar.update(b - a)
        bar.close()
        return self._assemble(len(rows), parts, rejected)

    def _assemble(self, n: int, parts: dict[str, list[dict]], rejected: dict[int, str]) -> Features:
        f = Features(n_rows=n, rejected=rejected)
        _, _, lm, saes, _ = self._load()
        for p, ps in parts.items():
            if p == "nait":
                f.nait = np.concatenate([x["nait"] for x in ps]) if ps else None
                f.nait_layers = list(self.nait_layers)
                continue
            if p.startswith(("resid@", "mlpin@")):
                continue  # kept activations stay on disk: they only feed variants
            f.n_pooled[p] = np.concatenate([x["n_pooled"] for x in ps]) if ps else np.zeros(0, np.int64)
            if p == "hidden":
                f.dense[p] = np.concatenate([x["sums"] for x in ps]) if ps else np.zeros((0, lm.hidden_size))
                f.width[p] = lm.hidden_size
            else:
                f.sparse[p] = _concat_sparse(ps) if ps else SparseRows.from_lists([], [])
                f.width[p] = int(ps[0]["width"]) if ps else 0
        return f

    def _tokenize(self, rows, excludes: set[str]):
        _, tok, _, _, _ = self._load()
        s = self.spec
        ids_all, masks = [], {e: [] for e in excludes}
        for msgs in rows:
            rendered = render(msgs, tok, s.render_mode, s.system_prompt)
            ids = None
            for e in sorted(excludes):
                i, m = tokenize(rendered, tok, s.max_length, e)
                ids = i if ids is None else ids
                masks[e].append(m)
            ids_all.append(ids)
        return ids_all, masks

    def _mlp_k(self) -> int:
        """K of the mlp_gate ablation, as the Embedder resolves it: embed.mlp_k, else the SAE's K."""
        main = self._load()[3].get((self.spec.sae_path, self.spec.hookpoint))
        return self.spec.mlp_k or self.spec.k or (main.k if main is not None else None) or 32

    def _embedder(self, reps: tuple[str, ...]):
        from ..features.engine import EmbedSettings, Embedder

        if reps not in self._embedders:
            _, tok, lm, saes, _ = self._load()
            s = self.spec
            sae = saes.get((s.sae_path, s.hookpoint))
            st = EmbedSettings(token_budget=s.token_budget, pad_multiple=s.pad_multiple, max_batch_rows=s.max_batch_rows,
                               sae_chunk_tokens=s.sae_chunk_tokens, pooling="sum", k=s.k, representations=reps,
                               mlp_k=self._mlp_k() if "mlp_gate" in reps else s.mlp_k)
            self._embedders[reps] = Embedder(lm, sae, st, pad_token_id=tok.pad_token_id)
        return self._embedders[reps]

    def _compute(self, rows, missing: list[str], nait_dirs) -> dict[str, dict]:
        _, tok, lm, saes, _ = self._load()
        s = self.spec
        variants = [v for v in self.variants if v.name in missing and isinstance(v, SaeVariant)]
        want_nait = "nait" in missing
        excludes = {s.exclude} | {v.exclude for v in variants} | ({"special"} if want_nait else set())
        ids, masks = self._tokenize(rows, excludes)
        key_to_rows: dict[tuple, list[int]] = {}
        for i, x in enumerate(ids):
            key_to_rows.setdefault(tuple(x), []).append(i)
        nait_pos = None
        if want_nait:  # first non-special token (never the attention sink) and the last token
            nait_pos = [(next((j for j, m in enumerate(mk) if m), 0), len(x) - 1)
                        for x, mk in zip(ids, masks["special"])]
        tap = Tap(lm, key_to_rows, masks, nait_pos, self.nait_layers or [], nait_dirs,
                   [(v, saes[(v.sae_path or s.sae_path, v.hookpoint)], parse_hookpoint(v.hookpoint)) for v in variants],
                   len(rows), s.sae_chunk_tokens,
                   resid_layers=[x for x in self.resid_layers if resid_name(x) in missing],
                   mlpin_layers=[x for x in self.mlpin_layers if mlpin_name(x) in missing])
        reps = tuple(p for p in self.products if p in missing)
        try:
            res = self._embedder(reps).embed(ids, masks[s.exclude])
        finally:
            tap.remove()
        self.stats["rows_embedded"] += len(rows)
        self.stats["tokens"] += res.real_tokens
        self.stats["forward_seconds"] += res.forward_seconds
        rejected = np.asarray(sorted(res.rejected), dtype=np.int64)
        n_pooled = np.asarray([0 if i in res.rejected else n for i, n in enumerate(res.n_pooled)], dtype=np.int64)
        empty = (np.zeros(0, np.int32), np.zeros(0, np.float32))
        out: dict[str, dict] = {}
        for p in reps:
            vals = res.outputs[p]
            if p == "hidden":
                sums = np.stack([v if v is not None else np.zeros(lm.hidden_size, np.float32) for v in vals])
                out[p] = {"sums": sums.astype(np.float32), "n_pooled": n_pooled, "rejected": rejected}
            else:
                width = saes[(s.sae_path, s.hookpoint)].num_latents if p == "sae" else lm.block(self.layer).mlp.gate_proj.out_features
                out[p] = {**_sparse_arrays([v if v is not None else empty for v in vals]), "n_pooled": n_pooled,
                          "width": np.asarray(width), "rejected": rejected}
        for v in variants:
            sae = saes[(v.sae_path or s.sae_path, v.hookpoint)]
            npool = np.asarray([0 if i in res.rejected else int(sum(m)) for i, m in enumerate(masks[v.exclude])], np.int64)
            out[v.name] = {**_sparse_arrays([x if x is not None else empty for x in tap.var_out[v.name]]),
                           "n_pooled": npool, "width": np.asarray(sae.num_latents), "rejected": rejected}
        if want_nait:
            out["nait"] = {"nait": tap.nait, "rejected": rejected}
        for name, per_row in tap.kept.items():
            zero = torch.zeros((0, lm.hidden_size), dtype=lm.dtype)
            per_row = [x if x is not None else zero for x in per_row]
            out[name] = {"tokens": _to_store(torch.cat(per_row)),
                                      "lengths": np.asarray([len(x) for x in per_row], np.int64), "rejected": rejected}
        return out

    def _variants_from_kept(self, rows, variants: list, got: dict[str, dict]) -> dict[str, dict]:
        """Variants encoded from cached activations (no model pass).

        Variants that read the same cached activations with the same encoder (one SAE at
        several K / exclusion rules, or mlp_gate) share one dense activation pass per token
        chunk (one GEMM, not one per variant) and one TopK per distinct K; they differ only
        in the token mask they pool. TopK runs row by row, so a token's codes are the same
        as the Embedder's whichever variants share the chunk."""
        _, _, lm, saes, _ = self._load()
        s = self.spec
        _, masks = self._tokenize(rows, {v.exclude for v in variants})
        groups: dict[tuple, list] = {}
        for v in variants:
            if isinstance(v, MlpGateVariant):
                groups.setdefault(("mlp", v.source), []).append(v)
            else:
                sae_key = (v.sae_path or s.sae_path, v.hookpoint)
                share = saes[sae_key].activation == "topk"
                groups.setdefault(("sae", v.source, sae_key) if share else ("one", v.name), []).append(v)
        out = {}
        for key, vs in groups.items():
            r = got[vs[0].source]
            lengths = r["lengths"]
            h = _from_store(r["tokens"]).to(lm.device)
            seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.as_tensor(lengths)).to(h.device)
            keeps = {v.name: self._token_mask(masks[v.exclude], lengths).to(h.device) for v in vs}
            if key[0] == "mlp":
                mlp = lm.block(parse_hookpoint(vs[0].hookpoint)).mlp
                width, dense = mlp.gate_proj.out_features, (lambda x, mlp=mlp: mlp.act_fn(mlp.gate_proj(x)).abs())
                ks = {v.name: v.k for v in vs}
            elif key[0] == "sae":
                sae = saes[key[2]]
                width, dense = sae.num_latents, (lambda x, sae=sae: torch.relu(sae.pre_acts(x)))
                ks = {v.name: v.k or sae.k for v in vs}
            else:
                (v,) = vs
                sae = saes[(v.sae_path or s.sae_path, v.hookpoint)]
                with torch.inference_mode():
                    keep = keeps[v.name]
                    per_row = encode_pooled(h[keep], seg[keep], len(lengths), sae.num_latents, sae_codes(sae, v.k),
                                            s.sae_chunk_tokens)
                out[v.name] = self._variant_arrays(per_row, masks[v.exclude], lengths, sae.num_latents, r)
                continue
            accs = {v.name: torch.zeros(len(lengths), width, dtype=torch.float32, device=h.device) for v in vs}
            with torch.inference_mode():
                for a in range(0, h.shape[0], s.sae_chunk_tokens):
                    b = min(h.shape[0], a + s.sae_chunk_tokens)
                    if not any(keeps[v.name][a:b].any() for v in vs):
                        continue
                    acts = dense(h[a:b])
                    codes = {}  # one TopK per distinct K, shared by that K's exclusion rules
                    for v in vs:
                        m = keeps[v.name][a:b]
                        if m.any():
                            k = ks[v.name]
                            if k not in codes:
                                codes[k] = acts.topk(k, dim=-1, sorted=False)
                            vals, idx = codes[k]
                            pooling.scatter_codes(accs[v.name], seg[a:b][m], vals[m], idx[m])
            for v in vs:
                out[v.name] = self._variant_arrays(pooling.to_sparse(accs[v.name]), masks[v.exclude], lengths, width, r)
        return out

    @staticmethod
    def _token_mask(row_masks: list[list[int]], lengths: np.ndarray) -> torch.Tensor:
        """The cached tokens (all real tokens, row after row) that a pooling mask keeps."""
        keep = torch.zeros(int(lengths.sum()), dtype=torch.bool)
        at = 0
        for i, n in enumerate(lengths.tolist()):
            if n:
                m = row_masks[i]
                if len(m) != n:
                    raise RuntimeError(f"cached activations of row {i} have {n} tokens, tokenization gives {len(m)}; "
                                       "clear the feature cache")
                keep[at:at + n] = torch.as_tensor(m, dtype=torch.bool)
            at += n
        return keep

    @staticmethod
    def _variant_arrays(per_row, row_masks, lengths: np.ndarray, width: int, src: dict) -> dict:
        npool = np.asarray([int(sum(m)) if n else 0 for m, n in zip(row_masks, lengths.tolist())], np.int64)
        return {**_sparse_arrays(per_row), "n_pooled": npool, "width": np.asarray(width), "rejected": src["rejected"]}

def spec_from_config(cfg) -> ModelSpec:
    """A :class:`ModelSpec` from a pipeline-style config (``model``, ``sae``, ``render``, ``pool``, ``embed``)."""
    g = lambda sect, key, default: (cfg.get(sect, {}) or {}).get(key, default)  # noqa: E731
    d = ModelSpec()
    return replace(d, model_path=str(g("model", "path", d.model_path)), dtype=g("model", "dtype", d.dtype),
                   device=g("model", "device", d.device),
                   sae_path=None if g("sae", "path", None) is None else str(g("sae", "path", None)),
                   sae_format=g("sae", "format", d.sae_format), hookpoint=g("sae", "hookpoint", d.hookpoint),
                   k=g("sae", "k", d.k), mlp_k=g("embed", "mlp_k", d.mlp_k),
                   render_mode=g("render", "mode", d.render_mode), system_prompt=g("render", "system_prompt", d.system_prompt),
                   max_length=int(g("render", "max_length", d.max_length)), exclude=g("pool", "exclude", d.exclude),
                   token_budget=int(g("embed", "token_budget", d.token_budget)),
                   pad_multiple=int(g("embed", "pad_multiple", d.pad_multiple)),
                   max_batch_rows=int(g("embed", "max_batch_rows", d.max_batch_rows)),
                   sae_chunk_tokens=int(g("embed", "sae_chunk_tokens", d.sae_chunk_tokens)))
