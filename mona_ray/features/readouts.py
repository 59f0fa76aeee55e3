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
  (``weighting="position"``, RDS+: token i of a row weighs i + 1);
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
        name = f"{self.kind}@layers.{self.block}"
        if self.kind in ("sae", "mlp_gate"):
            name += f"/k={self.k or 'sae'}"
        if self.kind == "hidden" and self.weighting != "mean":
            name += f"/{self.weighting}"
        return name + f"/exclude={self.exclude}"

    def spec(self) -> dict:
        """What decides this readout's output, besides the model, the SAE's weights and the rendering."""
        d = {k: v for k, v in asdict(self).items() if k != "sae"}
        d["blocks"] = list(self.blocks)
        return d
