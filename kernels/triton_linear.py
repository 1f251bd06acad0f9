"""The `triton` kernel: dequant-GEMV / GEMM / dequant+cuBLAS from packed codes (`triton_gemm`), and
the v2 kernels (`triton_v2`) on a layout made in `prepare()`, whichever the tuner measures faster.

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
from .triton_v2_layout import repack, v2_unsupported

ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
V2_VAR = "DAQ_TRITON_V2"  # "0": no v2 layout, so only the v1 paths run (and no second copy of the weights)


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

    def prepare(self, layer: torch.nn.Module) -> None:
        """Checks and the codebook (`LinearKernel.prepare`), then the v2 layout (`triton_v2_layout`)
        beside the checkpoint tensors, when the format allows it: the tuner measures the v2 kernels
        on it next to the v1 ones, which read the checkpoint tensors. It costs one more copy of the
        packed weights while both are candidates; DAQ_TRITON_V2=0 turns it off."""
        super().prepare(layer)
        s = self.spec
        self.v2_decode = self.v2_asm = self.v2_asm_bf16 = ""
        if os.environ.get(V2_VAR, "1").strip() == "0" or v2_unsupported(s.bits, s.group_size) is not None:
            return
        rp = repack(layer.qweight, layer.scales, layer.offsets, s.codebook, s.bits, s.group_size, s.in_features)
        layer.register_buffer("v2_codes", rp.codes, persistent=False)
        layer.register_buffer("v2_scales", rp.scales, persistent=False)
        layer.register_buffer("v2_offsets", rp.offsets, persistent=False)
        self.v2_decode, self.v2_asm, self.v2_asm_bf16 = rp.decode, rp.asm, rp.asm_bf16

    def apply(self, layer, x, bias=None):
        s = self.spec
        v2 = (layer.v2_codes, layer.v2_scales, layer.v2_offsets) if self.v2_decode else (None, None, None)
        return daq_linear_op(x, layer.qweight, layer.scales, layer.offsets, layer.codebook, s.bits, s.group_size,
                             s.decode == "e2m1", bias, *v2, self.v2_decode, self.v2_asm, self.v2_asm_bf16)
