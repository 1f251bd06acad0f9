"""Kernels in plain torch: `torch` (decode per call, any device) and `dense` (decode once).

`torch` is the numerical reference (`reference.daq_linear_reference`) used as a kernel: it keeps
only the packed tensors and dequantizes on every call, so memory stays at the packed size.
`dense` decodes the weight once in `prepare` and keeps it in the activation dtype, as an
unquantized layer would: fast, at full-precision memory. It is never chosen automatically; ask for
it by name (evaluation does, `DAQ_KERNEL=dense` does).
"""

from __future__ import annotations

import torch

from .base import LinearKernel, LinearSpec
from .reference import daq_linear_reference, dequantize


class TorchKernel(LinearKernel):
    name = "torch"

    @classmethod
    def can_implement(cls, spec: LinearSpec) -> tuple[bool, str | None]:
        return True, None

    def apply(self, layer, x, bias=None):
        s = self.spec
        return daq_linear_reference(x, layer.qweight, layer.scales, layer.offsets, layer.codebook, s.bits,
                                    s.group_size, bias)


class DenseKernel(LinearKernel):
    name = "dense"
    owns_weights = True

    @classmethod
    def can_implement(cls, spec: LinearSpec) -> tuple[bool, str | None]:
        return True, None

    def prepare(self, layer):
        super().prepare(layer)
        s = self.spec
        weight = dequantize(layer.qweight, layer.scales, layer.offsets, layer.codebook, s.bits, s.group_size,
                            s.in_features)
        layer.register_buffer("dense_weight", weight.to(s.act_dtype), persistent=False)

    def apply(self, layer, x, bias=None):
        weight = layer.dense_weight if layer.dense_weight.dtype == x.dtype else layer.dense_weight.to(x.dtype)
        return torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))
