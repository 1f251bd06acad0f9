"""`choose_kernel`: the first kernel in the device's priority list that can implement a layer.

As vLLM's `choose_mp_linear_kernel`: each kernel answers `can_implement(spec)` with a reason, and
when none can, one error lists every refusal. `DAQ_KERNEL=name` forces a kernel (an error names
why, if it cannot run the layer); `DAQ_DISABLED_KERNELS=a,b` takes kernels out of the lists. The
choice is logged once per distinct spec.

The rules live in `KernelChooser`, generic over the kernel family, so that the MoE kernel layer
(`moe.py`, `choose_moe_kernel`) applies the very same ones with its own registry, priority and
environment variables instead of a copy that could drift.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from daq_vllm.errors import DAQError

from .base import LinearKernel, LinearSpec
from .cpu_linear import CpuKernel
from .torch_linear import DenseKernel, TorchKernel
from .triton_linear import TritonKernel

logger = logging.getLogger("daq_vllm.kernels")


class Spec(Hashable, Protocol):
    """What the chooser reads of a layer spec (`LinearSpec`, `MoESpec`: frozen, so hashable)."""

    device_type: str

    def describe(self) -> str: ...


class Kernel(Protocol):
    """What the chooser needs of a kernel class (`LinearKernel`, `MoEKernel`)."""

    name: ClassVar[str]

    def __init__(self, spec: Any) -> None: ...

    @classmethod
    def can_implement(cls, spec: Any) -> tuple[bool, str | None]: ...


K = TypeVar("K", bound=Kernel)


@dataclass(frozen=True)
class KernelChooser(Generic[K]):
    """One kernel family's selection: a forced kernel, else the first able one in priority order.

    `kind` ("kernel", "MoE kernel") and `layer` ("layer", "MoE layer") are the words its messages
    use; `remedy` ends the error raised when no kernel is left.
    """

    kernels: Mapping[str, type[K]]
    priority: Mapping[str, tuple[str, ...]]  # by device type, fastest first
    default_priority: tuple[str, ...]  # for device types not in `priority`
    force_var: str
    disable_var: str
    kind: str
    layer: str
    remedy: str
    # (spec, kernel name) pairs already logged, so that each choice is logged once.
    _logged: set[tuple[Spec, str]] = field(default_factory=set, init=False, compare=False, repr=False)

    def choose(self, spec: Spec, preferred: Sequence[str] = ()) -> K:
        """A kernel instance for `spec`: `force_var`'s if set, else the first of `preferred` and then
        the device's priority list (less `disable_var`'s) that can implement it."""
        forced = os.environ.get(self.force_var, "").strip()
        if forced:
            kernel = self._named(forced, self.force_var)
            ok, reason = kernel.can_implement(spec)
            if not ok:
                raise DAQError(f"{self.force_var}={forced} cannot run the {self.layer} {spec.describe()}: {reason}; "
                               f"unset {self.force_var} or pick another kernel")
            return self._log(kernel(spec), spec, f"forced by {self.force_var}")
        disabled = {n.strip() for n in os.environ.get(self.disable_var, "").split(",") if n.strip()}
        for name in disabled:
            self._named(name, self.disable_var)
        order = [*preferred, *self.priority.get(spec.device_type, self.default_priority)]
        reasons = []
        for name in dict.fromkeys(order):  # in order, without repeats
            kernel = self._named(name, "the preferred kernels")
            if name in disabled:
                reasons.append(f"{name}: disabled by {self.disable_var}")
                continue
            ok, reason = kernel.can_implement(spec)
            if ok:
                return self._log(kernel(spec), spec, "chosen")
            reasons.append(f"{name}: {reason}")
        raise DAQError(f"no DAQ {self.kind} can run the layer {spec.describe()} ({'; '.join(reasons)}); {self.remedy}")

    def _named(self, name: str, source: str) -> type[K]:
        if name not in self.kernels:
            raise DAQError(f"{source} names no {self.kind} {name!r}; choose one of: {', '.join(self.kernels)}")
        return self.kernels[name]

    def _log(self, kernel: K, spec: Spec, how: str) -> K:
        if (spec, kernel.name) not in self._logged:
            self._logged.add((spec, kernel.name))
            logger.info("DAQ %s %s %s for %s", self.kind, kernel.name, how, spec.describe())
        return kernel


KERNELS: dict[str, type[LinearKernel]] = {k.name: k for k in (TritonKernel, CpuKernel, TorchKernel, DenseKernel)}
# Automatic choice, fastest first; `dense` (full-precision memory) is chosen only by name.
PRIORITY: dict[str, tuple[str, ...]] = {"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")}
DEFAULT_PRIORITY: tuple[str, ...] = ("torch",)
_CHOOSER: KernelChooser[LinearKernel] = KernelChooser(
    KERNELS, PRIORITY, DEFAULT_PRIORITY, "DAQ_KERNEL", "DAQ_DISABLED_KERNELS", "kernel", "layer",
    "re-enable a kernel in DAQ_DISABLED_KERNELS or move the model to a supported device")


def choose_kernel(spec: LinearSpec, preferred: Sequence[str] = ()) -> LinearKernel:
    """A kernel instance for `spec`: `DAQ_KERNEL` if set, else the first of `preferred` and then the
    device's priority list (less `DAQ_DISABLED_KERNELS`) that can implement it."""
    return _CHOOSER.choose(spec, preferred)
