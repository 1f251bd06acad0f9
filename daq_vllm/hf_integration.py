"""Load DAQ checkpoints with `transformers.AutoModelForCausalLM.from_pretrained`.

Importing `daq_vllm` registers the `daq` quant method in transformers' quantizer registry. Before
the weights load, every converted nn.Linear is swapped for a `DAQLinear` holding the packed tensors,
which then load by name from the checkpoint and compute with the torch reference.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .format import QUANT_METHOD, DAQFormat
from .kernels import daq_linear, dequantize, packed_words


class DAQLinear(nn.Module):
    """A linear layer stored in the DAQ format; computes `x @ W_hat^T + bias` from the packed codes."""

    def __init__(self, in_features: int, out_features: int, bias: bool, fmt: DAQFormat):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = fmt.bits, fmt.group_size
        n_groups = -(-in_features // fmt.group_size)
        self.qweight = nn.Parameter(
            torch.zeros(out_features, packed_words(in_features, fmt.bits), dtype=torch.int32), requires_grad=False
        )
        self.scales = nn.Parameter(torch.zeros(out_features, n_groups, dtype=torch.float16), requires_grad=False)
        self.offsets = nn.Parameter(torch.zeros(out_features, n_groups, dtype=torch.float16), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.register_buffer("codebook", torch.tensor(fmt.codebook, dtype=torch.float32), persistent=False)
        self._cached_weight: torch.Tensor | None = None

    def cache_dequantized(self, enabled: bool = True) -> None:
        """Keep the dequantized weight between calls: faster repeated forwards (evaluation), at the
        memory cost of a full-precision copy. Outputs are identical either way."""
        self._cached_weight = None
        self._cache = enabled

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight [out, in] this layer computes with (docs/FORMAT.md)."""
        return dequantize(
            self.qweight, self.scales, self.offsets, self.codebook, self.bits, self.group_size, self.in_features
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self, "_cache", False):
            if self._cached_weight is None or self._cached_weight.dtype != x.dtype:
                self._cached_weight = self.dequantized_weight().to(x.dtype)
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return torch.nn.functional.linear(x, self._cached_weight, bias)
        return daq_linear(  # Triton kernels on CUDA, torch reference on CPU
            x, self.qweight, self.scales, self.offsets, self.codebook, self.bits, self.group_size, self.bias
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, group_size={self.group_size}"


def replace_linears(model: nn.Module, fmt: DAQFormat) -> int:
    """Swap each converted nn.Linear of `model` for a DAQLinear; return how many were swapped."""
    swapped = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and fmt.is_converted(full):
                with torch.device("meta"):
                    layer = DAQLinear(child.in_features, child.out_features, child.bias is not None, fmt)
                setattr(module, child_name, layer)
                swapped += 1
    return swapped


class DAQHfConfig(QuantizationConfigMixin):
    """transformers' view of a DAQ `quantization_config` (validated through DAQFormat)."""

    def __init__(self, **kwargs: Any):
        self.daq_format = DAQFormat.from_dict(kwargs)
        self.quant_method = QUANT_METHOD
        self.extra = {k: v for k, v in kwargs.items() if k not in self.daq_format.to_dict()}

    def to_dict(self) -> dict[str, Any]:
        return {**self.daq_format.to_dict(), **self.extra}

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()


class DAQHfQuantizer(HfQuantizer):
    """Loads pre-quantized DAQ checkpoints (quantizing on load is `daq-vllm quantize`'s job)."""

    requires_calibration = True

    def _process_model_before_weight_loading(self, model, **kwargs):
        fmt = self.quantization_config.daq_format
        if replace_linears(model, fmt) == 0:
            raise ValueError("DAQ checkpoint: no linear layer of the model is marked as quantized")
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        # The codebook is not a checkpoint tensor: transformers leaves it uninitialised on load.
        # The loader also re-wraps float tensors as trainable parameters; these are frozen codes.
        values = self.quantization_config.daq_format.codebook
        for module in model.modules():
            if isinstance(module, DAQLinear):
                module.codebook = torch.tensor(values, dtype=torch.float32, device=module.qweight.device)
                for p in module.parameters():
                    p.requires_grad_(False)
        return model

    def is_serializable(self) -> bool:
        return False

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register the `daq` quant method with transformers (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(DAQHfConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(DAQHfQuantizer)
