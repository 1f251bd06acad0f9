"""`--format auto`: choose each linear's codebook by the calibration loss of every candidate.

Which grid suits a linear depends on its weight distribution (uniform-like weights favour `int4`,
bell-shaped ones `nf4`), and a user cannot know it in advance; so every candidate is tried on the
same calibration statistics and the lowest loss wins.

The cheap path: a candidate is *screened* with the run's range search (DCA + LDRA on the group
blocks) on every `screen_stride`-th output row only, and scored by the loss the run's rounding
minimises: the full output error `dw^T H dw` (H the full input second moment) of its nearest codes
when the run rounds with error compensation, else LDRA's block-diagonal loss. Both LDRA and the
compensated rounding treat output rows independently, so a row subset estimates the linear's
loss; only the winner is then quantized in full (all rows, compensated codes) by the pipeline.

Linears that read the same input (one `SecondMoments` accumulator: q/k/v_proj, gate/up_proj)
choose together, by the sum of their losses, so a layer vLLM fuses has one codebook. A candidate
within `tie_rtol` of the best loss that is cheaper to decode (`codebooks.DECODE_ORDER`) wins.
Without calibration statistics (a quantized lm_head) the loss is the squared weight error.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch

from daq_vllm.format.codebooks import Codebook, decode_cost

from .compensated import row_losses
from .grid import dequantize_weight, row_chunks
from .ldra import LDRASpec, quantize_weight_ldra
from .moments import SecondMoments
from .ranges import InitSpec, quantize_weight


@dataclass(frozen=True)
class AutoSpec:
    """Screening settings: the row stride of the subset each candidate is tried on, the tie tolerance."""

    screen_stride: int = 4
    tie_rtol: float = 0.002


@dataclass(frozen=True)
class Choice:
    """The codebook a linear is stored with, and its own screening loss per candidate ({} unscreened)."""

    codebook: Codebook
    losses: dict[str, float]


@dataclass(frozen=True)
class Screening:
    """What a candidate is screened with: the run's group size, initializer and LDRA settings, and
    whether its codes are rounded with error compensation (scored by the full-H loss)."""

    group_size: int
    init: InitSpec
    ldra: LDRASpec | None  # None: no calibration, then only one candidate is screened-free
    compensated: bool
    spec: AutoSpec


def screen_loss(
    w: torch.Tensor, codebook: Codebook, name: str, moments: SecondMoments | None, how: Screening
) -> float:
    """The loss of linear `name` (weight W [N, K]) stored with `codebook`, on its screened rows."""
    screened = w[:: how.spec.screen_stride]
    return sum(_chunk_loss(screened[rows], codebook, name, moments, how) for rows in row_chunks(*screened.shape))


def _chunk_loss(
    rows: torch.Tensor, codebook: Codebook, name: str, moments: SecondMoments | None, how: Screening
) -> float:
    """`screen_loss` of one chunk of the screened rows."""
    if moments is None:
        qw = quantize_weight(rows, codebook, how.group_size, how.init)
        return (dequantize_weight(qw, codebook.tensor(rows.device), how.group_size) - rows).square().sum().item()
    qw, stats = quantize_weight_ldra(rows, moments.moments(name), codebook, how.group_size, how.init, how.ldra)
    if not how.compensated:
        return stats.final_loss
    w_hat = dequantize_weight(qw, codebook.tensor(rows.device), how.group_size)
    return row_losses(w_hat, rows, moments.full_moment(name).to(rows.device)).sum().item()


def pick(losses: dict[str, float], candidates: list[Codebook], tie_rtol: float) -> Codebook:
    """The candidate of lowest loss; among those within `tie_rtol` of it, the cheapest to decode."""
    best = min(losses[cb.name] for cb in candidates)
    close = [cb for cb in candidates if losses[cb.name] <= best + tie_rtol * abs(best)]
    return min(close, key=lambda cb: (decode_cost(cb.values), losses[cb.name]))


def choose_codebooks(
    weights: dict[str, torch.Tensor], moments: SecondMoments | None, candidates: list[Codebook], how: Screening,
    shared: dict[str, str] | None = None, uncalibrated: Collection[str] = (),
) -> dict[str, Choice]:
    """A codebook for each linear of `weights` (one decoder layer's, or the head); one candidate
    is taken as it is, without screening.

    Linears that read one input choose together, and so do those `shared` maps to one key (a MoE
    layer's experts: vLLM runs them with one codebook). `uncalibrated` linears (experts routing
    left too few tokens) are screened by their weight error alone.
    """
    if len(candidates) == 1:
        return {name: Choice(candidates[0], {}) for name in weights}
    shared = shared or {}
    losses = {n: {cb.name: screen_loss(w, cb, n, None if n in uncalibrated else moments, how) for cb in candidates}
              for n, w in weights.items()}
    groups: dict[str, list[str]] = {}
    for name in weights:
        key = shared.get(name) or (moments.input_owner(name) if moments is not None else name)
        groups.setdefault(key, []).append(name)
    choices = {}
    for members in groups.values():
        total = {cb.name: sum(losses[m][cb.name] for m in members) for cb in candidates}
        winner = pick(total, candidates, how.spec.tie_rtol)
        choices.update({m: Choice(winner, losses[m]) for m in members})
    return choices
