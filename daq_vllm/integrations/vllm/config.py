"""vLLM's view of a DAQ checkpoint: `DAQConfig` (the `quantization_config`, fused-layer and expert skips).

Imports vllm; loaded only by `daq_vllm.integrations.vllm.register()`. The class lives at module
level because vLLM pickles the quantization config into its engine and worker processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from ...errors import DAQError
from ...format import QUANT_METHOD, DAQFormat
from ...format.check import check_checkpoint


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
        """Rename `modules_not_converted` and `module_formats` from the checkpoint's names to the vLLM model's."""
        self.fmt.modules_not_converted = hf_to_vllm_mapper.apply_list(self.fmt.modules_not_converted)
        self.fmt.module_formats = hf_to_vllm_mapper.apply_dict(self.fmt.module_formats)

    def _parts(self, prefix: str) -> list[str]:
        """The checkpoint linears vLLM fuses into the layer `prefix` (just `prefix` when it is not fused)."""
        head, _, proj = prefix.rpartition(".")
        parts = self.packed_modules_mapping.get(proj)
        return [f"{head}.{p}" if head else p for p in parts] if parts else [prefix]

    def layer_format(self, prefix: str) -> DAQFormat:
        """The single-codebook view of the vLLM linear `prefix`; a fused layer's parts must share it.

        `daq-vllm quantize --format auto` chooses one codebook per group of linears that read the
        same input, which is every group vLLM fuses (q/k/v_proj, gate/up_proj).
        """
        parts = self._parts(prefix)
        formats = {p: self.fmt.format_of(p) for p in parts}
        if len(set(formats.values())) > 1:
            listed = ", ".join(f"{p} {f}" for p, f in formats.items())
            raise DAQError(f"the parts of {prefix}, which vLLM fuses into one layer, have different codebooks "
                           f"({listed}); re-quantize (daq-vllm quantize chooses one codebook per fused group)")
        return self.fmt.for_module(parts[0])

    def is_skipped(self, prefix: str) -> bool:
        """Whether the vLLM linear `prefix` stays in full precision.

        vLLM fuses checkpoint linears (q/k/v_proj into qkv_proj, gate/up_proj into gate_up_proj);
        a fused linear is skipped when its own name or all of its parts are listed, and a fused
        linear with only some parts listed cannot be loaded at all.
        """
        names = self._parts(prefix)
        if len(names) == 1 or not self.fmt.is_converted(prefix):
            return not self.fmt.is_converted(prefix)
        skipped = [n for n in names if not self.fmt.is_converted(n)]
        if skipped and len(skipped) != len(names):
            raise DAQError(
                f"quantization_config.modules_not_converted lists {', '.join(skipped)} but not the other parts of "
                f"{prefix} ({', '.join(n for n in names if n not in skipped)}), which vLLM fuses into one layer; "
                "re-quantize with --skip covering all or none of them"
            )
        return bool(skipped)

    def experts_formats(self, prefix: str, num_experts: int, gate: str, up: str | None,
                        down: str) -> tuple[DAQFormat, DAQFormat] | None:
        """The codebooks of the vLLM experts layer `prefix` (gate/up, down), or None when its experts
        stay in full precision.

        The checkpoint stores each expert projection as its own linear (`<prefix>.<e>.<gate>`);
        vLLM computes all experts of the layer in one operator, so they are quantized all or none,
        and all gate/up projections share one codebook, as do all down projections.
        """
        groups = {"gate/up": [f"{prefix}.{e}.{p}" for e in range(num_experts) for p in (gate, up) if p],
                  "down": [f"{prefix}.{e}.{down}" for e in range(num_experts)]}
        names = [n for group in groups.values() for n in group]
        skipped = [n for n in names if not self.fmt.is_converted(n)]
        if len(skipped) == len(names):
            return None
        if skipped:
            converted = next(n for n in names if n not in skipped)
            raise DAQError(
                f"quantization_config.modules_not_converted lists {skipped[0]} ({len(skipped)} of the {len(names)} "
                f"expert projections of {prefix}) but not {converted}; vLLM computes a layer's experts in one "
                "operator: re-quantize with --skip covering all or none of them"
            )
        formats = []
        for what, group in groups.items():
            first_of = {}  # codebook -> its first projection
            for n in group:
                first_of.setdefault(self.fmt.format_of(n), n)
            if len(first_of) > 1:
                listed = ", ".join(f"{n} {f}" for f, n in first_of.items())
                raise DAQError(f"the {what} projections of the experts of {prefix} have different codebooks "
                               f"({listed}); vLLM computes a layer's experts with one codebook for gate/up and one "
                               "for down: re-quantize")
            formats.append(self.fmt.for_module(group[0]))
        return formats[0], formats[1]

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        # Here, not at the top: the plugin registers early in every vLLM process, and vLLM's MoE
        # package pulls in much of vLLM (its own resolve_quant_method imports it the same way).
        from vllm.model_executor.layers.fused_moe import GateLinear, RoutedExperts, UnquantizedFusedMoEMethod
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

        if isinstance(layer, RoutedExperts):
            formats = self.experts_formats(prefix, layer.moe_config.num_logical_experts, layer.ckpt_gate_proj_name,
                                           layer.ckpt_up_proj_name, layer.ckpt_down_proj_name)
            if formats is None:
                return UnquantizedFusedMoEMethod(layer.moe_config)
            from .moe import DAQMoEMethod

            return DAQMoEMethod(layer.moe_config, *formats, prefix)
        if isinstance(layer, ParallelLMHead):  # DAQ checkpoints keep it in full precision
            from .full_precision import DAQLMHeadMethod

            return DAQLMHeadMethod()
        if isinstance(layer, GateLinear):  # a MoE router: DAQ checkpoints keep routers in full precision
            return UnquantizedLinearMethod()
        if isinstance(layer, LinearBase):
            if self.is_skipped(prefix):
                from .full_precision import DAQFullPrecisionLinearMethod

                return DAQFullPrecisionLinearMethod()
            from .linear import DAQLinearMethod

            return DAQLinearMethod(self, prefix)
        return None
