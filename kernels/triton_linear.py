"""The `triton` kernel: dequant-GEMV / GEMM / dequant+cuBLAS from packed codes (`triton_gemm`).

Runs on CUDA, and on CPU tensors under `TRITON_INTERPRET=1` (how the tests run it). Calls go
through the custom op `torch.ops.daq.linear`, so the layer is safe under torch.compile and CUDA
graphs. The decode mode (bits of an E2M1 code, or the table) is fixed here, once per layer.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .base import LinearKernel, LinearSpec
from .op import daq_linear_op

ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class TritonKernel(LinearKernel):
    name = "triton"

    @classmethod
    def can_implement(cls, spec: LinearSpec) -> tuple[bool, str | None]:
        interpreting = os.environ.get("TRITON_INTERPRET") == "1"
        if spec.device_type != "cuda" and not (interpreting and spec.device_type == "cpu"):
            return False, f"needs a CUDA device (or TRITON_INTERPRET=1 on CPU), the layer is on {spec.device_type}"
        if importlib.util.find_spec("triton") is None:
            return False, "triton is not installed (pip install triton)"
        if spec.act_dtype not in ACT_DTYPES:
            return False, f"activations are {spec.act_dtype}; it computes in float16, bfloat16 or float32"
        return True, None

    def apply(self, layer, x, bias=None):
        s = self.spec
        return daq_linear_op(x, layer.qweight, layer.scales, layer.offsets, layer.codebook, s.bits, s.group_size,
                             s.decode == "e2m1", bias)
