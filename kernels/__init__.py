"""DAQ compute kernels: bit packing, the torch reference and the Triton dequant-GEMM.

Knows nothing of the quantizer or of vLLM: callers pass tensors and the codebook. Triton is
imported only for CUDA tensors, so CPU users do not need it (tests run the Triton paths on CPU
through `triton_gemm` under TRITON_INTERPRET=1).
"""

import torch

from .packing import pack_codes, packed_words, unpack_codes
from .reference import daq_linear_reference, dequantize, expand_groups


def daq_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    codebook: torch.Tensor,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x @ W_hat^T (+ bias)` for x [..., K]: the Triton kernels on CUDA, the torch reference elsewhere."""
    if x.is_cuda:
        from .triton_gemm import daq_linear_triton

        return daq_linear_triton(x, qweight, scales, offsets, codebook, bits, group_size, bias)
    return daq_linear_reference(x, qweight, scales, offsets, codebook, bits, group_size, bias)


__all__ = [
    "daq_linear",
    "daq_linear_reference",
    "dequantize",
    "expand_groups",
    "pack_codes",
    "packed_words",
    "unpack_codes",
]
