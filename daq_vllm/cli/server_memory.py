"""How much memory vLLM on CPU may take for its KV cache, when the user did not say.

vLLM-CPU reserves 92% of the NUMA node's memory for its KV cache unless told otherwise, which a
machine running anything else cannot give. `cpu_defaults` sets `VLLM_CPU_KVCACHE_SPACE` to a size
that fits (`cpu_kv_cache_gib`) and, if one sequence of the model's full context would not fit in
it, a `--max-model-len` (`fitting_max_model_len`). The user's flags and environment always win.
"""

from __future__ import annotations

import json
from pathlib import Path

from .server_args import asks_for_help, option_value

GiB = 1 << 30
KV_CAP_GIB = 4  # the most serve reserves for the KV cache on CPU by itself
KV_MARGIN_GIB = 2.0  # left for the OS, the API server and the tokenizer
WEIGHTS_FACTOR = 2.0  # checkpoint bytes -> resident weights plus workspace
KV_ENV = "VLLM_CPU_KVCACHE_SPACE"
MEMORY_FLAGS = ("--gpu-memory-utilization", "--kv-cache-memory-bytes")
BLOCK_TOKENS = 16  # max-model-len is rounded down to whole KV blocks


def cpu_kv_cache_gib(free_bytes: int, checkpoint_bytes: int) -> int:
    """Whole GiB of KV cache for vLLM on CPU: half of what is left, between 1 and KV_CAP_GIB.

    left = free memory - WEIGHTS_FACTOR (2) x the checkpoint's .safetensors bytes (weights plus workspace)
    - KV_MARGIN_GIB (2 GiB); the answer is floor(min(KV_CAP_GIB (4), left / 2)), at least 1 GiB.
    """
    left = free_bytes - WEIGHTS_FACTOR * checkpoint_bytes - KV_MARGIN_GIB * GiB
    return max(1, min(KV_CAP_GIB, int(left * 0.5 // GiB)))


def kv_bytes_per_token(config: dict, dtype: str | None = None) -> int | None:
    """Upper bound of one token's KV cache: 2 (K and V) x layers x kv heads x head dim x dtype bytes.

    dtype is the server's `--dtype`; without it (or "auto") the config's dtype decides, float32
    taking 4 bytes and anything else 2. None when the config lacks the fields.
    """
    try:
        layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    if dtype in (None, "auto"):
        dtype = str(config.get("torch_dtype") or config.get("dtype") or "")
    width = 4 if dtype in ("float32", "float", "torch.float32") else 2
    return 2 * layers * kv_heads * head_dim * width


def fitting_max_model_len(config: dict, kv_gib: int, dtype: str | None = None) -> int | None:
    """A `--max-model-len` (whole blocks of 16 tokens) so that one sequence fits kv_gib, or None when
    the model's `max_position_embeddings` already fits (or the config does not say enough)."""
    per_token = kv_bytes_per_token(config, dtype)
    try:
        positions = int(config["max_position_embeddings"])
    except (KeyError, TypeError, ValueError):
        return None
    if not per_token or positions * per_token <= kv_gib * GiB:
        return None
    return max(BLOCK_TOKENS, kv_gib * GiB // per_token // BLOCK_TOKENS * BLOCK_TOKENS)


def _node_available_bytes() -> list[int]:
    """Available memory per NUMA node as vLLM's CPU worker counts it (free + file pages + reclaimable slab)."""
    found = []
    for meminfo in sorted(Path("/sys/devices/system/node").glob("node[0-9]*/meminfo")):
        fields = {}
        try:
            for line in meminfo.read_text().splitlines():
                parts = line.split()  # "Node 0 MemFree:  9490652 kB"
                if len(parts) >= 4:
                    fields[parts[2].rstrip(":")] = int(parts[3]) * 1024
        except (OSError, ValueError):
            continue
        keys = ("MemFree", "Active(file)", "Inactive(file)", "SReclaimable")
        if fields.get("MemTotal") and all(k in fields for k in keys):
            found.append(sum(fields[k] for k in keys))
    return found


def free_memory_bytes() -> int | None:
    """Memory available now: psutil's (else /proc/meminfo MemAvailable), no more than any NUMA node's."""
    total = None
    try:
        import psutil

        total = int(psutil.virtual_memory().available)
    except ImportError:
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    total = int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
    candidates = [b for b in (total, *_node_available_bytes()) if b]
    return min(candidates) if candidates else None


def on_cpu() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return not torch.cuda.is_available()


def cpu_defaults(path: Path, server_args: list[str], env: dict[str, str]) -> list[str]:
    """On CPU, unless the user chose: set env's KV cache size, print it, and return server args to add."""
    if any(option_value(server_args, flag) is not None for flag in MEMORY_FLAGS) or env.get(KV_ENV):
        return []
    if asks_for_help(server_args):
        return []
    if not on_cpu():
        return []
    free = free_memory_bytes()
    if free is None:
        return []
    weights = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    kv_gib = cpu_kv_cache_gib(free, weights)
    env[KV_ENV] = str(kv_gib)
    print(f"daq-vllm: KV cache {kv_gib} GiB on CPU (free memory {free / GiB:.1f} GiB); "
          f"override with {KV_ENV} or --gpu-memory-utilization", flush=True)
    if option_value(server_args, "--max-model-len") is not None:
        return []
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return []
    max_len = fitting_max_model_len(config, kv_gib, option_value(server_args, "--dtype"))
    if max_len is None:
        return []
    print(f"daq-vllm: --max-model-len {max_len} so one sequence fits the KV cache "
          f"(the model allows {config['max_position_embeddings']}); pass --max-model-len to choose", flush=True)
    return ["--max-model-len", str(max_len)]
