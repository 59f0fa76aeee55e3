"""Residual-stream activations for SAE training and evaluation.

Texts are rendered exactly as the pipeline renders them (``records.normalize_record`` +
``render.render``), tokenized with ``render.tokenize(exclude="special")`` and run
through the model cut after the deepest requested block. Shallower blocks are captured
with forward hooks, so several layers cost ONE forward pass.

Kept positions: real tokens that are not special tokens (BOS / ``<|im_start|>`` /
``<|im_end|>`` / EOS) and never position 0. In SmolLM2 the first token is an attention
sink whose residual norm is ~25,000 against ~200 elsewhere at the middle blocks; one such
vector would dominate an SAE's loss.

Held-out rows are chosen by a hash of the row id (independent of seeds and of the file
order), so training and evaluation never share a row.

Activations can be cached on disk as bf16 safetensors shards, one folder per hookpoint
(``<cache>/<hookpoint>/shard_NNNNN.safetensors``) plus ``progress.json``; collection
resumes after the last complete shard set.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from ..core.model import parse_hookpoint
from ..core.records import RecordError, normalize_record
from ..core.render import render, tokenize


class ActivationError(RuntimeError):
    """Unusable data or cache settings; the message names the path and the fix."""


# ----------------------------------------------------------------------------- rows


def is_heldout(row_id: str, holdout_permille: int) -> bool:
    """A stable split: a row is held out when sha256(id) mod 1000 < ``holdout_permille``."""
    h = int.from_bytes(hashlib.sha256(str(row_id).encode()).digest()[:8], "little")
    return h % 1000 < holdout_permille


def read_rows(path: str | Path, split: str, holdout_permille: int, seed: int,
              max_rows: int | None = None, key: str = "data.path") -> list[dict]:
    """Rows of a Parquet / JSONL file for ``split`` (``train`` | ``heldout``), shuffled by ``seed``."""
    from ..core.readers import input_files, plan_units, read_unit

    p = Path(str(path)).expanduser()
    if not p.exists():
        raise ActivationError(f"{key}={str(path)!r} does not exist; set {key}=/path/to/rows.parquet")
    if split not in ("train", "heldout"):
        raise ActivationError(f"split={split!r}: use train or heldout")
    rows = []
    for unit in plan_units(input_files(p), rows_per_unit=1 << 30):
        for r, rec in read_unit(unit):
            if isinstance(rec, RecordError):
                continue
            rid = rec.get("id") if isinstance(rec, dict) and rec.get("id") is not None else f"{unit.path}:{r}"
            if is_heldout(rid, holdout_permille) == (split == "heldout"):
                rows.append(rec)
    if not rows:
        raise ActivationError(f"{key}={str(path)!r}: no usable rows in the {split} split")
    random.Random(seed).shuffle(rows)
    return rows[:max_rows] if max_rows else rows


@dataclass
class Tokenized:
    ids: list[int]
    keep: list[int]  # 1 = this position's activation is used


def tokenize_rows(rows: Iterable[dict], tokenizer, max_length: int, render_mode: str = "chat_template",
                  system_prompt: str | None = None) -> Iterator[Tokenized]:
    """Render and tokenize rows as the pipeline does; drop special tokens and position 0."""
    for rec in rows:
        try:
            msgs = normalize_record(rec)
        except RecordError:
            continue
        ids, mask = tokenize(render(msgs, tokenizer, render_mode, system_prompt), tokenizer, max_length,
                             exclude="special")
        special = set(tokenizer.all_special_ids)
        keep = [int(m and i > 0 and t not in special) for i, (t, m) in enumerate(zip(ids, mask))]
        if any(keep):
            yield Tokenized(ids, keep)


def rows_for_tokens(rows: list[dict], tokenizer, n_tokens: int, max_length: int,
                    render_mode: str = "chat_template", system_prompt: str | None = None) -> list[dict]:
    """The shortest prefix of ``rows`` holding at least ``n_tokens`` kept tokens. Collecting
    whole rows keeps an evaluation set unbiased: cutting a length-sorted stream at a token
    count would keep only the shortest rows."""
    total = 0
    for i, rec in enumerate(rows):
        total += sum(t.keep.count(1) for t in tokenize_rows([rec], tokenizer, max_length, render_mode,
                                                            system_prompt))
        if total >= n_tokens:
            return rows[: i + 1]
    return rows


def length_batches(items: Iterable[Tokenized], batch_tokens: int, window: int = 256) -> Iterator[list[Tokenized]]:
    """Group sequences of similar length (sorted within windows) into padded batches of
    at most ``batch_tokens`` tokens, keeping the overall order roughly intact."""
    buf: list[Tokenized] = []

    def flush(buf):
        buf = sorted(buf, key=lambda t: len(t.ids))
        batch: list[Tokenized] = []
        for t in buf:
            if batch and len(t.ids) * (len(batch) + 1) > batch_tokens:
                yield batch
                batch = []
            batch.append(t)
        if batch:
            yield batch

    for it in items:
        buf.append(it)
        if len(buf) >= window:
            yield from flush(buf)
            buf = []
    if buf:
        yield from flush(buf)


def pad_batch(batch: list[Tokenized], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and the kept-position mask."""
    n = max(len(t.ids) for t in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    att = torch.zeros((len(batch), n), dtype=torch.long)
    keep = torch.zeros((len(batch), n), dtype=torch.bool)
    for i, t in enumerate(batch):
        ids[i, : len(t.ids)] = torch.tensor(t.ids)
        att[i, : len(t.ids)] = 1
        keep[i, : len(t.ids)] = torch.tensor(t.keep, dtype=torch.bool)
    return ids, att, keep


# ----------------------------------------------------------------------------- forward


def _block_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@contextlib.contextmanager
def capture_blocks(blocks: dict[str, torch.nn.Module]):
    """Forward hooks storing each block's output tensor in the yielded dict."""
    store: dict[str, torch.Tensor] = {}
    handles = []
    for name, mod in blocks.items():
        handles.append(mod.register_forward_hook(
            lambda _m, _i, out, name=name: store.__setitem__(name, _block_output(out).detach())))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def deepest_layer(hookpoints: list[str]) -> int:
    return max(parse_hookpoint(h) for h in hookpoints)


@torch.inference_mode()
def batch_activations(tlm, hookpoints: list[str], ids: torch.Tensor, att: torch.Tensor,
                      keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{hookpoint: [n_kept, d]}`` for one padded batch, from one forward pass of ``tlm``
    (a :class:`~mona_ray.model.TruncatedLM` cut at the deepest hookpoint)."""
    blocks = {h: tlm.block(parse_hookpoint(h)) for h in hookpoints}
    with capture_blocks(blocks) as store:
        tlm(ids.to(tlm.device), att.to(tlm.device))
    k = keep.to(tlm.device)
    return {h: store[h][k] for h in hookpoints}


def stream_activations(tlm, tokenizer, rows: Iterable[dict], hookpoints: list[str], max_length: int,
                       batch_tokens: int, render_mode: str = "chat_template",
                       system_prompt: str | None = None) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Yield ``(rows_in_batch, {hookpoint: [n, d]})`` over ``rows``."""
    items = tokenize_rows(rows, tokenizer, max_length, render_mode, system_prompt)
    for batch in length_batches(items, batch_tokens):
        ids, att, keep = pad_batch(batch, tokenizer.pad_token_id)
        yield len(batch), batch_activations(tlm, hookpoints, ids, att, keep)


# ----------------------------------------------------------------------------- shard cache


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def read_progress(cache: Path) -> dict:
    f = Path(cache) / "progress.json"
    return json.loads(f.read_text()) if f.exists() else {"rows": 0, "tokens": 0, "shards": 0, "done": False}


def write_shard_set(cache: Path, index: int, acts: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    for h, a in acts.items():
        d = cache / h
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f"shard_{index:05d}.safetensors.tmp"
        save_file({"acts": a.to(dtype).contiguous()}, str(tmp))
        tmp.replace(d / f"shard_{index:05d}.safetensors")


def collect_to_cache(tlm, tokenizer, rows: list[dict], hookpoints: list[str], cache: str | Path,
                     max_tokens: int, max_length: int, batch_tokens: int, shard_tokens: int,
                     render_mode: str = "chat_template", system_prompt: str | None = None,
                     dtype: torch.dtype = torch.bfloat16, progress=None) -> dict:
    """Fill ``cache`` with about ``max_tokens`` kept tokens per hookpoint; resumable.

    ``rows`` must be the same list (same seed) on every resume: collection continues at
    row ``progress.json["rows"]``.
    """
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    prog = read_progress(cache)
    meta_file = cache / "meta.json"
    meta = {"hookpoints": sorted(hookpoints), "max_length": max_length, "render_mode": render_mode,
            "system_prompt": system_prompt}
    if meta_file.exists() and json.loads(meta_file.read_text()) != meta:
        raise ActivationError(f"activation cache {cache} was made with other settings "
                              f"({meta_file.read_text().strip()}); use another cache_dir")
    if not meta_file.exists():
        _atomic_write_text(meta_file, json.dumps(meta, indent=2))
    if prog["tokens"] >= max_tokens or prog.get("done"):
        return prog
    buf: dict[str, list[torch.Tensor]] = {h: [] for h in hookpoints}
    n_buf, rows_buf = 0, 0
    it = stream_activations(tlm, tokenizer, rows[prog["rows"]:], hookpoints, max_length, batch_tokens,
                            render_mode, system_prompt)
    for n_rows, acts in it:
        for h in hookpoints:
            buf[h].append(acts[h].to(dtype))
        n_new = acts[hookpoints[0]].shape[0]
        n_buf += n_new
        rows_buf += n_rows
        if progress is not None:
            progress.update(n_new)
        last = prog["tokens"] + n_buf >= max_tokens
        if n_buf >= shard_tokens or last:
            write_shard_set(cache, prog["shards"], {h: torch.cat(v) for h, v in buf.items()}, dtype)
            prog = {"rows": prog["rows"] + rows_buf, "tokens": prog["tokens"] + n_buf,
                    "shards": prog["shards"] + 1, "done": last}
            _atomic_write_text(cache / "progress.json", json.dumps(prog))
            buf = {h: [] for h in hookpoints}
            n_buf, rows_buf = 0, 0
            if last:
                return prog
    if n_buf:
        write_shard_set(cache, prog["shards"], {h: torch.cat(v) for h, v in buf.items()}, dtype)
        prog = {"rows": prog["rows"] + rows_buf, "tokens": prog["tokens"] + n_buf, "shards": prog["shards"] + 1}
    prog["done"] = True  # rows exhausted
    _atomic_write_text(cache / "progress.json", json.dumps(prog))
    return prog


def cache_hookpoints(cache: str | Path, wanted: list[str]) -> list[str]:
    """Hookpoints a cache collects: its own list when it already exists (a run may train on
    a subset of them), else ``wanted``."""
    meta_file = Path(cache) / "meta.json"
    if not meta_file.exists():
        return sorted(wanted)
    have = json.loads(meta_file.read_text())["hookpoints"]
    missing = set(wanted) - set(have)
    if missing:
        raise ActivationError(f"activation cache {cache} holds {', '.join(have)}, not {', '.join(sorted(missing))}; "
                              "use another cache_dir")
    return have


def cached_shards(cache: str | Path, hookpoint: str) -> list[Path]:
    """Complete shards for ``hookpoint`` (those counted in ``progress.json``)."""
    cache = Path(cache)
    n = read_progress(cache)["shards"]
    return [cache / hookpoint / f"shard_{i:05d}.safetensors" for i in range(n)]


def load_shard(path: Path) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("acts")


def shuffled_batches(shards: list[Path] | Callable[[], list[Path]], batch_size: int, seed: int,
                     shards_in_memory: int = 8, skip_batches: int = 0) -> Iterator[torch.Tensor]:
    """Endless stream of random token batches: groups of ``shards_in_memory`` shards are
    loaded, mixed and permuted; each pass over the shards uses a new shard order.
    Deterministic in ``seed``, so a resumed run skips the ``skip_batches`` it has used
    (without loading the skipped groups). ``shards`` may be a function, called at the start
    of every pass, so that training can use shards a concurrent collection adds."""
    list_shards = shards if callable(shards) else (lambda: shards)
    shards = list_shards()
    if sum(_shard_len(p) for p in shards) < batch_size:
        raise ActivationError(f"the activation cache holds fewer tokens than one batch ({batch_size}); "
                              "collect more (collect.tokens) or lower train.batch_size")
    g = torch.Generator().manual_seed(seed)
    served = 0
    while True:
        shards = list_shards()
        order = torch.randperm(len(shards), generator=g).tolist()
        for s in range(0, len(order), shards_in_memory):
            group = order[s: s + shards_in_memory]
            n_total = sum(_shard_len(shards[i]) for i in group)
            perm = torch.randperm(n_total, generator=g)
            n_batches = n_total // batch_size
            if served + n_batches <= skip_batches:
                served += n_batches
                continue
            data = torch.cat([load_shard(shards[i]) for i in group])
            for b in range(n_batches):
                if served >= skip_batches:
                    yield data[perm[b * batch_size: (b + 1) * batch_size]]
                served += 1


_LEN_CACHE: dict[str, int] = {}


def _shard_len(path: Path) -> int:
    key = str(path)
    if key not in _LEN_CACHE:
        from safetensors import safe_open

        with safe_open(key, framework="pt") as f:
            _LEN_CACHE[key] = f.get_slice("acts").get_shape()[0]
    return _LEN_CACHE[key]
