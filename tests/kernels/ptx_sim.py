"""A tiny PTX simulator for the decode asm of kernels/triton_v2_decode.py (numpy, vectorized over words).

Executes exactly the instructions those texts use (mov, prmt in its default mode, shifts, bit
logic, mul.lo, and the packed fp16/bf16 sub and fma, subnormals kept), so the asm is checked bit
for bit on a CPU, where neither a GPU nor the Triton interpreter can run it.
"""

from __future__ import annotations

import re

import numpy as np

U32 = np.uint32


def _prmt(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """prmt.b32 default mode: result byte i = byte sel_i & 7 of the 8-byte pool {b, a}, sign-replicated if sel_i & 8."""
    pool = [(a >> U32(8 * i)) & U32(0xFF) for i in range(4)] + [(b >> U32(8 * i)) & U32(0xFF) for i in range(4)]
    pool = np.stack(pool)  # [8, words]
    out = np.zeros_like(a)
    for i in range(4):
        sel = (c >> U32(4 * i)) & U32(0xF)
        byte = np.take_along_axis(pool, (sel & U32(7)).astype(np.int64)[None], 0)[0]
        byte = np.where(sel & U32(8), np.where(byte & U32(0x80), U32(0xFF), U32(0)), byte)
        out |= byte << U32(8 * i)
    return out


def _halves(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return ((x & U32(0xFFFF)).astype(np.uint16).view(np.float16),
            (x >> U32(16)).astype(np.uint16).view(np.float16))


def _join(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    bits = [v.astype(np.float16).view(np.uint16).astype(U32) for v in (lo, hi)]
    return bits[0] | (bits[1] << U32(16))


def _f16x2(op, *xs: np.ndarray) -> np.ndarray:
    """A packed fp16 op computed in float64 and rounded once (exact products and sums of fp16 fit)."""
    lows, highs = zip(*(_halves(x) for x in xs))
    return _join(op(*(v.astype(np.float64) for v in lows)), op(*(v.astype(np.float64) for v in highs)))


def bf16_to_float(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(U32) << U32(16)).view(np.float32).astype(np.float64)


def float_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round to bf16 bit patterns (nearest even, through float32)."""
    b = x.astype(np.float32).view(U32).astype(np.uint64)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(U32)


def _bf16x2(op, *xs: np.ndarray) -> np.ndarray:
    lo = float_to_bf16(op(*(bf16_to_float(x & U32(0xFFFF)) for x in xs)))
    hi = float_to_bf16(op(*(bf16_to_float(x >> U32(16)) for x in xs)))
    return lo | (hi << U32(16))


_OPS = {
    "mov.b32": lambda a: a,
    "prmt.b32": _prmt,
    "shl.b32": lambda a, b: (a << (b & U32(31))) if int(b.max()) < 32 else U32(0) * a,
    "shr.b32": lambda a, b: a >> b,
    "and.b32": lambda a, b: a & b,
    "or.b32": lambda a, b: a | b,
    "xor.b32": lambda a, b: a ^ b,
    "mul.lo.u32": lambda a, b: (a.astype(np.uint64) * b.astype(np.uint64) & 0xFFFFFFFF).astype(U32),
    "sub.f16x2": lambda a, b: _f16x2(lambda x, y: x - y, a, b),
    "sub.bf16x2": lambda a, b: _bf16x2(lambda x, y: x - y, a, b),
    "fma.rn.f16x2": lambda a, b, c: _f16x2(lambda x, y, z: x * y + z, a, b, c),
    "fma.rn.bf16x2": lambda a, b, c: _bf16x2(lambda x, y, z: x * y + z, a, b, c),
}


def run(asm: str, inputs: list[np.ndarray], n_outputs: int) -> list[np.ndarray]:
    """Run `asm` with $0..$(n_outputs-1) as outputs and the following $ as the uint32 `inputs`."""
    regs: dict[str, np.ndarray] = {f"${n_outputs + i}": x.astype(U32) for i, x in enumerate(inputs)}
    shape = inputs[0].shape
    for stmt in asm.replace("{", ";").replace("}", ";").split(";"):
        stmt = stmt.strip()
        if not stmt or stmt.startswith(".reg"):
            continue
        op, rest = stmt.split(None, 1)
        if op not in _OPS:
            raise NotImplementedError(f"the PTX simulator has no {op!r}")
        dst, *args = [a.strip() for a in rest.split(",")]
        vals = [regs[a] if not re.fullmatch(r"0x[0-9A-Fa-f]+|\d+", a) else np.full(shape, int(a, 0), dtype=U32)
                for a in args]
        regs[dst] = _OPS[op](*vals).astype(U32)
    return [regs[f"${i}"] for i in range(n_outputs)]


def decode_words(asm: str, words: np.ndarray) -> np.ndarray:
    """The decode asm on uint32 words -> fp16 values [words, 8] in stored code order (nibble order)."""
    r0, r1, r2, r3 = run(asm, [words], 4)
    even = np.stack([*_halves(r0), *_halves(r1)], axis=-1)  # codes of the low nibbles of bytes 0..3
    odd = np.stack([*_halves(r2), *_halves(r3)], axis=-1)
    return np.stack([even, odd], axis=-1).reshape(len(words), 8)


def _to_registers(data: np.ndarray, pack: int) -> list[np.ndarray]:
    """Elements [..., L] -> the 32-bit registers of each group of `pack` consecutive elements (along the
    last axis, low element in the low bits), one array [..., L / pack] per register."""
    bits = data.itemsize * 8
    raw = data.view(np.dtype(f"uint{bits}")).astype(np.uint64)
    groups = raw.reshape(*raw.shape[:-1], raw.shape[-1] // pack, pack)
    per_reg = 32 // bits
    regs = []
    for first in range(0, pack, per_reg):
        word = np.zeros(groups.shape[:-1], dtype=np.uint64)
        for i in range(min(per_reg, pack - first)):
            word |= groups[..., first + i] << np.uint64(i * bits)
        regs.append(word.astype(U32))
    return regs


def _from_registers(regs: list[np.ndarray], dtype: np.dtype, pack: int) -> np.ndarray:
    """Inverse of `_to_registers`."""
    bits = dtype.itemsize * 8
    per_reg = 32 // bits
    elems = [((regs[i // per_reg] >> U32((i % per_reg) * bits)) & U32((1 << bits) - 1)) for i in range(pack)]
    out = np.stack(elems, axis=-1).astype(np.dtype(f"uint{bits}"))
    return out.reshape(*out.shape[:-2], -1).view(dtype)


def interpreter_inline_asm(builder, asm, constraints, values, types, is_pure, pack):
    """`InterpreterBuilder.create_inline_asm` running the asm in this simulator: the Triton interpreter
    then executes a kernel's asm path (decode, joins, permutes, packed FMA) on CPU tensors."""
    from triton.runtime.interpreter import TensorHandle, _get_np_dtype

    shape = tuple(types[0].shape)
    inputs = [reg for v in values for reg in _to_registers(np.ascontiguousarray(np.broadcast_to(v.data, shape)), pack)]
    out_dtypes = [np.dtype(_get_np_dtype(t.element_ty)) for t in types]
    counts = [max(1, pack * d.itemsize * 8 // 32) for d in out_dtypes]
    regs = run(asm, inputs, sum(counts))
    results, first = [], 0
    for dtype, count, ty in zip(out_dtypes, counts, types):
        results.append(TensorHandle(_from_registers(regs[first:first + count], dtype, pack), ty.element_ty))
        first += count

    class _Call:
        def get_result(self, i):
            return results[i]

    return _Call()
