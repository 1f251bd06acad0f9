"""Error-compensated rounding (GPTQ-style) of a linear's codes onto its fixed LDRA grids.

LDRA tunes each group's grid `s*c + b` against that group's own output error and then rounds
every weight to its nearest grid point. Rounding errors of different inputs, however, add up in
the output through the full input second moment H = X^T X / T (K x K): the loss of output row n is

    L_n = dw_n^T H dw_n,

of which LDRA's per-group objective is the block-diagonal part. With the grids held fixed, this
module chooses the codes column by column as GPTQ does (Frantar et al., 2022): round a column,
then spread its error over the columns not yet rounded through the inverse Hessian, so later
columns compensate. The scale and offset of every group stay exactly as LDRA stored them; only the
codes change, and per row the result is kept only where it lowers L_n (never worse than nearest).

Memory: H is K x K floats (3.3 GB for K = 28672), so it is never copied. `InputHessian` permutes it
into act order in place and holds the Cholesky factor of its damped inverse, computed in float32
as GPTQ does, in one more K x K buffer, shared by the linears that read that input: 2 K^2 floats
while rounding, 3 K^2 while factoring. Row losses are summed over row chunks, never through a
float64 K x K copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from daq_vllm.errors import DAQError
from daq_vllm.format.codebooks import Codebook
from daq_vllm.kernels.reference import decode_values

from .grid import NearestCode, QuantizedWeight, dequantize_weight, row_chunks


@dataclass(frozen=True)
class CompensationSpec:
    """GPTQ settings: dampening (fraction of mean diag H), column block, descending-H order."""

    damp: float = 0.01
    block: int = 128
    act_order: bool = True


DAMP_RETRIES = 4  # float32 factorisation tries, each with 10x the dampening of the one before


def row_losses(w_hat: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """L_n = dw_n^T H dw_n for every output row: w_hat, w [N, K], h [K, K] -> [N] float64.

    The products run in float32 over row chunks; each row's sum is taken in float64.
    """
    out = torch.empty(w.shape[0], dtype=torch.float64, device=w.device)
    for rows in row_chunks(*w.shape):
        d = (w_hat[rows] - w[rows]).float()
        out[rows] = ((d @ h) * d).double().sum(dim=1)
    return out


def permute_symmetric_(h: torch.Tensor, order: torch.Tensor) -> None:
    """h <- h[order][:, order] in place: rows along the permutation's cycles, columns by row chunks."""
    target = order.tolist()
    done = [False] * len(target)
    for start in range(len(target)):
        if done[start] or target[start] == start:
            continue
        first, j = h[start].clone(), start
        while True:
            done[j] = True
            if target[j] == start:
                h[j] = first
                break
            h[j] = h[target[j]]
            j = target[j]
    for rows in row_chunks(*h.shape):
        h[rows] = h[rows].index_select(1, order)


def _upper_inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp*mean(diag H)*I)^-1 in float32; dead inputs (diag <= 0)
    get diag 1. The dampening grows 10x while H + damp is not positive definite in float32.

    H's diagonal is damped in place and restored after the first factorisation, so at most two
    K x K buffers exist beside H (each torch factorisation returns a new one).
    """
    diag = h.diagonal()
    saved = diag.clone()
    dead = saved <= 0
    try:
        for attempt in range(DAMP_RETRIES):
            diag.copy_(torch.where(dead, torch.ones_like(saved), saved))
            diag.add_(damp * 10**attempt * diag.mean())
            factor, info = torch.linalg.cholesky_ex(h)
            if int(info) == 0:
                break
            factor = None  # freed before the next try
        else:
            raise DAQError(f"the input second moment is not positive definite even with dampening "
                           f"{damp * 10 ** (DAMP_RETRIES - 1):g}; quantize with --rounding nearest")
    finally:
        diag.copy_(saved)
    inverse = torch.cholesky_inverse(factor)
    factor = None
    return torch.linalg.cholesky(inverse, upper=True)


class InputHessian:
    """One input's full second moment prepared for GPTQ rounding, shared by the linears reading it.

    Takes H [K, K] over: permutes it in place into `order` (descending diagonal with act order)
    and factors the damped inverse into `u`, both float32.
    """

    def __init__(self, h: torch.Tensor, spec: CompensationSpec):
        self.spec = spec
        self.order = torch.argsort(h.diagonal(), descending=True) if spec.act_order else None
        if self.order is not None:
            permute_symmetric_(h, self.order)
        self.h = h
        self.u = _upper_inverse_cholesky(h, spec.damp)

    def ordered(self, w: torch.Tensor) -> torch.Tensor:
        """W's columns [N, K] in H's order (a float32 copy)."""
        return (w[:, self.order] if self.order is not None else w).float().clone()

    def unordered(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes in H's column order back to W's."""
        if self.order is None:
            return codes
        out = torch.empty_like(codes)
        out[:, self.order] = codes
        return out


def compensated_codes(
    w: torch.Tensor, hess: InputHessian, qw: QuantizedWeight, codebook: Codebook, group_size: int
) -> torch.Tensor:
    """Codes [N, K] for W [N, K] on the grids of `qw` (its fp16 scales/offsets), GPTQ-ordered."""
    n, k = w.shape
    device = w.device
    block, u = hess.spec.block, hess.u
    w = hess.ordered(w)
    columns = hess.order if hess.order is not None else torch.arange(k, device=device)
    group_of = columns // group_size
    scales, offsets = qw.scales.float(), qw.offsets.float()
    nearest = NearestCode(codebook, device)
    values = codebook.tensor(device)
    codes = torch.empty(n, k, dtype=torch.int64, device=device)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, u1 = w[:, i1:i2], u[i1:i2, i1:i2]
        err = torch.empty(n, i2 - i1, device=device)
        for j in range(i2 - i1):
            g = group_of[i1 + j]
            s, b = scales[:, g], offsets[:, g]
            c = nearest((w1[:, j] - b) / s)
            e = (w1[:, j] - decode_values(c, s, b, values)) / u1[j, j]
            w1[:, j + 1 :] -= e[:, None] * u1[j, j + 1 :][None]
            codes[:, i1 + j], err[:, j] = c, e
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return hess.unordered(codes)


def compensate(
    w: torch.Tensor, hess: InputHessian, qw: QuantizedWeight, codebook: Codebook, group_size: int
) -> tuple[QuantizedWeight, tuple[float, float]]:
    """`qw` with compensated codes in the rows where they lower L_n; also (loss before, after)."""
    values = codebook.tensor(w.device)
    w_ordered = hess.ordered(w)

    def losses(codes: torch.Tensor) -> torch.Tensor:
        w_hat = dequantize_weight(QuantizedWeight(codes, qw.scales, qw.offsets), values, group_size)
        return row_losses(hess.ordered(w_hat), w_ordered, hess.h)

    before = losses(qw.codes)
    codes = compensated_codes(w, hess, qw, codebook, group_size)
    after = losses(codes)
    better = after < before
    kept = torch.where(better[:, None], codes, qw.codes)
    final = torch.where(better, after, before)
    return QuantizedWeight(kept, qw.scales, qw.offsets), (before.sum().item(), final.sum().item())
