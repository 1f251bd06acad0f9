"""The `daq` quantization method for vLLM: `DAQConfig` and `DAQLinearMethod`.

Imports vllm; loaded only by `daq_vllm.plugin.register()`. The classes live at module level
because vLLM pickles the quantization config into its engine and worker processes.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import torch
from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    UnquantizedLinearMethod,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.quantization.utils.quant_utils import is_layer_skipped
from vllm.model_executor.parameter import GroupQuantScaleParameter, PackedvLLMParameter

from .format import QUANT_METHOD, DAQFormat
from .kernels import daq_linear, packed_words


class DAQConfig(QuantizationConfig):
    """A DAQ checkpoint's `quantization_config` (validated by DAQFormat, naming a bad field)."""

    def __init__(self, fmt: DAQFormat):
        super().__init__()
        self.fmt = fmt

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float16, torch.bfloat16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 75  # Triton kernels; the CPU platform skips this check

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "DAQConfig":
        return cls(DAQFormat.from_dict(config))

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, LinearBase):
            if is_layer_skipped(prefix, self.fmt.modules_not_converted, self.packed_modules_mapping):
                return UnquantizedLinearMethod()
            return DAQLinearMethod(self)
        return None


@register_weight_loader_v2_supported_method
class DAQLinearMethod(LinearMethodBase):
    """Packed codes + fp16 scale/offset per group along K; computes with `daq_linear`."""

    def __init__(self, config: DAQConfig):
        self.fmt = config.fmt

    def create_weights(self, layer, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs):
        bits, g = self.fmt.bits, self.fmt.group_size
        k = input_size_per_partition
        if k != input_size and (k % g or (k * bits) % 32):
            raise ValueError(
                f"DAQ: a tensor-parallel shard of {k} inputs (of {input_size}) cuts a group of {g} or an "
                f"int32 word of {bits}-bit codes; use a tensor-parallel size that divides the groups evenly"
            )
        n = sum(output_partition_sizes)
        groups = -(-k // g)
        loader = extra_weight_attrs["weight_loader"]
        layer.register_parameter("qweight", PackedvLLMParameter(
            data=torch.empty(n, packed_words(k, bits), dtype=torch.int32), input_dim=1, output_dim=0,
            packed_dim=1, packed_factor=Fraction(32, bits), weight_loader=loader))
        for name in ("scales", "offsets"):
            layer.register_parameter(name, GroupQuantScaleParameter(
                data=torch.empty(n, groups, dtype=torch.float16), input_dim=1, output_dim=0, weight_loader=loader))
        layer.daq_in_features = k

    def process_weights_after_loading(self, layer) -> None:
        for name in ("qweight", "scales", "offsets"):
            setattr(layer, name, torch.nn.Parameter(getattr(layer, name).data, requires_grad=False))
        layer.register_buffer("daq_codebook", torch.tensor(self.fmt.codebook, dtype=torch.float32,
                                                           device=layer.qweight.device), persistent=False)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return daq_linear(x, layer.qweight, layer.scales, layer.offsets, layer.daq_codebook,
                          self.fmt.bits, self.fmt.group_size, bias)

