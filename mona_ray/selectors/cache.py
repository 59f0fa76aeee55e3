"""A content-addressed on-disk cache of per-row arrays, in chunks of rows (the dense baseline's
sentence embeddings; the model-based features live in the feature store, ``features/store.py``).

Rows are identified by their content hash (``records.content_hash``), never by their
position or id, so the same rows in another file, another order or another run hit the
same entries. A dataset is cut into chunks of ``chunk_rows`` consecutive rows; a chunk's
key is the hash of its rows' content hashes. Each chunk of each *product* (one kind of
array computed with one set of settings, named by a fingerprint of those settings) is
one ``.npz`` file written atomically, so an interrupted pass resumes at the first
missing chunk and a pass never reuses an array made with other settings.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ..core.io import atomic_path
from ..core.io import sha as fingerprint  # noqa: F401  (the dense selector's settings key)


def chunks(content_hashes: list[str], chunk_rows: int) -> list[tuple[int, int, str]]:
    """``(start, stop, key)`` for consecutive chunks of rows."""
    out = []
    for a in range(0, len(content_hashes), chunk_rows):
        b = min(len(content_hashes), a + chunk_rows)
        out.append((a, b, hashlib.sha256("\n".join(content_hashes[a:b]).encode()).hexdigest()[:24]))
    return out


class ChunkCache:
    """``root/<product>/<chunk key>.npz``; a ``None`` root caches nothing."""

    def __init__(self, root: str | Path | None):
        self.root = Path(root).expanduser() if root else None

    def _path(self, product: str, key: str) -> Path:
        return self.root / product / f"{key}.npz"

    def has(self, product: str, key: str) -> bool:
        return self.root is not None and self._path(product, key).exists()

    def load(self, product: str, key: str) -> dict[str, np.ndarray] | None:
        if not self.has(product, key):
            return None
        with np.load(self._path(product, key), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def save(self, product: str, key: str, arrays: dict[str, np.ndarray], meta: dict | None = None) -> None:
        if self.root is None:
            return
        p = self._path(product, key)
        p.parent.mkdir(parents=True, exist_ok=True)
        if meta is not None and not (p.parent / "meta.json").exists():
            (p.parent / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
        with atomic_path(p) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
