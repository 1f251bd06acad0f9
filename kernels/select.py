"""`choose_kernel`: the first kernel in the device's priority list that can implement a layer.

As vLLM's `choose_mp_linear_kernel`: each kernel answers `can_implement(spec)` with a reason, and
when none can, one error lists every refusal. `DAQ_KERNEL=name` forces a kernel (an error names
why, if it cannot run the layer); `DAQ_DISABLED_KERNELS=a,b` takes kernels out of the lists. The
choice is logged once per distinct spec.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from daq_vllm.errors import DAQError

from .base import LinearKernel, LinearSpec
from .cpu_linear import CpuKernel
from .torch_linear import DenseKernel, TorchKernel
from .triton_linear import TritonKernel

logger = logging.getLogger("daq_vllm.kernels")

KERNELS: dict[str, type[LinearKernel]] = {k.name: k for k in (TritonKernel, CpuKernel, TorchKernel, DenseKernel)}
# Automatic choice, fastest first; `dense` (full-precision memory) is chosen only by name.
PRIORITY: dict[str, tuple[str, ...]] = {"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")}
DEFAULT_PRIORITY: tuple[str, ...] = ("torch",)
_logged: set[tuple[LinearSpec, str]] = set()


def _named(name: str, source: str) -> type[LinearKernel]:
    if name not in KERNELS:
        raise DAQError(f"{source} names no kernel {name!r}; choose one of: {', '.join(KERNELS)}")
    return KERNELS[name]


def choose_kernel(spec: LinearSpec, preferred: Sequence[str] = ()) -> LinearKernel:
    """A kernel instance for `spec`: `DAQ_KERNEL` if set, else the first of `preferred` and then the
    device's priority list (less `DAQ_DISABLED_KERNELS`) that can implement it."""
    forced = os.environ.get("DAQ_KERNEL", "").strip()
    if forced:
        kernel = _named(forced, "DAQ_KERNEL")
        ok, reason = kernel.can_implement(spec)
        if not ok:
            raise DAQError(f"DAQ_KERNEL={forced} cannot run the layer {spec.describe()}: {reason}; "
                           "unset DAQ_KERNEL or pick another kernel")
        return _log(kernel(spec), spec, "forced by DAQ_KERNEL")
    disabled = {n.strip() for n in os.environ.get("DAQ_DISABLED_KERNELS", "").split(",") if n.strip()}
    for name in disabled:
        _named(name, "DAQ_DISABLED_KERNELS")
    order = [*preferred, *PRIORITY.get(spec.device_type, DEFAULT_PRIORITY)]
    reasons = []
    for name in dict.fromkeys(order):  # in order, without repeats
        kernel = _named(name, "the preferred kernels")
        if name in disabled:
            reasons.append(f"{name}: disabled by DAQ_DISABLED_KERNELS")
            continue
        ok, reason = kernel.can_implement(spec)
        if ok:
            return _log(kernel(spec), spec, "chosen")
        reasons.append(f"{name}: {reason}")
    raise DAQError(f"no DAQ kernel can run the layer {spec.describe()} ({'; '.join(reasons)}); "
                   "re-enable a kernel in DAQ_DISABLED_KERNELS or move the model to a supported device")


def _log(kernel: LinearKernel, spec: LinearSpec, how: str) -> LinearKernel:
    if (spec, kernel.name) not in _logged:
        _logged.add((spec, kernel.name))
        logger.info("DAQ kernel %s %s for %s", kernel.name, how, spec.describe())
    return kernel
