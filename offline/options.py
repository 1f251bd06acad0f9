"""What a quantization run is asked to do: `QuantizeOptions`, the named recipes, and their checks.

A recipe is a method name ("daq", "rtn", "absmax", "dca") with a rounding ("gptq" or "nearest"):
`RECIPES` is the one table of them. The CLI's `--method` choices, benchmarks/quality.py's row
names and the provenance's `method` all read it, so a method is added in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from daq_vllm.errors import DAQError
from daq_vllm.experts import CALIBRATE_ALL, CALIBRATE_ROUTED
from daq_vllm.format import CODEBOOKS, SUPPORTED_GROUP_SIZES, Codebook, get_codebook

from .auto_format import AutoSpec
from .calibration import CalibSpec
from .compensated import CompensationSpec
from .ldra import LDRASpec
from .ranges import InitSpec


@dataclass(frozen=True)
class Recipe:
    """A named method: its initializer, whether it calibrates (LDRA), and its default rounding."""

    init: str  # a key of ranges.INIT_METHODS
    calibrated: bool
    rounding: str  # one of ROUNDINGS, used when the caller names none


AUTO = "auto"  # --format auto: each linear (each group reading one input) gets the candidate of lowest loss
# --format auto's candidates when --formats names none: the 4-bit codebooks a kernel decodes
# (fp4_e2m1_ref is the reference code's variant of fp4_e2m1, kept for comparison only).
AUTO_CANDIDATES: tuple[str, ...] = ("nf4", "fp4_e2m1", "int4")
# The codebook when none is named. A calibrated run chooses per linear (AUTO): on SmolLM2 it matched
# the best single codebook (nf4) at g64 and g128 and beat the former default fp4_e2m1, in under 1.5x
# a single codebook's time (benchmarks/results/quality.md), and on a model whose weights fit nf4 badly
# it keeps int4 where that fits better. Without calibration there is no loss to choose by.
DEFAULT_FORMAT, UNCALIBRATED_FORMAT = AUTO, "fp4_e2m1"
ROUNDINGS: tuple[str, ...] = ("gptq", "nearest")  # GPTQ-style error-compensated codes, or the nearest ones
RECIPES: dict[str, Recipe] = {
    "daq": Recipe(init="dca", calibrated=True, rounding="gptq"),
    "rtn": Recipe(init="rtn", calibrated=False, rounding="nearest"),
    "absmax": Recipe(init="absmax", calibrated=False, rounding="nearest"),
    "dca": Recipe(init="dca", calibrated=False, rounding="nearest"),
}


@dataclass
class QuantizeOptions:
    """Everything `quantize_model` needs besides the input and output paths.

    `ldra=None` quantizes from the initializer alone (no calibration); with an LDRASpec the run
    calibrates on `calib` and tunes each group (the full DAQ when `init.method` is "dca").
    `compensation` (with LDRA only) re-chooses the codes on the tuned grids GPTQ-style.
    """

    format: str | None = None  # a codebook name, or AUTO; None: DEFAULT_FORMAT, UNCALIBRATED_FORMAT without LDRA
    formats: tuple[str, ...] = ()  # AUTO's candidates, one bit width (empty: AUTO_CANDIDATES)
    auto: AutoSpec = field(default_factory=AutoSpec)
    group_size: int = 128
    init: InitSpec = field(default_factory=InitSpec)
    ldra: LDRASpec | None = None
    compensation: CompensationSpec | None = None
    calib: CalibSpec = field(default_factory=CalibSpec)
    sequential: bool = False
    # asymmetric calibration (asymmetric.py): the share alpha of the step towards the float model's
    # outputs from the quantized model's inputs; 0 = off
    asymmetric: float = 0.0
    skip: list[str] = field(default_factory=list)
    quantize_lm_head: bool = False
    device: str = "cpu"
    max_shard_bytes: int = 2 * 1024**3
    max_memory: float | None = None  # GiB the compute device may use (None: all of it); see memory.py
    offload_activations: bool = False  # calibration activations between layers on the host, not the device
    overwrite: bool = False
    resume: bool = False
    progress: bool = True
    revision: str | None = None  # of a Hub model ID: a branch, tag or commit (None: main)
    # every expert sees every calibration token (only routed outputs flow on), or (CALIBRATE_ROUTED)
    # the tokens routed to it; `all` lost 4% less perplexity (benchmarks/results/moe_quality.md)
    moe_calibration: str = CALIBRATE_ALL
    # an expert projection whose statistics hold fewer than this share of the calibration tokens is
    # quantized by the initializer alone (GPTQModel's default threshold: 0.5%)
    moe_min_token_share: float = 0.005

    def __post_init__(self) -> None:
        if self.format is None:
            self.format = DEFAULT_FORMAT if self.ldra is not None else UNCALIBRATED_FORMAT

    def method_name(self) -> str:
        """The recipe these options follow ("daq", "rtn+gptq"...); a calibrated run from another
        initializer than the recipe's is "<init>+ldra"."""
        calibrated = self.ldra is not None
        name = next(
            (n for n, r in RECIPES.items() if r.init == self.init.method and r.calibrated == calibrated),
            f"{self.init.method}+ldra",
        )
        return f"{name}+gptq" if self.compensation is not None else name


def recipe_options(
    method: str, rounding: str | None = None, *, init: InitSpec | None = None, ldra: LDRASpec | None = None,
    compensation: CompensationSpec | None = None, **options: Any,
) -> QuantizeOptions:
    """QuantizeOptions for the recipe `method` with `rounding` (the recipe's default when None).

    A calibrated recipe starts LDRA from `init` as given (the CLI's --ldra-init; the recipe's
    initializer by default) and tunes with `ldra` (defaults: LDRASpec()); the others quantize with
    their own initializer, keeping `init`'s DCA settings. The gptq rounding uses `compensation`
    (default: CompensationSpec()). `options` are the remaining fields.
    """
    if method not in RECIPES or rounding not in (None, *ROUNDINGS):
        raise DAQError(f"unknown recipe {method!r} with rounding {rounding!r}; methods are {', '.join(RECIPES)}, "
                       f"roundings {', '.join(ROUNDINGS)}")
    recipe = RECIPES[method]
    init = init if init is not None else InitSpec(method=recipe.init)
    if not recipe.calibrated:
        init = replace(init, method=recipe.init)
    rounding = rounding or recipe.rounding
    return QuantizeOptions(
        init=init,
        ldra=(ldra if ldra is not None else LDRASpec()) if recipe.calibrated else None,
        compensation=(compensation or CompensationSpec()) if rounding == "gptq" else None,
        **options,
    )


def candidate_codebooks(opts: QuantizeOptions) -> list[Codebook]:
    """The codebooks a run may store: the one named by `format`, or AUTO's candidates in order."""
    if opts.format != AUTO:
        return [get_codebook(opts.format)]
    return [get_codebook(name) for name in dict.fromkeys(opts.formats or AUTO_CANDIDATES)]


def check_options(opts: QuantizeOptions) -> None:
    """Refuse options that cannot work before anything slow starts, naming the fix."""
    if opts.formats and opts.format != AUTO:
        raise DAQError(f"--formats lists the candidates of --format {AUTO}, not of --format {opts.format}; "
                       f"add --format {AUTO} or drop --formats")
    unknown = [f for f in (opts.formats or (opts.format,)) if f != AUTO and f not in CODEBOOKS]
    if unknown:
        raise DAQError(f"unknown format {unknown[0]!r}; choose from {AUTO}, {', '.join(CODEBOOKS)}")
    if len({cb.bits for cb in candidate_codebooks(opts)}) > 1:
        listed = ", ".join(f"{cb.name} ({cb.bits}-bit)" for cb in candidate_codebooks(opts))
        raise DAQError(f"--formats mixes bit widths ({listed}); list codebooks of one bit width")
    if opts.format == AUTO and opts.ldra is None:
        raise DAQError(f"--format {AUTO} chooses each linear's codebook by its calibration loss; use it with "
                       f"--method daq, not {opts.init.method}")
    if opts.group_size not in SUPPORTED_GROUP_SIZES:
        raise DAQError(
            f"group size {opts.group_size} is not supported; choose one of "
            f"{', '.join(map(str, SUPPORTED_GROUP_SIZES))}"
        )
    if opts.compensation is not None and opts.ldra is None:
        raise DAQError(
            f"--rounding gptq needs calibration statistics; use it with --method daq, not {opts.init.method}"
        )
    if not 0 <= opts.asymmetric <= 1:
        raise DAQError(f"--asymmetric {opts.asymmetric:g} is not a share of the step; give a number from 0 (off) to 1")
    if opts.asymmetric and opts.ldra is None:
        raise DAQError(f"--asymmetric needs calibration statistics; use it with --method daq, not {opts.init.method}")
    if opts.moe_calibration not in (CALIBRATE_ROUTED, CALIBRATE_ALL):
        raise DAQError(f"unknown --moe-calibration {opts.moe_calibration!r}; "
                       f"choose {CALIBRATE_ROUTED} or {CALIBRATE_ALL}")
    if not 0 <= opts.moe_min_token_share < 1:
        raise DAQError(f"--moe-min-tokens {opts.moe_min_token_share:g} is not a share of the calibration tokens; "
                       "give a number from 0 to below 1 (e.g. 0.005)")
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise DAQError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
