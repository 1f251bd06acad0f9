"""The checkpoint contract (docs/FORMAT.md): config schema, codebooks, layout arithmetic, checker.

Imports nothing else of the package but `errors`: kernels, the quantizer and the integrations all
build on it.
"""

from .codebooks import CODEBOOKS, Codebook, get_codebook
from .config import FORMAT_VERSION, QUANT_METHOD, SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, DAQFormat
from .layout import OFFSETS, PACKED, QWEIGHT, SCALES, num_groups, packed_shapes, packed_words

__all__ = [
    "CODEBOOKS", "FORMAT_VERSION", "OFFSETS", "PACKED", "QUANT_METHOD", "QWEIGHT", "SCALES", "SUPPORTED_BITS",
    "SUPPORTED_GROUP_SIZES", "Codebook", "DAQFormat", "get_codebook", "num_groups", "packed_shapes", "packed_words",
]
