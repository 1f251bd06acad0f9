"""Peak memory of a quantization run: estimated from shapes before the first layer, and measured.

The model, in bytes (f = 4: everything the quantizer computes with is float32), per decoder layer:

    weights      W = the layer's parameters (dropped linear by linear once quantized; with
                     --asymmetric kept, and each quantized linear's decoded weight added)
    activations  A = 2 S T D f: every calibration block's hidden states entering and leaving it
                     (3 S T D f with --asymmetric: the float model's stream beside the quantized one)
    forward      F = one block inside the layer: T (2D + sum of the linears' outputs) f + heads T^2 f
    moments      M = per input read by its linears: K^2 f (full, for --rounding gptq) or K g f
                     (2 K^2 f with --asymmetric until its targets are made: the cross moment too)
    rounding     R = the Cholesky factor of the damped inverse moment, K^2 f, and K^2 f more while
                     it is computed (`compensated.InputHessian`)
    working      Q = LDRA on one row chunk (`grid.row_chunks`): LDRA_COPIES floats per weight, and
                     WORKING_BASE (without calibration: INIT_COPIES floats per weight)

    peak(layer) = A + max(W + M + max(F, Q, S),               calibration forward, --format auto,
                                                              --asymmetric's targets (S = 3 K^2 f)
                          max over its linears n, in order:   quantizing n
                              W(n and later) + M(inputs still read) + R(n) + Q(n) [+ M])

where the last M counts in a run over several processes only: a rank other than the last still
sends one layer's running sums on while it quantizes another (`distributed.Ranks.pass_on`). A rank
holds the complete sums of the inputs it owns only, so this errs high there too.

and the run's peak = the process before the first layer (measured) + what runs before the decoder
layers (embeddings, float32) + the output shard being filled + the largest layer peak. With
`--device cuda` the device holds all but the process and the shard (and, with
`--offload-activations`, the calibration activations). Which linears read one input is
known only after the first pass, so the estimate takes the usual fusions (`SHARED_INPUTS`) and
counts any other linear as reading its own input: it errs high, never low.

Measured: the largest anonymous resident set seen (`/proc/self/status` RssAnon, sampled; file pages
of the memory-mapped source are page cache, not counted) and, on CUDA, torch's peak allocation.
"""

from __future__ import annotations

import ctypes
import functools
import math
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Callable

import torch
from torch import nn

from daq_vllm.errors import DAQError

from .grid import row_chunks
from .model_source import ModelSource
from .options import QuantizeOptions, candidate_codebooks
from .targets import Targets

F32 = 4
GIB = 1024**3
LDRA_COPIES = 8  # float32 copies of a row chunk at LDRA's peak, beyond WORKING_BASE (fit: quant_memory.md)
INIT_COPIES = 6  # the same without calibration (initializer and rounding only)
WORKING_BASE = 160 * 1024**2  # what LDRA adds whatever a linear's size (glibc keeps small freed blocks)
SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"), ("query", "key", "value"))


@dataclass(frozen=True)
class LayerMemory:
    """One layer's peak bytes and what it is made of (the parts at the largest phase)."""

    name: str
    peak: int
    weights: int
    activations: int
    moments: int  # moments and rounding factors held at the peak
    working: int  # the forward's or LDRA's working set at the peak


@dataclass(frozen=True)
class MemoryPlan:
    """The estimate for a run: per compute device, and in all on the host."""

    device: str
    process: int  # the process before the first layer (measured)
    outside: int  # parameters materialised before the decoder layers
    shard: int  # the output shard at its fullest
    largest: LayerMemory
    offload: bool = False  # the calibration activations live on the host (--offload-activations)
    world: int = 1  # processes of the run (the estimate is per process)

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def device_peak(self) -> int:
        """Peak bytes on the compute device (the host itself on CPU)."""
        if self.on_cuda:
            return self.outside + self.largest.peak - self._on_host
        return self.process + self.outside + self.shard + self.largest.peak

    @property
    def host_peak(self) -> int:
        return self.process + self.shard + self._on_host if self.on_cuda else self.device_peak

    @property
    def _on_host(self) -> int:
        return self.largest.activations if self.offload else 0

    def summary(self) -> str:
        """One line for the log, before the first layer."""
        big = self.largest
        where = f"{gib(self.device_peak)} on {self.device}" + (f", {gib(self.host_peak)} host" if self.on_cuda else "")
        return (f"memory estimate: peak {where} (largest layer {big.name}: weights {gib(big.weights)}, "
                f"calibration activations {gib(big.activations)}, moments and rounding {gib(big.moments)}, "
                f"working {gib(big.working)}; process before it {gib(self.process)})")


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def _shared_key(name: str) -> str:
    """The input a linear reads, as far as names tell: fused siblings share one."""
    parent, _, leaf = name.rpartition(".")
    for group in SHARED_INPUTS:
        if leaf in group:
            return f"{parent}.{'+'.join(group)}"
    return name


def _linear_shapes(module: nn.Module, prefix: str, names: list[str]) -> dict[str, tuple[int, int]]:
    return {n: tuple(module.get_submodule(n[len(prefix) + 1 :]).weight.shape) for n in names}


def _working(n: int, k: int, copies: int, base: int = WORKING_BASE) -> int:
    rows = row_chunks(n, k)[0]
    return base + copies * (rows.stop - rows.start) * k * F32


def layer_memory(
    name: str, module: nn.Module, linears: list[str], opts: QuantizeOptions, hidden: int, heads: int, world: int = 1
) -> LayerMemory:
    """The peak of quantizing one decoder layer (`module` on the meta device is enough) in one of
    `world` processes."""
    shapes = _linear_shapes(module, name, linears)
    params = sum(p.numel() for p in module.parameters()) * F32
    if opts.ldra is None:  # no calibration: the layer's weights and the initializer's working set
        working = max((_working(n, k, INIT_COPIES, 0) for n, k in shapes.values()), default=0)
        return LayerMemory(name, params + working, params, 0, 0, working)
    s, t = opts.calib.nsamples, opts.calib.seqlen
    paired = bool(opts.asymmetric)
    full = opts.compensation is not None or paired
    activations = (3 if paired else 2) * s * t * hidden * F32
    inputs: dict[str, int] = {}
    readers: dict[str, list[str]] = {}
    for lin, (_, k) in shapes.items():
        key = _shared_key(lin)
        inputs[key] = k * k * F32 if full else k * min(k, opts.group_size) * F32
        readers.setdefault(key, []).append(lin)
    forward = t * (2 * hidden + sum(n for n, _ in shapes.values())) * F32 + heads * t * t * F32
    screen = max(_working(n, k, LDRA_COPIES) for n, k in shapes.values()) if len(candidate_codebooks(opts)) > 1 else 0
    moments = sum(inputs.values()) * (2 if paired else 1)  # the cross moments go once the targets are made
    sending = moments if world > 1 else 0
    targets = 3 * max(k for _, k in shapes.values()) ** 2 * F32 if paired else 0
    phases = [(params, moments, max(forward, screen, targets))]
    weights_left, order = params, list(shapes)
    for lin, (n, k) in shapes.items():
        key = _shared_key(lin)
        factor = (2 if readers[key][0] == lin else 1) * k * k * F32 if full else 0
        held = sum(inputs[i] for i, members in readers.items() if order.index(members[-1]) >= order.index(lin))
        phases.append((weights_left, held + factor + sending, _working(n, k, LDRA_COPIES)))
        # --asymmetric keeps each quantized linear's float weight and adds its decoded one, for the
        # layer's later stages (pipeline._quantize_stages)
        weights_left += n * k * F32 if paired else -n * k * F32
    w, m, q = max(phases, key=sum)
    return LayerMemory(name, activations + w + m + q, w, activations, m, q)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def return_freed_memory() -> None:
    """Hand memory freed by the allocator back to the system (glibc's malloc_trim; else nothing).

    glibc keeps freed blocks below its adaptive mmap threshold (up to 32 MiB) in its heaps, so
    without this a run's resident set grows by the working sets of earlier linears (measured:
    +30% by the second layer of a 1024-wide model). Called after each linear: it costs milliseconds.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def anonymous_rss() -> int:
    """Bytes of the process's anonymous resident memory (Linux), else its peak resident set."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _output_bytes(source: ModelSource, targets: Targets, opts: QuantizeOptions) -> int:
    """The checkpoint's size: untouched tensors as float32 at most, quantized linears packed."""
    bits = candidate_codebooks(opts)[0].bits
    params = dict(source.skeleton.named_parameters())
    untouched = sum(params[t].numel() * F32 for t in targets.untouched(source) if t in params)
    quantized = 0
    for layer, names in zip(targets.layers, targets.linears):
        for n, k in _linear_shapes(layer.module, layer.name, names).values():
            quantized += n * math.ceil(k * bits / 32) * 4 + 2 * 2 * n * math.ceil(k / opts.group_size)
    return untouched + quantized


def _outside_bytes(source: ModelSource, targets: Targets) -> int:
    """Parameters outside the decoder layers and the head (the calibration forward materialises them)."""
    if not targets.layers:
        return 0
    list_name = targets.layers[0].name.rsplit(".", 1)[0]
    head = source.skeleton.get_output_embeddings()
    head_params = {id(p) for p in head.parameters()} if head is not None else set()
    return sum(p.numel() * F32 for n, p in source.skeleton.named_parameters()
               if not n.startswith(list_name + ".") and id(p) not in head_params)


def plan_memory(
    source: ModelSource, targets: Targets, opts: QuantizeOptions, process: int | None = None, world: int = 1
) -> MemoryPlan:
    """The estimate for quantizing `targets` of `source` with `opts`, per process of `world`;
    `process`: the bytes the process holds now (measured when None)."""
    text = source.config.get_text_config()
    hidden = int(getattr(text, "hidden_size", 0) or 0)
    heads = int(getattr(text, "num_attention_heads", 0) or 0)
    layers = [layer_memory(lay.name, lay.module, names, opts, hidden, heads, world)
              for lay, names in zip(targets.layers, targets.linears)]
    for name, tensor_name in targets.head.items():
        n, k = source.skeleton.get_submodule(name).weight.shape
        w, working = n * k * F32, _working(n, k, INIT_COPIES, 0)
        layers.append(LayerMemory(name, w + working, w, 0, 0, working))
    largest = max(layers, key=lambda m: m.peak, default=LayerMemory("-", 0, 0, 0, 0, 0))
    outside = _outside_bytes(source, targets) if opts.ldra is not None else 0
    shard = min(opts.max_shard_bytes, _output_bytes(source, targets, opts))
    process = anonymous_rss() if process is None else process
    return MemoryPlan(opts.device, process, outside, shard, largest, opts.offload_activations, world)


def device_budget(opts: QuantizeOptions) -> tuple[int, str]:
    """The bytes the compute device may use and where that number comes from."""
    if opts.max_memory is not None:
        return int(opts.max_memory * GIB), f"--max-memory {opts.max_memory:g}"
    if opts.device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(opts.device)).total_memory, f"{opts.device}'s memory"
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's memory"


def check_memory(source: ModelSource, targets: Targets, opts: QuantizeOptions, plan: MemoryPlan) -> None:
    """Refuse a run whose estimated peak exceeds the device's budget, naming options that fit."""
    budget, what = device_budget(opts)
    if plan.device_peak <= budget:
        return
    fits = []
    for flag, alt in _alternatives(opts):
        alt_plan = plan_memory(source, targets, alt, plan.process, plan.world)
        if alt_plan.device_peak <= budget:
            fits.append(f"{flag} ({gib(alt_plan.device_peak)})")
    advice = f"it fits with {' or '.join(fits)}" if fits else "no option of quantize fits it; use a larger machine"
    raise DAQError(f"quantizing needs about {gib(plan.device_peak)} on {opts.device} at {plan.largest.name}, more "
                   f"than the {gib(budget)} of {what}; {advice}")


def _alternatives(opts: QuantizeOptions) -> list[tuple[str, QuantizeOptions]]:
    """Option changes that lower the peak, each on its own, cheapest in quality first."""
    alts = []
    if opts.compensation is not None:
        alts.append(("--rounding nearest", replace(opts, compensation=None)))
    nsamples = opts.calib.nsamples // 2
    while opts.ldra is not None and nsamples >= 8:
        alts.append((f"--nsamples {nsamples}", replace(opts, calib=replace(opts.calib, nsamples=nsamples))))
        nsamples //= 2
    if opts.device.startswith("cuda") and opts.ldra is not None and not opts.offload_activations:
        alts.append(("--offload-activations", replace(opts, offload_activations=True)))
    if opts.device.startswith("cuda"):
        alts.append(("--device cpu", replace(opts, device="cpu")))
    return alts


class PeakMemory:
    """Measures a run's peak: anonymous RSS sampled every `interval` s, and CUDA's peak allocation."""

    def __init__(self, device: str, interval: float = 0.005):
        self.device, self.interval = device, interval
        self.host = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.host = max(self.host, anonymous_rss())
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(torch.device(self.device))
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self.host = max(self.host, anonymous_rss())

    @property
    def device_peak(self) -> int:
        if self.device.startswith("cuda"):
            return int(torch.cuda.max_memory_allocated(torch.device(self.device)))
        return self.host
