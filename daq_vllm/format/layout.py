"""Layout arithmetic of the packed tensors (docs/FORMAT.md): names, dtypes and shapes per linear.

A quantized linear [N, K] is stored as `<module>.qweight` int32 [N, words_per_row(K)] and
`<module>.scales`, `<module>.offsets` float16 [N, groups_per_row(K)]. Every reader and writer
(checker, loaders, kernels, quantizer) takes these numbers from here.
"""

from __future__ import annotations

WORD_BITS = 32
# Suffixes of the tensors that replace `<module>.weight` for a quantized linear.
QWEIGHT, SCALES, OFFSETS = "qweight", "scales", "offsets"
PACKED = (QWEIGHT, SCALES, OFFSETS)
PACKED_DTYPES = {QWEIGHT: "I32", SCALES: "F16", OFFSETS: "F16"}  # safetensors dtype names


def packed_words(k: int, bits: int) -> int:
    """int32 words that hold `k` codes of `bits` bits: `ceil(K * bits / 32)`."""
    return -(-k * bits // WORD_BITS)


def num_groups(k: int, group_size: int) -> int:
    """Groups along K, the last one possibly partial: `ceil(K / g)`."""
    return -(-k // group_size)


def packed_shapes(n: int, k: int, bits: int, group_size: int) -> dict[str, tuple[int, int]]:
    """Shape of each packed tensor of an [N, K] linear, by suffix."""
    groups = num_groups(k, group_size)
    return {QWEIGHT: (n, packed_words(k, bits)), SCALES: (n, groups), OFFSETS: (n, groups)}
