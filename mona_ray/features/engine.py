"""The feature engine: token ids -> pooled features, for any set of readouts, from ONE forward.

Every model-based feature in mona_ray comes from here: the pipeline's embedding actors,
the evaluation, NAIT, explain's top-activating tokens and the benchmarks. For a list of
rows the :class:`FeatureEngine`

1. sorts rows by length and packs rows of equal padded length into micro-batches under a
   padded-token budget (:func:`micro_batches`), so padding stays small and a row's result
   never depends on its neighbours;
2. pads them into tensors (:func:`pad_batch`, the one place that does) and runs the model
   only up to the deepest block any readout needs (``model.TruncatedLM``), with forward
   hooks on the blocks (and MLPs) that readouts read;
3. hands each readout its activations: sparse codes are encoded **row by row**, in chunks
   of at most ``sae_chunk_tokens`` of that row's pooled tokens (the determinism rule: a
   GEMM's result for one input row can change with the number of rows in the call, seen
   on CPU BLAS at small M, so a token set is only ever encoded with itself), scatter-added
   into per-row accumulators and pooled (``pooling.py``);
4. retries a micro-batch that raises (a CUDA OOM, say) in halves; a single row that still
   fails is reported back as rejected with its reason instead of killing the job.

Readouts that read the same tokens (same block, source and exclusion rule) with the same
encoder share one dense pass per chunk; an SAE at several K shares one TopK per K.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from . import pooling
from .readouts import Readout


@dataclass(frozen=True)
class Batching:
    """How rows are grouped and encoded (``embed.*`` settings); only ``pad_multiple`` and
    ``sae_chunk_tokens`` can change a row's bits, and both are in the store's fingerprint."""

    token_budget: int = 8192  # padded tokens per micro-batch
    pad_multiple: int = 16  # rows are padded to a multiple of this (and batched only with equal lengths)
    max_batch_rows: int = 64
    sae_chunk_tokens: int = 4096  # tokens per encode call (bounds memory at 131k latents)
    value_dtype: str = "float32"  # float32 | float16 for the stored sparse values

    @classmethod
    def of(cls, embed) -> "Batching":
        """From an ``embed`` config section (``EmbedConfig``)."""
        return cls(token_budget=int(embed.token_budget), pad_multiple=int(embed.pad_multiple),
                   max_batch_rows=int(embed.max_batch_rows), sae_chunk_tokens=int(embed.sae_chunk_tokens),
                   value_dtype=str(embed.value_dtype))


@dataclass
class EngineResult:
    """Per readout name, per row: ``(indices, values)`` (sparse, mean-pooled) or a float32
    vector (dense); ``None`` for rejected rows."""

    outputs: dict[str, list]
    n_tokens: list[int]
    n_pooled: dict[str, list[int]]  # per readout, tokens pooled per row (its exclusion rule)
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
    that row alone, so its features do not change with the unit size, the number of
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


def pad_batch(ids: list[list[int]], rows: list[int], pad_multiple: int, pad_token_id: int,
              masks: dict[str, list[list[int]]] | None = None):
    """Right-padded ``input_ids [B, T]``, ``attention_mask [B, T]`` and, per exclusion rule in
    ``masks``, the pooled-token mask ``[B, T]`` (bool) of the rows ``rows``."""
    B, T = len(rows), padded_length(max(len(ids[i]) for i in rows), pad_multiple)
    inp = torch.full((B, T), pad_token_id, dtype=torch.long)
    att = torch.zeros((B, T), dtype=torch.long)
    pools = {e: torch.zeros((B, T), dtype=torch.bool) for e in (masks or {})}
    for b, i in enumerate(rows):
        n = len(ids[i])
        inp[b, :n] = torch.as_tensor(ids[i], dtype=torch.long)
        att[b, :n] = 1
        for e, m in (masks or {}).items():
            pools[e][b, :n] = torch.as_tensor(m[i], dtype=torch.bool)
    return inp, att, pools


class FeatureEngine:
    """One forward per micro-batch, read out into every readout in ``readouts``.

    ``saes``: the SAE of each SAE readout's ``sae`` key (loaded in the model's dtype).
    ``token_hook(readout, rows, positions, values, indices)``: optional, called with every
    encoded chunk of an SAE readout's token codes (``rows``/``positions`` of each token):
    how explain finds the tokens that fire a latent without a second engine.
    """

    def __init__(self, lm, readouts: list[Readout], batching: Batching = Batching(), pad_token_id: int = 0,
                 saes: dict | None = None, token_hook=None):
        if not readouts:
            raise ValueError("the feature engine needs at least one readout")
        names = [r.name for r in readouts]
        if len(set(names)) != len(names):
            raise ValueError(f"readouts with the same name: {names}")
        self.lm, self.readouts, self.b = lm, list(readouts), batching
        self.pad_token_id = pad_token_id
        self.saes = dict(saes or {})
        self.token_hook = token_hook
        for r in self.readouts:
            if not 0 <= r.block <= lm.layer:
                raise ValueError(f"readout {r.name} reads block {r.block}, after layers.{lm.layer} where the model is cut")
            if r.final_norm and (lm.final_norm is None or r.block != lm.num_layers - 1):
                raise ValueError(f"readout {r.name} reads through the final norm, which follows only the last block "
                                 f"(layers.{lm.num_layers - 1}); " + (
                                     f"the model is cut after layers.{lm.layer}" if lm.layer != lm.num_layers - 1
                                     else "this model has no final norm at model.norm"))
            if r.kind == "sae" and r.sae not in self.saes:
                raise ValueError(f"readout {r.name} needs the SAE {r.sae!r}, which was not loaded")
        self.excludes = sorted({r.exclude for r in self.readouts} | ({"special"} if self._has("nait") else set()))
        self._groups = self._group()
        self._acts: dict[tuple[str, int], torch.Tensor] = {}
        self._nait_pos: list[tuple[int, int]] = []
        self._hooks = []
        self._install_hooks()
        if lm.device.startswith("cuda"):
            torch.use_deterministic_algorithms(True, warn_only=True)

    def _has(self, kind: str) -> bool:
        return any(r.kind == kind for r in self.readouts)

    def width(self, r: Readout) -> int:
        if r.kind == "sae":
            return int(self.saes[r.sae].num_latents)
        if r.kind == "mlp_gate":
            return int(self.lm.block(r.block).mlp.gate_proj.out_features)
        if r.kind == "nait":
            return len(r.blocks) * int(self.lm.hidden_size)
        return int(self.lm.hidden_size)

    # ------------------------------------------------------------------ hooks

    def _group(self) -> dict[tuple, list[Readout]]:
        """Readouts that read the same tokens through the same dense map share one pass."""
        groups: dict[tuple, list[Readout]] = {}
        for r in self.readouts:
            if r.kind == "nait":
                continue
            enc = r.sae if r.kind == "sae" and self.saes[r.sae].activation == "topk" else (
                r.name if r.kind == "sae" else r.kind)
            groups.setdefault((r.source, r.block, r.exclude, r.kind, enc), []).append(r)
        return groups

    def _install_hooks(self) -> None:
        lm = self.lm
        resid = {b for (src, b, *_rest) in self._groups if src == "resid" and b != lm.layer}
        mlp_in = {b for (src, b, *_rest) in self._groups if src == "mlp_in"}
        nait = sorted({b for r in self.readouts if r.kind == "nait" for b in r.blocks})
        for b in sorted(resid | set(nait)):
            keep = b in resid

            def hook(_m, _i, out, b=b, keep=keep):
                h = out[0] if isinstance(out, (tuple, list)) else out
                if keep:
                    self._acts[("resid", b)] = h
                if b in self._nait_blocks:
                    self._nait_read(b, h)

            self._hooks.append(lm.block(b).register_forward_hook(hook))
        for b in sorted(mlp_in):
            self._hooks.append(lm.block(b).mlp.register_forward_pre_hook(
                lambda _m, args, b=b: self._acts.__setitem__(("mlp_in", b), args[0])))
        self._nait_blocks = set(nait)
        self._nait_out: dict[int, torch.Tensor] = {}

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _nait_read(self, block: int, h: torch.Tensor) -> None:
        """Per row of the batch: the block's output at its last token minus its first non-special token."""
        first = torch.as_tensor([p[0] for p in self._nait_pos], device=h.device)
        last = torch.as_tensor([p[1] for p in self._nait_pos], device=h.device)
        ar = torch.arange(h.shape[0], device=h.device)
        self._nait_out[block] = (h[ar, last].float() - h[ar, first].float()).cpu()

    # ------------------------------------------------------------------ public

    def run(self, ids: list[list[int]], masks: dict[str, list[list[int]]], on_batch=None) -> EngineResult:
        """Features of rows ``ids`` with pooled-token ``masks`` per exclusion rule (every rule a
        readout uses; ``special`` too for NAIT). ``on_batch(rows, real_tokens)`` after every micro-batch."""
        missing = [e for e in self.excludes if e not in masks]
        if missing:
            raise ValueError(f"pooled-token masks for exclusion rule(s) {missing} are needed by the readouts")
        n = len(ids)
        res = EngineResult(outputs={r.name: [None] * n for r in self.readouts}, n_tokens=[len(x) for x in ids],
                           n_pooled={r.name: [int(sum(m)) for m in masks[r.exclude]] for r in self.readouts})
        for i in range(n):
            if not ids[i]:
                res.rejected[i] = "no tokens after rendering"
        live = [i for i in range(n) if ids[i]]
        lengths = [len(ids[i]) for i in live]
        for mb in micro_batches(lengths, self.b.token_budget, self.b.max_batch_rows, self.b.pad_multiple):
            self._run_with_retry([live[j] for j in mb], ids, masks, res)
            if on_batch is not None:
                on_batch(len(mb), sum(lengths[j] for j in mb))
        return res

    # ------------------------------------------------------------------ internals

    def _run_with_retry(self, rows: list[int], ids, masks, res: EngineResult) -> None:
        try:
            self._run(rows, ids, masks, res)
        except Exception as e:  # noqa: BLE001 - any failure of our batch is retried smaller
            self._acts.clear()
            if self.lm.device.startswith("cuda"):
                torch.cuda.empty_cache()
            if len(rows) == 1:
                res.rejected[rows[0]] = f"embedding failed: {type(e).__name__}: {str(e)[:300]}"
                return
            half = len(rows) // 2
            self._run_with_retry(rows[:half], ids, masks, res)
            self._run_with_retry(rows[half:], ids, masks, res)

    def _run(self, rows: list[int], ids, masks, res: EngineResult) -> None:
        dev = self.lm.device
        inp, att, pools = pad_batch(ids, rows, self.b.pad_multiple, self.pad_token_id,
                                    {e: masks[e] for e in self.excludes})
        if self._nait_blocks:  # first non-special token (never the attention sink) and the last token
            self._nait_pos = [(next((j for j, m in enumerate(masks["special"][i]) if m), 0), len(ids[i]) - 1)
                              for i in rows]
        if dev.startswith("cuda"):
            inp, att = (t.pin_memory().to(dev, non_blocking=True) for t in (inp, att))
            pools = {e: t.to(dev) for e, t in pools.items()}
        B = len(rows)
        t0 = time.perf_counter()
        outs: dict[str, object] = {}
        try:
            with torch.inference_mode():
                self._acts[("resid", self.lm.layer)] = self.lm(inp, att)
                for (src, block, exclude, kind, _enc), group in self._groups.items():
                    x = self._acts[(src, block)]
                    pos = pools[exclude].nonzero()
                    outs.update(self._read_group(kind, group, x, pos, B, rows))
        finally:
            self._acts.clear()
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        res.forward_seconds += time.perf_counter() - t0
        res.real_tokens += int(att.sum())
        res.padded_tokens += int(att.numel())
        for r in self.readouts:
            if r.kind == "nait":
                per_row = list(torch.cat([self._nait_out[b] for b in r.blocks], dim=1).numpy())
            elif r.sparse:
                per_row = pooling.to_sparse(outs[r.name], self.b.value_dtype)
            else:
                per_row = list(outs[r.name].float().cpu().numpy())
            for b, i in enumerate(rows):
                res.outputs[r.name][i] = per_row[b]
        self._nait_out.clear()

    def _read_group(self, kind: str, group: list[Readout], x: torch.Tensor, pos: torch.Tensor, B: int,
                    rows: list[int]) -> dict[str, torch.Tensor]:
        seg = pos[:, 0]
        counts = torch.bincount(seg, minlength=B)
        if kind == "hidden":
            out = {}
            for r in group:
                acc = torch.zeros(B, x.shape[-1], dtype=torch.float32, device=x.device)
                tok = x[pos[:, 0], pos[:, 1]]
                if r.final_norm:  # per-token norm: the same on the pooled tokens as on the whole batch
                    tok = self.lm.final_norm(tok)
                if r.weighting == "position":  # RDS+: token i of a row weighs i + 1 (1-based position)
                    w = (pos[:, 1] + 1).to(torch.float32)
                    pooling.scatter_dense(acc, seg, tok.float() * w.unsqueeze(1))
                    total = torch.zeros(B, dtype=torch.float32, device=x.device).index_add_(0, seg, w)
                    out[r.name] = acc / total.clamp_min(1e-12).unsqueeze(1)
                else:
                    pooling.scatter_dense(acc, seg, tok)
                    out[r.name] = pooling.finish(acc, counts, "mean")
            return out
        width = self.width(group[0])
        dense_fn, ks = self._encoder(kind, group)
        accs = {r.name: torch.zeros(B, width, dtype=torch.float32, device=x.device) for r in group}
        for a, e in self._chunks(seg, B):
            p = pos[a:e]
            acts = dense_fn(x[p[:, 0], p[:, 1]])
            codes = {}
            for r in group:
                k = ks[r.name]
                if k not in codes:
                    codes[k] = acts(k)
                vals, idx = codes[k]
                pooling.scatter_codes(accs[r.name], seg[a:e], vals, idx)
                if self.token_hook is not None:
                    self.token_hook(r, [rows[b] for b in seg[a:e].tolist()], p[:, 1].tolist(), vals, idx)
        return {name: pooling.finish(acc, counts, "mean") for name, acc in accs.items()}

    def _chunks(self, seg: torch.Tensor, B: int):
        """``(a, e)``: the pooled tokens ``a:e`` (``seg``: each one's row, ascending) encoded in one
        call. Row by row, at most ``sae_chunk_tokens`` at a time: a token set is only ever encoded
        with itself (the determinism rule)."""
        step = max(1, int(self.b.sae_chunk_tokens))
        bounds = torch.searchsorted(seg, torch.arange(B + 1, device=seg.device)).tolist()
        for b in range(B):
            for a in range(bounds[b], bounds[b + 1], step):
                yield a, min(a + step, bounds[b + 1])

    def _encoder(self, kind: str, group: list[Readout]):
        """``dense_fn(tokens) -> codes(k) -> (values, indices)``: the group's shared dense map, and
        each readout's K. TopK of ReLU(pre-activations) is what ``SAE.encode`` computes."""
        if kind == "mlp_gate":
            mlp = self.lm.block(group[0].block).mlp

            def dense_fn(t):
                a = mlp.act_fn(mlp.gate_proj(t)).abs()
                return lambda k: a.topk(k, dim=-1, sorted=False)

            return dense_fn, {r.name: int(r.k) for r in group}
        sae = self.saes[group[0].sae]
        ks = {r.name: int(r.k or sae.k) for r in group}
        if sae.activation == "topk":
            def dense_fn(t):
                a = torch.relu(sae.pre_acts(t))
                return lambda k: a.topk(k, dim=-1, sorted=False)
        else:  # relu / jumprelu SAEs: their own encode, one readout per group
            def dense_fn(t):
                return lambda k: sae.encode(t, group[0].k)
        return dense_fn, ks
