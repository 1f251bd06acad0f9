"""`torch.ops.daq.linear`: the Triton kernels as one opaque torch custom op.

vLLM compiles models with torch.compile and captures CUDA graphs, and transformers users may
compile too; a Triton launch with Python-side tuning inside a traced region would be traced into
or break the graph. As a custom op (`torch.library.custom_op`, as GemLite registers its own) the
kernel is one node whose fake implementation gives torch.compile the output's shape and dtype.
The op belongs to the kernel layer, so every integration gets it. Imports triton when first run.

The op is defined once per process. This file can run twice: as `daq_vllm.kernels.op` and, when
the repository root is on `sys.path` (`python -m pytest` or `python -m daq_vllm.cli` run there),
as `kernels.op`, because transformers imports any top-level `kernels` package it finds while it
looks for Hugging Face's package of that name. torch frees a redefined op's registration while the
first definition's callers still hold it: calls through it then read freed memory (seen as a rare
`ValueError: vector::reserve`, and as a use-after-free under AddressSanitizer). A second run
therefore takes the registered op instead of defining it again.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _define() -> Callable[..., torch.Tensor]:
    @torch.library.custom_op("daq::linear", mutates_args=())
    def daq_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                   codebook: torch.Tensor, bits: int, group_size: int, e2m1: bool,
                   bias: torch.Tensor | None = None, v2_codes: torch.Tensor | None = None,
                   v2_scales: torch.Tensor | None = None, v2_offsets: torch.Tensor | None = None,
                   v2_decode: str = "", v2_asm: str = "", v2_asm_bf16: str = "") -> torch.Tensor:
        """`x @ W_hat^T (+ bias)` through the Triton kernels (`triton_gemm.daq_linear_triton`); the
        `v2_*` arguments carry the layer's v2 layout (`triton_v2_layout.RepackedWeights`), if any."""
        from .triton_gemm import daq_linear_triton
        from .triton_v2_layout import RepackedWeights

        repacked = None if v2_codes is None else RepackedWeights(v2_codes, v2_scales, v2_offsets, v2_decode, v2_asm,
                                                                 v2_asm_bf16)
        return daq_linear_triton(x, qweight, scales, offsets, codebook, bits, group_size, e2m1, bias, repacked)

    @daq_linear.register_fake
    def _(x, qweight, scales, offsets, codebook, bits, group_size, e2m1, bias=None, v2_codes=None, v2_scales=None,
          v2_offsets=None, v2_decode="", v2_asm="", v2_asm_bf16=""):
        return x.new_empty((*x.shape[:-1], qweight.shape[0]))

    return daq_linear


daq_linear_op = torch.ops.daq.linear.default if hasattr(torch.ops.daq, "linear") else _define()
