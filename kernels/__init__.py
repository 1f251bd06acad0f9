"""DAQ compute kernels: bit packing, the torch reference and the kernel layer.

Every dense compute path is a `LinearKernel` chosen once per layer by `choose_kernel(LinearSpec)`:
`torch` (the reference, any device), `cpu` (C++, on CPU), `dense` (decoded once, on request) and
`triton` (CUDA, or CPU tensors under TRITON_INTERPRET=1). A mixture-of-experts layer gets an
`MoEKernel` from `choose_moe_kernel(MoESpec)` (`moe.py`): `triton_moe` (fused, CUDA), `cpu_moe`
(fused, C++ on CPU) or `loop` (per expert, through the linear kernels), all checked against
`moe_reference`. Knows nothing of
the quantizer, transformers or vLLM; it builds on the format contract only. Triton is imported
when a Triton kernel first runs.
"""

from .base import LinearKernel, LinearSpec
from .moe import MoEKernel, MoESpec, choose_moe_kernel, moe_reference
from .packing import pack_codes, packed_words, unpack_codes
from .reference import daq_linear_reference, dequantize, expand_groups
from .select import KERNELS, choose_kernel

__all__ = [
    "KERNELS",
    "LinearKernel",
    "LinearSpec",
    "MoEKernel",
    "MoESpec",
    "choose_kernel",
    "choose_moe_kernel",
    "daq_linear_reference",
    "dequantize",
    "expand_groups",
    "moe_reference",
    "pack_codes",
    "packed_words",
    "unpack_codes",
]
