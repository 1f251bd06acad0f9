"""`DAQLinearMethod`: vLLM's linear method for DAQ weights, glue around the kernel layer.

`create_weights` declares the packed tensors (vLLM's parameter classes shard them for tensor
parallelism) and chooses the layer's kernel once; `apply` is one call to it. Imports vllm.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearMethodBase, register_weight_loader_v2_supported_method
from vllm.model_executor.parameter import GroupQuantScaleParameter, PackedvLLMParameter

from ...errors import DAQError
from ...format import PACKED, num_groups, packed_words
from ...kernels import LinearSpec, choose_kernel
from .config import DAQConfig


def _named_loader(loader: Callable[..., None], tensor: str) -> Callable[..., None]:
    """Wrap vLLM's weight loader so that a checkpoint tensor that does not fit names itself.

    vLLM's parameter loaders fail with a bare `assert param.shape == loaded.shape`; the
    pre-flight check catches this for LLaMA-like models, this covers every other architecture.
    """

    def load(param: torch.nn.Parameter, loaded_weight: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        try:
            return loader(param, loaded_weight, *args, **kwargs)
        except (AssertionError, RuntimeError, ValueError) as e:
            shard = args[0] if args else kwargs.get("loaded_shard_id")
            part = f" (part {shard!r} of a fused layer)" if shard is not None else ""
            raise DAQError(
                f"cannot load tensor {tensor}{part}: checkpoint shape {list(loaded_weight.shape)} does not fit "
                f"the layer's {list(param.shape)} ({str(e) or type(e).__name__}); the checkpoint does not match "
                "config.json: re-quantize"
            ) from e

    return load


@register_weight_loader_v2_supported_method
class DAQLinearMethod(LinearMethodBase):
    """Packed codes + fp16 scale/offset per group along K; computes with the kernel chosen for the layer."""

    def __init__(self, config: DAQConfig, prefix: str = ""):
        self.fmt = config.layer_format(prefix)  # this layer's own codebook
        self.prefix = prefix

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
        groups = num_groups(k, g)
        loader = extra_weight_attrs["weight_loader"]
        layer.register_parameter("qweight", PackedvLLMParameter(
            data=torch.empty(n, packed_words(k, bits), dtype=torch.int32), input_dim=1, output_dim=0,
            packed_dim=1, packed_factor=Fraction(32, bits),
            weight_loader=_named_loader(loader, f"{self.prefix}.qweight")))
        for name in ("scales", "offsets"):
            layer.register_parameter(name, GroupQuantScaleParameter(
                data=torch.empty(n, groups, dtype=torch.float16), input_dim=1, output_dim=0,
                weight_loader=_named_loader(loader, f"{self.prefix}.{name}")))
        spec = LinearSpec.of(self.fmt, k, n, params_dtype, layer.qweight.device.type)
        self.kernel = choose_kernel(spec)

    def process_weights_after_loading(self, layer) -> None:
        for name in PACKED:
            setattr(layer, name, torch.nn.Parameter(getattr(layer, name).data, requires_grad=False))
        self.kernel.prepare(layer)
        if self.kernel.owns_weights:  # a server never saves the model: hold the weights once, not twice
            for name in PACKED:
                setattr(layer, name, torch.nn.Parameter(getattr(layer, name).data.new_empty(0), requires_grad=False))

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.kernel.apply(layer, x, bias)

