"""PTX that decodes whole 32-bit words of stored codes (`triton_v2_layout`) into fp16 or bf16 values.

Used by the v2 kernels (`triton_v2`) through `tl.inline_asm_elementwise(pack=4)`. No int-to-float
conversion and no memory lookup (Hopper converts slowly and a per-code gather costs a load per
weight): only bit operations and byte permutes.

4-bit layers: each call takes 4 bytes (8 codes) and returns two tensors, the values of the low
nibbles (even stored positions) and of the high nibbles (odd ones), in byte order; `tl.join`
interleaves them back.
- `e2m1`: sign, exponent and mantissa bits placed into an fp16 pattern worth `value * 2**-14`
  exactly (the 2**14 is folded into the scale by the layout), or a bf16 pattern worth
  `value * 2**-126` (bf16's exponent bias; the kernels multiply the folded scale by
  E2M1_BF16_REFOLD = 2**112 once per group, which the layout keeps in bf16 range). Codes of
  exponent 0 decode to subnormals, which both packed FMAs take as they are.
- `int`: the code under the exponent of 1024 (fp16: `0x6400 | q` is exactly 1024 + q) or of 128
  (bf16: `0x4300 | q` is exactly 128 + q), minus that.
- `table` (any codebook): the 16 values as two byte tables (low and high bytes of their bit
  patterns) selected with `prmt`, whose 8-byte pool covers half a table per instruction; the
  code's top bit picks the half through a byte mask.
3-bit layers: each call takes words A, B and C of one 32-code chunk and returns 8 tensors; an
8-entry table is exactly one `prmt` pool and a 3-bit code a valid selector nibble (FLUTE's
observation), so each 4 codes cost two shifts, two masks, an or and four `prmt`.

Tables are written into the asm text, so each codebook compiles once. `FMA_F16X2`/`FMA_BF16X2`
apply scale and offset with one packed FMA per pair (Triton 3.6 turns `w * s + b` on fp16 tensors
into scalar FMAs). The asm texts are data: tests/kernels/test_triton_v2.py executes them with a
small PTX simulator, on random words and inside the interpreted kernels, because the Triton
interpreter cannot run inline asm.
"""

from __future__ import annotations

import numpy as np


def _e2m1_asm(shift: int, mask: str) -> str:
    """The E2M1 bit decode: each code's nibble to the top of a 16-bit half (its sign bit at 15), then
    the exponent and mantissa bits `shift` lower, kept by `mask` (fp16: bits 11-9, bf16: 8-6)."""
    return f"""{{ .reg .b32 t0, t1, u;
prmt.b32 t0, $4, 0, 0x1404; prmt.b32 t1, $4, 0, 0x3424;
shl.b32 u, t0, 4; shr.b32 $0, u, {shift}; and.b32 $0, $0, {mask}; and.b32 u, u, 0x80008000; or.b32 $0, $0, u;
shl.b32 u, t1, 4; shr.b32 $1, u, {shift}; and.b32 $1, $1, {mask}; and.b32 u, u, 0x80008000; or.b32 $1, $1, u;
shr.b32 $2, t0, {shift}; and.b32 $2, $2, {mask}; and.b32 u, t0, 0x80008000; or.b32 $2, $2, u;
shr.b32 $3, t1, {shift}; and.b32 $3, $3, {mask}; and.b32 u, t1, 0x80008000; or.b32 $3, $3, u; }}"""


E2M1_ASM = _e2m1_asm(3, "0x0E000E00")  # fp16 pattern = value * 2**-14
E2M1_BF16_ASM = _e2m1_asm(6, "0x01C001C0")  # bf16 pattern = value * 2**-126: one exponent lower in the word
E2M1_BF16_REFOLD = 2.0**112  # bf16 pattern = value * 2**-126; the layout folded 2**14 into the scale


def _int_asm(base: str, sub: str) -> str:
    """The uniform-int decode: each code as the low mantissa bits under the exponent `base` (a
    packed pair), then `base` subtracted."""
    return f"""{{ .reg .b32 t0, t1, k;
mov.b32 k, {base};
prmt.b32 t0, $4, 0, 0x4140; prmt.b32 t1, $4, 0, 0x4342;
and.b32 $0, t0, 0x000F000F; or.b32 $0, $0, k; {sub} $0, $0, k;
and.b32 $1, t1, 0x000F000F; or.b32 $1, $1, k; {sub} $1, $1, k;
shr.b32 t0, t0, 4; and.b32 $2, t0, 0x000F000F; or.b32 $2, $2, k; {sub} $2, $2, k;
shr.b32 t1, t1, 4; and.b32 $3, t1, 0x000F000F; or.b32 $3, $3, k; {sub} $3, $3, k; }}"""


INT_ASM = _int_asm("0x64006400", "sub.f16x2")  # 1024 in fp16: one unit per mantissa step
INT_BF16_ASM = _int_asm("0x43004300", "sub.bf16x2")  # 128 in bf16: one unit per mantissa step

FMA_F16X2 = "fma.rn.f16x2 $0, $1, $2, $3;"
FMA_BF16X2 = "fma.rn.bf16x2 $0, $1, $2, $3;"


def _table_half(t: str, out0: str, out1: str) -> str:
    """Values of the 4 codes in the bytes of `t` (each byte 0..15) -> two fp16x2 registers."""
    return f"""shr.b32 sel, {t}, 4; or.b32 sel, sel, {t}; prmt.b32 sel, sel, 0, 0x4420; and.b32 sel, sel, 0x7777;
shr.b32 m, {t}, 3; and.b32 m, m, 0x01010101; mul.lo.u32 m, m, 255;
prmt.b32 a, la0, la1, sel; prmt.b32 b, lb0, lb1, sel; xor.b32 b, b, a; and.b32 b, b, m; xor.b32 lo, a, b;
prmt.b32 a, ha0, ha1, sel; prmt.b32 b, hb0, hb1, sel; xor.b32 b, b, a; and.b32 b, b, m; xor.b32 hi, a, b;
prmt.b32 {out0}, lo, hi, 0x5140; prmt.b32 {out1}, lo, hi, 0x7362;"""


def _bit_patterns(values: tuple[float, ...], dtype: str) -> np.ndarray:
    """uint32 bit patterns of `values` in fp16 or bf16 (bf16 rounded to nearest even)."""
    if dtype == "float16":
        return np.asarray(values, dtype=np.float16).view(np.uint16).astype(np.uint32)
    bits32 = np.asarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((bits32 + 0x7FFF + ((bits32 >> 16) & 1)) >> 16).astype(np.uint32)


def _byte_tables(values: tuple[float, ...], dtype: str, names: tuple[str, ...]) -> str:
    """`mov`s of the low-byte then high-byte tables of the values' bit patterns, 4 entries a register."""
    patterns = _bit_patterns(values, dtype)
    planes = [patterns & 0xFF, patterns >> 8]
    words = [int(sum(int(b[i + j]) << (8 * j) for j in range(4))) for b in planes for i in range(0, len(values), 4)]
    return " ".join(f"mov.b32 {name}, 0x{w:08X};" for name, w in zip(names, words))


def table_asm(values: tuple[float, ...], dtype: str = "float16") -> str:
    """Decode asm for a 16-entry codebook (4-bit), its values written in as byte tables."""
    if len(values) != 16:
        raise ValueError(f"the 4-bit table decode needs 16 codebook values, got {len(values)}")
    movs = _byte_tables(values, dtype, ("la0", "la1", "lb0", "lb1", "ha0", "ha1", "hb0", "hb1"))
    return ("{ .reg .b32 t, sel, m, a, b, lo, hi, la0, la1, lb0, lb1, ha0, ha1, hb0, hb1;\n" + movs + "\n"
            "and.b32 t, $4, 0x0F0F0F0F;\n" + _table_half("t", "$0", "$1") + "\n"
            "shr.b32 t, $4, 4; and.b32 t, t, 0x0F0F0F0F;\n" + _table_half("t", "$2", "$3") + " }")


def table3_asm(values: tuple[float, ...], dtype: str = "float16") -> str:
    """Decode asm for an 8-entry codebook (3-bit): words A ($16), B ($17), C ($18) of a chunk ->
    8 outputs of 4 values ($2g, $2g+1 = group g's nibbles 0, 1 and 2, 3; `triton_v2_layout.three_bit_slots`)."""
    if len(values) != 8:
        raise ValueError(f"the 3-bit table decode needs 8 codebook values, got {len(values)}")
    lines = ["{ .reg .b32 sel, t, lo, hi, l0, l1, h0, h1;", _byte_tables(values, dtype, ("l0", "l1", "h0", "h1"))]
    for g in range(8):
        word = "$16" if g < 4 else "$17"
        low_shift = [0, 2, 16, 18][g % 4]
        low = f"shr.b32 sel, {word}, {low_shift}; and.b32 sel, sel, 0x3333;" if low_shift else \
            f"and.b32 sel, {word}, 0x3333;"
        high_shift = 16 * (g // 4) + g % 4 - 2  # the high bit of nibble j moves to bit 4j + 2
        high = (f"shr.b32 t, $18, {high_shift};" if high_shift > 0 else f"shl.b32 t, $18, {-high_shift};"
                if high_shift < 0 else "mov.b32 t, $18;")
        lines.append(f"{low} {high} and.b32 t, t, 0x4444; or.b32 sel, sel, t;"
                     f" prmt.b32 lo, l0, l1, sel; prmt.b32 hi, h0, h1, sel;"
                     f" prmt.b32 ${2 * g}, lo, hi, 0x5140; prmt.b32 ${2 * g + 1}, lo, hi, 0x7362;")
    return "\n".join(lines) + " }"


def decode_asm(decode: str, values: tuple[float, ...], bits: int = 4, dtype: str = "float16") -> str:
    """The asm for a layer's decode kind (`RepackedWeights.decode`), bit width and activation dtype:
    the bit tricks where the codebook allows (4-bit e2m1 and int), the tables otherwise."""
    if bits == 3:
        return table3_asm(values, dtype)
    if decode == "e2m1":
        return E2M1_ASM if dtype == "float16" else E2M1_BF16_ASM
    if decode == "int":
        return INT_ASM if dtype == "float16" else INT_BF16_ASM
    return table_asm(values, dtype)
