"""Group quantizer: nearest-codebook rounding and the range initializers (RTN, absmax, DCA).

Notation (paper): per group, `w_hat = s * (c[q] - z)`; the checkpoint stores the scale `s` and the
offset `b = -s*z` in fp16. We round `s` and `b` to fp16 *before* choosing codes, so the codes are
the nearest ones for the parameters actually stored and the fake-quant weight equals what a loader
decodes, bit for bit.

Groups are handled as a 2-D block `rows [R, L]` (R groups of L inputs). A weight [N, K] becomes a
block of full groups and, when g does not divide K, a block of partial last groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from daq_vllm.format.codebooks import Codebook

InitMethod = Literal["rtn", "absmax", "dca"]
DCACenter = Literal["quantile", "kde", "hist", "zero"]
INIT_METHODS: tuple[str, ...] = ("rtn", "absmax", "dca")
DCA_CENTERS: tuple[str, ...] = ("quantile", "kde", "hist", "zero")

_MIN_SCALE = 2.0**-24  # smallest positive fp16 (subnormal): a stored scale is never 0
_KDE_CHUNK_ELEMS = 1 << 24  # bound on the [rows, L, L] pairwise tensor of the KDE estimator


@dataclass(frozen=True)
class InitSpec:
    """How the per-group range is initialised."""

    method: InitMethod = "dca"
    dca_center: DCACenter = "quantile"
    dca_shrink: float = 0.9
    hist_bins: int = 16
    hist_mass: float = 0.5


@dataclass
class QuantizedGroups:
    """Codes [R, L] with the fp16 scale and offset [R] of each group."""

    codes: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor


class NearestCode:
    """Nearest-codebook rounding by bucketizing against midpoints (no loop over codes).

    Saturating: inputs beyond the ends take the end codes. Ties (an input exactly on a midpoint)
    go to the smaller value. Codebooks with repeated values (+0 and -0 in the FP formats) use the
    lowest code that holds the value.
    """

    def __init__(self, codebook: Codebook, device: torch.device | str):
        distinct = sorted(set(codebook.values))
        self.values = torch.tensor(distinct, dtype=torch.float32, device=device)
        self.codes = torch.tensor(
            [codebook.values.index(v) for v in distinct], dtype=torch.int64, device=device
        )
        self.midpoints = (self.values[1:] + self.values[:-1]) / 2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.codes[torch.bucketize(x, self.midpoints)]


def stored_params(scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp16 (scale, offset) that a checkpoint stores for float (s, z)."""
    s16 = scale.clamp_min(_MIN_SCALE).to(torch.float16)
    b16 = (-s16.float() * zero).to(torch.float16)
    if not (torch.isfinite(s16).all() and torch.isfinite(b16).all()):
        raise ValueError("a group's scale or offset overflows float16 (weights above ~6e4?)")
    return s16, b16


def quantize_groups(
    rows: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, nearest: NearestCode
) -> QuantizedGroups:
    """Round each group `rows[r]` onto the grid `s16*c + b16` of its stored parameters."""
    s16, b16 = stored_params(scale, zero)
    x = (rows - b16.float()[:, None]) / s16.float()[:, None]
    return QuantizedGroups(nearest(x), s16, b16)


def dequantize_groups(q: QuantizedGroups, codebook_values: torch.Tensor) -> torch.Tensor:
    """`s*c[q] + b` in float32, the same arithmetic as the checkpoint reference decoder."""
    return codebook_values[q.codes] * q.scales.float()[:, None] + q.offsets.float()[:, None]


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
    step = max(1, _KDE_CHUNK_ELEMS // (length * length))
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
    padded = torch.cat([torch.full((r, 1), -1.0, device=rows.device), counts,
                        torch.full((r, 1), -1.0, device=rows.device)], dim=1)
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


def dca_center(rows: torch.Tensor, spec: InitSpec) -> torch.Tensor:
    if spec.dca_center == "quantile":
        return center_quantile(rows)
    if spec.dca_center == "kde":
        return center_kde(rows)
    if spec.dca_center == "hist":
        return center_hist(rows, spec.hist_bins, spec.hist_mass)
    if spec.dca_center == "zero":
        return torch.zeros(rows.shape[0], dtype=rows.dtype, device=rows.device)
    raise ValueError(f"unknown DCA centre estimator {spec.dca_center!r}; choose one of {DCA_CENTERS}")


# --- initializers ----------------------------------------------------------------------------


def init_range(rows: torch.Tensor, codebook: Codebook, spec: InitSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial float (s, z) per group of `rows [R, L]`.

    With the codebook's centre m = (lo+hi)/2 and half-range h = (hi-lo)/2 (m = 0, h = max|c| for
    the symmetric FP formats):
    - rtn: min-max asymmetric, [min w, max w] onto [lo, hi]; integer grids round z to an integer
      code (the GPTQ/AWQ baseline);
    - absmax: symmetric around 0, z = m, s = max|w| / h;
    - dca: centre d from the estimator, half-extent k = shrink * max(max w - d, d - min w),
      s = k / h and z = m - d/s, so that the codebook's centre (0 for FP formats) lands on d.
    """
    w_min, w_max = rows.min(dim=1).values, rows.max(dim=1).values
    lo, hi = codebook.lo, codebook.hi
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    if spec.method == "rtn":
        s = ((w_max - w_min) / (hi - lo)).clamp_min(_MIN_SCALE)
        z = lo - w_min / s
        if codebook.integer_grid:
            z = z.round().clamp(lo, hi)
        return s, z
    if spec.method == "absmax":
        s = (torch.maximum(w_max.abs(), w_min.abs()) / half).clamp_min(_MIN_SCALE)
        return s, torch.full_like(s, mid)
    if spec.method == "dca":
        d = dca_center(rows, spec)
        k = spec.dca_shrink * torch.maximum(w_max - d, d - w_min)
        s = (k / half).clamp_min(_MIN_SCALE)
        return s, mid - d / s
    raise ValueError(f"unknown init method {spec.method!r}; choose one of {INIT_METHODS}")


# --- whole weights ---------------------------------------------------------------------------


def group_blocks(weight: torch.Tensor, group_size: int) -> list[torch.Tensor]:
    """Split W [N, K] into row blocks: full groups [N*(K//g), g] and partial last groups [N, K%g]."""
    n, k = weight.shape
    full = k // group_size
    blocks = []
    if full:
        blocks.append(weight[:, : full * group_size].reshape(n * full, group_size))
    if k % group_size:
        blocks.append(weight[:, full * group_size :])
    return blocks


def merge_blocks(per_block: list[torch.Tensor], n: int) -> torch.Tensor:
    """Inverse of `group_blocks` for per-group [R] values or codes [R, L] -> [N, ...]."""
    parts = [p.reshape(n, -1) for p in per_block]
    return torch.cat(parts, dim=1)


@dataclass
class QuantizedWeight:
    """One linear's quantized form: codes [N, K], fp16 scales and offsets [N, ceil(K/g)]."""

    codes: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor


def quantize_weight(
    weight: torch.Tensor, codebook: Codebook, group_size: int, spec: InitSpec
) -> QuantizedWeight:
    """Quantize W [N, K] group-wise along K with the initializer `spec` (no calibration)."""
    w = weight.float()
    nearest = NearestCode(codebook, w.device)
    results = []
    for rows in group_blocks(w, group_size):
        s, z = init_range(rows, codebook, spec)
        results.append(quantize_groups(rows, s, z, nearest))
    n = w.shape[0]
    return QuantizedWeight(
        codes=merge_blocks([r.codes for r in results], n),
        scales=merge_blocks([r.scales for r in results], n),
        offsets=merge_blocks([r.offsets for r in results], n),
    )
