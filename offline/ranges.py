"""Range initializers: each group's first (s, z), from the weights alone (RTN, absmax, DCA).

With the codebook's centre m = (lo+hi)/2 and half-range h = (hi-lo)/2 (m = 0, h = max|c| for the
symmetric FP formats):
- rtn: min-max asymmetric, [min w, max w] onto [lo, hi]; integer grids round z to an integer code
  (the GPTQ/AWQ baseline);
- absmax: symmetric around 0, z = m, s = max|w| / h;
- dca: centre d from a density estimator, half-extent k = shrink * max(max w - d, d - min w),
  s = k / h and z = m - d/s, so that the codebook's centre (0 for FP formats) lands on d.

Initializers and DCA centre estimators are registries (`INIT_METHODS`, `DCA_CENTERS`): a new one
is a function and a dict entry, and the CLI's choices follow the keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from daq_vllm.format.codebooks import Codebook

from .grid import MIN_SCALE, NearestCode, QuantizedWeight, group_blocks, quantize_groups

_KDE_CHUNK_ELEMS = 1 << 24  # bound on the [rows, L, L] pairwise tensor of the KDE estimator

Range = tuple[torch.Tensor, torch.Tensor]  # float (s, z) per group, [R] each


@dataclass(frozen=True)
class InitSpec:
    """How the per-group range is initialised: `method` is a key of INIT_METHODS, `dca_center` of DCA_CENTERS."""

    method: str = "dca"
    dca_center: str = "quantile"
    dca_shrink: float = 0.9
    hist_bins: int = 16
    hist_mass: float = 0.5


# --- centre estimators for DCA ---------------------------------------------------------------


def _quantile_sorted(sorted_rows: torch.Tensor, p: float) -> torch.Tensor:
    """Linear-interpolation quantile (numpy's default) of already sorted rows."""
    pos = p * (sorted_rows.shape[1] - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, sorted_rows.shape[1] - 1)
    frac = pos - lo
    return sorted_rows[:, lo] * (1 - frac) + sorted_rows[:, hi] * frac


def center_quantile(rows: torch.Tensor) -> torch.Tensor:
    """Midpoint of the 2.5% and 97.5% quantiles: the centre of the dense 95% of the group."""
    s = rows.sort(dim=1).values
    return (_quantile_sorted(s, 0.025) + _quantile_sorted(s, 0.975)) / 2


def center_kde(rows: torch.Tensor) -> torch.Tensor:
    """Centroid of the group weighted by a Gaussian KDE density (Silverman bandwidth)."""
    length = rows.shape[1]
    bandwidth = (1.06 * rows.std(dim=1, unbiased=False) * length**-0.2).clamp_min(1e-12)
    out = torch.empty(rows.shape[0], dtype=rows.dtype, device=rows.device)
    step = max(1, _KDE_CHUNK_ELEMS // (length * length))  # rows per chunk
    for i in range(0, rows.shape[0], step):
        r, h = rows[i : i + step], bandwidth[i : i + step, None, None]
        density = torch.exp(-0.5 * ((r[:, :, None] - r[:, None, :]) / h) ** 2).sum(dim=2)
        out[i : i + step] = (density * r).sum(dim=1) / density.sum(dim=1)
    return out


def center_hist(rows: torch.Tensor, bins: int, mass: float) -> torch.Tensor:
    """Mean of the weights in a histogram window grown from the modal bin to `mass` of the group.

    The window extends, one bin at a time, towards the fuller neighbouring bin.
    """
    r, length = rows.shape
    lo_v, hi_v = rows.min(dim=1).values, rows.max(dim=1).values
    width = ((hi_v - lo_v) / bins).clamp_min(1e-12)
    idx = ((rows - lo_v[:, None]) / width[:, None]).long().clamp_(0, bins - 1)
    counts = torch.zeros(r, bins, dtype=torch.float32, device=rows.device)
    counts.scatter_add_(1, idx, torch.ones_like(rows, dtype=torch.float32))
    left = counts.argmax(dim=1)
    right = left.clone()
    covered = counts.gather(1, left[:, None]).squeeze(1)
    need = mass * length
    edge = torch.full((r, 1), -1.0, device=rows.device)
    padded = torch.cat([edge, counts, edge], dim=1)
    for _ in range(bins - 1):
        grow = covered < need
        if not grow.any():
            break
        c_left = padded.gather(1, left[:, None]).squeeze(1)  # bin left-1 in padded coordinates
        c_right = padded.gather(1, (right + 2)[:, None]).squeeze(1)  # bin right+1
        take_left = grow & (c_left >= c_right) & (c_left >= 0)
        take_right = grow & ~take_left & (c_right >= 0)
        left = left - take_left.long()
        right = right + take_right.long()
        covered = covered + torch.where(take_left, c_left, 0.0) + torch.where(take_right, c_right, 0.0)
    inside = (idx >= left[:, None]) & (idx <= right[:, None])
    return (rows * inside).sum(dim=1) / inside.sum(dim=1)


def _center_zero(rows: torch.Tensor) -> torch.Tensor:
    """Centre 0: DCA's extent rule around the origin (an ablation of the estimators)."""
    return torch.zeros(rows.shape[0], dtype=rows.dtype, device=rows.device)


DCA_CENTERS: dict[str, Callable[[torch.Tensor, InitSpec], torch.Tensor]] = {
    "quantile": lambda rows, spec: center_quantile(rows),
    "kde": lambda rows, spec: center_kde(rows),
    "hist": lambda rows, spec: center_hist(rows, spec.hist_bins, spec.hist_mass),
    "zero": lambda rows, spec: _center_zero(rows),
}


def dca_center(rows: torch.Tensor, spec: InitSpec) -> torch.Tensor:
    """The centre d [R] of each group by the estimator `spec.dca_center`."""
    if spec.dca_center not in DCA_CENTERS:
        raise ValueError(f"unknown DCA centre estimator {spec.dca_center!r}; choose one of {tuple(DCA_CENTERS)}")
    return DCA_CENTERS[spec.dca_center](rows, spec)


# --- initializers ----------------------------------------------------------------------------


def _init_rtn(rows: torch.Tensor, codebook: Codebook, spec: InitSpec) -> Range:
    """[min w, max w] onto [lo, hi]; an integer grid keeps z on a code."""
    w_min, w_max = rows.min(dim=1).values, rows.max(dim=1).values
    lo, hi = codebook.lo, codebook.hi
    s = ((w_max - w_min) / (hi - lo)).clamp_min(MIN_SCALE)
    z = lo - w_min / s
    if codebook.integer_grid:
        z = z.round().clamp(lo, hi)
    return s, z


def _init_absmax(rows: torch.Tensor, codebook: Codebook, spec: InitSpec) -> Range:
    """[-max|w|, max|w|] onto the codebook, centred on its centre."""
    w_min, w_max = rows.min(dim=1).values, rows.max(dim=1).values
    lo, hi = codebook.lo, codebook.hi
    s = (torch.maximum(w_max.abs(), w_min.abs()) / ((hi - lo) / 2)).clamp_min(MIN_SCALE)
    return s, torch.full_like(s, (lo + hi) / 2)


def _init_dca(rows: torch.Tensor, codebook: Codebook, spec: InitSpec) -> Range:
    """The codebook's centre on the density centre d, its half-range on the shrunk extent around d."""
    w_min, w_max = rows.min(dim=1).values, rows.max(dim=1).values
    lo, hi = codebook.lo, codebook.hi
    d = dca_center(rows, spec)
    k = spec.dca_shrink * torch.maximum(w_max - d, d - w_min)
    s = (k / ((hi - lo) / 2)).clamp_min(MIN_SCALE)
    return s, (lo + hi) / 2 - d / s


INIT_METHODS: dict[str, Callable[[torch.Tensor, Codebook, InitSpec], Range]] = {
    "rtn": _init_rtn,
    "absmax": _init_absmax,
    "dca": _init_dca,
}


def init_range(rows: torch.Tensor, codebook: Codebook, spec: InitSpec) -> Range:
    """Initial float (s, z) per group of `rows [R, L]` by the initializer `spec.method` (module docstring)."""
    if spec.method not in INIT_METHODS:
        raise ValueError(f"unknown init method {spec.method!r}; choose one of {tuple(INIT_METHODS)}")
    return INIT_METHODS[spec.method](rows, codebook, spec)


def quantize_weight(weight: torch.Tensor, codebook: Codebook, group_size: int, spec: InitSpec) -> QuantizedWeight:
    """Quantize W [N, K] group-wise along K with the initializer `spec` alone (no calibration)."""
    w = weight.float()
    nearest = NearestCode(codebook, w.device)
    blocks = [quantize_groups(rows, *init_range(rows, codebook, spec), nearest) for rows in group_blocks(w, group_size)]
    return QuantizedWeight.from_blocks(blocks, w.shape[0])
