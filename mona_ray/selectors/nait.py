"""NAIT (Chen et al. 2026, arXiv 2603.13201): neuron-activation directions of the target task.

The method as specified for this product, with every choice the paper leaves open:

1. **Activations.** For each block ``l`` (the residual stream at the block's output,
   read with forward hooks on ``model.layers[l]``; by default every block up to the
   hookpoint where the model is cut, ``layers.28`` = 29 of SmolLM2's 30 blocks, so one
   forward pass serves MoNA and NAIT) and each sample, the *delta* is the activation of
   the sample's last token minus that of its first token.
   - *last token*: the last real token after rendering and truncation (for the chat
     template, the newline after the final ``<|im_end|>``: it has attended to the whole
     sample).
   - *first token*: the first non-special token, not position 0. In SmolLM2 position 0
     (``<|im_start|>``) is an attention sink whose residual norm is ~100x any other
     token's; subtracting it would make every delta mostly ``-sink``. With the chat
     template the first non-special token is a fixed role word, so the subtraction
     removes a constant per block: it shifts every score by the same amount and never
     changes a ranking, but it keeps the sign rule below meaningful.
2. **Direction.** Per block, the first principal component of the target deltas (the top
   right singular vector of the centred ``[n_target, d]`` matrix), unit norm, with its
   sign chosen so that the mean target delta projects positively on it. With a single
   target example (no variance) the direction is the normalised mean delta.
3. **Score.** A candidate's deltas are projected on the directions, one number per
   block, and summed over blocks (``layer_norm="none"``, as specified). Because the
   residual norm grows with depth, that sum is dominated by the deepest blocks;
   ``layer_norm="zscore"`` first standardises each block's projection by the mean and
   standard deviation of the *target* projections on that block, so blocks weigh
   equally. Both are measured in ``docs/evaluation.md``.

Memory: :meth:`NAITSelector.score` computes the target directions first and then streams
the source keeping only ``[n_source, n_blocks]`` projections; ``prepare`` and the
evaluation (which serves many targets from one pass, through the feature store) keep the
full deltas, ``n_source x n_blocks x d`` float32.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .base import Messages, Selector, check_target
from ..core.model import EMBEDDED_MODEL
from ..config.schema import NAIT_LAYER_NORMS as LAYER_NORMS


def nait_directions(deltas: np.ndarray) -> np.ndarray:
    """Per block, the sign-fixed first principal component of the target deltas: ``[n, L, d] -> [L, d]``."""
    X = np.asarray(deltas, dtype=np.float64)
    if X.ndim != 3 or X.shape[0] == 0:
        raise ValueError(f"NAIT needs target deltas of shape [n >= 1, layers, d], got {X.shape}")
    out = np.zeros(X.shape[1:], dtype=np.float64)
    for l in range(X.shape[1]):
        D = X[:, l, :]
        mean = D.mean(0)
        C = D - mean
        if X.shape[0] > 1 and np.abs(C).max() > 0:
            v = np.linalg.svd(C, full_matrices=False)[2][0]
        else:
            v = mean.copy()
        n = np.linalg.norm(v)
        v = v / n if n > 0 else v
        if v @ mean < 0:
            v = -v
        out[l] = v
    return out


def project(deltas: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    """``[n, L, d] x [L, d] -> [n, L]``: each block's delta on that block's direction."""
    return np.einsum("nld,ld->nl", np.asarray(deltas, dtype=np.float64), dirs)


def combine(proj: np.ndarray, target_proj: np.ndarray, layer_norm: str = "none") -> np.ndarray:
    """Sum over blocks of the projections, optionally z-scored per block by the target's."""
    if layer_norm not in LAYER_NORMS:
        raise ValueError(f"nait layer_norm={layer_norm!r}: use one of {', '.join(LAYER_NORMS)}")
    proj = np.asarray(proj, dtype=np.float64)
    if layer_norm == "zscore":
        mu = target_proj.mean(0)
        sd = target_proj.std(0)
        sd = np.where(sd > 0, sd, 1.0)
        proj = (proj - mu) / sd
    return proj.sum(1)


class NAITSelector(Selector):
    """NAIT on conversations in memory, through the feature engine's ``nait`` readout (one
    forward per row; the blocks up to ``hookpoint``)."""

    name = "nait"

    def __init__(self, model_path: str = EMBEDDED_MODEL, hookpoint: str = "layers.28", layers: Sequence[int] | str = "all",
                 layer_norm: str = "none", dtype: str = "auto", device: str = "auto", render_mode: str = "chat_template",
                 system_prompt: str | None = None, max_length: int = 512, token_budget: int = 8192, pad_multiple: int = 16,
                 max_batch_rows: int = 64, rows_per_unit: int = 256, progress: bool = True):
        from ..core.model import parse_hookpoint
        from ..features.engine import Batching
        from ..features.local import Rendering
        from ..features.readouts import Readout

        if layer_norm not in LAYER_NORMS:
            raise ValueError(f"nait layer_norm={layer_norm!r}: use one of {', '.join(LAYER_NORMS)}")
        last = parse_hookpoint(hookpoint)
        self.layers = list(range(last + 1)) if layers == "all" else sorted(int(x) for x in layers)
        self.layer_norm = layer_norm
        self.readout = Readout("nait", max(self.layers), "special", blocks=tuple(self.layers))
        self.model_path, self.dtype, self.device = model_path, dtype, device
        self.batching = Batching(token_budget=token_budget, pad_multiple=pad_multiple, max_batch_rows=max_batch_rows)
        self.rendering = Rendering(render_mode, system_prompt, max_length)
        self.rows_per_unit, self.progress = rows_per_unit, progress
        self._engine = None

    def _load(self):
        """The engine (model cut after the deepest block used), built on first use."""
        from ..core.model import dtype_name, resolve_device, resolve_dtype_reason, resolve_model_path
        from ..features.spec import EngineJob, load_engine

        if self._engine is None:
            dev = resolve_device(self.device)
            job = EngineJob(model_dir=str(resolve_model_path(self.model_path)),
                            dtype=dtype_name(resolve_dtype_reason(self.dtype, dev)[0]), device=dev,
                            readouts=(self.readout,), batching=self.batching)
            self._engine = load_engine(job)
        return self._engine

    def deltas(self, rows: Sequence[Messages], dirs: np.ndarray | None = None, desc: str = "nait") -> np.ndarray:
        """``[n, L, d]`` deltas, or with ``dirs`` only their projections ``[n, L]`` (memory O(n L))."""
        from tqdm.auto import tqdm

        from ..features.local import tokenize_rows

        engine, tok = self._load()
        L = len(self.layers)
        out = []
        bar = tqdm(total=len(rows), desc=desc, unit="row", disable=not self.progress, dynamic_ncols=True)
        for a in range(0, len(rows), self.rows_per_unit):
            chunk = list(rows[a:a + self.rows_per_unit])
            ids, masks, bad = tokenize_rows(chunk, tok, self.rendering, engine.excludes)
            res = engine.run([x if i not in bad else [] for i, x in enumerate(ids)], masks)
            D = np.stack([np.zeros(L * engine.lm.hidden_size, np.float32) if v is None else v
                          for v in res.outputs[self.readout.name]]).reshape(len(chunk), L, -1)
            out.append(project(D, dirs) if dirs is not None else D)
            bar.update(len(chunk))
        bar.close()
        return np.concatenate(out) if out else np.zeros((0, L) if dirs is not None else (0, L, 0))

    def target_directions(self, target: Sequence[Messages]) -> tuple[np.ndarray, np.ndarray]:
        """(directions [L, d], target deltas [n, L, d])."""
        check_target(target)
        t = self.deltas(target, desc="nait: target")
        return nait_directions(t), t

    def prepare(self, source: Sequence[Messages], source_ids: Sequence[str]) -> np.ndarray:
        return self.deltas(source, desc="nait: source")

    def score_prepared(self, state: np.ndarray, target: Sequence[Messages]) -> np.ndarray:
        dirs, t = self.target_directions(target)
        return combine(project(state, dirs), project(t, dirs), self.layer_norm)

    def score(self, source, target, source_ids) -> np.ndarray:
        """Directions first, then one pass over the source keeping only projections."""
        if len(source) != len(source_ids):
            raise ValueError(f"{len(source)} source rows but {len(source_ids)} ids")
        dirs, t = self.target_directions(target)
        if len(source) == 0:
            return np.zeros(0)
        return combine(self.deltas(source, dirs, "nait: source"), project(t, dirs), self.layer_norm)
