"""LDRA: learnable dynamic range adjustment of each group's (s, z) against calibration statistics.

The objective of group (n, j), rows n of a linear and input group j, is the quadratic form

    L(s, z) = dw^T H_j dw,   dw = W_hat(s, z)[n, j] - W[n, j],   H_j = X_j^T X_j / T,

which equals the mean squared error that the group adds to output n over the T calibration tokens
(`X_j` is the calibration input restricted to group j). Its cost does not depend on T.

Two solvers, both never letting a group's loss increase:
- `sign`: the paper's finite-difference, sign-based descent on z (additive steps) and s
  (multiplicative steps), with the reference code's fine/coarse step schedule;
- `alt`: alternate between rounding codes for fixed (s, b) and the exact weighted least-squares
  (s, b) for fixed codes (a 2x2 solve per group), keeping a group's update only if it lowers L.
They are the registry `SOLVERS`: a new solver is a function and a dict entry.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from daq_vllm.format.codebooks import Codebook

from .grid import NearestCode, QuantizedGroups, QuantizedWeight, dequantize_groups, group_blocks, quantize_groups
from .ranges import InitSpec, init_range


@dataclass(frozen=True)
class LDRASpec:
    """Search settings (`solver` is a key of SOLVERS); the defaults of `sign` follow the reference code."""

    solver: str = "alt"
    epochs: int = 10
    iters: int = 100
    step: float = 1e-3  # e0: fine step e0/5 (x0.9 per use), coarse step e0*5 (x1.1 per use)
    patience: int = 5  # an epoch ends after this many iterations in which no group changed
    min_epoch_gain: float = 1e-3  # stop when an epoch lowers the total loss by less than this fraction
    alt_iters: int = 30
    # DCA shrink factors tried per group before the search (best L wins); () = the DCA init alone.
    shrink_grid: tuple[float, ...] = (0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)


@dataclass
class LDRAStats:
    """Summed group loss L before and after tuning, and the most solver steps a block took."""

    initial_loss: float
    final_loss: float
    steps: int


def group_loss(w_hat: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """L per group: w, w_hat [N, G, L], h [G, L, L] -> [N, G]."""
    d = w_hat - w
    return torch.einsum("ngi,gij,ngj->ng", d, h, d)


class GroupProblem:
    """One block of groups of a linear: weights [N, G, L] and their second moments H [G, L, L]."""

    def __init__(self, w: torch.Tensor, h: torch.Tensor, codebook: Codebook):
        self.w, self.h = w, h
        self.n, self.g, self.length = w.shape
        self.nearest = NearestCode(codebook, w.device)
        self.values = codebook.tensor(w.device)

    def quantize(self, s: torch.Tensor, z: torch.Tensor) -> QuantizedGroups:
        """Codes and fp16 params for float (s, z) [N, G]."""
        return quantize_groups(self.w.reshape(-1, self.length), s.reshape(-1), z.reshape(-1), self.nearest)

    def w_hat(self, q: QuantizedGroups) -> torch.Tensor:
        """The decoded weights [N, G, L] of `q`."""
        return dequantize_groups(q, self.values).reshape(self.n, self.g, self.length)

    def loss(self, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """L [N, G] of the grid that float (s, z) [N, G] are stored as."""
        return group_loss(self.w_hat(self.quantize(s, z)), self.w, self.h)


def _sign_search(
    p: GroupProblem, s: torch.Tensor, z: torch.Tensor, spec: LDRASpec
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The paper's search: finite differences on z (additive) then s (multiplicative), sign steps."""
    loss = p.loss(s, z)
    steps = 0
    for _ in range(spec.epochs):
        epoch_start = loss.sum().item()
        fine, coarse = spec.step / 5, spec.step * 5
        stale = 0
        for it in range(spec.iters):
            if it % 2 == 0:
                e, fine = fine, fine * 0.9
            else:
                e, coarse = coarse, coarse * 1.1
            l_minus, l_plus = p.loss(s, z - e), p.loss(s, z + e)
            move_z = torch.minimum(l_minus, l_plus) < loss
            z = torch.where(move_z, z - e * torch.sign(l_plus - l_minus), z)
            loss = torch.where(move_z, torch.minimum(l_minus, l_plus), loss)
            s_down, s_up = s * (1 - e), s * (1 + e)
            l_down, l_up = p.loss(s_down, z), p.loss(s_up, z)
            take_down = (l_down < loss) & (l_down <= l_up)
            take_up = (l_up < loss) & ~take_down
            s = torch.where(take_down, s_down, torch.where(take_up, s_up, s))
            loss = torch.where(take_down, l_down, torch.where(take_up, l_up, loss))
            steps += 1
            stale = 0 if bool((move_z | take_down | take_up).any()) else stale + 1
            if stale >= spec.patience:
                break
        if epoch_start - loss.sum().item() <= spec.min_epoch_gain * epoch_start:
            break
    return s, z, steps


def _weighted_fit(p: GroupProblem, codes_vals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact (s, b) minimising L for fixed code values c [N, G, L]: the 2x2 normal equations.

    Returns s, b and a mask of groups where the fit is well defined (non-singular, s > 0).
    """
    h = p.h.double()
    c = codes_vals.double()
    w = p.w.double()
    ones_h = h.sum(dim=2)  # H @ 1, [G, L]
    hc = torch.einsum("gij,ngj->ngi", h, c)
    a11 = (c * hc).sum(-1)
    a12 = (c * ones_h).sum(-1)
    a22 = ones_h.sum(-1).expand_as(a11)
    r1 = (hc * w).sum(-1)
    r2 = (ones_h * w).sum(-1)
    det = a11 * a22 - a12 * a12
    ok = det > 1e-12 * (a11 * a22).clamp_min(1e-300)
    det = torch.where(ok, det, torch.ones_like(det))
    s = (a22 * r1 - a12 * r2) / det
    b = (a11 * r2 - a12 * r1) / det
    ok &= s > 0
    return s.float(), b.float(), ok


def _alternating(
    p: GroupProblem, s: torch.Tensor, z: torch.Tensor, spec: LDRASpec
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Codes for fixed (s, b), then the exact (s, b) for fixed codes; a group keeps only improvements."""
    q = p.quantize(s, z)
    loss = group_loss(p.w_hat(q), p.w, p.h)
    steps = 0
    for _ in range(spec.alt_iters):
        start = loss.sum().item()
        codes_vals = p.values[q.codes].reshape(p.n, p.g, p.length)
        s_fit, b_fit, ok = _weighted_fit(p, codes_vals)
        z_fit = -b_fit / s_fit.clamp_min(1e-30)
        q_new = p.quantize(torch.where(ok, s_fit, s), torch.where(ok, z_fit, z))
        new_loss = group_loss(p.w_hat(q_new), p.w, p.h)
        better = ok & (new_loss < loss)
        s, z = torch.where(better, s_fit, s), torch.where(better, z_fit, z)
        loss = torch.where(better, new_loss, loss)
        q = p.quantize(s, z)
        steps += 1
        if start - loss.sum().item() <= spec.min_epoch_gain * start:
            break
    return s, z, steps


def best_initial_range(
    p: GroupProblem, rows: torch.Tensor, codebook: Codebook, init: InitSpec, grid: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial (s, z) [N, G]: the initializer's, or per group the best of the DCA shrink grid.

    The grid always contains the initializer's own shrink, so the result is never worse than it.
    """
    s, z = (t.reshape(p.n, p.g) for t in init_range(rows, codebook, init))
    if init.method != "dca" or not grid:
        return s, z
    loss = p.loss(s, z)
    for shrink in grid:
        s_c, z_c = (t.reshape(p.n, p.g) for t in init_range(rows, codebook, replace(init, dca_shrink=shrink)))
        l_c = p.loss(s_c, z_c)
        better = l_c < loss
        s, z, loss = torch.where(better, s_c, s), torch.where(better, z_c, z), torch.where(better, l_c, loss)
    return s, z


Solver = Callable[[GroupProblem, torch.Tensor, torch.Tensor, LDRASpec], tuple[torch.Tensor, torch.Tensor, int]]
SOLVERS: dict[str, Solver] = {"alt": _alternating, "sign": _sign_search}


def ldra(
    w: torch.Tensor, h: torch.Tensor, s: torch.Tensor, z: torch.Tensor, codebook: Codebook, spec: LDRASpec
) -> tuple[QuantizedGroups, LDRAStats]:
    """Refine initial (s, z) [N, G] for weights w [N, G, L] with statistics h [G, L, L]."""
    if spec.solver not in SOLVERS:
        raise ValueError(f"unknown LDRA solver {spec.solver!r}; choose one of {tuple(SOLVERS)}")
    p = GroupProblem(w.float(), h.float(), codebook)
    initial = p.loss(s, z).sum().item()
    s, z, steps = SOLVERS[spec.solver](p, s, z, spec)
    q = p.quantize(s, z)
    final = group_loss(p.w_hat(q), p.w, p.h).sum().item()
    return q, LDRAStats(initial, final, steps)


def quantize_weight_ldra(
    weight: torch.Tensor, moments: list[torch.Tensor], codebook: Codebook, group_size: int,
    init: InitSpec, spec: LDRASpec,
) -> tuple[QuantizedWeight, LDRAStats]:
    """Quantize W [N, K]: initial range from `init`, then LDRA against per-block moments [G, L, L]."""
    w = weight.float()
    n = w.shape[0]
    blocks, initial, final, steps = [], 0.0, 0.0, 0
    for rows, h in zip(group_blocks(w, group_size), moments):
        h = h.to(w.device)
        grouped = rows.reshape(n, h.shape[0], h.shape[1])
        s, z = best_initial_range(GroupProblem(grouped, h, codebook), rows, codebook, init, spec.shrink_grid)
        q, stats = ldra(grouped, h, s, z, codebook, spec)
        blocks.append(q)
        initial, final, steps = initial + stats.initial_loss, final + stats.final_loss, max(steps, stats.steps)
    return QuantizedWeight.from_blocks(blocks, n), LDRAStats(initial, final, steps)
