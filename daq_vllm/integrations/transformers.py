"""Load DAQ checkpoints with `transformers.AutoModelForCausalLM.from_pretrained`.

Importing `daq_vllm` registers the `daq` quant method in transformers' quantizer registry. Before
the weights load, every converted nn.Linear is swapped for a `DAQLinear` holding the packed tensors,
which then load by name from the checkpoint; each then computes with the kernel chosen for it
(`daq_vllm.kernels.choose_kernel`).
"""

from __future__ import annotations

from collections.abc import Sequence
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

from ..experts import CheckpointNames, defuse_experts
from ..format import QUANT_METHOD, DAQFormat, num_groups, packed_words
from ..kernels import LinearKernel, LinearSpec, choose_kernel, dequantize


class DAQLinear(nn.Module):
    """A linear layer stored in the DAQ format; computes `x @ W_hat^T + bias` with its kernel.

    The kernel is chosen by `select_kernels` once the weights are loaded (transformers' loader
    does it, and `daq_vllm.load` again after moving the model to its device).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, fmt: DAQFormat):
        """`fmt` is this linear's single-codebook view (`DAQFormat.for_module`)."""
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.fmt = fmt
        groups = num_groups(in_features, fmt.group_size)
        self.qweight = nn.Parameter(
            torch.zeros(out_features, packed_words(in_features, fmt.bits), dtype=torch.int32), requires_grad=False
        )
        self.scales = nn.Parameter(torch.zeros(out_features, groups, dtype=torch.float16), requires_grad=False)
        self.offsets = nn.Parameter(torch.zeros(out_features, groups, dtype=torch.float16), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.kernel: LinearKernel | None = None

    def select_kernel(self, act_dtype: torch.dtype, preferred: Sequence[str] = ()) -> None:
        """Choose and prepare the kernel for where the weights are now."""
        spec = LinearSpec.of(self.fmt, self.in_features, self.out_features, act_dtype, self.qweight.device.type)
        self.kernel = choose_kernel(spec, preferred)
        self.kernel.prepare(self)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight [out, in] this layer computes with (docs/FORMAT.md)."""
        codebook = torch.tensor(self.fmt.codebook, dtype=torch.float32, device=self.qweight.device)
        return dequantize(self.qweight, self.scales, self.offsets, codebook, self.fmt.bits, self.fmt.group_size,
                          self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is None:
            raise RuntimeError("DAQLinear has no kernel: load the model with from_pretrained or daq_vllm.load")
        return self.kernel.apply(self, x, self.bias)

    def extra_repr(self) -> str:
        kernel = self.kernel.name if self.kernel is not None else None
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.fmt.bits}, "
                f"group_size={self.fmt.group_size}, kernel={kernel}")


def select_kernels(model: nn.Module, preferred: str | None = None) -> None:
    """(Re)choose every DAQLinear's kernel for its current device and the model's dtype (that of its
    input embedding: DAQLinear's own fp16 scales say nothing of it)."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    dtype = embedding.weight.dtype if embedding is not None else torch.float32
    for module in model.modules():
        if isinstance(module, DAQLinear):
            module.select_kernel(dtype, (preferred,) if preferred else ())


def replace_linears(model: nn.Module, fmt: DAQFormat) -> int:
    """Swap each converted nn.Linear of `model` for a DAQLinear with its own codebook; return how many.

    Fused experts become one linear per expert projection first (`daq_vllm.experts`), as the
    checkpoint stores them. `fmt` names modules as the checkpoint does, which for some models
    (Mixtral) is not as the transformers model does.
    """
    defuse_experts(model)
    names = CheckpointNames(model)
    swapped = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = names.to_checkpoint(f"{name}.{child_name}" if name else child_name)
            if isinstance(child, nn.Linear) and fmt.is_converted(full):
                with torch.device("meta"):
                    layer = DAQLinear(child.in_features, child.out_features, child.bias is not None,
                                      fmt.for_module(full))
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
        # The loader re-wraps float tensors as trainable parameters: kernels freeze them again.
        select_kernels(model)
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
