"""DAQ compute kernels: bit packing and the torch reference dequant-GEMM.

Knows nothing of the quantizer or of vLLM: callers pass tensors and the codebook.
"""

from .packing import pack_codes, packed_words, unpack_codes
from .reference import daq_linear_reference, dequantize, expand_groups

__all__ = [
    "daq_linear_reference",
    "dequantize",
    "expand_groups",
    "pack_codes",
    "packed_words",
    "unpack_codes",
]
