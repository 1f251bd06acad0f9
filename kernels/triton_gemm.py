"""Triton dequant-GEMM for DAQ weights: `y = x @ W_hat^T (+ bias)` straight from packed codes.

Each program decodes a [BLOCK_N, BLOCK_K] tile of W_hat in registers: bit-extract the codes from
the int32 words (a 3-bit code may straddle two words), look them up in the 2**bits codebook
(a generic table from the checkpoint), then `scale * value + offset` per group (the offset is
applied to the weights, not folded into a separate `sum(x) * offset` product: the tile is decoded
once per program either way, and this keeps one code path for partial last groups).

Paths, chosen by M (`daq_linear`):
- M <= 8 (decode): GEMV with split-K; each program reduces a K slice for all rows with
  elementwise products, partial sums go to a [SPLIT_K, M, N] fp32 buffer summed afterwards;
- 8 < M <= 1024: tiled GEMM with `tl.dot` (fp32 accumulate);
- M > 1024: a dequantize kernel writes W_hat once, then cuBLAS (`torch.nn.functional.linear`).

Under `TRITON_INTERPRET=1` (CPU tensors) the dot operands are upcast to fp32, because the
interpreter's bf16 `tl.dot` is wrong; the weight is rounded to the activation dtype first so the
result matches the reference's arithmetic.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

GEMV_MAX_M = 8
GEMM_MAX_M = 1024


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _decode_tile(q_ptr, stride_qn, cb_ptr, s_ptr, b_ptr, stride_sn, offs_n, offs_k, N, K, W,
                 BITS: tl.constexpr, GROUP: tl.constexpr):
    """W_hat[offs_n, offs_k] in fp32 (zeros outside N x K)."""
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    bitpos = offs_k * BITS
    word = bitpos // 32
    shift = (bitpos % 32)[None, :]
    row = q_ptr + offs_n[:, None] * stride_qn
    lo = tl.load(row + word[None, :], mask=mask, other=0).to(tl.uint32, bitcast=True)
    code = lo >> shift.to(tl.uint32)
    if 32 % BITS != 0:  # a code may continue in the next word
        spill = (shift + BITS) > 32
        hi_mask = mask & spill & ((word[None, :] + 1) < W)
        hi = tl.load(row + word[None, :] + 1, mask=hi_mask, other=0).to(tl.uint32, bitcast=True)
        up = tl.where(spill, 32 - shift, 0).to(tl.uint32)
        code = code | tl.where(spill, hi << up, 0)
    code = (code & ((1 << BITS) - 1)).to(tl.int32)
    value = tl.load(cb_ptr + code, mask=mask, other=0.0)
    group = offs_k // GROUP
    s = tl.load(s_ptr + offs_n[:, None] * stride_sn + group[None, :], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs_n[:, None] * stride_sn + group[None, :], mask=mask, other=0.0).to(tl.float32)
    return value * s + b


@triton.jit
def _gemm_kernel(x_ptr, q_ptr, cb_ptr, s_ptr, b_ptr, bias_ptr, y_ptr, M, N, K, W,
                 stride_xm, stride_qn, stride_sn, stride_ym,
                 BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = _decode_tile(q_ptr, stride_qn, cb_ptr, s_ptr, b_ptr, stride_sn, offs_n, offs_k, N, K, W, BITS, GROUP)
        w = w.to(x.dtype)
        if UPCAST:
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)))
        else:
            acc += tl.dot(x, tl.trans(w))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _gemv_kernel(x_ptr, q_ptr, cb_ptr, s_ptr, b_ptr, part_ptr, M, N, K, W,
                 stride_xm, stride_qn, stride_sn, K_PER_SPLIT,
                 BITS: tl.constexpr, GROUP: tl.constexpr, M_ROWS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Partial sums of a K slice for every row m < M: part[split, m, n]."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = split * K_PER_SPLIT
    for m in tl.static_range(M_ROWS):
        if m < M:
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for k0 in range(k_start, k_start + K_PER_SPLIT, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                w = _decode_tile(q_ptr, stride_qn, cb_ptr, s_ptr, b_ptr, stride_sn, offs_n, offs_k, N, K, W, BITS, GROUP)
                x = tl.load(x_ptr + m * stride_xm + offs_k, mask=offs_k < K, other=0.0)
                w = w.to(x.dtype).to(tl.float32)
                acc += tl.sum(w * x.to(tl.float32)[None, :], axis=1)
            tl.store(part_ptr + (split * M + m) * N + offs_n, acc, mask=offs_n < N)


@triton.jit
def _dequant_kernel(q_ptr, cb_ptr, s_ptr, b_ptr, w_ptr, N, K, W, stride_qn, stride_sn, stride_wn,
                    BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    w = _decode_tile(q_ptr, stride_qn, cb_ptr, s_ptr, b_ptr, stride_sn, offs_n, offs_k, N, K, W, BITS, GROUP)
    tl.store(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], w.to(w_ptr.dtype.element_ty),
             mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))


def _new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel must fill (tests poison it to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _contiguous(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.contiguous() for t in tensors]


def dequantize_triton(qweight, scales, offsets, codebook, bits: int, group_size: int, in_features: int,
                      dtype: torch.dtype, block_n: int = 64, block_k: int = 64) -> torch.Tensor:
    """W_hat [N, in_features] in `dtype`."""
    qweight, scales, offsets = _contiguous(qweight, scales, offsets)
    n = qweight.shape[0]
    out = _new_output((n, in_features), dtype, qweight.device)
    grid = (triton.cdiv(n, block_n), triton.cdiv(in_features, block_k))
    _dequant_kernel[grid](qweight, codebook.float().contiguous(), scales, offsets, out, n, in_features,
                          qweight.shape[1], qweight.stride(0), scales.stride(0), out.stride(0),
                          BITS=bits, GROUP=group_size, BLOCK_N=block_n, BLOCK_K=block_k)
    return out


def gemm_triton(x, qweight, scales, offsets, codebook, bits: int, group_size: int, bias=None,
                block_m: int = 16, block_n: int = 32, block_k: int = 32) -> torch.Tensor:
    """Tiled dequant-GEMM, x [M, K] -> [M, N] in x.dtype."""
    x, qweight, scales, offsets = _contiguous(x, qweight, scales, offsets)
    m, k = x.shape
    n = qweight.shape[0]
    y = _new_output((m, n), x.dtype, x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _gemm_kernel[grid](x, qweight, codebook.float().contiguous(), scales, offsets,
                       bias if bias is not None else y, y, m, n, k, qweight.shape[1],
                       x.stride(0), qweight.stride(0), scales.stride(0), y.stride(0),
                       BITS=bits, GROUP=group_size, HAS_BIAS=bias is not None, UPCAST=interpreting(),
                       BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return y


def gemv_triton(x, qweight, scales, offsets, codebook, bits: int, group_size: int, bias=None,
                block_n: int = 64, block_k: int = 64, split_k: int = 4) -> torch.Tensor:
    """Split-K dequant-GEMV for small M (decode): x [M <= 8, K] -> [M, N] in x.dtype."""
    x, qweight, scales, offsets = _contiguous(x, qweight, scales, offsets)
    m, k = x.shape
    if m > GEMV_MAX_M:
        raise ValueError(f"gemv_triton handles M <= {GEMV_MAX_M}, got {m}")
    n = qweight.shape[0]
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    splits = triton.cdiv(k, k_per_split)
    part = _new_output((splits, m, n), torch.float32, x.device)
    grid = (triton.cdiv(n, block_n), splits)
    _gemv_kernel[grid](x, qweight, codebook.float().contiguous(), scales, offsets, part, m, n, k,
                       qweight.shape[1], x.stride(0), qweight.stride(0), scales.stride(0), k_per_split,
                       BITS=bits, GROUP=group_size, M_ROWS=GEMV_MAX_M, BLOCK_N=block_n, BLOCK_K=block_k)
    y = part.sum(dim=0)
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype)


def daq_linear_triton(x, qweight, scales, offsets, codebook, bits: int, group_size: int, bias=None) -> torch.Tensor:
    """M-dependent dispatch over the three paths; x is [..., K]."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    m = x2.shape[0]
    if m <= GEMV_MAX_M:
        y = gemv_triton(x2, qweight, scales, offsets, codebook, bits, group_size, bias)
    elif m <= GEMM_MAX_M:
        y = gemm_triton(x2, qweight, scales, offsets, codebook, bits, group_size, bias)
    else:
        w = dequantize_triton(qweight, scales, offsets, codebook, bits, group_size, x2.shape[1], x.dtype)
        y = torch.nn.functional.linear(x2, w, None if bias is None else bias.to(x.dtype))
    return y.reshape(*lead, y.shape[-1])
