"""Train TopK SAEs for any Hugging Face causal LM: ``python -m mona_ray.train_sae``.

Settings: ``TrainSaeConfig`` (``mona_ray/config/schema.py``); a preset from the config group
``sae_train`` (``mona_ray/conf/sae_train/``) sets them, e.g.::

    python -m mona_ray.train_sae sae_train=smollm2 data.path=/data/pool.parquet out_dir=runs/sae

Several hookpoints train together from ONE forward pass per batch of text. Two modes:

* ``cache_dir`` set: activations are first collected into bf16 shards there
  (``collect.tokens`` per hookpoint; resumable), then every SAE trains on
  random batches drawn from the shards (several passes when ``steps x batch_size``
  exceeds the cache).
* ``cache_dir=null``: activations stream from the model into a shuffle buffer
  and each token is used once.

Each hookpoint writes ``<out_dir>/<hookpoint>/{cfg.json,sae.safetensors}`` (sparsify
format, loadable with ``mona_ray.sae.load_sae``) at every checkpoint and at the end, and
``<out_dir>/checkpoints/<hookpoint>.safetensors`` (fp32 parameters, Adam state, counters;
written atomically). Re-running the same command resumes from the last checkpoint.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from . import activations as acts
from . import trainer as T
from ..config import CONF_DIR, ConfigError, TrainSaeConfig, exit_on_bad_command_line, to_typed, validate
from ..config.schema import TrainLoopConfig as TrainSettings  # the train.* settings
from ..core.sae import SAEError, save_sparsify


# ----------------------------------------------------------------------------- config

HELDOUT_DIR = "heldout_rows"  # held-out activations inside the cache


def lr_at(step: int, base: float, s: TrainSettings) -> float:
    """Linear warm-up, constant, linear decay to 0 over the last ``lr_decay_frac`` steps."""
    warm = min(1.0, step / max(1, s.lr_warmup_steps))
    decay_start = s.steps * (1 - s.lr_decay_frac)
    if s.lr_decay_frac > 0 and step > decay_start:
        warm = min(warm, max(0.0, (s.steps - step + 1) / (s.steps - decay_start)))
    return base * warm


# ----------------------------------------------------------------------------- state


@dataclass
class HookState:
    hookpoint: str
    params: dict[str, torch.Tensor]
    opt: dict[str, torch.Tensor]
    since_fired: torch.Tensor
    scale: float
    step: int = 0
    tokens: int = 0
    last: T.StepStats | None = None
    history: list = field(default_factory=list)


def checkpoint_path(out_dir: Path, hookpoint: str) -> Path:
    return out_dir / "checkpoints" / f"{hookpoint}.safetensors"


def save_checkpoint(out_dir: Path, st: HookState, fingerprint: str) -> None:
    """All tensors in one safetensors file, counters in its metadata; atomic rename."""
    from safetensors.torch import save_file

    path = checkpoint_path(out_dir, st.hookpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"param.{k}": v for k, v in st.params.items()}
    tensors.update({f"adam.{k}": v for k, v in st.opt.items()})
    tensors["since_fired"] = st.since_fired
    meta = {"step": str(st.step), "tokens": str(st.tokens), "scale": repr(st.scale), "config": fingerprint}
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    tmp.replace(path)


def load_checkpoint(out_dir: Path, hookpoint: str, fingerprint: str) -> HookState | None:
    from safetensors import safe_open

    path = checkpoint_path(out_dir, hookpoint)
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("config") != fingerprint:
        raise SAEError(f"{path} was written with other SAE settings (width, K, model, hookpoint or data); "
                       f"delete it or set out_dir to a new folder")
    return HookState(hookpoint=hookpoint,
                     params={k[6:]: v for k, v in tensors.items() if k.startswith("param.")},
                     opt={k[5:]: v for k, v in tensors.items() if k.startswith("adam.")},
                     since_fired=tensors["since_fired"], scale=float(meta["scale"]),
                     step=int(meta["step"]), tokens=int(meta["tokens"]))


def settings_fingerprint(cfg: TrainSaeConfig) -> str:
    """What a checkpoint must agree with to be resumed (not steps/lr: those may be extended)."""
    import hashlib

    data = str(Path(str(cfg.data.path)).expanduser().resolve())  # the same file however it is spelled
    # the keys and values of the untyped config this replaced, so that earlier checkpoints resume
    key = {"model": str(cfg.model.path), "data": data, "holdout": cfg.data.holdout_permille,
           "sae": asdict(cfg.sae), "max_length": cfg.render.max_length,
           "render": {"mode": cfg.render.mode, "system_prompt": cfg.render.system_prompt}}
    if cfg.init_from:  # a warm start is another run (absent: the fingerprints of earlier runs hold)
        key["init_from"] = str(Path(str(cfg.init_from)).expanduser().resolve())
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- batches


def token_batches_from_cache(cache: Path, hookpoints: list[str], batch_size: int, seed: int,
                             shards_in_memory: int, skip: dict[str, int]) -> dict[str, Iterator[torch.Tensor]]:
    """Batches per hookpoint; the shard list is re-read at every pass, so shards that a
    concurrent collection adds are used too."""
    from ..core.model import parse_hookpoint

    # the batch order of a hookpoint does not depend on which others train in the same run
    return {h: acts.shuffled_batches(lambda h=h: acts.cached_shards(cache, h), batch_size,
                                     seed=seed + parse_hookpoint(h), shards_in_memory=shards_in_memory,
                                     skip_batches=skip.get(h, 0))
            for h in hookpoints}


def streamed_batches(stream: Iterator[tuple[int, dict[str, torch.Tensor]]], hookpoints: list[str],
                     batch_size: int, seed: int, buffer_batches: int = 8) -> Iterator[dict[str, torch.Tensor]]:
    """Mix streamed activations in a buffer of ``buffer_batches`` batches; same permutation
    for every hookpoint (the rows are the same tokens)."""
    g = torch.Generator().manual_seed(seed)
    buf: dict[str, list[torch.Tensor]] = {h: [] for h in hookpoints}
    n = 0
    for _, a in stream:
        for h in hookpoints:
            buf[h].append(a[h])
        n += a[hookpoints[0]].shape[0]
        if n >= buffer_batches * batch_size:
            full = {h: torch.cat(v) for h, v in buf.items()}
            perm = torch.randperm(n, generator=g)
            nb = n // batch_size
            for b in range(nb):
                sel = perm[b * batch_size: (b + 1) * batch_size]
                yield {h: full[h][sel] for h in hookpoints}
            rest = perm[nb * batch_size:]
            buf = {h: [full[h][rest]] for h in hookpoints}
            n = rest.numel()


# ----------------------------------------------------------------------------- main loop


def _format_postfix(states: dict[str, HookState]) -> dict[str, str]:
    out = {}
    for h, st in states.items():
        if st.last is not None:
            tag = h.replace("layers.", "L")
            out[tag] = f"loss {st.last.loss:.3f} fvu {st.last.fvu:.3f} dead {st.last.dead_frac:.1%}"
    return out


def export_all(out_dir: Path, states: dict[str, HookState], k: int, cfg, dtype: torch.dtype,
               extra: dict, heldout: dict[str, dict] | None = None) -> list[Path]:
    dirs = []
    for h, st in states.items():
        sae = T.export(st.params, st.scale, k, h, dtype)
        info = {"hookpoint": h, "model": str(cfg.model.path), "trained_tokens": st.tokens, "trained_steps": st.step,
                "train_fvu": st.last.fvu if st.last else None,
                "train_dead_frac": st.last.dead_frac if st.last else None, **extra}
        if heldout and h in heldout:
            info["heldout"] = heldout[h]
        dirs.append(save_sparsify(sae, out_dir, extra_cfg=info))
    return dirs


def train(cfg: TrainSaeConfig) -> dict[str, HookState]:
    """Run (or resume) training as configured; returns the final per-hookpoint states."""
    from tqdm import tqdm

    from ..core.model import load_tokenizer, load_truncated, parse_hookpoint

    cfg = to_typed(cfg)  # load_config(..., "train_sae")'s result or its typed object
    s = cfg.train
    if cfg.torch_threads:  # 1 is much faster than 2 on a shared, oversubscribed CPU
        torch.set_num_threads(int(cfg.torch_threads))
    hookpoints = list(cfg.hookpoints)
    for h in hookpoints:
        parse_hookpoint(h)
    if not cfg.out_dir:
        raise SAEError("out_dir is not set; set out_dir=/path/to/output")
    out_dir = Path(str(cfg.out_dir)).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    fp = settings_fingerprint(cfg)
    save_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[cfg.save_dtype]

    model_path = resolve_model(str(cfg.model.path), "model.path")
    cache = Path(str(cfg.cache_dir)).expanduser() if cfg.cache_dir else None
    prog = acts.read_progress(cache) if cache is not None else None
    need_model = prog is None or not (prog.get("done") or prog["tokens"] >= int(cfg.collect.tokens))
    if cache is not None and int(cfg.heldout.tokens) > 0:
        need_model |= not acts.read_progress(cache / HELDOUT_DIR).get("done")
    collect_hps = acts.cache_hookpoints(cache, hookpoints) if cache is not None else hookpoints
    rows = acts.read_rows(cfg.data.path, "train", cfg.data.holdout_permille, cfg.data.seed, cfg.data.max_rows,
                          key="data.path") if need_model else None
    tok = load_tokenizer(model_path, trust_remote_code=bool(cfg.model.trust_remote_code))
    tlm = None
    if need_model:
        tlm = load_truncated(model_path, acts.deepest_layer(collect_hps), dtype=str(cfg.model.dtype),
                             device=str(cfg.model.device), trust_remote_code=bool(cfg.model.trust_remote_code),
                             attn_implementation=str(cfg.model.attn_implementation))

    def train_rows():
        return rows

    if cache is not None and need_model:
        t0 = time.time()
        with tqdm(total=int(cfg.collect.tokens), desc="collect", unit="tok", initial=acts.read_progress(cache)["tokens"],
                  file=sys.stderr, mininterval=5) as bar:
            prog = acts.collect_to_cache(tlm, tok, train_rows(), collect_hps, cache, int(cfg.collect.tokens),
                                         int(cfg.render.max_length), int(cfg.collect.batch_tokens),
                                         int(cfg.collect.shard_tokens), cfg.render.mode, cfg.render.system_prompt,
                                         progress=bar)
        print(f"[train_sae] activation cache {cache}: {prog['tokens']:,} tokens from {prog['rows']:,} rows "
              f"({time.time() - t0:.0f} s)", file=sys.stderr)
    heldout = None
    if int(cfg.heldout.tokens) > 0:
        heldout = collect_heldout(cfg, tlm, tok, collect_hps, cache)
    if cache is not None:
        tlm = None  # free the model before training

    states: dict[str, HookState] = {}
    for h in hookpoints:
        st = load_checkpoint(out_dir, h, fp)
        if st is not None:
            print(f"[train_sae] {h}: resuming at step {st.step} ({st.tokens:,} tokens)", file=sys.stderr)
            states[h] = st
    k = int(cfg.sae.k)
    init = warm_start_saes(cfg, [h for h in hookpoints if h not in states])

    if cache is not None:
        skip = {h: st.step for h, st in states.items()}
        sources = token_batches_from_cache(cache, hookpoints, s.batch_size, s.seed, s.shards_in_memory, skip)

        def next_batches():
            return {h: next(it) for h, it in sources.items()}
    else:
        stream = acts.stream_activations(tlm, tok, _cycle(train_rows), hookpoints, int(cfg.render.max_length),
                                         int(cfg.collect.batch_tokens), cfg.render.mode, cfg.render.system_prompt)
        it = streamed_batches(stream, hookpoints, s.batch_size, s.seed)

        def next_batches():
            return next(it)

    start = min((st.step for st in states.values()), default=0) if len(states) == len(hookpoints) else 0
    if start >= s.steps and states:
        print(f"[train_sae] already trained {start} >= {s.steps} steps", file=sys.stderr)
    log_file = out_dir / "train_log.jsonl"
    t0 = time.time()
    with tqdm(total=s.steps, initial=start, desc="train", unit="step", file=sys.stderr, mininterval=2) as bar:
        for step in range(start + 1, s.steps + 1):
            batch = next_batches()
            for h in hookpoints:
                x = batch[h].float()
                if h not in states:
                    if init is not None:
                        params, scale = T.params_from_sae(x, init[h])
                    else:
                        d = x.shape[1]
                        num_latents = int(cfg.sae.num_latents) or d * int(cfg.sae.expansion_factor)
                        params, scale = T.init_params(x, num_latents, s.seed, s.b_dec_init)
                    num_latents = params["W_enc"].shape[0]
                    states[h] = HookState(h, params, {}, torch.zeros(num_latents, dtype=torch.long), scale)
                st = states[h]
                num_latents = st.params["W_enc"].shape[0]
                d = st.params["W_enc"].shape[1]
                base = s.lr if s.lr else T.default_lr(num_latents)
                st.last = T.train_step(st.params, st.opt, st.since_fired, x * st.scale, step, k,
                                       lr_at(step, base, s), s.auxk_alpha, s.k_aux or d // 2, s.dead_tokens)
                st.step, st.tokens = step, st.tokens + x.shape[0]
            bar.set_postfix(_format_postfix(states), refresh=False)
            bar.update(1)
            if step % 10 == 0 or step == s.steps:
                with open(log_file, "a") as fh:
                    fh.write(json.dumps({"step": step, "time": round(time.time() - t0, 1), **{
                        h: {"loss": st.last.loss, "fvu": st.last.fvu, "auxk": st.last.auxk,
                            "dead": st.last.dead_frac} for h, st in states.items()}}) + "\n")
            if step % s.checkpoint_every == 0 or step == s.steps:
                extra = {"provisional": True} if cfg.provisional else {}
                if heldout is not None:
                    ev = {h: T.heldout_metrics(st.params, st.scale, heldout[h], k) for h, st in states.items()}
                    with open(log_file, "a") as fh:
                        fh.write(json.dumps({"step": step, "time": round(time.time() - t0, 1), "heldout": ev}) + "\n")
                    bar.write(f"step {step} held-out: " + "  ".join(
                        f"{h} fvu {m['fvu']:.4f} l0 {m['l0']:.1f} dead {m['dead_frac']:.2%}" for h, m in ev.items()))
                for st in states.values():
                    save_checkpoint(out_dir, st, fp)
                export_all(out_dir, states, k, cfg, save_dtype, extra,
                           {h: ev[h] for h in states} if heldout is not None else {})
    return states


def warm_start_saes(cfg, hookpoints: list[str]) -> dict | None:
    """The SAEs named by ``init_from`` (a sparsify folder) for the hookpoints that
    start fresh, checked against the configured width (K is this run's ``sae.k``); None
    when it is not set. Their input width is checked against the data in
    :func:`sae_trainer.params_from_sae`."""
    if not cfg.init_from or not hookpoints:
        return None
    from ..core.sae import load_sparsify

    out = {}
    for h in hookpoints:
        sae = load_sparsify(str(cfg.init_from), hookpoint=h)
        want = int(cfg.sae.num_latents) or sae.d_in * int(cfg.sae.expansion_factor)
        if sae.num_latents != want:
            raise SAEError(f"init_from={cfg.init_from}: the {h} SAE has {sae.num_latents} latents; "
                           f"this run trains {want}")
        out[h] = sae
    return out


def collect_heldout(cfg, tlm, tok, hookpoints: list[str], cache: Path | None) -> dict[str, torch.Tensor]:
    """Held-out activations for the checkpoint metrics: all kept tokens of the first held-out
    rows that hold ``heldout.tokens`` of them (whole rows, so not biased towards short ones);
    cached in ``<cache_dir>/heldout_rows`` when there is a cache, else kept in memory."""
    n = int(cfg.heldout.tokens)
    rows = None
    if tlm is not None:
        rows = acts.read_rows(cfg.data.path, "heldout", cfg.data.holdout_permille, cfg.data.seed,
                              key="data.path")
        rows = acts.rows_for_tokens(rows, tok, n, int(cfg.render.max_length), cfg.render.mode, cfg.render.system_prompt)
    if cache is not None:
        where = cache / HELDOUT_DIR
        if tlm is not None:  # every token of the chosen rows, in one shard
            acts.collect_to_cache(tlm, tok, rows, hookpoints, where, 1 << 62, int(cfg.render.max_length),
                                  int(cfg.collect.batch_tokens), 1 << 62, cfg.render.mode, cfg.render.system_prompt)
        return {h: torch.cat([acts.load_shard(p) for p in acts.cached_shards(where, h)]) for h in hookpoints}
    got: dict[str, list[torch.Tensor]] = {h: [] for h in hookpoints}
    for _, a in acts.stream_activations(tlm, tok, rows, hookpoints, int(cfg.render.max_length),
                                        int(cfg.collect.batch_tokens), cfg.render.mode, cfg.render.system_prompt):
        for h in hookpoints:
            got[h].append(a[h].to(torch.bfloat16))
    return {h: torch.cat(v) for h, v in got.items()}


def resolve_model(path: str, key: str) -> Path:
    """``model.path`` as the run reads it (a folder, ``embedded:...`` or a hub id, fetched into the
    hub cache: ``pipeline.plan.local_model``)."""
    from ..core.model import ModelError
    from ..pipeline.plan import local_model

    try:
        return local_model(path, what=key)
    except ModelError as e:
        raise SAEError(f"{key}={path!r}: {e} Set {key}=/path/to/checkpoint.") from None


def _cycle(rows_fn):
    while True:
        yield from rows_fn()


def main_from_config(cfg) -> None:
    from omegaconf import OmegaConf

    from ..core.hub import HubError
    from ..core.model import ModelError
    from ..core.records import InputError

    try:
        train(validate(cfg))
    except (ConfigError, SAEError, acts.ActivationError, ModelError, InputError, HubError) as e:  # each carries its fix
        print(f"mona_ray: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(OmegaConf.to_yaml(cfg), file=sys.stderr)


def main() -> None:
    import hydra

    exit_on_bad_command_line("train_sae")

    @hydra.main(config_path=str(CONF_DIR), config_name="train_sae", version_base="1.3")
    def _run(cfg):
        main_from_config(cfg)

    _run()


if __name__ == "__main__":
    main()
