"""Triton dequant-GEMM for DAQ weights: `y = x @ W_hat^T (+ bias)` straight from packed codes.

Decoding: each program bit-extracts codes from the int32 words of docs/FORMAT.md (a 3-bit code
may straddle two words) and maps them to values, either through the checkpoint's 2**bits
codebook (a gather from a 16-entry table that stays in L1) or, for `fp4_e2m1`, by placing the
code's sign/exponent/mantissa bits into an fp16 bit pattern (`E2M1`: the pattern is the value
/ 16384, and 16384 is folded into the scale).

Offset folding: the kernels never build `s * c[q] + b` per weight. Within group j,
`sum_k x_k (s_j c_k + b_j) = s_j * (x . c)_j + b_j * (sum_k x_k)_j`, so the inner loop is a plain
product of x with codebook values, and scale and offset are applied once per group and output,
a [M, N] update per group instead of a [N, K] one. Partial last groups are masked like any
other edge.

Paths, chosen per (M bucket, N, K) by measurement on the GPU (`_tuned`; configs shipped per
GPU in `configs/<gpu>.json` are taken first), with fixed defaults under the interpreter and
during CUDA-graph capture:
- `gemv` (M <= 8, decode): CUDA-core products, one x row per program, weights walked in chunks
  of 32 codes (exactly `bits` int32 words, so each code is a constant shift of one word plane),
  optional split-K with atomic adds;
- `gemm`: a tiled `tl.dot` per group (fp32 accumulate), optional split-K for small M;
- `dequant`: write W_hat once, then cuBLAS (`torch.nn.functional.linear`), for large M;
- `mma` and `gemv2` (`triton_v2`): the v2 kernels on the repacked layout made in `prepare()`,
  candidates beside the others until measurements on a GPU show where they win.

Under `TRITON_INTERPRET=1` (CPU tensors) `tl.dot` operands are upcast to fp32, because the
interpreter's bf16 `tl.dot` is wrong.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl

from .triton_v2 import GEMV2_MAX_M, e2m1_pattern, gemv_v2, mma_v2
from .triton_v2_layout import RepackedWeights

GEMV_MAX_M = 8
DEQUANT_MIN_M = 2048  # the untuned default switches to dequantize + cuBLAS from here


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration; `path` names the kernel."""

    path: str  # "gemv" | "gemm" | "dequant" | "mma" | "gemv2"
    block_m: int = 16
    block_n: int = 32
    chunks_per_iter: int = 4  # gemv: chunks of 32 codes per step
    split_k: int = 1  # v2 paths: 0 = sized to the GPU (`triton_v2.waves_split_k`)
    num_warps: int = 4
    num_stages: int = 2

    def describe(self) -> str:
        if self.path == "dequant":
            return "dequant+cuBLAS"
        if self.path == "gemv":
            return (f"gemv BN{self.block_n} C{self.chunks_per_iter} split{self.split_k} "
                    f"w{self.num_warps} s{self.num_stages}")
        split = "auto" if self.split_k == 0 else self.split_k
        if self.path == "gemv2":
            return f"gemv2 BN{self.block_n} split{split} w{self.num_warps} s{self.num_stages}"
        return f"{self.path} BM{self.block_m} BN{self.block_n} split{split} w{self.num_warps} s{self.num_stages}"


@triton.jit
def _codes(q_ptr, stride_qn, offs_n, offs_k, mask, W, BITS: tl.constexpr):
    """Integer codes at broadcastable (offs_n, offs_k)."""
    bitpos = offs_k * BITS
    word = bitpos // 32
    shift = bitpos % 32
    row = q_ptr + offs_n * stride_qn
    code = tl.load(row + word, mask=mask, other=0).to(tl.uint32, bitcast=True) >> shift.to(tl.uint32)
    if 32 % BITS != 0:  # a code may continue in the next word
        spill = (shift + BITS) > 32
        hi = tl.load(row + word + 1, mask=mask & spill & ((word + 1) < W), other=0).to(tl.uint32, bitcast=True)
        code = code | tl.where(spill, hi << tl.where(spill, 32 - shift, 0).to(tl.uint32), 0)
    return (code & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def _group_codes(q_ptr, stride_qn, offs_n, nmask, group0, W, BITS: tl.constexpr, GROUP: tl.constexpr,
                 BLOCK_N: tl.constexpr, GROUPS: tl.constexpr):
    """Codes [BLOCK_N, GROUPS, GROUP] of GROUPS whole groups from group0 on.

    When codes never straddle words (4-bit) each int32 word is loaded once and split in
    registers; otherwise (3-bit) every code gathers its own bits. Codes past K are zero (the
    packer pads with zeros) or masked; callers zero x there.
    """
    if 32 % BITS == 0:
        PER: tl.constexpr = 32 // BITS
        NW: tl.constexpr = GROUPS * GROUP // PER
        word = group0 * (GROUP // PER) + tl.arange(0, NW)
        words = tl.load(q_ptr + offs_n[:, None] * stride_qn + word[None, :],
                        mask=nmask[:, None] & (word[None, :] < W), other=0)
        shifts = tl.arange(0, PER) * BITS
        code = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
        code = tl.reshape(code, (BLOCK_N, GROUPS, GROUP))
    else:
        offs_k = (group0 + tl.arange(0, GROUPS))[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        code = _codes(q_ptr, stride_qn, offs_n[:, None, None], offs_k[None, :, :],
                      nmask[:, None, None] & (offs_k[None, :, :] < W * 32 // BITS), W, BITS)
    return code


@triton.jit
def _chunk_code(p0, p1, p2, p3, J: tl.constexpr, BITS: tl.constexpr):
    """Code J (0..31) of each 32-code chunk, from the chunk's word planes p0..p3 (BITS words).

    A chunk of 32 codes fills exactly BITS words, so the word and shift of code J are
    compile-time constants: no gathers and no layout changes, whatever BITS is.
    """
    if (J * BITS) // 32 == 0:
        w = p0
    elif (J * BITS) // 32 == 1:
        w = p1
    elif (J * BITS) // 32 == 2:
        w = p2
    else:
        w = p3
    code = w.to(tl.uint32, bitcast=True) >> ((J * BITS) % 32)
    if (J * BITS) % 32 + BITS > 32:  # continues in the next word
        if (J * BITS) // 32 == 0:
            nxt = p1
        elif (J * BITS) // 32 == 1:
            nxt = p2
        else:
            nxt = p3
        code = code | (nxt.to(tl.uint32, bitcast=True) << (32 - (J * BITS) % 32))
    return (code & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def _chunk_planes(q_ptr, stride_qn, offs_n, nmask, chunk, cmask, W, BITS: tl.constexpr):
    """Word planes [len(offs_n), len(chunk)]: plane p holds word p of each chunk (p3 unused at 3 bits)."""
    base = q_ptr + offs_n[:, None] * stride_qn + (chunk * BITS)[None, :]
    word0 = (chunk * BITS)[None, :]
    mask = nmask[:, None] & cmask[None, :]
    p0 = tl.load(base, mask=mask & (word0 < W), other=0)
    p1 = tl.load(base + 1, mask=mask & (word0 + 1 < W), other=0)
    p2 = tl.load(base + 2, mask=mask & (word0 + 2 < W), other=0)
    if BITS == 4:
        p3 = tl.load(base + 3, mask=mask & (word0 + 3 < W), other=0)
    else:
        p3 = p2
    return p0, p1, p2, p3


@triton.jit
def _values(code, cb_ptr, mask, E2M1: tl.constexpr):
    """Code values: fp16 bit patterns (value / 16384) for E2M1, else fp32 codebook entries."""
    if E2M1:
        v = e2m1_pattern(code)
    else:
        v = tl.load(cb_ptr + code, mask=mask, other=0.0)
    return v


@triton.jit
def _group_params(s_ptr, b_ptr, offs_n, group, mask, stride_sn, E2M1: tl.constexpr):
    s = tl.load(s_ptr + offs_n * stride_sn + group, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs_n * stride_sn + group, mask=mask, other=0.0).to(tl.float32)
    if E2M1:  # the fp16 pattern (code & 7) << 9 is the E2M1 magnitude / 2**14
        s = s * 16384.0
    return s, b


@triton.jit
def _store(y_ptr, bias_ptr, acc, offs_m, offs_n, M, N, stride_ym, split,
           HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """Write (or, split-K, atomically add) an fp32 [rows, cols] tile; the first split adds the bias."""
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        acc += tl.where(split == 0, bias, 0.0)[None, :]
    ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K == 1:
        tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemv_kernel(x_ptr, q_ptr, cb_ptr, s_ptr, b_ptr, bias_ptr, y_ptr, M, N, K, W, CHUNKS, CHUNKS_PER_SPLIT,
                 stride_xm, stride_qn, stride_sn, stride_ym,
                 BITS: tl.constexpr, GROUP: tl.constexpr, E2M1: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, SPLIT_K: tl.constexpr):
    """One x row (program axis 1) against [BLOCK_N, BLOCK_C chunks of 32 codes] per step.

    Everything stays in the layout of the word loads: code J of every chunk is one shift of a
    word plane, multiplied by x[chunk * 32 + J]; per-chunk sums get the chunk's group scale and
    offset; one reduction over chunks at the end.
    """
    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    split = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    c_start = split * CHUNKS_PER_SPLIT
    c_end = tl.minimum(c_start + CHUNKS_PER_SPLIT, CHUNKS)
    x_row = x_ptr + row * stride_xm
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for c0 in range(c_start, c_end, BLOCK_C):
        chunk = c0 + tl.arange(0, BLOCK_C)
        cmask = chunk < c_end
        p0, p1, p2, p3 = _chunk_planes(q_ptr, stride_qn, offs_n, nmask, chunk, cmask, W, BITS)
        part = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        xsum = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for j in tl.static_range(32):
            k = chunk * 32 + j
            xj = tl.load(x_row + k, mask=cmask & (k < K), other=0.0).to(tl.float32)
            v = _values(_chunk_code(p0, p1, p2, p3, j, BITS), cb_ptr, p0 == p0, E2M1).to(tl.float32)
            part += v * xj[None, :]
            xsum += xj
        group = (chunk * 32) // GROUP
        s, b = _group_params(s_ptr, b_ptr, offs_n[:, None], group[None, :], nmask[:, None] & cmask[None, :],
                             stride_sn, E2M1)
        acc += part * s + b * xsum[None, :]
    y = tl.sum(acc, axis=1)
    _store(y_ptr, bias_ptr, y[None, :], row + tl.arange(0, 1), offs_n, M, N, stride_ym, split, HAS_BIAS, SPLIT_K)


@triton.jit
def _gemm_kernel(x_ptr, q_ptr, cb_ptr, s_ptr, b_ptr, bias_ptr, y_ptr, M, N, K, W, GROUPS, GROUPS_PER_SPLIT,
                 stride_xm, stride_qn, stride_sn, stride_ym,
                 BITS: tl.constexpr, GROUP: tl.constexpr, E2M1: tl.constexpr, HAS_BIAS: tl.constexpr,
                 UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr):
    """One `tl.dot` per group of codebook values; scale and offset applied to its fp32 result."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, GROUP)
    g_start = split * GROUPS_PER_SPLIT
    g_end = tl.minimum(g_start + GROUPS_PER_SPLIT, GROUPS)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(g_start, g_end):
        offs_k = g * GROUP + kk
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        code = tl.reshape(_group_codes(q_ptr, stride_qn, offs_n, offs_n < N, g, W, BITS, GROUP, BLOCK_N, 1),
                          (BLOCK_N, GROUP))
        v = _values(code, cb_ptr, code >= 0, E2M1)
        if UPCAST:
            d = tl.dot(x.to(tl.float32), tl.trans(v.to(x.dtype).to(tl.float32)))
        else:
            d = tl.dot(x, tl.trans(v.to(x.dtype)))
        s, b = _group_params(s_ptr, b_ptr, offs_n, g, offs_n < N, stride_sn, E2M1)
        xsum = tl.sum(x.to(tl.float32), axis=1)
        acc += d * s[None, :] + xsum[:, None] * b[None, :]
    _store(y_ptr, bias_ptr, acc, offs_m, offs_n, M, N, stride_ym, split, HAS_BIAS, SPLIT_K)


@triton.jit
def _dequant_kernel(q_ptr, cb_ptr, s_ptr, b_ptr, w_ptr, N, K, W, GROUPS, stride_qn, stride_sn, stride_wn,
                    BITS: tl.constexpr, GROUP: tl.constexpr, E2M1: tl.constexpr,
                    BLOCK_N: tl.constexpr, GPI: tl.constexpr):
    """W_hat for [BLOCK_N rows, GPI groups]: codes read as whole words, stores contiguous along K."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    g0 = tl.program_id(1) * GPI
    nmask = offs_n < N
    group = g0 + tl.arange(0, GPI)
    offs_k = group[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # [GPI, GROUP]
    code = _group_codes(q_ptr, stride_qn, offs_n, nmask, g0, W, BITS, GROUP, BLOCK_N, GPI)
    v = _values(code, cb_ptr, code >= 0, E2M1).to(tl.float32)
    s, b = _group_params(s_ptr, b_ptr, offs_n[:, None], group[None, :], nmask[:, None] & (group < GROUPS)[None, :],
                         stride_sn, E2M1)
    w = v * s[:, :, None] + b[:, :, None]
    tl.store(w_ptr + offs_n[:, None, None] * stride_wn + offs_k[None, :, :], w.to(w_ptr.dtype.element_ty),
             mask=nmask[:, None, None] & (offs_k < K)[None, :, :])


def _new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel must fill (tests poison it to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _prepare(qweight, scales, offsets, codebook):
    return qweight.contiguous(), scales.contiguous(), offsets.contiguous(), codebook.float().contiguous()


def _split_k(units: int, split_k: int, per_iter: int, dtype: torch.dtype) -> tuple[int, int]:
    """K units (groups or chunks) per split, a multiple of `per_iter`, and the splits launched.

    Split-K adds partial sums atomically in the output dtype; bf16 atomics are not portable
    (the interpreter lacks them), so bf16 outputs run unsplit.
    """
    if dtype == torch.bfloat16:
        split_k = 1
    per_split = triton.cdiv(triton.cdiv(units, split_k), per_iter) * per_iter
    return per_split, triton.cdiv(units, per_split)


def gemv_triton(x, qweight, scales, offsets, codebook, bits: int, group_size: int, e2m1: bool, bias=None,
                config: KernelConfig | None = None) -> torch.Tensor:
    """CUDA-core dequant-GEMV for small M (decode): x [M <= 8, K] -> [M, N] in x.dtype."""
    cfg = config or default_config(x.shape[0], qweight.shape[0], x.shape[1], x.is_cuda)
    x = x.contiguous()
    qweight, scales, offsets, cb = _prepare(qweight, scales, offsets, codebook)
    m, k = x.shape
    if m > GEMV_MAX_M:
        raise ValueError(f"gemv_triton handles M <= {GEMV_MAX_M}, got {m}")
    n = qweight.shape[0]
    chunks = triton.cdiv(k, 32)
    per_split, splits = _split_k(chunks, cfg.split_k, cfg.chunks_per_iter, x.dtype)
    y = torch.zeros((m, n), dtype=x.dtype, device=x.device) if splits > 1 else _new_output((m, n), x.dtype, x.device)
    _gemv_kernel[(triton.cdiv(n, cfg.block_n), m, splits)](
        x, qweight, cb, scales, offsets, bias if bias is not None else y, y, m, n, k, qweight.shape[1], chunks,
        per_split, x.stride(0), qweight.stride(0), scales.stride(0), y.stride(0),
        BITS=bits, GROUP=group_size, E2M1=e2m1, HAS_BIAS=bias is not None,
        BLOCK_N=cfg.block_n, BLOCK_C=cfg.chunks_per_iter, SPLIT_K=splits,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y


def gemm_triton(x, qweight, scales, offsets, codebook, bits: int, group_size: int, e2m1: bool, bias=None,
                config: KernelConfig | None = None) -> torch.Tensor:
    """Tensor-core dequant-GEMM, x [M, K] -> [M, N] in x.dtype."""
    cfg = config or default_config(max(x.shape[0], GEMV_MAX_M + 1), qweight.shape[0], x.shape[1], x.is_cuda)
    x = x.contiguous()
    qweight, scales, offsets, cb = _prepare(qweight, scales, offsets, codebook)
    m, k = x.shape
    n = qweight.shape[0]
    groups = triton.cdiv(k, group_size)
    per_split, splits = _split_k(groups, cfg.split_k, 1, x.dtype)
    y = torch.zeros((m, n), dtype=x.dtype, device=x.device) if splits > 1 else _new_output((m, n), x.dtype, x.device)
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), splits)
    _gemm_kernel[grid](
        x, qweight, cb, scales, offsets, bias if bias is not None else y, y, m, n, k, qweight.shape[1], groups,
        per_split, x.stride(0), qweight.stride(0), scales.stride(0), y.stride(0),
        BITS=bits, GROUP=group_size, E2M1=e2m1, HAS_BIAS=bias is not None, UPCAST=interpreting(),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SPLIT_K=splits, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y


def dequantize_triton(qweight, scales, offsets, codebook, bits: int, group_size: int, e2m1: bool, in_features: int,
                      dtype: torch.dtype, block_n: int = 32, groups_per_program: int = 1) -> torch.Tensor:
    """W_hat [N, in_features] in `dtype`."""
    qweight, scales, offsets, cb = _prepare(qweight, scales, offsets, codebook)
    n = qweight.shape[0]
    groups = triton.cdiv(in_features, group_size)
    out = _new_output((n, in_features), dtype, qweight.device)
    grid = (triton.cdiv(n, block_n), triton.cdiv(groups, groups_per_program))
    _dequant_kernel[grid](qweight, cb, scales, offsets, out, n, in_features, qweight.shape[1], groups,
                          qweight.stride(0), scales.stride(0), out.stride(0),
                          BITS=bits, GROUP=group_size, E2M1=e2m1, BLOCK_N=block_n, GPI=groups_per_program)
    return out


def dequant_matmul(x, qweight, scales, offsets, codebook, bits: int, group_size: int, e2m1: bool, bias=None,
                   config: KernelConfig | None = None) -> torch.Tensor:
    """Large M: W_hat once in x.dtype, then cuBLAS (`config` is unused: the same signature as the other paths)."""
    w = dequantize_triton(qweight, scales, offsets, codebook, bits, group_size, e2m1, x.shape[1], x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


_PATHS = {"gemv": gemv_triton, "gemm": gemm_triton, "dequant": dequant_matmul}
V2_PATHS = ("mma", "gemv2")


def run_path(cfg: KernelConfig, x, qweight, scales, offsets, codebook, bits: int, group_size: int, e2m1: bool,
             bias=None, repacked: RepackedWeights | None = None) -> torch.Tensor:
    """One call of the path `cfg` names; the v2 paths read `repacked` (the layout `prepare()` made)."""
    if cfg.path not in V2_PATHS:
        return _PATHS[cfg.path](x, qweight, scales, offsets, codebook, bits, group_size, e2m1, bias, cfg)
    if repacked is None:
        raise ValueError(f"the {cfg.path} path needs the v2 layout (triton_v2_layout.repack)")
    if cfg.path == "gemv2":
        return gemv_v2(x, repacked, codebook, bits, group_size, bias, cfg.block_n, cfg.split_k, cfg.num_warps,
                       cfg.num_stages, _new_output)
    return mma_v2(x, repacked, codebook, bits, group_size, bias, cfg.block_m, cfg.block_n, cfg.split_k,
                  cfg.num_warps, cfg.num_stages, _new_output, interpreting())


def m_bucket(m: int) -> int:
    """Tuning key for M: the next power of two (decode batches and prefill chunks share configs)."""
    return triton.next_power_of_2(max(m, 1))


def default_config(m: int, n: int, k: int, cuda: bool) -> KernelConfig:
    """Untuned choice: used under the interpreter, during CUDA-graph capture and before tuning.

    Under the interpreter (`cuda` False) small M takes a `tl.dot` tile too: gemv's unrolled 32-code
    steps cost seconds per call there, a 16 x 64 tile a tenth of a second.
    """
    if not cuda:
        return KernelConfig("dequant") if m >= DEQUANT_MIN_M else KernelConfig("gemm", block_m=16, block_n=64)
    if m <= GEMV_MAX_M:
        return KernelConfig("gemv", block_n=32, chunks_per_iter=4, split_k=2)
    if m >= DEQUANT_MIN_M:
        return KernelConfig("dequant")
    if m <= 64:
        return KernelConfig("gemm", block_m=max(16, m_bucket(m)), block_n=64, split_k=2 if m <= 16 else 1)
    return KernelConfig("gemm", block_m=128 if m >= 256 else 64, block_n=128, num_warps=8, num_stages=3)


def candidate_configs(m: int) -> list[KernelConfig]:
    """What the tuner measures for an M bucket among the v1 paths (kept short: each one is a compile)."""
    if m <= GEMV_MAX_M:
        gemv = [KernelConfig("gemv", block_n=bn, chunks_per_iter=c, split_k=sk)
                for bn in (16, 32, 64) for c in (4, 8, 16) for sk in (1, 4)]
        return gemv + [KernelConfig("gemm", block_m=16, block_n=bn, split_k=4) for bn in (64, 128)]
    if m <= 64:
        return [KernelConfig("gemm", block_m=max(16, m_bucket(m)), block_n=bn, split_k=sk, num_warps=4, num_stages=st)
                for bn in (32, 64, 128) for sk in (1, 4) for st in (2, 4)]
    return [KernelConfig("gemm", block_m=bm, block_n=bn, num_warps=w, num_stages=st)
            for bm in (64, 128) for bn in (64, 128, 256) for w, st in ((4, 3), (8, 3), (8, 4))
            if bm * bn <= 128 * 128 or w == 8] + [KernelConfig("dequant")]


def v2_candidate_configs(m: int) -> list[KernelConfig]:
    """The v2 configs the tuner measures for an M bucket (each compiles to register-A wgmma without
    spills for sm_90a: tests/kernels/test_triton_v2_compile.py). Split-K fills the SMs at small M:
    fixed factors, and 0 (about two waves of the GPU's SMs)."""
    if m <= GEMV2_MAX_M:
        return ([KernelConfig("gemv2", block_n=bn, split_k=sk, num_warps=w, num_stages=2)
                 for bn, w in ((32, 4), (64, 4), (128, 8)) for sk in (0, 4, 8)]
                + [KernelConfig("mma", block_m=16, block_n=bn, split_k=sk, num_warps=4, num_stages=3)
                   for bn in (64, 128) for sk in (0, 8)])
    if m <= 16:
        return [KernelConfig("mma", block_m=16, block_n=bn, split_k=sk, num_warps=4, num_stages=st)
                for bn in (64, 128) for sk in (0, 4, 8) for st in (3, 4)]
    if m <= 64:
        return [KernelConfig("mma", block_m=m_bucket(m), block_n=bn, split_k=sk, num_warps=4, num_stages=3)
                for bn in (64, 128) for sk in (0, 1, 4)]
    return [KernelConfig("mma", block_m=bm, block_n=128, num_warps=w, num_stages=st)
            for bm, w in ((64, 4), (128, 8)) for st in (2, 3)]


_TUNED: dict[tuple, tuple[KernelConfig, float]] = {}
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
_KEY_FIELDS = ("m_bucket", "n", "k", "bits", "group_size", "dtype", "decode", "bias")


def gpu_slug(name: str) -> str:
    """File name of a GPU's shipped configs: `torch.cuda.get_device_name()` in lower case, dashed."""
    return "-".join(name.lower().replace("_", " ").split())


def _key_text(key: tuple) -> str:
    return ",".join(str(v) for v in key)


def load_configs(path: Path) -> dict[str, KernelConfig]:
    """Shipped configs of one GPU: {tuning key text: config}, as `save_configs` writes them."""
    data = json.loads(path.read_text())
    return {row["key"]: KernelConfig(**row["config"]) for row in data["configs"]}


def save_configs(path: Path, device: str) -> None:
    """Add every configuration tuned so far (with its time) to the shipped configs of `device`
    (keys tuned in this process replace the file's)."""
    old = json.loads(path.read_text())["configs"] if path.exists() else []
    new = {_key_text(key): {"key": _key_text(key), "config": asdict(cfg), "ms": ms} for key, (cfg, ms) in _TUNED.items()
           if ms == ms}  # NaN: taken from a shipped file, not measured here
    rows = [r for r in old if r["key"] not in new] + sorted(new.values(), key=lambda r: r["key"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"device": device, "triton": triton.__version__, "configs": rows}, indent=1) + "\n")
    tmp.replace(path)


_SHIPPED: dict[str, dict[str, KernelConfig]] = {}


def shipped_config(key: tuple, device_name: str) -> KernelConfig | None:
    """The config shipped for this key on this GPU (configs/<gpu>.json, read once), if any."""
    if device_name not in _SHIPPED:
        path = CONFIGS_DIR / f"{gpu_slug(device_name)}.json"
        _SHIPPED[device_name] = load_configs(path) if path.exists() else {}
    return _SHIPPED[device_name].get(_key_text(key))


def nearest_shipped_config(key: tuple, device_name: str) -> KernelConfig | None:
    """For a key this GPU's file lacks: the config shipped for the nearest M bucket, then the nearest
    shape (in log N + log K), with the same format, dtype, decode and bias. What a CUDA-graph
    capture, which cannot tune, runs for shapes or batch sizes the GPU run did not measure (rather
    than the untuned default)."""
    shipped_config(key, device_name)  # reads the file once
    m_bucket, n, k, *rest = key
    best = None
    for text, cfg in _SHIPPED[device_name].items():
        fields = text.split(",")
        if fields[3:] != [str(v) for v in rest]:
            continue
        m, n2, k2 = (int(v) for v in fields[:3])
        distance = (abs(math.log(m / m_bucket)), abs(math.log(n2 / n)) + abs(math.log(k2 / k)))
        if best is None or distance < best[0]:
            best = (distance, cfg)
    return best[1] if best else None


def tuned_configs() -> list[dict]:
    """Every configuration the tuner chose so far, with its measured time (for benchmark records)."""
    return [{**dict(zip(_KEY_FIELDS, key)), **asdict(cfg), "ms": ms} for key, (cfg, ms) in _TUNED.items()]


def tuning_key(x, qweight, bits: int, group_size: int, e2m1: bool, bias, repacked) -> tuple:
    """(M bucket, N, K, bits, g, dtype, decode, bias): what a config is tuned for. The decode names
    the v2 layout's when there is one (its candidates then run too)."""
    m, k = x.shape
    decode = repacked.decode + "+v2" if repacked is not None else ("e2m1" if e2m1 else "table")
    return (m_bucket(m), qweight.shape[0], k, bits, group_size, str(x.dtype).removeprefix("torch."), decode,
            bias is not None)


def _tuned(x, qweight, scales, offsets, codebook, bits, group_size, e2m1, bias, repacked=None) -> KernelConfig:
    """The measured-best config for this (M bucket, N, K, format): shipped for this GPU, or tuned on
    first use.

    No tuning on CPU (interpreter) or during CUDA-graph capture, where a key not yet tuned gets the
    config shipped for the nearest M bucket and shape (`nearest_shipped_config`), else the default.
    vLLM's profiling run tunes only its own M bucket, so its decode graphs run shipped configs.
    """
    m, k = x.shape
    n = qweight.shape[0]
    if not x.is_cuda:
        return default_config(m, n, k, False)
    key = tuning_key(x, qweight, bits, group_size, e2m1, bias, repacked)
    if key in _TUNED:
        return _TUNED[key][0]
    device_name = torch.cuda.get_device_name(x.device)
    shipped = shipped_config(key, device_name)
    if shipped is not None:
        _TUNED[key] = (shipped, float("nan"))
        return shipped
    if torch.cuda.is_current_stream_capturing():  # not kept: an eager call may still tune this key
        return nearest_shipped_config(key, device_name) or default_config(m, n, k, True)
    from triton.testing import do_bench

    candidates = candidate_configs(m) + (v2_candidate_configs(m) if repacked is not None else [])
    best = None
    for cfg in candidates:
        try:
            ms = do_bench(lambda: run_path(cfg, x, qweight, scales, offsets, codebook, bits, group_size, e2m1, bias,
                                           repacked), warmup=5, rep=20, return_mode="median")
        except Exception:  # noqa: BLE001 - a candidate that does not compile or launch here is skipped
            continue
        if best is None or ms < best[1]:
            best = (cfg, ms)
    _TUNED[key] = best or (default_config(m, n, k, True), float("nan"))
    return _TUNED[key][0]


def daq_linear_triton(x, qweight, scales, offsets, codebook, bits: int, group_size: int, e2m1: bool,
                      bias=None, repacked: RepackedWeights | None = None) -> torch.Tensor:
    """`x @ W_hat^T (+ bias)` for x [..., K]: the tuned path for this (M bucket, N, K) on CUDA.

    `e2m1`: the codebook is fp4_e2m1 in code order (decided once per layer by the kernel layer,
    `LinearSpec.decode`), so codes are decoded from their bits instead of the table. `repacked`:
    the layer's v2 layout, when its kernel made one; the v2 paths are then candidates too.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    cfg = _tuned(x2, qweight, scales, offsets, codebook, bits, group_size, e2m1, bias, repacked)
    y = run_path(cfg, x2, qweight, scales, offsets, codebook, bits, group_size, e2m1, bias, repacked)
    return y.reshape(*lead, y.shape[-1])
