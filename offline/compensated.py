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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from daq_vllm.format.codebooks import Codebook
from daq_vllm.kernels.reference import decode_values

from .grid import NearestCode, QuantizedWeight, dequantize_weight


@dataclass(frozen=True)
class CompensationSpec:
    """GPTQ settings: dampening (fraction of mean diag H), column block, descending-H order."""

    damp: float = 0.01
    block: int = 128
    act_order: bool = True


def row_losses(w_hat: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """L_n = dw_n^T H dw_n for every output row: w_hat, w [N, K], h [K, K] -> [N]."""
    d = (w_hat - w).double()
    return ((d @ h.double()) * d).sum(dim=1)


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp*mean(diag H)*I)^-1; dead inputs get diag 1."""
    h = h.double().clone()
    diag = h.diagonal()
    dead = diag <= 0
    h[dead, dead] = 1.0
    diag.add_(damp * diag.mean())
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(hinv, upper=True).float()


def compensated_codes(
    w: torch.Tensor, h: torch.Tensor, qw: QuantizedWeight, codebook: Codebook, group_size: int,
    spec: CompensationSpec,
) -> torch.Tensor:
    """Codes [N, K] for W [N, K] on the grids of `qw` (its fp16 scales/offsets), GPTQ-ordered."""
    n, k = w.shape
    device = w.device
    perm = torch.argsort(h.diagonal(), descending=True) if spec.act_order else torch.arange(k, device=device)
    w = w.float()[:, perm].clone()
    u = _inverse_cholesky(h[perm][:, perm], spec.damp).to(device)
    group_of = perm // group_size
    scales, offsets = qw.scales.float(), qw.offsets.float()
    nearest = NearestCode(codebook, device)
    values = codebook.tensor(device)
    codes = torch.empty(n, k, dtype=torch.int64, device=device)
    for i1 in range(0, k, spec.block):
        i2 = min(i1 + spec.block, k)
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
    out = torch.empty_like(codes)
    out[:, perm] = codes
    return out


def compensate(
    w: torch.Tensor, h: torch.Tensor, qw: QuantizedWeight, codebook: Codebook, group_size: int,
    spec: CompensationSpec,
) -> tuple[QuantizedWeight, tuple[float, float]]:
    """`qw` with compensated codes in the rows where they lower L_n; also (loss before, after)."""
    values = codebook.tensor(w.device)
    h = h.to(w.device)
    before = row_losses(dequantize_weight(qw, values, group_size), w, h)
    codes = compensated_codes(w, h, qw, codebook, group_size, spec)
    after = row_losses(dequantize_weight(QuantizedWeight(codes, qw.scales, qw.offsets), values, group_size), w, h)
    better = after < before
    kept = torch.where(better[:, None], codes, qw.codes)
    final = torch.where(better, after, before)
    return QuantizedWeight(kept, qw.scales, qw.offsets), (before.sum().item(), final.sum().item())
