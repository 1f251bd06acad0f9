"""vLLM's methods for the layers a DAQ checkpoint keeps in full precision: the lm_head and the
linears named in `modules_not_converted`.

vLLM computes these with its unquantized methods. In bfloat16 on a CPU without bfloat16
instructions, oneDNN refuses the weight and vLLM falls back to torch's `F.linear`, 5x slower
there than oneDNN's fp32 product (benchmarks/results/lm-head-cpu.md): SmolLM2's 49152 x 576 head
at 16 sequences costs more than all its DAQ decoder linears. These methods are vLLM's, except
that where `kernels.cpu_bf16` takes the weight the product runs there, chosen once after loading.
MoE routers keep vLLM's method: their weights are small, and vLLM has a kernel for those. Imports
vllm.
"""

from __future__ import annotations

import logging

import torch
from vllm.model_executor.layers.linear import UnquantizedLinearMethod, register_weight_loader_v2_supported_method
from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

from ...kernels.cpu_bf16 import bf16_linear, unavailable

logger = logging.getLogger("daq_vllm.kernels")  # where every kernel choice is logged


class _Bf16Product:
    """Mixed into a vLLM unquantized method: `apply` through `bf16_linear` where it takes the
    weight, else the vLLM method's own (`kernel` says which)."""

    def __init__(self) -> None:
        super().__init__()
        self.kernel, self.linear = "vllm", super().apply  # until process_weights_after_loading chooses

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        reason = "the weight is not loaded" if layer.weight.is_meta else unavailable(layer.weight)
        if reason is None:
            self.kernel, self.linear = "bf16_linear", lambda layer, x, bias: bf16_linear(x, layer.weight, bias)
            logger.info("%s [%d, %d]: bfloat16 product through the DAQ CPU kernel (no bfloat16 instructions here)",
                        type(self).__name__, *layer.weight.shape)
        else:
            super().process_weights_after_loading(layer)
            logger.debug("%s: vLLM's unquantized product (%s)", type(self).__name__, reason)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.linear(layer, x, bias)


class DAQLMHeadMethod(_Bf16Product, UnquantizedEmbeddingMethod):
    """The lm_head (tied or not): vLLM's `UnquantizedEmbeddingMethod`, product through `bf16_linear` where it runs."""


@register_weight_loader_v2_supported_method  # loads as UnquantizedLinearMethod does (vLLM lists it by name)
class DAQFullPrecisionLinearMethod(_Bf16Product, UnquantizedLinearMethod):
    """A linear in `modules_not_converted`: vLLM's `UnquantizedLinearMethod`, product through `bf16_linear`
    where it runs."""
