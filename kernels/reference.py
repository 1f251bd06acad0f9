"""Torch reference for DAQ weights: dequantize and the dequant-GEMM.

This is the numerical definition every faster path (Triton kernels, the vLLM plugin) is tested
against. Dequantization runs in float32 from the stored fp16 scale and offset:
`W_hat[n, k] = float(scales[n, k//g]) * codebook[q[n, k]] + float(offsets[n, k//g])`.
"""

from __future__ import annotations

import torch

from .packing import unpack_codes


def expand_groups(per_group: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    """Repeat per-group values [N, G] along K to [N, k] (the last group may be partial)."""
    return per_group.repeat_interleave(group_size, dim=1)[:, :k]


def decode_values(
    codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, codebook: torch.Tensor
) -> torch.Tensor:
    """`codebook[codes] * scales + offsets` in float32: the decoding formula, written once.

    `scales` and `offsets` hold one value per code or broadcast against `codes` (per-group columns
    [R, 1] against codes [R, L]); the quantizer rounds with this same arithmetic, so what it
    measures is what a loader decodes, bit for bit.
    """
    return codebook.float()[codes] * scales.float() + offsets.float()


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    codebook: torch.Tensor,
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """Decode packed codes to a float32 weight [N, in_features]."""
    codes = unpack_codes(qweight, bits, in_features)
    s = expand_groups(scales.float(), group_size, in_features)
    b = expand_groups(offsets.float(), group_size, in_features)
    return decode_values(codes, s, b, codebook.to(device=qweight.device, dtype=torch.float32))


def daq_linear_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    codebook: torch.Tensor,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x @ W_hat^T (+ bias)` with the weight dequantized to x's dtype; x is [..., K]."""
    k = x.shape[-1]
    weight = dequantize(qweight, scales, offsets, codebook, bits, group_size, k).to(x.dtype)
    return torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))
