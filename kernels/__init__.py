"""DAQ compute kernels: bit packing, the torch reference and the kernel layer.

Every compute path is a `LinearKernel` chosen once per layer by `choose_kernel(LinearSpec)`:
`torch` (the reference, any device), `dense` (decoded once, on request) and `triton` (CUDA, or
CPU tensors under TRITON_INTERPRET=1). Knows nothing of the quantizer, transformers or vLLM; it
builds on the format contract only. Triton is imported when a Triton kernel first runs.
"""

from .base import LinearKernel, LinearSpec
from .packing import pack_codes, packed_words, unpack_codes
from .reference import daq_linear_reference, dequantize, expand_groups
from .select import KERNELS, choose_kernel

__all__ = [
    "KERNELS",
    "LinearKernel",
    "LinearSpec",
    "choose_kernel",
    "daq_linear_reference",
    "dequantize",
    "expand_groups",
    "pack_codes",
    "packed_words",
    "unpack_codes",
]
