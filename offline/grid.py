"""The rounding grid of a group: nearest-codebook rounding onto the fp16 parameters a checkpoint stores.

Notation (paper): per group, `w_hat = s * (c[q] - z)`; the checkpoint stores the scale `s` and the
offset `b = -s*z` in fp16. We round `s` and `b` to fp16 *before* choosing codes, so the codes are
the nearest ones for the parameters actually stored and the fake-quant weight equals what a loader
decodes, bit for bit (decoding is `kernels.reference.decode_values`, the one formula).

Groups are handled as a 2-D block `rows [R, L]` (R groups of L inputs). A weight [N, K] becomes a
block of full groups and, when g does not divide K, a block of partial last groups: `split_groups`
is the one place that cuts K that way (weights here, input statistics in `moments.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from daq_vllm.format.codebooks import Codebook
from daq_vllm.kernels.reference import decode_values, expand_groups

MIN_SCALE = 2.0**-24  # smallest positive fp16 (subnormal): a stored scale is never 0
# Output rows a linear is quantized in at once: N x K weights of LDRA, compensation and screening
# take about a dozen float copies of their rows, so a row chunk holds at most this many weights
# (64 MiB a copy). It depends on K alone, so results never depend on the machine's memory.
ROW_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class GroupSpan:
    """Inputs `[start, stop)` of K, cut into `count` groups of `length` inputs each."""

    start: int
    stop: int
    count: int
    length: int
    partial: bool  # the last group, shorter than the group size


def split_groups(k: int, group_size: int) -> list[GroupSpan]:
    """K inputs as one span of the full groups (if any), then the partial last group (if any)."""
    full = k // group_size
    spans = []
    if full:
        spans.append(GroupSpan(0, full * group_size, full, group_size, partial=False))
    if k % group_size:
        spans.append(GroupSpan(full * group_size, k, 1, k % group_size, partial=True))
    return spans


def row_chunks(n: int, k: int) -> list[slice]:
    """Output rows [0, N) of a weight [N, K] in chunks of at most ROW_CHUNK_ELEMENTS weights."""
    rows = max(1, ROW_CHUNK_ELEMENTS // max(k, 1))
    return [slice(r, min(r + rows, n)) for r in range(0, n, rows)]


def group_blocks(weight: torch.Tensor, group_size: int) -> list[torch.Tensor]:
    """Split W [N, K] into row blocks: full groups [N*(K//g), g], then partial last groups [N, K%g]."""
    n, k = weight.shape
    return [weight[:, s.start : s.stop].reshape(n * s.count, s.length) for s in split_groups(k, group_size)]


def merge_blocks(per_block: list[torch.Tensor], n: int) -> torch.Tensor:
    """Inverse of `group_blocks` for per-group [R] values or codes [R, L] -> [N, ...]."""
    return torch.cat([p.reshape(n, -1) for p in per_block], dim=1)


@dataclass
class QuantizedGroups:
    """Codes [R, L] with the fp16 scale and offset [R] of each group."""

    codes: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor


@dataclass
class QuantizedWeight:
    """One linear's quantized form: codes [N, K], fp16 scales and offsets [N, ceil(K/g)]."""

    codes: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor

    @classmethod
    def from_blocks(cls, blocks: list[QuantizedGroups], n: int) -> QuantizedWeight:
        """Reassemble the blocks of `group_blocks` (each quantized on its own) into W's layout."""
        return cls(
            codes=merge_blocks([b.codes for b in blocks], n),
            scales=merge_blocks([b.scales for b in blocks], n),
            offsets=merge_blocks([b.offsets for b in blocks], n),
        )


class NearestCode:
    """Nearest-codebook rounding by bucketizing against midpoints (no loop over codes).

    Saturating: inputs beyond the ends take the end codes. Ties (an input exactly on a midpoint)
    go to the smaller value. Codebooks with repeated values (+0 and -0 in the FP formats) use the
    lowest code that holds the value.
    """

    def __init__(self, codebook: Codebook, device: torch.device | str):
        distinct = sorted(set(codebook.values))
        self.values = torch.tensor(distinct, dtype=torch.float32, device=device)
        self.codes = torch.tensor([codebook.values.index(v) for v in distinct], dtype=torch.int64, device=device)
        self.midpoints = (self.values[1:] + self.values[:-1]) / 2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.codes[torch.bucketize(x, self.midpoints)]


def stored_params(scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp16 (scale, offset) that a checkpoint stores for float (s, z)."""
    s16 = scale.clamp_min(MIN_SCALE).to(torch.float16)
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
    """`s*c[q] + b` in float32 for groups [R, L], by the checkpoint's own decoding formula."""
    return decode_values(q.codes, q.scales[:, None], q.offsets[:, None], codebook_values)


def dequantize_weight(qw: QuantizedWeight, codebook_values: torch.Tensor, group_size: int) -> torch.Tensor:
    """W_hat [N, K] in float32 of a quantized linear (unpacked codes), by the checkpoint's formula."""
    k = qw.codes.shape[1]
    scales = expand_groups(qw.scales.float(), group_size, k)
    offsets = expand_groups(qw.offsets.float(), group_size, k)
    return decode_values(qw.codes, scales, offsets, codebook_values)
