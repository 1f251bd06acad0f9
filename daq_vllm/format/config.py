"""The checkpoint contract (docs/FORMAT.md): config fields, tensor names and their validation.

Everything that reads a DAQ checkpoint (the transformers loader, the vLLM plugin, third parties)
goes through `DAQFormat.from_dict`, so a bad config fails the same way everywhere, naming the field.

Version 1 has one codebook for every linear. Version 2 (written only when a checkpoint mixes
codebooks, `--format auto`) adds `module_formats` (module -> format name, for the modules whose
codebook is not `format`'s) and `codebooks` (the values of each of those formats, once). A version-1
reader would decode such a checkpoint with the wrong codebook, hence the bump; single-codebook
checkpoints stay version 1. Loaders ask `for_module(name)` for one linear's single-codebook view.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..errors import DAQError

QUANT_METHOD = "daq"
SINGLE_CODEBOOK_VERSION = 1
MIXED_CODEBOOK_VERSION = 2
FORMAT_VERSION = MIXED_CODEBOOK_VERSION  # the newest version this package reads
SUPPORTED_BITS = (3, 4)
SUPPORTED_GROUP_SIZES = (32, 64, 128, 256)


@dataclass
class DAQFormat:
    """The `quantization_config` of a DAQ checkpoint."""

    format: str
    bits: int
    group_size: int
    codebook: list[float]
    modules_not_converted: list[str] = field(default_factory=list)
    format_version: int = SINGLE_CODEBOOK_VERSION
    quant_method: str = QUANT_METHOD
    # How the checkpoint was made (method, DCA/LDRA settings, calibration, tool version).
    provenance: dict[str, Any] = field(default_factory=dict)
    # Version 2: module name -> format name where it is not `format`, and those formats' values.
    module_formats: dict[str, str] = field(default_factory=dict)
    codebooks: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The config.json dict; a single-codebook format leaves out the version-2 fields."""
        out = asdict(self)
        if not self.module_formats:
            del out["module_formats"], out["codebooks"]
        return out

    @classmethod
    def mixed(cls, by_module: dict[str, tuple[str, list[float]]], **fields: Any) -> "DAQFormat":
        """The format of a checkpoint whose quantized modules have the (name, values) codebooks given.

        The most common codebook becomes `format` (ties: the first met); the others go to
        `module_formats` and `codebooks`. One codebook in all gives a version-1 format.
        """
        counts: dict[str, int] = {}
        values: dict[str, list[float]] = {}
        for name, vals in by_module.values():
            counts[name] = counts.get(name, 0) + 1
            values[name] = list(vals)
        default = max(counts, key=counts.__getitem__)
        others = {m: name for m, (name, _) in by_module.items() if name != default}
        return cls(
            format=default, codebook=values[default],
            format_version=MIXED_CODEBOOK_VERSION if others else SINGLE_CODEBOOK_VERSION,
            module_formats=others, codebooks={name: values[name] for name in sorted(set(others.values()))},
            **fields,
        )

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "DAQFormat":
        """Validate a `quantization_config` dict; raise DAQError naming the first bad field."""

        def need(name: str) -> Any:
            if name not in cfg:
                raise DAQError(f"quantization_config is missing the field {name!r}")
            return cfg[name]

        if need("quant_method") != QUANT_METHOD:
            raise DAQError(f"quantization_config.quant_method is {cfg['quant_method']!r}, expected 'daq'")
        version = need("format_version")
        if version not in (SINGLE_CODEBOOK_VERSION, MIXED_CODEBOOK_VERSION):
            raise DAQError(
                f"quantization_config.format_version {version!r} is not supported by this daq-vllm "
                f"(it reads versions {SINGLE_CODEBOOK_VERSION} and {FORMAT_VERSION}); upgrade daq-vllm or re-quantize"
            )
        bits = need("bits")
        if bits not in SUPPORTED_BITS:
            raise DAQError(f"quantization_config.bits {bits!r} is not supported (supported: {SUPPORTED_BITS})")
        group_size = need("group_size")
        if group_size not in SUPPORTED_GROUP_SIZES:
            raise DAQError(
                f"quantization_config.group_size {group_size!r} is not supported "
                f"(supported: {SUPPORTED_GROUP_SIZES})"
            )
        codebook = need("codebook")
        _check_values("codebook", codebook, bits)
        fmt_name = str(need("format"))
        module_formats, codebooks = _mixed_fields(cfg, version, fmt_name, bits)
        not_converted = cfg.get("modules_not_converted", [])
        if not isinstance(not_converted, list) or not all(isinstance(m, str) for m in not_converted):
            raise DAQError("quantization_config.modules_not_converted must be a list of module names")
        return cls(
            format=fmt_name,
            bits=bits,
            group_size=group_size,
            codebook=[float(v) for v in codebook],
            modules_not_converted=list(not_converted),
            format_version=version,
            provenance=dict(cfg.get("provenance", {})),
            module_formats=module_formats,
            codebooks=codebooks,
        )

    def is_converted(self, module_name: str) -> bool:
        """Whether the linear `module_name` is stored quantized (exact names, or any parent prefix)."""
        return not any(
            module_name == m or module_name.startswith(m + ".") for m in self.modules_not_converted
        )

    def codebook_names(self) -> list[str]:
        """The codebooks the checkpoint uses: `format`, then those of `module_formats` (version 2)."""
        return [self.format, *self.codebooks]

    def format_of(self, module_name: str) -> str:
        """The name of the codebook the quantized linear `module_name` is stored with."""
        return self.module_formats.get(module_name, self.format)

    def for_module(self, module_name: str) -> "DAQFormat":
        """The single-codebook view of one linear: what its loader and kernel compute with."""
        name = self.format_of(module_name)
        if name == self.format:
            return replace(self, module_formats={}, codebooks={})
        return replace(self, format=name, codebook=list(self.codebooks[name]), module_formats={}, codebooks={})

    @property
    def bits_per_weight(self) -> float:
        """Storage cost of one weight: its code plus its share of the fp16 scale and offset."""
        return self.bits + 32 / self.group_size


def _check_values(field_name: str, values: Any, bits: int) -> None:
    """A codebook: a list of 2**bits finite numbers."""
    if not isinstance(values, list) or len(values) != 2**bits:
        raise DAQError(f"quantization_config.{field_name} must be a list of {2**bits} numbers for {bits}-bit codes")
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        raise DAQError(f"quantization_config.{field_name} holds a value that is not a finite number")


def _mixed_fields(
    cfg: dict[str, Any], version: int, default: str, bits: int
) -> tuple[dict[str, str], dict[str, list[float]]]:
    """Validated `module_formats` and `codebooks` (version 2 only; both empty in version 1)."""
    module_formats, codebooks = cfg.get("module_formats", {}), cfg.get("codebooks", {})
    if version == SINGLE_CODEBOOK_VERSION:
        if module_formats or codebooks:
            raise DAQError("quantization_config.module_formats needs format_version 2 (1 has one codebook for all "
                           "linears); set format_version to 2 or re-quantize")
        return {}, {}
    if not isinstance(module_formats, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in module_formats.items()
    ):
        raise DAQError("quantization_config.module_formats must map module names to format names")
    if not isinstance(codebooks, dict):
        raise DAQError("quantization_config.codebooks must map format names to lists of values")
    if default in codebooks:
        raise DAQError(f"quantization_config.codebooks lists {default!r}, the default format whose values are "
                       "in codebook; list each format once")
    for name, values in codebooks.items():
        _check_values(f"codebooks.{name}", values, bits)
    for module, name in module_formats.items():
        if name != default and name not in codebooks:
            raise DAQError(f"quantization_config.module_formats gives {module} the format {name!r}, which "
                           "quantization_config.codebooks does not list; add its values or re-quantize")
    return dict(module_formats), {name: [float(v) for v in values] for name, values in codebooks.items()}
