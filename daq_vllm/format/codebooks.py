"""Named codebooks: the single source of truth for every format's values, in code order.

A checkpoint stores the chosen codebook's values in config.json, so loaders never look a name up
here; this table is what the quantizer writes. Code order matters: for the FP formats the top bit
of a code is the sign, so a kernel may decode `fp4_e2m1` by bit manipulation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_E2M1_REF = (0.0, 0.0625, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_E2M0 = (0.0, 1.0, 2.0, 4.0)
# QLoRA NF4 (Dettmers et al. 2023), as in bitsandbytes.
_NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def _sign_magnitude(magnitudes: tuple[float, ...]) -> tuple[float, ...]:
    """Codes 0..n-1 are +magnitudes, codes n..2n-1 the same negated (code n is -0)."""
    return magnitudes + tuple(-m for m in magnitudes)


E2M1_VALUES = _sign_magnitude(_E2M1)


def decode_kind(values: list[float] | tuple[float, ...]) -> str:
    """How a kernel may turn a code into its value: `e2m1` (from the code's sign/exponent/mantissa
    bits), `int` (the code itself, a uniform 0..2**bits-1 grid) or `table` (a lookup)."""
    values = tuple(float(v) for v in values)
    if values == E2M1_VALUES:
        return "e2m1"
    if values == tuple(float(i) for i in range(len(values))):
        return "int"
    return "table"


# Decode kinds from the cheapest for a kernel to the dearest: `--format auto` breaks ties by it.
DECODE_ORDER: tuple[str, ...] = ("int", "e2m1", "table")


def decode_cost(values: list[float] | tuple[float, ...]) -> int:
    """Rank of the codebook's decode kind in DECODE_ORDER (0 = the cheapest to decode)."""
    return DECODE_ORDER.index(decode_kind(values))


@dataclass(frozen=True)
class Codebook:
    """A format: its name, bit width and the value of each code."""

    name: str
    bits: int
    values: tuple[float, ...]
    integer_grid: bool = False  # uniform integer grid 0..2**bits-1 (RTN rounds its zero point)
    description: str = ""

    def tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.tensor(self.values, dtype=torch.float32, device=device)

    @property
    def lo(self) -> float:
        return min(self.values)

    @property
    def hi(self) -> float:
        return max(self.values)


CODEBOOKS: dict[str, Codebook] = {
    cb.name: cb
    for cb in (
        Codebook("fp4_e2m1", 4, E2M1_VALUES, description="OCP FP4 E2M1"),
        Codebook("nf4", 4, _NF4, description="QLoRA NormalFloat4"),
        Codebook(
            "fp4_e2m1_ref", 4, _sign_magnitude(_E2M1_REF),
            description="DAQ reference code's FP4 table (0.5 replaced by 0.0625)",
        ),
        Codebook("int4", 4, tuple(float(i) for i in range(16)), True, "uniform 0..15"),
        Codebook("fp3_e2m0", 3, _sign_magnitude(_E2M0), description="FP3 E2M0, +-{0,1,2,4}"),
        Codebook("int3", 3, tuple(float(i) for i in range(8)), True, "uniform 0..7"),
    )
}


def get_codebook(name: str) -> Codebook:
    """Look a format up by name, with an error that lists the known ones."""
    try:
        return CODEBOOKS[name]
    except KeyError:
        raise ValueError(f"unknown format {name!r}; choose one of: {', '.join(CODEBOOKS)}") from None
