"""The `daq` quantization method for vLLM: `DAQConfig` and `DAQLinearMethod`.

Imports vllm; loaded only by `daq_vllm.plugin.register()`. The classes live at module level
because vLLM pickles the quantization config into its engine and worker processes.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    UnquantizedLinearMethod,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.parameter import GroupQuantScaleParameter, PackedvLLMParameter

from .checkpoint import check_checkpoint
from .errors import DAQError
from .format import QUANT_METHOD, DAQFormat
from .kernels import daq_linear, packed_words
from .vllm_ops import daq_linear_op


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
        """Runs in the process that starts the engine: a bad field fails there, named."""
        return cls(DAQFormat.from_dict(config))

    def maybe_update_config(self, model_name: str, hf_config: Any = None, revision: str | None = None) -> None:
        """Pre-flight check of a local checkpoint's tensors against the config, before any engine starts.

        vLLM calls this right after `from_config`, in the starting process, so a missing or
        mis-shaped tensor fails at start-up with its name instead of deep inside a worker.
        """
        if Path(model_name).expanduser().is_dir():
            check_checkpoint(model_name, for_vllm=True)

    def apply_vllm_mapper(self, hf_to_vllm_mapper: Any) -> None:
        """Rename `modules_not_converted` from the checkpoint's names to the vLLM model's."""
        self.fmt.modules_not_converted = hf_to_vllm_mapper.apply_list(self.fmt.modules_not_converted)

    def is_skipped(self, prefix: str) -> bool:
        """Whether the vLLM linear `prefix` stays in full precision.

        vLLM fuses checkpoint linears (q/k/v_proj into qkv_proj, gate/up_proj into gate_up_proj);
        a fused linear is skipped when its own name or all of its parts are listed, and a fused
        linear with only some parts listed cannot be loaded at all.
        """
        head, _, proj = prefix.rpartition(".")
        parts = self.packed_modules_mapping.get(proj)
        if not parts or not self.fmt.is_converted(prefix):
            return not self.fmt.is_converted(prefix)
        names = [f"{head}.{p}" if head else p for p in parts]
        skipped = [n for n in names if not self.fmt.is_converted(n)]
        if skipped and len(skipped) != len(names):
            raise DAQError(
                f"quantization_config.modules_not_converted lists {', '.join(skipped)} but not the other parts of "
                f"{prefix} ({', '.join(n for n in names if n not in skipped)}), which vLLM fuses into one layer; "
                "re-quantize with --skip covering all or none of them"
            )
        return bool(skipped)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, LinearBase):
            if self.is_skipped(prefix):
                return UnquantizedLinearMethod()
            return DAQLinearMethod(self, prefix)
        return None


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
    """Packed codes + fp16 scale/offset per group along K; computes with `daq_linear`."""

    def __init__(self, config: DAQConfig, prefix: str = ""):
        self.fmt = config.fmt
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
        groups = -(-k // g)
        loader = extra_weight_attrs["weight_loader"]
        layer.register_parameter("qweight", PackedvLLMParameter(
            data=torch.empty(n, packed_words(k, bits), dtype=torch.int32), input_dim=1, output_dim=0,
            packed_dim=1, packed_factor=Fraction(32, bits), weight_loader=_named_loader(loader, f"{self.prefix}.qweight")))
        for name in ("scales", "offsets"):
            layer.register_parameter(name, GroupQuantScaleParameter(
                data=torch.empty(n, groups, dtype=torch.float16), input_dim=1, output_dim=0,
                weight_loader=_named_loader(loader, f"{self.prefix}.{name}")))
        layer.daq_in_features = k

    def process_weights_after_loading(self, layer) -> None:
        for name in ("qweight", "scales", "offsets"):
            setattr(layer, name, torch.nn.Parameter(getattr(layer, name).data, requires_grad=False))
        layer.register_buffer("daq_codebook", torch.tensor(self.fmt.codebook, dtype=torch.float32,
                                                           device=layer.qweight.device), persistent=False)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The Triton kernels as a custom op on CUDA (torch.compile, CUDA graphs); the torch path elsewhere."""
        compute = daq_linear_op if x.is_cuda else daq_linear
        return compute(x, layer.qweight, layer.scales, layer.offsets, layer.daq_codebook,
                       self.fmt.bits, self.fmt.group_size, bias)

