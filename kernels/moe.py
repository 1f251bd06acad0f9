"""The MoE kernel layer: `MoESpec`, `MoEKernel`, the torch reference and `choose_moe_kernel`.

A mixture-of-experts layer holds, for each of its E local experts, two DAQ linears in the
checkpoint format (docs/FORMAT.md) stacked along a leading expert axis: `w13` [2I, H] (gate rows
[0, I), up rows [I, 2I)) and `w2` [H, I]. For a token x routed to experts e_j with weights r_j,
`out = sum_j r_j * W2_e( act(W_gate_e x) * (W_up_e x) )`.

As for dense linears (`base.py`, `select.py`), a layer (vLLM's fused-MoE method) builds one
`MoESpec`, gets a kernel from `choose_moe_kernel(spec)` once, calls `kernel.prepare(layer)` once its
packed tensors are loaded, and then only ever calls `kernel.apply(layer, x, topk_weights, topk_ids)`.
Kernels, fastest first per device:
- `triton_moe` (CUDA, or CPU tensors under TRITON_INTERPRET=1; 4-bit): one fused dequant-GEMM per
  projection over all experts (`triton_moe.py`), without host syncs;
- `cpu_moe` (CPU, 3- and 4-bit): the whole layer in one C++ call (`csrc/cpu_moe.cpp`) through the
  dense `cpu` kernel's bodies, every expert repacked as that kernel repacks a linear;
- `loop` (any device): per expert with tokens, its two projections through the dense-linear kernel
  layer (`moe_loop.py`), so on CPU the C++ `cpu` kernel does the work. `DAQ_KERNEL` and
  `DAQ_DISABLED_KERNELS` steer those per-expert linears as they steer any other.
`DAQ_MOE_KERNEL=name` forces a kernel and `DAQ_DISABLED_MOE_KERNELS=a,b` takes kernels out of the
priority lists; when none can run a layer, one error lists every refusal. The choice follows the same
rules as `choose_kernel` (`select.KernelChooser`).
"""

from __future__ import annotations

import importlib.util
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from daq_vllm.errors import DAQError
from daq_vllm.format.layout import num_groups, packed_words

from .base import LinearSpec
from .cpu_linear import ISAS, MAX_FUSED_M, CpuKernel, chosen_isa, lut, repack
from .moe_loop import expert_linears, loop_moe
from .reference import dequantize
from .select import KernelChooser

Gated = Callable[[torch.Tensor], torch.Tensor]


def _gated(act: Callable[[torch.Tensor], torch.Tensor]) -> Gated:
    """[..., 2I] first-projection outputs -> act(gate) * up [..., I], in float32."""
    def gated(h: torch.Tensor) -> torch.Tensor:
        gate, up = h.float().chunk(2, dim=-1)
        return act(gate) * up

    return gated


# What `MoESpec.activation` may name; `gelu` is the exact (erf) GELU, as vLLM's GeluAndMul.
ACTIVATIONS: dict[str, Gated] = {"silu": _gated(torch.nn.functional.silu), "gelu": _gated(torch.nn.functional.gelu)}
ACTIVATION_IDS = {"silu": 0, "gelu": 1}  # the `activation` argument of torch.ops.daq_cpu.moe (csrc/cpu_moe.cpp)


@dataclass(frozen=True)
class MoESpec:
    """Everything an MoE kernel may base its choice on, for one layer of E local experts."""

    bits: int
    group_size: int
    hidden_size: int  # H: the input of w13, the output of w2
    intermediate_size: int  # I per partition: w13 has 2I rows (gate, then up), w2 is [H, I]
    num_experts: int  # local experts E
    act_dtype: torch.dtype
    device_type: str  # "cpu", "cuda", ...
    w13_codebook: tuple[float, ...]
    w2_codebook: tuple[float, ...]
    activation: str = "silu"  # the first projection's output becomes act(gate) * up

    def shapes(self) -> dict[str, tuple[int, int, int]]:
        """The shape each layer tensor must have, by attribute name."""
        e, h, i = self.num_experts, self.hidden_size, self.intermediate_size
        return {"w13_qweight": (e, 2 * i, packed_words(h, self.bits)),
                "w13_scales": (e, 2 * i, num_groups(h, self.group_size)),
                "w13_offsets": (e, 2 * i, num_groups(h, self.group_size)),
                "w2_qweight": (e, h, packed_words(i, self.bits)),
                "w2_scales": (e, h, num_groups(i, self.group_size)),
                "w2_offsets": (e, h, num_groups(i, self.group_size))}

    def linear(self, projection: str) -> LinearSpec:
        """One expert's `w13` or `w2` as a dense-linear spec."""
        h, i = self.hidden_size, self.intermediate_size
        in_features, out_features = (h, 2 * i) if projection == "w13" else (i, h)
        return LinearSpec(self.bits, self.group_size, in_features, out_features, self.act_dtype, self.device_type,
                          getattr(self, f"{projection}_codebook"))

    def describe(self) -> str:
        dtype = str(self.act_dtype).removeprefix("torch.")
        h, i = self.hidden_size, self.intermediate_size
        return (f"{self.num_experts} experts w13 [{2 * i}, {h}] w2 [{h}, {i}] {self.bits}-bit g{self.group_size} "
                f"{self.activation} {dtype} on {self.device_type}")


def _activation_refusal(spec: MoESpec) -> str | None:
    if spec.activation in ACTIVATIONS:
        return None
    return f"the activation is {spec.activation!r}; DAQ MoE kernels compute {' or '.join(ACTIVATIONS)}"


class MoEKernel(ABC):
    """One way to compute an MoE layer's expert outputs from its packed tensors."""

    name: ClassVar[str]
    # As `LinearKernel.owns_weights`: True when apply() never reads the checkpoint tensors again.
    owns_weights: ClassVar[bool] = False

    def __init__(self, spec: MoESpec):
        self.spec = spec

    @classmethod
    @abstractmethod
    def can_implement(cls, spec: MoESpec) -> tuple[bool, str | None]:
        """(True, None), or (False, why not) in words a user can act on."""

    def prepare(self, layer: torch.nn.Module) -> None:
        """Once, after loading: check shapes and values, freeze, add `w13_codebook` / `w2_codebook`.

        A NaN or infinite scale or offset would turn whole outputs to NaN at run time, far from its
        cause, and a wrongly shaped tensor would be read out of bounds by a fused kernel: both are
        refused here, at load, for every kernel.
        """
        for name, shape in self.spec.shapes().items():
            tensor = getattr(layer, name)
            if tuple(tensor.shape) != shape:
                raise DAQError(f"{name} of a DAQ MoE layer {self.spec.describe()} has shape {tuple(tensor.shape)}, "
                               f"expected {shape}: the checkpoint does not match the model config")
            tensor.requires_grad_(False)
            if name.endswith(("scales", "offsets")) and not torch.isfinite(tensor).all():
                raise DAQError(f"the {name} of a DAQ MoE layer {self.spec.describe()} hold NaN or infinity: "
                               "the checkpoint is corrupt; quantize the model again")
        for projection in ("w13", "w2"):
            codebook = getattr(self.spec, f"{projection}_codebook")
            layer.register_buffer(f"{projection}_codebook", torch.tensor(
                codebook, dtype=torch.float32, device=layer.w13_qweight.device), persistent=False)

    @abstractmethod
    def apply(self, layer: torch.nn.Module, x: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
        """x [M, H], topk_weights [M, k] (float), topk_ids [M, k] (int; local expert ids, -1 or any id outside
        [0, E): not on this rank, contributes nothing) -> [M, H] in x's dtype."""


class LoopMoEKernel(MoEKernel):
    """Per expert with tokens: gather them, both projections through the dense-linear kernel layer."""

    name = "loop"

    @classmethod
    def can_implement(cls, spec: MoESpec) -> tuple[bool, str | None]:
        refusal = _activation_refusal(spec)
        return refusal is None, refusal

    def prepare(self, layer: torch.nn.Module) -> None:
        super().prepare(layer)
        layer.daq_moe_w13 = expert_linears(layer, "w13", self.spec.linear("w13"))
        layer.daq_moe_w2 = expert_linears(layer, "w2", self.spec.linear("w2"))

    def apply(self, layer, x, topk_weights, topk_ids):
        return loop_moe(x, topk_weights, topk_ids, layer.daq_moe_w13, layer.daq_moe_w2,
                        ACTIVATIONS[self.spec.activation])


class TritonMoEKernel(MoEKernel):
    """Fused: every expert's tiles in one launch per projection (`triton_moe.fused_moe`)."""

    name = "triton_moe"
    ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

    @classmethod
    def can_implement(cls, spec: MoESpec) -> tuple[bool, str | None]:
        interpreting = os.environ.get("TRITON_INTERPRET") == "1"
        if spec.device_type != "cuda" and not (interpreting and spec.device_type == "cpu"):
            return False, f"needs a CUDA device (or TRITON_INTERPRET=1 on CPU), the layer is on {spec.device_type}"
        if spec.bits != 4:
            return False, (f"reads 4-bit codes, two to a byte, the layer has {spec.bits}-bit ones; "
                           "use the loop kernel (DAQ_MOE_KERNEL=loop)")
        if spec.group_size < 16 or spec.group_size & (spec.group_size - 1):
            return False, f"steps through K in blocks within one group; group size {spec.group_size} is not 2**n >= 16"
        if importlib.util.find_spec("triton") is None:
            return False, "triton is not installed (pip install triton)"
        if spec.act_dtype not in cls.ACT_DTYPES:
            return False, f"activations are {spec.act_dtype}; it computes in float16, bfloat16 or float32"
        refusal = _activation_refusal(spec)
        return refusal is None, refusal

    def apply(self, layer, x, topk_weights, topk_ids):
        from .triton_moe import PackedExperts, fused_moe

        w13, w2 = (PackedExperts(*(getattr(layer, f"{p}_{t}") for t in ("qweight", "scales", "offsets", "codebook")))
                   for p in ("w13", "w2"))
        return fused_moe(x, topk_weights, topk_ids, w13, w2, self.spec.group_size, ACTIVATIONS[self.spec.activation])


class CpuMoEKernel(MoEKernel):
    """Fused on CPU: the layer in one C++ call, one parallel loop over (expert, output block) per projection.

    `prepare` repacks every expert's projections as the dense `cpu` kernel repacks a linear
    (`cpu_linear.repack`), stacked along the expert axis, and then never reads the checkpoint tensors.
    """

    name = "cpu_moe"
    owns_weights = True

    @classmethod
    def can_implement(cls, spec: MoESpec) -> tuple[bool, str | None]:
        """What the dense `cpu` kernel needs of each projection (device, bits, dtype, the build), and the activation."""
        for projection in ("w13", "w2"):
            ok, why = CpuKernel.can_implement(spec.linear(projection))
            if not ok:
                return False, why
        refusal = _activation_refusal(spec)
        return refusal is None, refusal

    def prepare(self, layer: torch.nn.Module) -> None:
        super().prepare(layer)
        s = self.spec
        self.isa = chosen_isa()
        for projection, in_features in (("w13", s.hidden_size), ("w2", s.intermediate_size)):
            qweight, scales, offsets = (getattr(layer, f"{projection}_{t}").data.cpu()
                                        for t in ("qweight", "scales", "offsets"))
            first = repack(qweight[0], scales[0], offsets[0], s.bits, in_features, self.isa)
            codes, scale_offset = (torch.empty(s.num_experts, *t.shape, dtype=t.dtype) for t in first)
            codes[0], scale_offset[0] = first
            for e in range(1, s.num_experts):
                codes[e], scale_offset[e] = repack(qweight[e], scales[e], offsets[e], s.bits, in_features, self.isa)
            layer.register_buffer(f"cpu_{projection}_codes", codes, persistent=False)
            layer.register_buffer(f"cpu_{projection}_scale_offset", scale_offset, persistent=False)
            layer.register_buffer(f"cpu_{projection}_lut", lut(getattr(s, f"{projection}_codebook")), persistent=False)

    def apply(self, layer, x, topk_weights, topk_ids):
        s = self.spec
        return torch.ops.daq_cpu.moe(x, topk_weights, topk_ids, layer.cpu_w13_codes, layer.cpu_w13_scale_offset,
                                     layer.cpu_w13_lut, layer.cpu_w2_codes, layer.cpu_w2_scale_offset, layer.cpu_w2_lut,
                                     s.intermediate_size, s.group_size, ISAS[self.isa], MAX_FUSED_M[self.isa],
                                     ACTIVATION_IDS[s.activation])


MOE_KERNELS: dict[str, type[MoEKernel]] = {k.name: k for k in (TritonMoEKernel, CpuMoEKernel, LoopMoEKernel)}
MOE_PRIORITY: dict[str, tuple[str, ...]] = {"cuda": ("triton_moe", "loop"), "cpu": ("cpu_moe", "loop")}
DEFAULT_MOE_PRIORITY: tuple[str, ...] = ("loop",)
_CHOOSER: KernelChooser[MoEKernel] = KernelChooser(
    MOE_KERNELS, MOE_PRIORITY, DEFAULT_MOE_PRIORITY, "DAQ_MOE_KERNEL", "DAQ_DISABLED_MOE_KERNELS", "MoE kernel",
    "MoE layer", "re-enable a kernel in DAQ_DISABLED_MOE_KERNELS, move the model to a supported device or change "
    "the layer's activation")


def choose_moe_kernel(spec: MoESpec) -> MoEKernel:
    """A kernel instance for `spec`: `DAQ_MOE_KERNEL` if set, else the first of the device's priority
    list (less `DAQ_DISABLED_MOE_KERNELS`) that can implement it; the rules are `choose_kernel`'s."""
    return _CHOOSER.choose(spec)


def moe_reference(spec: MoESpec, layer: torch.nn.Module, x: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor) -> torch.Tensor:
    """The numerical definition every MoE kernel is tested against: a plain loop over experts.

    Reads the layer's checkpoint tensors only (no `prepare` needed). Each expert's weights are
    dequantized in float32 and rounded to x's dtype, as a dense layer's are (docs/FORMAT.md);
    products accumulate in float32; act(gate) * up is rounded to x's dtype, being the input of a
    linear; the routed sum is float32, rounded once at the end. Ids outside [0, E) add nothing.
    """
    h, i, g, bits = spec.hidden_size, spec.intermediate_size, spec.group_size, spec.bits
    gated = ACTIVATIONS[spec.activation]
    out = torch.zeros(x.shape[0], h, dtype=torch.float32, device=x.device)
    for e in range(spec.num_experts):
        rows, slots = (topk_ids == e).nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        w13, w2 = (dequantize(getattr(layer, f"{p}_qweight")[e], getattr(layer, f"{p}_scales")[e],
                              getattr(layer, f"{p}_offsets")[e], torch.tensor(getattr(spec, f"{p}_codebook")),
                              bits, g, k).to(x.dtype).float()
                   for p, k in (("w13", h), ("w2", i)))
        hidden = gated(x[rows].float() @ w13.T).to(x.dtype).float()
        out.index_add_(0, rows, (hidden @ w2.T) * topk_weights[rows, slots, None].float())
    return out.to(x.dtype)
