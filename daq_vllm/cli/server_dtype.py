"""On a CPU without native bfloat16, `serve` runs vLLM in float32 unless the user chose a dtype.

vLLM downcasts every float32 checkpoint to its platform's first dtype, bfloat16 on CPU
(`vllm.config.model._resolve_auto_dtype`), even where the CPU has neither AVX512-BF16 nor AMX and
computes bfloat16 matmuls and attention by conversion. There the unquantized SmolLM2 ran at 11.8
output tok/s in bfloat16 against 52.5 in float32 (batch 16, benchmarks/results/throughput-cpu.md),
and DAQ checkpoints paid the same for the layers they leave in full precision. Their head and
skipped linears now run through `kernels.cpu_bf16` there, which brings DAQ in bfloat16 level with
DAQ in float32 (throughput-cpu.md); float32 stays the default, keeping activations and the KV cache
in float32.
"""

from __future__ import annotations

from .server_args import option_value


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (`kernels.cpu_bf16.native_bf16`, imported here, not
    at the top, so that `daq-vllm` starts without importing torch)."""
    from ..kernels.cpu_bf16 import native_bf16 as kernels_native_bf16

    return kernels_native_bf16()


def cpu_dtype(server_args: list[str]) -> list[str]:
    """`--dtype float32` (said in one line) when the user gave no dtype and bfloat16 is not native."""
    if option_value(server_args, "--dtype") is not None or native_bf16():
        return []
    print("daq-vllm: --dtype float32: this CPU has no native bfloat16 (AVX512-BF16 or AMX), so vLLM's "
          "default bfloat16 would run about 4x slower; pass --dtype to choose", flush=True)
    return ["--dtype", "float32"]
