"""The checkpoint contract (docs/FORMAT.md): config fields, tensor names and their validation.

Everything that reads a DAQ checkpoint (the transformers loader, the vLLM plugin, third parties)
goes through `DAQFormat.from_dict`, so a bad config fails the same way everywhere, naming the field.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import DAQError

QUANT_METHOD = "daq"
FORMAT_VERSION = 1
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
    format_version: int = FORMAT_VERSION
    quant_method: str = QUANT_METHOD
    # How the checkpoint was made (method, DCA/LDRA settings, calibration, tool version).
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

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
        if version != FORMAT_VERSION:
            raise DAQError(
                f"quantization_config.format_version {version!r} is not supported by this daq-vllm "
                f"(it reads version {FORMAT_VERSION}); upgrade daq-vllm or re-quantize"
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
        if not isinstance(codebook, list) or len(codebook) != 2**bits:
            raise DAQError(
                f"quantization_config.codebook must be a list of {2**bits} numbers for {bits}-bit codes"
            )
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in codebook):
            raise DAQError("quantization_config.codebook holds a value that is not a finite number")
        not_converted = cfg.get("modules_not_converted", [])
        if not isinstance(not_converted, list) or not all(isinstance(m, str) for m in not_converted):
            raise DAQError("quantization_config.modules_not_converted must be a list of module names")
        return cls(
            format=str(need("format")),
            bits=bits,
            group_size=group_size,
            codebook=[float(v) for v in codebook],
            modules_not_converted=list(not_converted),
            format_version=version,
            provenance=dict(cfg.get("provenance", {})),
        )

    def is_converted(self, module_name: str) -> bool:
        """Whether the linear `module_name` is stored quantized (exact names, or any parent prefix)."""
        return not any(
            module_name == m or module_name.startswith(m + ".") for m in self.modules_not_converted
        )

    @property
    def bits_per_weight(self) -> float:
        """Storage cost of one weight: its code plus its share of the fp16 scale and offset."""
        return self.bits + 32 / self.group_size
