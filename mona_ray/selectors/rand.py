"""Random selection, seeded and independent of row order.

A row's score is a uniform number in [0, 1) derived from ``(seed, id)`` by BLAKE2b, so
the same seed gives the same selection however the source is ordered or sharded, and
different seeds give independent selections.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

from .base import Messages, Selector


def uniform_from_id(seed: int, row_id: str) -> float:
    h = hashlib.blake2b(f"{seed}\x00{row_id}".encode("utf-8"), digest_size=8).digest()
    return (int.from_bytes(h, "little") >> 11) / float(1 << 53)


class RandomSelector(Selector):
    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def prepare(self, source: Sequence[Messages], source_ids: Sequence[str]):
        return np.fromiter((uniform_from_id(self.seed, str(i)) for i in source_ids), dtype=np.float64,
                           count=len(source_ids))

    def score_prepared(self, state, target: Sequence[Messages]) -> np.ndarray:
        return state
