"""The one interface every selector implements, and the text view of a conversation.

A selector scores source samples against a target set; higher is better. Inputs are
conversations as ``records.normalize_record`` returns them (``[{"role", "content"}]``),
so every record format the pipeline reads works here unchanged. Ranking and the
deterministic id tie-break are not the selector's business: callers apply
``scoring.topk`` / ``scoring.order_key`` to the scores.

Scoring is split in two so that one source pass serves many targets:

* ``prepare(source, source_ids)`` does everything that depends on the source alone
  (an index, n-gram counts, embeddings) and returns an opaque state;
* ``score_prepared(state, target)`` scores that source for one target set.

``score(source, target, source_ids)`` is the two in one call.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..core.records import InputError

Messages = list[dict]


def messages_text(messages: Messages) -> str:
    """The text a lexical or sentence-embedding selector sees: message contents joined by blank lines
    (role names and chat-template markers are left out; they are the same in every sample)."""
    return "\n\n".join(m["content"] for m in messages if m.get("content"))


def check_target(target: Sequence[Messages], name: str = "target") -> None:
    if len(target) == 0:
        raise InputError(f"the {name} set has no rows: a selector needs at least one target example")


class Selector:
    """Base class: subclasses implement ``prepare`` and ``score_prepared``."""

    name: str = ""

    def prepare(self, source: Sequence[Messages], source_ids: Sequence[str]) -> Any:
        raise NotImplementedError

    def score_prepared(self, state: Any, target: Sequence[Messages]) -> np.ndarray:
        raise NotImplementedError

    def score(self, source: Sequence[Messages], target: Sequence[Messages],
              source_ids: Sequence[str]) -> np.ndarray:
        """One float64 score per source row, higher = more useful for the target."""
        if len(source) != len(source_ids):
            raise ValueError(f"{len(source)} source rows but {len(source_ids)} ids")
        check_target(target)
        if len(source) == 0:
            return np.zeros(0, dtype=np.float64)
        return np.asarray(self.score_prepared(self.prepare(source, source_ids), target), dtype=np.float64)
