"""The v2 Triton kernels' weight layout, made once per layer in `prepare()` (pure torch, any device).

The checkpoint layout (docs/FORMAT.md: one little-endian code stream per row, scales and offsets
[N, groups]) does not change; this is a copy the v2 kernels (`triton_v2`) read faster:

- **K permuted within every block of 128 codes** (logical `k = 16j + 8h + 2t + e`, stored
  `p = 32t + 4j + 2h + e`; t < 4, j < 8, h, e < 2). A Hopper wgmma with the weights as its
  register operand gives each thread, per row, the 32 values with one t: after the permutation
  they are 16 contiguous bytes, one vector load. The kernels undo the permutation with a
  reshape/permute of the decoded tile, which compiles to register renaming. K is padded to a
  multiple of 128 with code 0 (the activations are zero there).
- **4-bit codes as bytes** `[N, Kp/2]` (stored code p in the low nibble when p is even), so a
  32-bit word holds 8 codes that decode together. **3-bit codes as a 2-bit and a 1-bit plane**,
  3/8 byte per code as in the checkpoint: each block of 128 is 48 bytes, words A (16 B), B
  (16 B) and C (16 B); chunk c (stored 32c..32c+31) owns word c of each. A and B hold the codes'
  low 2 bits, C their high bit, placed so that the decode builds each `prmt` selector (4 codes
  as nibbles) with two shifts and masks (`three_bit_slots`, `triton_v2_decode.table3_asm`).
- **Scales and offsets as `[groups, N]`**, contiguous along N: a tile's per-group parameters are
  one coalesced load. Padded groups get scale and offset 0.
- **E2M1 folded**: the bit decode yields `value * 2**-14` (an exact fp16 pattern), so its scale is
  stored times 2**14 when that stays in range (FOLDED_MAX: in fp16, and in bf16 after the bf16
  decode's further 2**112); otherwise the layer decodes through the table.

Research notes with sources: `shared/research/kernels-v2.md` section 3.1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from daq_vllm.format.codebooks import decode_kind

from .packing import unpack_codes
from .triton_v2_decode import decode_asm

SHUFFLE = 128  # codes per permutation block; also every kernel's K step
E2M1_FOLD = 2.0**14  # the E2M1 bit decode's values are the code's value times 2**-14
# The largest folded scale both decodes take: fp16's 65504 would round to 2**16 in bf16, and
# 2**16 * E2M1_BF16_REFOLD overflows; 65280 is the largest bf16 value below 2**16.
FOLDED_MAX = 65280.0
ROWS_PER_PASS = 1024  # repack this many rows at a time: the int64 codes of a whole layer would take 8 B per weight


def v2_unsupported(bits: int, group_size: int) -> str | None:
    """Why the v2 layout cannot hold this format, or None: 3/4-bit codes, groups that tile 128."""
    if bits not in (3, 4):
        return f"{bits}-bit codes (the v2 layout holds 3- and 4-bit codes)"
    if not (SHUFFLE % group_size == 0 or group_size % SHUFFLE == 0) or group_size < 16:
        return f"group size {group_size} (the v2 kernels need a divisor of 128 from 16, or a multiple of 128)"
    return None


def padded_k(k: int) -> int:
    return -(-k // SHUFFLE) * SHUFFLE


def permute_k(codes: torch.Tensor) -> torch.Tensor:
    """Codes [N, Kp] in logical order -> stored order (the permutation in the module docstring)."""
    n, kp = codes.shape
    return codes.view(n, kp // SHUFFLE, 8, 2, 4, 2).permute(0, 1, 4, 2, 3, 5).reshape(n, kp)


def unpermute_k(stored: torch.Tensor) -> torch.Tensor:
    """Inverse of `permute_k` (what the kernels do to a decoded tile)."""
    n, kp = stored.shape
    return stored.view(n, kp // SHUFFLE, 4, 8, 2, 2).permute(0, 1, 3, 4, 2, 5).reshape(n, kp)


def chunk_group(m: int) -> int:
    """The decode group (asm output) of a chunk's codes at offsets m, m + 8, m + 16, m + 24 (m < 8):
    the 3-bit reversal of m, because the kernels interleave the 8 outputs with three nested joins."""
    return ((m & 1) << 2) | (m & 2) | (m >> 2)


def three_bit_slots() -> list[tuple[int, int, int]]:
    """For offset l (< 32) of a chunk: (low word 0 = A / 1 = B, bit of the low 2 bits in it, bit of
    the high bit in C). Group g's 4 codes (nibble j = offset 8j + m) sit where one shift and one mask
    turn a word into the nibbles of a `prmt` selector: low bits at 4j + [0, 2, 16, 18][g % 4] of
    word g // 4, high bits at 16 (g // 4) + 4j + g % 4."""
    slots = []
    for offset in range(32):
        j, m = divmod(offset, 8)
        g = chunk_group(m)
        slots.append((g // 4, 2 * (g % 2) + 16 * ((g // 2) % 2) + 4 * j, 16 * (g // 4) + 4 * j + g % 4))
    return slots


def _words_to_bytes(words: torch.Tensor) -> torch.Tensor:
    """int64 32-bit words [N, blocks, 4] -> little-endian bytes [N, blocks, 16]."""
    shifts = torch.arange(0, 32, 8, device=words.device)
    return ((words[..., None] >> shifts) & 255).flatten(-2)


def pack_stored(stored: torch.Tensor, bits: int) -> torch.Tensor:
    """Stored-order codes [N, Kp] -> uint8 [N, Kp * bits / 8] (bytes, or the 3-bit A/B/C words)."""
    c = stored.to(torch.int64)
    n, kp = c.shape
    if bits == 4:
        pairs = c.view(n, kp // 2, 2)
        return (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)
    chunks = c.view(n, kp // SHUFFLE, 4, 32)
    words = torch.zeros(3, n, kp // SHUFFLE, 4, dtype=torch.int64, device=c.device)
    for offset, (word, low_bit, high_bit) in enumerate(three_bit_slots()):
        words[word] |= (chunks[..., offset] & 3) << low_bit
        words[2] |= (chunks[..., offset] >> 2) << high_bit
    return torch.cat([_words_to_bytes(w) for w in words], dim=-1).reshape(n, kp * 3 // 8).to(torch.uint8)


def unpack_stored(packed: torch.Tensor, bits: int, kp: int) -> torch.Tensor:
    """Inverse of `pack_stored`: uint8 -> stored-order int64 codes [N, Kp]."""
    p = packed.to(torch.int64)
    n = p.shape[0]
    if bits == 4:
        return torch.stack([p & 15, p >> 4], dim=-1).reshape(n, kp)
    shifts = torch.arange(0, 32, 8, device=p.device)
    words = (p.view(n, kp // SHUFFLE, 3, 4, 4) << shifts).sum(-1)  # [N, blocks, A/B/C, chunk]
    codes = torch.zeros(n, kp // SHUFFLE, 4, 32, dtype=torch.int64, device=p.device)
    for offset, (word, low_bit, high_bit) in enumerate(three_bit_slots()):
        codes[..., offset] = ((words[:, :, word] >> low_bit) & 3) | (((words[:, :, 2] >> high_bit) & 1) << 2)
    return codes.reshape(n, kp)


@dataclass
class RepackedWeights:
    """One linear in the v2 layout; `decode` is how its kernels turn a code into a value."""

    codes: torch.Tensor  # uint8 [N, Kp * bits / 8]
    scales: torch.Tensor  # fp16 [groups of Kp, N] (times E2M1_FOLD when decode == "e2m1")
    offsets: torch.Tensor  # fp16 [groups of Kp, N]
    decode: str  # "e2m1" | "int" | "table"
    asm: str  # the decode in PTX for fp16 activations (`triton_v2_decode`)
    asm_bf16: str  # ... and for bf16 activations


def repack(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, codebook: tuple[float, ...],
           bits: int, group_size: int, in_features: int) -> RepackedWeights:
    """The v2 layout of a checkpoint linear (the checkpoint tensors are left as they are)."""
    why = v2_unsupported(bits, group_size)
    if why:
        raise ValueError(f"the v2 Triton layout does not hold {why}")
    kp = padded_k(in_features)
    packed = torch.cat([pack_stored(permute_k(torch.nn.functional.pad(unpack_codes(rows, bits, in_features),
                                                                      (0, kp - in_features))), bits)
                        for rows in qweight.split(ROWS_PER_PASS)])
    groups = -(-kp // group_size)

    def by_group(t: torch.Tensor) -> torch.Tensor:
        t = torch.nn.functional.pad(t.float(), (0, groups - t.shape[1]))
        return t.t().contiguous()

    s, b = by_group(scales), by_group(offsets)
    decode = decode_kind(codebook)
    if decode == "e2m1":
        if (s.abs() * E2M1_FOLD).max() <= FOLDED_MAX:
            s = s * E2M1_FOLD
        else:
            decode = "table"
    asm = {dtype: decode_asm(decode, codebook, bits, dtype) for dtype in ("float16", "bfloat16")}
    return RepackedWeights(packed, s.half(), b.half(), decode, asm["float16"], asm["bfloat16"])
