"""PTX that decodes a 32-bit word of 8 stored 4-bit codes (4 bytes) into 8 fp16 values at once.

Used by the v2 kernels (`triton_v2`) through `tl.inline_asm_elementwise(pack=4)`: each call takes
4 bytes of the v2 layout (`triton_v2_layout`) and returns two fp16 tensors, the values of the low
nibbles (even stored positions) and of the high nibbles (odd ones), in byte order, which
`tl.join` interleaves back. No int-to-float conversion and no memory lookup (Hopper converts
slowly and a per-code gather costs a load per weight): only bit operations and byte permutes.

- `e2m1`: sign, exponent and mantissa bits placed into an fp16 pattern worth `value * 2**-14`
  exactly (the 2**14 is folded into the scale by the layout).
- `int`: the code under the fp16 exponent of 1024 (`0x6400 | q` is exactly 1024 + q), minus 1024.
- `table`: any 16-entry codebook (NF4 ...) as two byte tables (low and high bytes of the fp16
  values) selected with `prmt`, whose 8-byte pool covers half a table per instruction; the code's
  top bit picks the half through a byte mask. The table is written into the asm text, so each
  codebook compiles once.

`FMA_F16X2` applies scale and offset with one packed `fma.rn.f16x2` per pair (Triton 3.6 turns
`w * s + b` on fp16 tensors into scalar FMAs). The asm texts are data: tests/kernels/
test_triton_v2.py executes them with a small PTX simulator on random words against the codebook,
because the Triton interpreter cannot run inline asm.
"""

from __future__ import annotations

import numpy as np

E2M1_ASM = """{ .reg .b32 t0, t1, u;
prmt.b32 t0, $4, 0, 0x1404; prmt.b32 t1, $4, 0, 0x3424;
shl.b32 u, t0, 4; shr.b32 $0, u, 3; and.b32 $0, $0, 0x0E000E00; and.b32 u, u, 0x80008000; or.b32 $0, $0, u;
shl.b32 u, t1, 4; shr.b32 $1, u, 3; and.b32 $1, $1, 0x0E000E00; and.b32 u, u, 0x80008000; or.b32 $1, $1, u;
shr.b32 $2, t0, 3; and.b32 $2, $2, 0x0E000E00; and.b32 u, t0, 0x80008000; or.b32 $2, $2, u;
shr.b32 $3, t1, 3; and.b32 $3, $3, 0x0E000E00; and.b32 u, t1, 0x80008000; or.b32 $3, $3, u; }"""

INT_ASM = """{ .reg .b32 t0, t1, k;
mov.b32 k, 0x64006400;
prmt.b32 t0, $4, 0, 0x4140; prmt.b32 t1, $4, 0, 0x4342;
and.b32 $0, t0, 0x000F000F; or.b32 $0, $0, k; sub.f16x2 $0, $0, k;
and.b32 $1, t1, 0x000F000F; or.b32 $1, $1, k; sub.f16x2 $1, $1, k;
shr.b32 t0, t0, 4; and.b32 $2, t0, 0x000F000F; or.b32 $2, $2, k; sub.f16x2 $2, $2, k;
shr.b32 t1, t1, 4; and.b32 $3, t1, 0x000F000F; or.b32 $3, $3, k; sub.f16x2 $3, $3, k; }"""

FMA_F16X2 = "fma.rn.f16x2 $0, $1, $2, $3;"


def _table_half(t: str, out0: str, out1: str) -> str:
    """Values of the 4 codes in the bytes of `t` (each byte 0..15) -> two fp16x2 registers."""
    return f"""shr.b32 sel, {t}, 4; or.b32 sel, sel, {t}; prmt.b32 sel, sel, 0, 0x4420; and.b32 sel, sel, 0x7777;
shr.b32 m, {t}, 3; and.b32 m, m, 0x01010101; mul.lo.u32 m, m, 255;
prmt.b32 a, la0, la1, sel; prmt.b32 b, lb0, lb1, sel; xor.b32 b, b, a; and.b32 b, b, m; xor.b32 lo, a, b;
prmt.b32 a, ha0, ha1, sel; prmt.b32 b, hb0, hb1, sel; xor.b32 b, b, a; and.b32 b, b, m; xor.b32 hi, a, b;
prmt.b32 {out0}, lo, hi, 0x5140; prmt.b32 {out1}, lo, hi, 0x7362;"""


def table_asm(values: tuple[float, ...]) -> str:
    """Decode asm for a 16-entry codebook, its fp16 values written in as byte tables."""
    if len(values) != 16:
        raise ValueError(f"the table decode needs 16 codebook values, got {len(values)}")
    half = np.asarray(values, dtype=np.float16).view(np.uint16).astype(np.uint32)
    lo, hi = half & 0xFF, half >> 8

    def word(b: np.ndarray, first: int) -> str:
        return f"0x{int(b[first] | b[first + 1] << 8 | b[first + 2] << 16 | b[first + 3] << 24):08X}"

    tables = [("la0", lo, 0), ("la1", lo, 4), ("lb0", lo, 8), ("lb1", lo, 12),
              ("ha0", hi, 0), ("ha1", hi, 4), ("hb0", hi, 8), ("hb1", hi, 12)]
    movs = " ".join(f"mov.b32 {name}, {word(b, first)};" for name, b, first in tables)
    return ("{ .reg .b32 t, sel, m, a, b, lo, hi, la0, la1, lb0, lb1, ha0, ha1, hb0, hb1;\n" + movs + "\n"
            "and.b32 t, $4, 0x0F0F0F0F;\n" + _table_half("t", "$0", "$1") + "\n"
            "shr.b32 t, $4, 4; and.b32 t, t, 0x0F0F0F0F;\n" + _table_half("t", "$2", "$3") + " }")


def decode_asm(decode: str, values: tuple[float, ...]) -> str:
    """The asm for a 4-bit layer's decode kind (`RepackedWeights.decode`)."""
    if decode == "e2m1":
        return E2M1_ASM
    if decode == "int":
        return INT_ASM
    return table_asm(values)
