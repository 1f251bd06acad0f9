"""The kernel interface: what a kernel may look at (`LinearSpec`) and what it does (`LinearKernel`).

Modelled on vLLM's `MPLinearLayerConfig` + `MPLinearKernel`. A layer that computes with DAQ
weights (vLLM's `DAQLinearMethod`, transformers' `DAQLinear`) builds one `LinearSpec`, gets a
kernel from `choose_kernel(spec)` once, calls `kernel.prepare(layer)` once its packed tensors are
loaded, and then only ever calls `kernel.apply(layer, x, bias)`. The layer holds the checkpoint
tensors as attributes `qweight`, `scales` and `offsets` (docs/FORMAT.md); `prepare` adds whatever
the kernel needs beside them (the `codebook` buffer, caches, repacked copies).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from daq_vllm.errors import DAQError
from daq_vllm.format import DAQFormat
from daq_vllm.format.codebooks import decode_kind


@dataclass(frozen=True)
class LinearSpec:
    """Everything a kernel may base its choice on, for one quantized linear [out, in]."""

    bits: int
    group_size: int
    in_features: int
    out_features: int
    act_dtype: torch.dtype
    device_type: str  # "cpu", "cuda", ...
    codebook: tuple[float, ...]

    @classmethod
    def of(cls, fmt: DAQFormat, in_features: int, out_features: int, act_dtype: torch.dtype,
           device_type: str) -> LinearSpec:
        return cls(fmt.bits, fmt.group_size, in_features, out_features, act_dtype, device_type,
                   tuple(fmt.codebook))

    @property
    def decode(self) -> str:
        """`e2m1`, `int` or `table`: how a code becomes its value (`codebooks.decode_kind`)."""
        return decode_kind(self.codebook)

    def describe(self) -> str:
        dtype = str(self.act_dtype).removeprefix("torch.")
        return (f"[{self.out_features}, {self.in_features}] {self.bits}-bit g{self.group_size} "
                f"{self.decode} {dtype} on {self.device_type}")


class LinearKernel(ABC):
    """One way to compute `x @ W_hat^T + bias` from a layer's packed tensors."""

    name: ClassVar[str]
    # True when prepare() copies the weights into the kernel's own layout and apply() never reads the
    # checkpoint tensors again: an integration that will not save the model (vLLM) then frees them.
    owns_weights: ClassVar[bool] = False

    def __init__(self, spec: LinearSpec):
        self.spec = spec

    @classmethod
    @abstractmethod
    def can_implement(cls, spec: LinearSpec) -> tuple[bool, str | None]:
        """(True, None), or (False, why not) in words a user can act on."""

    def prepare(self, layer: torch.nn.Module) -> None:
        """Once, after the packed tensors are loaded: check and freeze them, add the codebook buffer.

        A NaN or infinite scale or offset would turn whole outputs to NaN at run time, far from
        its cause; it is refused here, at load, for every kernel.
        """
        for name in ("qweight", "scales", "offsets"):
            getattr(layer, name).requires_grad_(False)
        for name in ("scales", "offsets"):
            if not torch.isfinite(getattr(layer, name)).all():
                raise DAQError(f"the {name} of a DAQ linear {self.spec.describe()} hold NaN or infinity: the "
                               "checkpoint is corrupt; quantize the model again")
        codebook = torch.tensor(self.spec.codebook, dtype=torch.float32, device=layer.qweight.device)
        layer.register_buffer("codebook", codebook, persistent=False)

    @abstractmethod
    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """`x @ W_hat^T (+ bias)` for x [..., in_features], in x's dtype."""
