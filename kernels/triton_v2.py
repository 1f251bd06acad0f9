"""v2 Triton kernels: the weights as the left `tl.dot` operand (`mma`) and a decode-once GEMV (`gemv2`).

Both read the layout of `triton_v2_layout` (made once in `prepare()`) and compute
`y = x @ W_hat^T (+ bias)`. Per K step of 128 codes a program decodes a [BN, 128] weight tile
(stored order), undoes the K permutation with a reshape/permute (register renaming when
compiled), applies scale and offset per group, and then:

- `mma`: `acc[BN, BM] = tl.dot(w, x^T, acc)`, stored transposed. With W on the left, Hopper's
  wgmma reads the decoded tile from registers; on the right (the v1 `gemm`) it is written to
  shared memory first. Split-K programs add fp32 partial sums into a zeroed fp32 workspace,
  whatever the activation dtype, then one cast.
- `gemv2` (M <= 4): CUDA-core products of the decoded tile with every row of x, so all rows share
  one decode (the v1 `gemv` decodes once per row).

The decode is PTX on whole 32-bit words (`triton_v2_decode`; `ASM` constexpr, fp16 and bf16
activations on CUDA) followed by one packed FMA per pair in the activation dtype (for bf16 the
fp16 scales and offsets are rounded to bf16 first; an e2m1 layer's scale also takes the bf16
decode's 2**112), or plain `tl` in fp32 (fp32 activations, and
the Triton interpreter, which cannot run inline asm; the tests run the asm paths there through a
PTX simulator). The tuner in `triton_gemm` measures these paths beside the v1 ones and keeps
whichever is faster per shape. Research notes: `shared/research/kernels-v2.md` sections 3.2-3.4.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .triton_v2_decode import E2M1_BF16_REFOLD, FMA_BF16X2, FMA_F16X2
from .triton_v2_layout import SHUFFLE, RepackedWeights

GEMV2_MAX_M = 4
_FMA_F16X2 = tl.constexpr(FMA_F16X2)  # globals a jit function may read
_FMA_BF16X2 = tl.constexpr(FMA_BF16X2)
_E2M1_BF16_REFOLD = tl.constexpr(E2M1_BF16_REFOLD)


@triton.jit
def e2m1_pattern(code):
    """fp16 values of E2M1 codes from their bits (sign to bit 15, exponent and mantissa to bits 9-11):
    exactly the E2M1 value / 2**14, which the kernels fold into the scale."""
    return (((code & 7) << 9) | ((code & 8) << 12)).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _plain_codes(q_ptr, stride_qn, offs_n, nmask, k0, BITS: tl.constexpr):
    """Stored-order codes [BLOCK_N, 128] of the step at k0, gathered byte by byte (any bit width)."""
    p = tl.arange(0, 128)
    row = q_ptr + offs_n[:, None] * stride_qn
    if BITS == 4:
        byte = tl.load(row + (k0 // 2 + p // 2)[None, :], mask=nmask[:, None], other=0).to(tl.int32)
        code = (byte >> ((p % 2) * 4)[None, :]) & 15
    else:  # the A/B/C words of `triton_v2_layout.three_bit_slots`, bit by bit
        chunk = p // 32
        j = (p % 32) // 8
        m = p % 8
        g = ((m & 1) << 2) | (m & 2) | (m >> 2)  # chunk_group
        low_bit = 2 * (g % 2) + 16 * ((g // 2) % 2) + 4 * j
        high_bit = 16 * (g // 4) + 4 * j + g % 4
        block = row + (k0 // 128) * 48 + 4 * chunk
        low = tl.load(block + ((g // 4) * 16 + low_bit // 8)[None, :], mask=nmask[:, None], other=0).to(tl.int32)
        high = tl.load(block + (32 + high_bit // 8)[None, :], mask=nmask[:, None], other=0).to(tl.int32)
        code = ((low >> (low_bit % 8)[None, :]) & 3) | (((high >> (high_bit % 8)[None, :]) & 1) << 2)
    return code


@triton.jit
def _unpermute(w, BLOCK_N: tl.constexpr):
    """Stored order p = 32t + 4j + 2h + e -> logical k = 16j + 8h + 2t + e, per row of a [BLOCK_N, 128] tile."""
    return tl.reshape(tl.permute(tl.reshape(w, (BLOCK_N, 4, 8, 2, 2)), (0, 2, 3, 1, 4)), (BLOCK_N, 128))


@triton.jit
def _group_params(s_ptr, b_ptr, offs_n, nmask, k0, N, GROUP: tl.constexpr):
    """Scale and offset [BLOCK_N, NG] of the NG groups in the step at k0 (layout [groups, N])."""
    NG: tl.constexpr = 128 // GROUP if GROUP < 128 else 1
    gi = (k0 + tl.arange(0, NG) * (128 // NG)) // GROUP
    ptr = gi[None, :] * N + offs_n[:, None]
    s = tl.load(s_ptr + ptr, mask=nmask[:, None], other=0.0)
    b = tl.load(b_ptr + ptr, mask=nmask[:, None], other=0.0)
    return s, b


@triton.jit
def _weights(q_ptr, s_ptr, b_ptr, cb_ptr, x_ptr, offs_n, nmask, k0, N, KP, stride_qn,
             BITS: tl.constexpr, GROUP: tl.constexpr, DECODE: tl.constexpr, ASM: tl.constexpr,
             BLOCK_N: tl.constexpr):
    """The decoded weight tile W_hat[offs_n, k0:k0+128] in logical order, in the activations' dtype."""
    OUT = x_ptr.dtype.element_ty
    NG: tl.constexpr = 128 // GROUP if GROUP < 128 else 1
    s, b = _group_params(s_ptr, b_ptr, offs_n, nmask, k0, N, GROUP)
    if ASM != "":  # whole words through PTX, then one packed FMA per pair
        row = q_ptr + offs_n[:, None] * stride_qn
        if BITS == 4:
            qb = tl.load(row + (k0 // 2 + tl.arange(0, 64))[None, :], mask=nmask[:, None], other=0,
                         eviction_policy="evict_first")
            even, odd = tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r", [qb], dtype=(OUT, OUT), is_pure=True, pack=4)
            w = tl.reshape(tl.join(even, odd), (BLOCK_N, 128))
        else:
            block = row + (k0 // 128) * 48 + tl.arange(0, 16)[None, :]
            a = tl.load(block, mask=nmask[:, None], other=0, eviction_policy="evict_first")
            b_ = tl.load(block + 16, mask=nmask[:, None], other=0, eviction_policy="evict_first")
            c = tl.load(block + 32, mask=nmask[:, None], other=0, eviction_policy="evict_first")
            o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
                ASM, "=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,r,r,r", [a, b_, c],
                dtype=(OUT, OUT, OUT, OUT, OUT, OUT, OUT, OUT), is_pure=True, pack=4)
            w = tl.join(tl.join(tl.join(o0, o1), tl.join(o2, o3)), tl.join(tl.join(o4, o5), tl.join(o6, o7)))
            w = tl.reshape(w, (BLOCK_N, 128))
        w = _unpermute(w, BLOCK_N)
        if OUT == tl.bfloat16 and DECODE == "e2m1":  # the bf16 bit decode is the value * 2**-126
            s = s.to(tl.float32) * _E2M1_BF16_REFOLD
        s16 = tl.reshape(tl.broadcast_to(s.to(OUT)[:, :, None], (BLOCK_N, NG, 128 // NG)), (BLOCK_N, 128))
        b16 = tl.reshape(tl.broadcast_to(b.to(OUT)[:, :, None], (BLOCK_N, NG, 128 // NG)), (BLOCK_N, 128))
        if OUT == tl.float16:
            w = tl.inline_asm_elementwise(_FMA_F16X2, "=r,r,r,r", [w, s16, b16], dtype=OUT, is_pure=True, pack=2)
        else:
            w = tl.inline_asm_elementwise(_FMA_BF16X2, "=r,r,r,r", [w, s16, b16], dtype=OUT, is_pure=True, pack=2)
    else:
        code = _plain_codes(q_ptr, stride_qn, offs_n, nmask, k0, BITS)
        if DECODE == "e2m1":  # the fp16 pattern of (code & 7) is the value / 2**14 (folded into s)
            v = e2m1_pattern(code).to(tl.float32)
        elif DECODE == "int":
            v = code.to(tl.float32)
        else:
            v = tl.load(cb_ptr + code)
        v = tl.reshape(_unpermute(v, BLOCK_N), (BLOCK_N, NG, 128 // NG))
        w = v * s.to(tl.float32)[:, :, None] + b.to(tl.float32)[:, :, None]
        w = tl.reshape(w, (BLOCK_N, 128)).to(OUT)
    return w


@triton.jit
def _x_tile(x_ptr, offs_m, k0, M, K, stride_xm):
    """Activations [rows, 128] of the step at k0, zero past M and K (kept in L2: every N tile reads them)."""
    offs_k = k0 + tl.arange(0, 128)
    return tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                   mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0, eviction_policy="evict_last")


@triton.jit
def _store_t(y_ptr, bias_ptr, acc, offs_n, offs_m, M, N, stride_ym, split, HAS_BIAS: tl.constexpr,
             SPLIT_K: tl.constexpr):
    """acc [BN, BM] -> y[offs_m, offs_n] (transposed); split-K adds into an fp32 workspace."""
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        acc += tl.where(split == 0, bias, 0.0)[:, None]
    ptrs = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None]
    mask = (offs_m[None, :] < M) & (offs_n[:, None] < N)
    if SPLIT_K == 1:
        tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(ptrs, acc, mask=mask, sem="relaxed")


@triton.jit
def _mma_kernel(x_ptr, q_ptr, s_ptr, b_ptr, cb_ptr, bias_ptr, y_ptr, M, N, K, KP, STEPS_PER_SPLIT,
                stride_xm, stride_qn, stride_ym,
                BITS: tl.constexpr, GROUP: tl.constexpr, DECODE: tl.constexpr, ASM: tl.constexpr,
                UPCAST: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                SPLIT_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    nmask = offs_n < N
    k_start = split * STEPS_PER_SPLIT * 128
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_start, tl.minimum(k_start + STEPS_PER_SPLIT * 128, KP), 128):
        w = _weights(q_ptr, s_ptr, b_ptr, cb_ptr, x_ptr, offs_n, nmask, k0, N, KP, stride_qn, BITS, GROUP, DECODE,
                     ASM, BLOCK_N)
        x = _x_tile(x_ptr, offs_m, k0, M, K, stride_xm)
        if UPCAST:  # the interpreter's half-precision tl.dot is wrong
            acc = tl.dot(w.to(tl.float32), tl.trans(x.to(tl.float32)), acc)
        else:
            acc = tl.dot(w, tl.trans(x), acc)
    _store_t(y_ptr, bias_ptr, acc, offs_n, offs_m, M, N, stride_ym, split, HAS_BIAS, SPLIT_K)


@triton.jit
def _gemv2_kernel(x_ptr, q_ptr, s_ptr, b_ptr, cb_ptr, bias_ptr, y_ptr, M, N, K, KP, STEPS_PER_SPLIT,
                  stride_xm, stride_qn, stride_ym,
                  BITS: tl.constexpr, GROUP: tl.constexpr, DECODE: tl.constexpr, ASM: tl.constexpr,
                  HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, ROWS)
    nmask = offs_n < N
    k_start = split * STEPS_PER_SPLIT * 128
    acc = tl.zeros((BLOCK_N, ROWS), dtype=tl.float32)
    for k0 in range(k_start, tl.minimum(k_start + STEPS_PER_SPLIT * 128, KP), 128):
        w = _weights(q_ptr, s_ptr, b_ptr, cb_ptr, x_ptr, offs_n, nmask, k0, N, KP, stride_qn, BITS, GROUP, DECODE,
                     ASM, BLOCK_N)
        x = _x_tile(x_ptr, offs_m, k0, M, K, stride_xm)
        w = w.to(tl.float32)
        for r in tl.static_range(ROWS):  # one [BN, 128] product live at a time
            xr = tl.sum(tl.where(offs_m[:, None] == r, x.to(tl.float32), 0.0), axis=0)
            acc += tl.where(offs_m[None, :] == r, tl.sum(w * xr[None, :], axis=1)[:, None], 0.0)
    _store_t(y_ptr, bias_ptr, acc, offs_n, offs_m, M, N, stride_ym, split, HAS_BIAS, SPLIT_K)


def asm_decode_applies(x: torch.Tensor) -> bool:
    """Whether the PTX decode runs: fp16 or bf16 activations on CUDA (the interpreter cannot run
    inline asm; fp32 activations take the plain decode)."""
    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)


WAVES = 2  # split-K "auto" fills about this many waves of the GPU's SMs
MIN_STEPS_PER_SPLIT = 4  # ... keeping at least this many 128-code steps per split


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 elsewhere: the interpreter runs one program at a time)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def waves_split_k(tiles: int, steps: int, sms: int) -> int:
    """Split-K that gives about WAVES waves of programs over `sms` SMs for `tiles` output tiles,
    with at least MIN_STEPS_PER_SPLIT K steps per split (the rule of triton_kernels' heuristics)."""
    return max(1, min(triton.cdiv(WAVES * sms, tiles), steps // MIN_STEPS_PER_SPLIT))


def _launch_args(x: torch.Tensor, rp: RepackedWeights, bits: int, split_k: int,
                 tiles: int) -> tuple[str, int, int, int]:
    """(decode asm or "" for the plain decode, padded K, K steps per split, splits) for this call;
    `split_k` 0 means `waves_split_k` for this device and `tiles` output tiles."""
    kp = rp.codes.shape[1] * 8 // bits
    steps = kp // SHUFFLE
    if split_k == 0:
        split_k = waves_split_k(tiles, steps, sm_count(x.device))
    per_split = triton.cdiv(steps, max(split_k, 1))
    asm = (rp.asm if x.dtype == torch.float16 else rp.asm_bf16) if asm_decode_applies(x) else ""
    return asm, kp, per_split, triton.cdiv(steps, per_split)


def _output(m: int, n: int, splits: int, x: torch.Tensor, new_output) -> torch.Tensor:
    if splits > 1:
        return torch.zeros((m, n), dtype=torch.float32, device=x.device)
    return new_output((m, n), x.dtype, x.device)


def mma_v2(x: torch.Tensor, rp: RepackedWeights, codebook: torch.Tensor, bits: int, group_size: int,
           bias: torch.Tensor | None, block_m: int, block_n: int, split_k: int, num_warps: int, num_stages: int,
           new_output, upcast: bool) -> torch.Tensor:
    """Tensor-core path, x [M, K] -> [M, N] in x.dtype."""
    x = x.contiguous()
    m, k = x.shape
    n = rp.codes.shape[0]
    asm, kp, per_split, splits = _launch_args(x, rp, bits, split_k, triton.cdiv(n, block_n) * triton.cdiv(m, block_m))
    y = _output(m, n, splits, x, new_output)
    _mma_kernel[(triton.cdiv(n, block_n), triton.cdiv(m, block_m), splits)](
        x, rp.codes, rp.scales, rp.offsets, codebook, bias if bias is not None else y, y, m, n, k,
        kp, per_split, x.stride(0), rp.codes.stride(0), y.stride(0),
        BITS=bits, GROUP=group_size, DECODE=rp.decode, ASM=asm, UPCAST=upcast, HAS_BIAS=bias is not None,
        BLOCK_N=block_n, BLOCK_M=block_m, SPLIT_K=splits, num_warps=num_warps, num_stages=num_stages)
    return y.to(x.dtype) if splits > 1 else y


def gemv_v2(x: torch.Tensor, rp: RepackedWeights, codebook: torch.Tensor, bits: int, group_size: int,
            bias: torch.Tensor | None, block_n: int, split_k: int, num_warps: int, num_stages: int,
            new_output) -> torch.Tensor:
    """Decode-once GEMV, x [M <= 4, K] -> [M, N] in x.dtype."""
    x = x.contiguous()
    m, k = x.shape
    if m > GEMV2_MAX_M:
        raise ValueError(f"gemv2 handles M <= {GEMV2_MAX_M}, got {m}")
    n = rp.codes.shape[0]
    asm, kp, per_split, splits = _launch_args(x, rp, bits, split_k, triton.cdiv(n, block_n))
    y = _output(m, n, splits, x, new_output)
    _gemv2_kernel[(triton.cdiv(n, block_n), splits)](
        x, rp.codes, rp.scales, rp.offsets, codebook, bias if bias is not None else y, y, m, n, k,
        kp, per_split, x.stride(0), rp.codes.stride(0), y.stride(0),
        BITS=bits, GROUP=group_size, DECODE=rp.decode, ASM=asm, HAS_BIAS=bias is not None,
        BLOCK_N=block_n, ROWS=triton.next_power_of_2(m), SPLIT_K=splits, num_warps=num_warps, num_stages=num_stages)
    return y.to(x.dtype) if splits > 1 else y
