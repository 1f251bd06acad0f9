"""Bit packing of low-bit codes into int32 words (the layout of docs/FORMAT.md).

Row n of a packed tensor is one little-endian bit stream: the code of input k occupies bits
[k*bits, (k+1)*bits), least significant bit first, and word w holds stream bits 32w..32w+31.
A 3-bit code may straddle two words. Pure torch, vectorized, device-agnostic.
"""

from __future__ import annotations

import torch

from daq_vllm.format.layout import WORD_BITS as _WORD_BITS
from daq_vllm.format.layout import packed_words

_WORD_MASK = (1 << _WORD_BITS) - 1

def _bit_positions(k: int, bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.arange(k, device=device, dtype=torch.int64) * bits
    return start // _WORD_BITS, start % _WORD_BITS


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes [N, K] (values in [0, 2**bits)) into int32 words [N, ceil(K*bits/32)]."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [N, K], got shape {tuple(codes.shape)}")
    n, k = codes.shape
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= (1 << bits)):
        raise ValueError(f"codes must lie in [0, {1 << bits}) for {bits}-bit packing")
    word, shift = _bit_positions(k, bits, codes.device)
    n_words = packed_words(k, bits)
    # One extra word catches the high part of a code that straddles the last word boundary;
    # it is always zero because the stream ends inside the last real word.
    acc = torch.zeros(n, n_words + 1, dtype=torch.int64, device=codes.device)
    low = (c << shift) & _WORD_MASK
    high = c >> (_WORD_BITS - shift)  # shift >= 1 here, so this is the spill-over part
    acc.scatter_add_(1, word.expand(n, k), low)  # bit ranges are disjoint: add == or
    acc.scatter_add_(1, (word + 1).expand(n, k), high)
    acc = acc[:, :n_words]
    # Reinterpret the unsigned 32-bit value as two's-complement int32.
    acc = torch.where(acc >= (1 << 31), acc - (1 << _WORD_BITS), acc)
    return acc.to(torch.int32)


def unpack_codes(qweight: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of `pack_codes`: int32 words [N, W] -> int64 codes [N, k]."""
    if qweight.dim() != 2 or qweight.dtype != torch.int32:
        raise ValueError("qweight must be a 2-D int32 tensor")
    if qweight.shape[1] != packed_words(k, bits):
        raise ValueError(
            f"qweight has {qweight.shape[1]} words per row, expected {packed_words(k, bits)} "
            f"for {k} inputs at {bits} bits"
        )
    n = qweight.shape[0]
    if _WORD_BITS % bits == 0:  # codes never straddle words: one shift per slot, no gather
        shifts = torch.arange(0, _WORD_BITS, bits, device=qweight.device, dtype=torch.int32)
        slots = (qweight[:, :, None] >> shifts) & ((1 << bits) - 1)  # arithmetic shift, then mask
        return slots.reshape(n, -1)[:, :k].to(torch.int64)
    words = qweight.to(torch.int64) & _WORD_MASK
    words = torch.cat([words, torch.zeros(n, 1, dtype=torch.int64, device=words.device)], dim=1)
    word, shift = _bit_positions(k, bits, qweight.device)
    low = words[:, word] >> shift
    high = words[:, word + 1] << (_WORD_BITS - shift)
    return (low | high) & ((1 << bits) - 1)
