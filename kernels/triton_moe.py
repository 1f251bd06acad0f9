"""Fused MoE over DAQ 4-bit weights in Triton: vLLM's `fused_moe_kernel_gptq_awq`, decoding through a codebook.

Routing (`align_pairs`, plain torch): the M*k token-expert pairs are sorted by expert and each
expert's run is padded to BLOCK_M, so every BLOCK_M slice of the sorted list belongs to one expert;
`expert_of_block` names it. Pairs of experts not on this rank (ids outside [0, E), -1 from vLLM's
expert map) are left out. Two launches of one kernel then follow, as in vLLM's `fused_experts`:
GEMM1 (w13, [T, 2I] per pair) -> act(gate) * up in torch (float32, rounded to x's dtype) -> GEMM2
(w2, the routing weight multiplied in, [T, H] per pair, zero for left-out pairs) -> float32 sum over
the top-k.

Weights are read where the checkpoint has them: `qweight.view(torch.uint8)` [E, N, 4 * words] holds
code k of a row in byte k // 2, low nibble for even k (little-endian words, as on every CUDA GPU and
x86/ARM CPU), which is byte for byte vLLM's int4_w4a16 layout [E, N, K/2]. Each code decodes to
`codebook[code] * scale + offset` in float32 (a 16-entry table gather and one scale and one offset
per output and K step: BLOCK_K divides the group size), is rounded to the activation dtype and
multiplied by `tl.dot` with float32 accumulation. A partial last group is masked like any edge.

No host syncs: the alignment is scatter/cumsum/sort/searchsorted on the device, the grid is sized by
vLLM's upper bound on padded pairs (T + min(T, E) * (BLOCK_M - 1)), and surplus programs return
after reading the padded count from device memory, so the path is meant to be CUDA-graph
capturable (not yet tried on a GPU). Intermediates are [T, 2I], [T, I] and [T, H] in x's dtype, not
chunked over tokens. Launch configurations are untuned defaults (`default_config`). Float32
activations multiply in TF32 on GPUs that have it (Triton's default, as in `triton_gemm`). Under
`TRITON_INTERPRET=1` (CPU tensors) `tl.dot` operands are upcast to float32, because the
interpreter's bf16 `tl.dot` is wrong.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl


class PackedExperts(NamedTuple):
    """One projection of every local expert: qweight int32 [E, N, words(K)], scales/offsets fp16 [E, N, groups(K)],
    codebook float32 [16]."""

    qweight: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor
    codebook: torch.Tensor


@dataclass(frozen=True)
class MoEConfig:
    """One launch configuration of `_moe_gemm_kernel` (BLOCK_K must divide the group size)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


def default_config(m: int, group_size: int) -> MoEConfig:
    """vLLM's wna16 defaults: BLOCK_M by token count (M, not pairs), BLOCK_K at most one group.

    8 warps at BLOCK_M 64: compiled for sm_90, 4 warps need 219 registers a thread there, 8 need 117.
    """
    block_m = 16 if m <= 20 else 32 if m <= 40 else 64
    return MoEConfig(block_m, 64, min(64, group_size), num_warps=8 if block_m == 64 else 4)


@triton.jit
def _moe_gemm_kernel(a_ptr, q_ptr, s_ptr, o_ptr, cb_ptr, c_ptr, w_ptr, pair_ptr, expert_ptr, padded_ptr,
                     N, K, num_pairs, stride_am, stride_qe, stride_qn, stride_se, stride_sn, stride_cm,
                     GROUP: tl.constexpr, TOP_K: tl.constexpr, MUL_WEIGHT: tl.constexpr, UPCAST: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C[p, n] = A[p // TOP_K] . W_hat_e[n] (times weight[p]) for the BLOCK_M pairs p of one sorted block.

    Programs run n-tile-major within an m block, so consecutive programs share one expert's rows of
    A. Padding slots hold `num_pairs` and are masked; blocks past the padded count return at once.
    """
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    pid_m = pid // n_tiles
    pid_n = pid % n_tiles
    if pid_m * BLOCK_M >= tl.load(padded_ptr):
        return
    pair = tl.load(pair_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    pmask = pair < num_pairs
    expert = tl.load(expert_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + (pair // TOP_K).to(tl.int64)[:, None] * stride_am
    q_cols = q_ptr + expert * stride_qe + offs_n.to(tl.int64)[None, :] * stride_qn
    s_cols = s_ptr + expert * stride_se + offs_n * stride_sn
    o_cols = o_ptr + expert * stride_se + offs_n * stride_sn
    nibble = ((offs_k % 2) * 4)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        kmask = kk < K
        a = tl.load(a_rows + kk[None, :], mask=pmask[:, None] & kmask[None, :], other=0.0)
        byte = tl.load(q_cols + (kk // 2)[:, None], mask=kmask[:, None] & nmask[None, :], other=0)
        code = (byte.to(tl.int32) >> nibble) & 0xF
        scale = tl.load(s_cols + k0 // GROUP, mask=nmask, other=0.0).to(tl.float32)
        offset = tl.load(o_cols + k0 // GROUP, mask=nmask, other=0.0).to(tl.float32)
        w = (tl.load(cb_ptr + code) * scale[None, :] + offset[None, :]).to(a.dtype)
        if UPCAST:
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc)
        else:
            acc = tl.dot(a, w, acc)
    if MUL_WEIGHT:
        acc = acc * tl.load(w_ptr + pair, mask=pmask, other=0.0)[:, None]
    tl.store(c_ptr + pair.to(tl.int64)[:, None] * stride_cm + offs_n[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=pmask[:, None] & nmask[None, :])


def align_pairs(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
    """Token-expert pairs sorted by expert, each expert's run padded to `block_m` (vLLM's
    `moe_align_block_size`, in torch and without host syncs).

    Returns `pair_ids` int32 [blocks * block_m] (pair index m * k + j, or T = M * k in padding),
    `expert_of_block` int32 [blocks] and `padded` int64 [1], the number of slots in use; `blocks`
    depends on the shapes only. Pairs whose id is outside [0, E) are left out.
    """
    device = topk_ids.device
    ids = topk_ids.reshape(-1).to(torch.int64)
    pairs = ids.numel()
    ids = torch.where((ids >= 0) & (ids < num_experts), ids, num_experts)  # a last bucket, dropped below
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device).scatter_add_(0, ids, torch.ones_like(ids))
    run = (counts[:num_experts] + block_m - 1) // block_m * block_m
    run_end = torch.cumsum(run, 0)
    blocks = triton.cdiv(pairs + min(pairs, num_experts) * (block_m - 1), block_m)
    capacity = blocks * block_m
    order = torch.argsort(ids, stable=True)
    expert = ids[order]
    rank = torch.arange(pairs, device=device) - (torch.cumsum(counts, 0) - counts)[expert]
    start = torch.cat([run_end - run, run_end.new_full((1,), capacity)])  # the dropped bucket -> slot `capacity`
    slot = torch.where(expert < num_experts, start[expert] + rank, capacity)
    pair_ids = torch.full((capacity + 1,), pairs, dtype=torch.int32, device=device)
    pair_ids.scatter_(0, slot, order.to(torch.int32))
    block_start = torch.arange(blocks, device=device) * block_m
    expert_of_block = torch.searchsorted(run_end, block_start, right=True).to(torch.int32)
    return pair_ids[:capacity], expert_of_block, run_end[-1:]


def _new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """GEMM1's output, whose every routed row the kernel must write (tests poison it to check)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _gemm(a: torch.Tensor, w: PackedExperts, out: torch.Tensor, routing: tuple[torch.Tensor, ...], top_k: int,
          weights: torch.Tensor | None, group_size: int, cfg: MoEConfig) -> torch.Tensor:
    """One launch: row p of `out` [T, N] gets A[p // top_k] @ W_hat_e^T (times weights[p]) for every routed pair p."""
    pair_ids, expert_of_block, padded = routing
    qbytes = w.qweight.contiguous().view(torch.uint8)
    scales, offsets = w.scales.contiguous(), w.offsets.contiguous()
    n, k = qbytes.shape[1], a.shape[1]
    grid = (expert_of_block.numel() * triton.cdiv(n, cfg.block_n),)
    _moe_gemm_kernel[grid](
        a, qbytes, scales, offsets, w.codebook, out, weights if weights is not None else out, pair_ids,
        expert_of_block, padded, n, k, out.shape[0], a.stride(0), qbytes.stride(0), qbytes.stride(1),
        scales.stride(0), scales.stride(1), out.stride(0),
        GROUP=group_size, TOP_K=top_k, MUL_WEIGHT=weights is not None, UPCAST=os.environ.get("TRITON_INTERPRET") == "1",
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    return out


def fused_moe(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w13: PackedExperts,
              w2: PackedExperts, group_size: int, gated: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """sum_j topk_weights[m, j] * W2_e(gated(W13_e x[m])), e = topk_ids[m, j]: [M, H] in x's dtype."""
    m, top_k = topk_ids.shape
    hidden, pairs = x.shape[1], topk_ids.numel()
    if pairs == 0:
        return x.new_zeros(m, hidden)
    cfg = default_config(m, group_size)
    routing = align_pairs(topk_ids, w13.qweight.shape[0], cfg.block_m)
    x = x.contiguous()
    h = _gemm(x, w13, _new_output((pairs, w13.qweight.shape[1]), x.dtype, x.device), routing, top_k, None,
              group_size, cfg)
    act = gated(h).to(x.dtype)  # rows of left-out pairs hold garbage and are never read
    y = _gemm(act, w2, x.new_zeros(pairs, hidden), routing, 1, topk_weights.reshape(-1).float().contiguous(),
              group_size, cfg)
    return y.view(m, top_k, hidden).sum(1, dtype=torch.float32).to(x.dtype)
