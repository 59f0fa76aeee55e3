"""Readouts: what the feature engine reads out of one forward pass, per row.

A :class:`Readout` is a small, hashable description; the engine does the work. Each one
knows its name, the block and tokens it reads, whether it is sparse, and what changes its
output (``spec``, which goes into the store's fingerprint). Widths come from the loaded
model and SAE (``FeatureEngine.width``), never from the data.

* ``sae``: MoNA's monosemantic codes, ``TopK_K(ReLU(W_enc (h - b_dec) + b_enc))`` of the
  residual stream at the output of ``block``, mean-pooled (``sae`` names the loaded SAE,
  ``k=None`` its own K);
* ``mlp_gate``: the polysemantic ablation, ``TopK_K(|act_fn(W_gate x)|)`` of the MLP input
  of ``block``;
* ``hidden``: the residual stream itself (dense), mean-pooled, or position-weighted
  (``weighting="position"``, RDS+: token i of a row weighs i + 1); ``final_norm=True`` reads
  it through the model's final norm, which only exists after the last block: with
  ``block`` = the last block that is Hugging Face's ``hidden_states[-1]``, what RDS+ as
  published reads (:func:`rds_readout`);
* ``nait``: NAIT's per-block deltas, last token minus first non-special token, for the
  blocks ``blocks`` (dense, ``len(blocks) x hidden`` per row).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

KINDS = ("sae", "mlp_gate", "hidden", "nait")
EXCLUDES = ("none", "special", "template")
WEIGHTINGS = ("mean", "position")


@dataclass(frozen=True)
class Readout:
    kind: str  # sae | mlp_gate | hidden | nait
    block: int  # the block read (nait: the deepest of ``blocks``)
    exclude: str = "special"  # which tokens are pooled (pool.exclude)
    k: int | None = None  # sae: TopK K (None: the SAE's own); mlp_gate: required
    sae: str | None = None  # sae: key of the loaded SAE (its path) in the engine's ``saes``
    weighting: str = "mean"  # hidden: mean | position
    blocks: tuple[int, ...] = ()  # nait: the blocks whose deltas are kept
    final_norm: bool = False  # hidden: through the model's final norm (block must be the last one)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"readout kind {self.kind!r}: use one of {', '.join(KINDS)}")
        if self.exclude not in EXCLUDES:
            raise ValueError(f"pool.exclude={self.exclude!r}: use one of {', '.join(EXCLUDES)}")
        if self.kind == "mlp_gate" and not self.k:
            raise ValueError("an mlp_gate readout needs its K (embed.mlp_k or the SAE's K)")
        if self.kind == "sae" and not self.sae:
            raise ValueError("an sae readout needs the key of its SAE")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"hidden weighting {self.weighting!r}: use one of {', '.join(WEIGHTINGS)}")
        if self.final_norm and self.kind != "hidden":
            raise ValueError(f"final_norm applies to hidden readouts only, not {self.kind}")
        if self.kind == "nait" and (not self.blocks or max(self.blocks) != self.block):
            raise ValueError("a nait readout needs its blocks, the deepest one as its block")

    @property
    def source(self) -> str:
        return "mlp_in" if self.kind == "mlp_gate" else "resid"

    @property
    def sparse(self) -> bool:
        return self.kind in ("sae", "mlp_gate")

    @property
    def name(self) -> str:
        if self.kind == "nait":
            return f"nait@layers.{min(self.blocks)}-{self.block}" + ("" if len(self.blocks) == self.block - min(self.blocks) + 1
                                                                  else f"[{len(self.blocks)}]")
        name = f"{self.kind}@layers.{self.block}" + ("+norm" if self.final_norm else "")
        if self.kind in ("sae", "mlp_gate"):
            name += f"/k={self.k or 'sae'}"
        if self.kind == "hidden" and self.weighting != "mean":
            name += f"/{self.weighting}"
        return name + f"/exclude={self.exclude}"

    def spec(self) -> dict:
        """What decides this readout's output, besides the model, the SAE's weights and the rendering."""
        d = {k: v for k, v in asdict(self).items() if k != "sae"}
        d["blocks"] = list(self.blocks)
        if not self.final_norm:  # absent when off: the fingerprints of every earlier store stay as they were
            del d["final_norm"]
        return d


RDS_WEIGHTING = "position"  # Ivison et al. 2025: token i (from 0, every token, BOS included) weighs i + 1


def rds_readout(num_layers: int) -> Readout:
    """RDS+ as published (Ivison et al. 2025; ``compute_influence_cosinesim.py --pooling
    weighted_mean``): ``hidden_states[-1]`` (the last block's output through the final norm) of
    a model with ``num_layers`` blocks, every token pooled with weight ``(i + 1) / sum_j (j + 1)``."""
    return Readout("hidden", int(num_layers) - 1, "none", weighting=RDS_WEIGHTING, final_norm=True)
