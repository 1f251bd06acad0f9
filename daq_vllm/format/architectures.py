"""What the format knows of model architectures: the linear shapes to expect per `model_type`.

The checkpoint checker uses this to check N and K exactly where it can; other architectures are
checked for self-consistency only.
"""

from __future__ import annotations

from typing import Any

# Architectures whose decoder linears have the LLaMA shapes below.
LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3"}


def expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(N, K) of each decoder linear by its last name, for LLaMA-like architectures; else empty."""
    if config.get("model_type") not in LLAMA_LIKE:
        return {}
    hidden, heads, inter = (config.get(k) for k in ("hidden_size", "num_attention_heads", "intermediate_size"))
    if not all(isinstance(v, int) and v > 0 for v in (hidden, heads, inter)):
        return {}  # vLLM reports the config itself
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    q, kv_out = heads * head_dim, kv * head_dim
    return {
        "q_proj": (q, hidden), "k_proj": (kv_out, hidden), "v_proj": (kv_out, hidden), "o_proj": (hidden, q),
        "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter),
    }
