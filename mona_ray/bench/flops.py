"""Forward FLOPs of the work the embedding actor actually does, and device peaks.

Counted per real (non-padding) token, as model FLOPs utilisation is defined (Chowdhery
et al. 2022): padding, recomputation and kernels that are not matmuls do not count.
For a Llama block with hidden d, KV width d_kv = n_kv_heads * head_dim and MLP width f:

* projections: q and o are d x d, k and v are d x d_kv, the MLP is 3 matrices d x f:
  ``2 * (2 d^2 + 2 d d_kv + 3 d f)`` per token;
* causal attention: QK^T and AV for a token at position t (1-based) attend to t keys:
  ``2 * 2 * t * d`` (summed exactly over each row's positions).

Only the blocks that run count (``layers.N`` runs N + 1 blocks); there is no LM head.
The SAE encoder adds ``2 * d * num_latents`` per token (one GEMM; the top-k is not a FLOP).
"""

from __future__ import annotations

# Dense bf16 tensor-core peaks in TFLOP/s (NVIDIA datasheets, without sparsity); anything
# else needs --peak-tflops.
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM; other H100 names fall back to this
    "A100": 312.0,  # SXM and PCIe alike
}


def peak_tflops(device_name: str) -> float | None:
    """The bf16 dense peak for a CUDA device name, or None when it is not in the table."""
    name = device_name.upper()
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):  # most specific first
        if key.upper() in name:
            return PEAK_BF16_TFLOPS[key]
    return None


def block_matmul_flops_per_token(hidden: int, kv_width: int, intermediate: int) -> float:
    return 2.0 * (2 * hidden * hidden + 2 * hidden * kv_width + 3 * hidden * intermediate)


def attention_flops(hidden: int, lengths) -> float:
    """Causal QK^T + AV over real tokens of rows with these lengths, for one block."""
    return float(sum(4.0 * hidden * n * (n + 1) / 2 for n in lengths))


def model_flops(config, blocks: int, lengths) -> float:
    """Forward FLOPs of ``blocks`` Llama-style blocks over rows of the given real lengths."""
    d = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    tokens = float(sum(lengths))
    per_block = block_matmul_flops_per_token(d, kv, config.intermediate_size) * tokens + attention_flops(d, lengths)
    return blocks * per_block


def sae_flops(d_in: int, num_latents: int, tokens: int) -> float:
    return 2.0 * d_in * num_latents * tokens
