"""Error-compensated rounding (GPTQ-style) of a linear's codes, then polishing of codes and grids.

LDRA tunes each group's grid `s*c + b` against that group's own output error and then rounds
every weight to its nearest grid point. Rounding errors of different inputs, however, add up in
the output through the full input second moment H = X^T X / T (K x K): the loss of output row n is

    L_n = dw_n^T H dw_n,

of which LDRA's per-group objective is the block-diagonal part. Three steps lower the full L_n:
- `compensated_codes`: with the grids fixed, choose the codes column by column as GPTQ does
  (Frantar et al., 2022): round a column, then spread its error over the columns not yet rounded
  through the inverse Hessian, so later columns compensate;
- `descend_codes`: cyclic coordinate descent on the codes (QuantEase, Behdin et al., 2023): each
  weight moves to its best grid point with all others held, which GPTQ's one greedy pass misses;
- `refit_grids`: with the codes fixed, L_n is a quadratic in all of row n's (s, b) at once, which
  LDRA solved group by group under the block-diagonal part only; solve it under the full H.
`compensate` runs GPTQ and then `CompensationSpec.polish` rounds of descent + refit, and keeps, per
row, whichever candidate has the lowest L_n (never worse than the nearest codes on LDRA's grids).

Memory: H is K x K floats (3.3 GB for K = 28672), so it is never copied. `InputHessian` permutes it
into act order in place and holds the Cholesky factor of its damped inverse, computed in float32
as GPTQ does, in one more K x K buffer, shared by the linears that read that input: 2 K^2 floats
while rounding, 3 K^2 while factoring. Row losses are summed over row chunks, never through a
float64 K x K copy; the polishing steps hold a few [rows, K] copies of a row chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from daq_vllm.errors import DAQError
from daq_vllm.format.codebooks import Codebook
from daq_vllm.kernels.reference import decode_values

from .grid import MIN_SCALE, NearestCode, QuantizedWeight, dequantize_weight, row_chunks


@dataclass(frozen=True)
class CompensationSpec:
    """GPTQ settings (dampening as a fraction of mean diag H, column block, descending-H order) and
    the rounds of polishing after it (each: a coordinate-descent pass over the codes, then a refit
    of the grids). Polishing is off by default: on SmolLM2 (g64) 3 rounds lowered the output error
    on held-out calibration data by 10.7% but moved WikiText-2 perplexity by +0.007, for +13% time
    (benchmarks/results/quality.md, rows /p3)."""

    damp: float = 0.01
    block: int = 128
    act_order: bool = True
    polish: int = 0


REFIT_SWEEPS = 2  # block coordinate descent sweeps over the groups per refit (a third gains little)
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

    def ordered_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [N, K] with columns in H's order (a copy, safe to write)."""
        return codes[:, self.order] if self.order is not None else codes.clone()

    def groups(self, group_size: int) -> torch.Tensor:
        """The group index of each column in H's order [K]."""
        k = self.h.shape[0]
        columns = self.order if self.order is not None else torch.arange(k, device=self.h.device)
        return columns // group_size

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
    group_of = hess.groups(group_size)
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


def refit_grids(
    w: torch.Tensor, hess: InputHessian, qw: QuantizedWeight, codebook: Codebook, group_size: int
) -> QuantizedWeight:
    """`qw` with every group's (s, b) re-solved for its codes against the full H (codes unchanged).

    L_n is a quadratic in all of row n's (s, b) at once. Block coordinate descent solves it group by
    group (a 2x2 Newton step with the other groups held), keeping the gradient H dw_n of every row
    current with one [N, L] x [L, K] product per group: a sweep costs one N x K x K product.
    """
    h, group_of = hess.h, hess.groups(group_size)
    values = codebook.tensor(w.device)
    codes = hess.ordered_codes(qw.codes)
    v = values.float()[codes]
    s, b = qw.scales.float().clone(), qw.offsets.float().clone()
    grad = (decode_values(codes, s[:, group_of], b[:, group_of], values) - hess.ordered(w)) @ h
    members = [torch.nonzero(group_of == g).squeeze(1) for g in range(s.shape[1])]
    for _ in range(REFIT_SWEEPS):
        for g, idx in enumerate(members):
            h_rows = h[idx]
            h_gg = h_rows[:, idx]
            v_g, grad_g = v[:, idx], grad[:, idx]
            hv = v_g @ h_gg
            a, c, d = (hv * v_g).sum(1), hv.sum(1), h_gg.sum()
            gs, gb = (v_g * grad_g).sum(1), grad_g.sum(1)
            det = a * d - c * c
            ok = det > 1e-6 * a * d
            safe = torch.where(ok, det, torch.ones_like(det))
            new_s = (s[:, g] - (d * gs - c * gb) / safe).half().float()
            ok &= torch.isfinite(new_s) & (new_s >= MIN_SCALE)
            new_s = torch.where(ok, new_s, s[:, g])
            # b's exact minimiser for the stored (fp16) s: the gradient in b moves by c * ds
            new_b = (b[:, g] - (gb + c * (new_s - s[:, g])) / d).half().float()
            new_b = torch.where(torch.isfinite(new_b), new_b, b[:, g])  # also d = 0: a dead group
            delta = (new_s - s[:, g])[:, None] * v_g + (new_b - b[:, g])[:, None]
            grad += delta @ h_rows
            s[:, g], b[:, g] = new_s, new_b
    return QuantizedWeight(qw.codes, s.half(), b.half())


def descend_codes(
    w: torch.Tensor, hess: InputHessian, qw: QuantizedWeight, codebook: Codebook, group_size: int
) -> QuantizedWeight:
    """`qw` with codes improved by one pass of cyclic coordinate descent on L_n (grids unchanged).

    With every other weight held, L_n is a 1-D quadratic in weight (n, j) of curvature H_jj, so
    its best grid point is the nearest one to w_hat_nj - (H dw_n)_j / H_jj: each step can only
    lower L_n (QuantEase, Behdin et al., 2023). Columns go in blocks, the gradient of later blocks
    updated once per block as in GPTQ.
    """
    device = w.device
    n, k = w.shape
    h, block, group_of = hess.h, hess.spec.block, hess.groups(group_size)
    values = codebook.tensor(device)
    nearest = NearestCode(codebook, device)
    codes = hess.ordered_codes(qw.codes)
    scales, offsets = qw.scales.float(), qw.offsets.float()
    w_hat = decode_values(codes, scales[:, group_of], offsets[:, group_of], values)
    grad = (w_hat - hess.ordered(w)) @ h
    diag, groups = h.diagonal(), group_of.tolist()
    live = (diag > 0).tolist()
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        g_blk, h_blk = grad[:, i1:i2].clone(), h[i1:i2, i1:i2]
        delta = torch.zeros(n, i2 - i1, device=device)
        for j in range(i2 - i1):
            col = i1 + j
            if not live[col]:
                continue
            s, b = scales[:, groups[col]], offsets[:, groups[col]]
            target = w_hat[:, col] - g_blk[:, j] / diag[col]
            c = nearest((target - b) / s)
            new = decode_values(c, s, b, values)
            dj = new - w_hat[:, col]
            g_blk += dj[:, None] * h_blk[j][None]
            w_hat[:, col], codes[:, col], delta[:, j] = new, c, dj
        grad[:, i1:i2] = g_blk
        grad[:, :i1] += delta @ h[i1:i2, :i1]
        grad[:, i2:] += delta @ h[i1:i2, i2:]
    return QuantizedWeight(hess.unordered(codes), qw.scales, qw.offsets)


def compensate(
    w: torch.Tensor, hess: InputHessian, qw: QuantizedWeight, codebook: Codebook, group_size: int
) -> tuple[QuantizedWeight, tuple[float, float]]:
    """`qw` (nearest codes on LDRA's grids) re-coded by GPTQ and polished, each row the candidate of
    lowest L_n seen; also the summed loss (before, after)."""
    values = codebook.tensor(w.device)
    w_ordered = hess.ordered(w)

    def losses(q: QuantizedWeight) -> torch.Tensor:
        return row_losses(hess.ordered(dequantize_weight(q, values, group_size)), w_ordered, hess.h)

    best_loss = before = losses(qw)
    best = current = qw
    steps = [lambda q: QuantizedWeight(compensated_codes(w, hess, q, codebook, group_size), q.scales, q.offsets)]
    steps += [lambda q: descend_codes(w, hess, q, codebook, group_size),
              lambda q: refit_grids(w, hess, q, codebook, group_size)] * hess.spec.polish
    for step in steps:
        current = step(current)
        loss = losses(current)
        better = loss < best_loss
        best = QuantizedWeight(*(torch.where(better[:, None], new, old) for new, old in
                                 ((current.codes, best.codes), (current.scales, best.scales),
                                  (current.offsets, best.offsets))))
        best_loss = torch.where(better, loss, best_loss)
    return best, (before.sum().item(), best_loss.sum().item())
