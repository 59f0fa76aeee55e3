"""Evaluate SAEs on held-out text: ``python -m mona_ray.eval_sae``.

For each SAE (one per hookpoint), on the held-out rows (the same hash split as training):

* ``fvu``: fraction of variance unexplained, sum |x - x_hat|^2 / sum |x - mean(x)|^2 over
  all kept tokens (the mean is over the whole evaluation set);
* ``dead_frac``: latents that fire on none of the evaluation tokens;
* ``l0``: mean number of non-zero latents per token;
* ``ce_clean`` / ``ce_sae`` / ``delta_ce``: next-token cross-entropy (nats per predicted
  token) of the FULL model, and its increase when block N's output is replaced by the
  SAE reconstruction (forward hook on ``model.layers[N]``) at the kept positions.

Kept positions are those the SAE is trained on: real, non-special tokens after position 0
(the first token is an attention sink whose residual norm is ~100x the others). The CE
is over every real next-token prediction.

Settings: ``SaeEvalConfig`` in ``mona_ray/config/schema.py``; ``hookpoints`` lists the SAEs
evaluated (default: ``sae.hookpoint``). Prints a table and writes JSON.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import activations as acts
from ..config import CONF_DIR, ConfigError, exit_on_bad_command_line, to_typed, validate
from ..core.model import parse_hookpoint
from ..core.sae import SAE, SAEError, load_sae, to_sparsify_hookpoint


@dataclass
class SAEMetrics:
    hookpoint: str
    num_latents: int
    k: int | None
    tokens: int
    fvu: float
    dead_frac: float
    l0: float
    ce_clean: float
    ce_sae: float
    delta_ce: float


class _Acc:
    """Running sums for one SAE (float64)."""

    def __init__(self, d: int, num_latents: int):
        self.n = 0
        self.sum_x = torch.zeros(d, dtype=torch.float64)
        self.sum_sq = 0.0
        self.sse = 0.0
        self.l0 = 0.0
        self.fired = torch.zeros(num_latents, dtype=torch.bool)
        self.ce_sae = 0.0

    def add(self, x: torch.Tensor, x_hat: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor) -> None:
        x64 = x.double()
        self.n += x.shape[0]
        self.sum_x += x64.sum(0)
        self.sum_sq += float(x64.pow(2).sum())
        self.sse += float((x64 - x_hat.double()).pow(2).sum())
        nz = vals > 0
        self.l0 += float(nz.sum())
        self.fired[idx[nz]] = True

    def fvu(self) -> float:
        total = self.sum_sq - float(self.sum_x.pow(2).sum()) / max(self.n, 1)
        return self.sse / total


def token_ce(logits: torch.Tensor, ids: torch.Tensor, att: torch.Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy over real positions, and their count."""
    mask = att[:, 1:].bool() & att[:, :-1].bool()
    lp = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                         reduction="none").view(mask.shape)
    return float(lp[mask].sum()), int(mask.sum())


def _output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _replace_output(out, new):
    if isinstance(out, tuple):
        return (new,) + tuple(out[1:])
    if isinstance(out, list):
        return [new] + out[1:]
    return new


@torch.inference_mode()
def evaluate(model, tokenizer, saes: dict[str, SAE], rows: list[dict], max_length: int, batch_tokens: int,
             render_mode: str = "chat_template", system_prompt: str | None = None, progress=None) -> list[SAEMetrics]:
    """Metrics per SAE for a full causal LM (``AutoModelForCausalLM``) on ``rows``."""
    layers = model.model.layers
    first = next(iter(saes.values()))
    accs = {h: _Acc(s.d_in, s.num_latents) for h, s in saes.items()}
    ce_clean, n_pred = 0.0, 0
    device = next(model.parameters()).device
    items = acts.tokenize_rows(rows, tokenizer, max_length, render_mode, system_prompt)
    for batch in acts.length_batches(items, batch_tokens):
        ids, att, keep = acts.pad_batch(batch, tokenizer.pad_token_id)
        ids, att, keep = ids.to(device), att.to(device), keep.to(device)
        blocks = {h: layers[parse_hookpoint(h)] for h in saes}
        with acts.capture_blocks(blocks) as store:
            logits = model(input_ids=ids, attention_mask=att, use_cache=False).logits
        ce, n = token_ce(logits, ids, att)
        ce_clean, n_pred = ce_clean + ce, n_pred + n
        for h, sae in saes.items():
            x = store[h][keep]
            vals, idx = sae.encode(x)
            x_hat = sae.reconstruct(x, codes=(vals, idx))
            accs[h].add(x.float(), x_hat.float(), vals.float(), idx)

            def patch(_m, _i, out, x_hat=x_hat):
                o = _output(out).clone()
                o[keep] = x_hat.to(o.dtype)
                return _replace_output(out, o)

            handle = layers[parse_hookpoint(h)].register_forward_hook(patch)
            try:
                logits = model(input_ids=ids, attention_mask=att, use_cache=False).logits
            finally:
                handle.remove()
            accs[h].ce_sae += token_ce(logits, ids, att)[0]
        if progress is not None:
            progress.update(int(keep.sum()))
    if first is None or n_pred == 0:
        raise SAEError("no held-out tokens to evaluate on")
    out = []
    for h, sae in saes.items():
        a = accs[h]
        out.append(SAEMetrics(hookpoint=h, num_latents=sae.num_latents, k=sae.k, tokens=a.n, fvu=a.fvu(),
                              dead_frac=1 - float(a.fired.float().mean()), l0=a.l0 / max(a.n, 1),
                              ce_clean=ce_clean / n_pred, ce_sae=a.ce_sae / n_pred,
                              delta_ce=(a.ce_sae - ce_clean) / n_pred))
    return out


def format_table(rows: list[SAEMetrics]) -> str:
    head = f"{'hookpoint':<12}{'latents':>8}{'K':>5}{'tokens':>9}{'FVU':>8}{'dead %':>8}{'L0':>7}" \
           f"{'CE clean':>10}{'CE SAE':>9}{'dCE':>8}"
    lines = [head, "-" * len(head)]
    for m in rows:
        lines.append(f"{m.hookpoint:<12}{m.num_latents:>8}{m.k or '-':>5}{m.tokens:>9}{m.fvu:>8.4f}"
                     f"{100 * m.dead_frac:>8.2f}{m.l0:>7.1f}{m.ce_clean:>10.4f}{m.ce_sae:>9.4f}{m.delta_ce:>8.4f}")
    return "\n".join(lines)


def load_full_model(path: Path, dtype: str, device: str, trust_remote_code: bool = False,
                    attn_implementation: str | None = None):
    import transformers
    from transformers import AutoModelForCausalLM

    from ..core.model import resolve_device, resolve_dtype

    device = resolve_device(device)
    transformers.utils.logging.disable_progress_bar()
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, device), use_safetensors=True,
                                                 trust_remote_code=trust_remote_code, **extra)
    return model.eval().requires_grad_(False).to(device)


def run(cfg) -> list[SAEMetrics]:
    from tqdm import tqdm

    from ..core.model import load_tokenizer
    from ..pipeline.plan import sae_path
    from .train import resolve_model

    cfg = to_typed(cfg)  # load_config(..., "sae_eval")'s result or its typed object
    if cfg.torch_threads:
        torch.set_num_threads(int(cfg.torch_threads))
    model_path = resolve_model(str(cfg.model.path), "model.path")
    hookpoints = [to_sparsify_hookpoint(h) for h in cfg.hookpoints]
    saes = {h: load_sae(sae_path(cfg.sae.path, h), str(cfg.sae.format), h, cfg.sae.k, dtype=torch.float32)
            for h in hookpoints}  # sae.path as the run reads it: a hub id fetches only each hookpoint's files
    rows = acts.read_rows(cfg.data.path, cfg.data.split, cfg.data.holdout_permille, cfg.data.seed, cfg.data.max_rows)
    m = cfg.model
    tok = load_tokenizer(model_path, trust_remote_code=bool(m.trust_remote_code))
    model = load_full_model(model_path, str(m.dtype), str(m.device), bool(m.trust_remote_code),
                            str(m.attn_implementation))
    t0 = time.time()
    with tqdm(desc="eval", unit="tok", file=sys.stderr, mininterval=5) as bar:
        metrics = evaluate(model, tok, saes, rows, int(cfg.render.max_length), int(cfg.batch_tokens), cfg.render.mode,
                           cfg.render.system_prompt, progress=bar)
    print(format_table(metrics))
    if cfg.out:
        out = Path(str(cfg.out)).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        info = {"model": str(cfg.model.path), "sae_path": str(cfg.sae.path), "data": str(cfg.data.path),
                "split": cfg.data.split, "rows": len(rows), "seconds": round(time.time() - t0, 1),
                "metrics": [asdict(m) for m in metrics]}
        out.write_text(json.dumps(info, indent=2))
        print(f"wrote {out}", file=sys.stderr)
    return metrics


def main() -> None:
    import hydra

    exit_on_bad_command_line("sae_eval")

    @hydra.main(config_path=str(CONF_DIR), config_name="sae_eval", version_base="1.3")
    def _run(cfg):
        from ..core.hub import HubError
        from ..core.model import ModelError
        from ..core.records import InputError

        try:
            run(validate(cfg))
        except (ConfigError, SAEError, acts.ActivationError, ModelError, InputError, HubError) as e:
            print(f"mona_ray: error: {e}", file=sys.stderr)
            raise SystemExit(2)

    _run()


if __name__ == "__main__":
    main()
