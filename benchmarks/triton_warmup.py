"""Compile every Triton kernel a GPU benchmark will launch, in parallel, before anything is timed.

Why: a GPU session has about 15 minutes in all. `kernel_bench.py --check` launches 12 path configs
for 18 (format, group, dtype) cases, and the tuner measures 20-33 candidate configs per (M bucket,
format); every distinct constexpr set (config, bits, group, decode, split-K, M == 1, ...) is one
JIT compile, one after another in the timing process. Counted for gpu_check.sh's first step
(check, then fp4_e2m1 + nf4 over the benchmark's shapes and M): 826 distinct compiles, at 0.8-1 s
each for sm_90a on one core here: 11-14 minutes of a budget meant for measuring. Triton keeps
compiled kernels in its on-disk cache (`~/.triton/cache`), keyed by the source and its
specialization, so the same launches made first by worker processes, one per spare host core,
leave the timing process only cache hits. Each worker makes the real launch (same tensors' shapes,
dtypes and strides), so the cache keys are exactly those of the later calls.

Launches are grouped into jobs by everything but the shape and M: one job holds one config of one
format, so no two workers compile the same kernel (a worker reuses its own compiles across shapes).
A launch that fails (a candidate that does not fit this GPU, which the tuner skips too) is counted
and reported, not raised.
"""

from __future__ import annotations

import multiprocessing
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from daq_vllm.kernels.triton_gemm import KernelConfig


@dataclass(frozen=True)
class Launch:
    """One kernel call: a (format, group, dtype) layer of shape [n, k], M rows, one config."""

    fmt: str
    group: int
    dtype: str  # "float16" | "bfloat16"
    n: int
    k: int
    m: int
    cfg: KernelConfig
    bias: bool = False


@dataclass(frozen=True)
class Warmed:
    """What a warm-up did: jobs (one per worker task), launches, the failed ones and the wall time."""

    jobs: int
    launches: int
    failures: list[str]
    seconds: float

    def line(self) -> str:
        return (f"warm-up: {self.launches} launches in {self.jobs} jobs, {len(self.failures)} failed, "
                f"{self.seconds:.0f} s")


def m_classes(max_m: int) -> list[int]:
    """One M per (tuning bucket, specialization) for launches whose M varies up to `max_m` (an MoE
    expert's token count): the tuner keys M by its power-of-two bucket b (M in (b/2, b]), and Triton
    compiles an int argument equal to 1, or divisible by 16, apart; so 1, then each bucket's b - 1
    and b."""
    ms, b = [1], 2
    while b // 2 < max_m:
        ms += [b - 1, b] if b > 2 else [b]
        b *= 2
    return ms


def jobs(launches: list[Launch]) -> list[list[Launch]]:
    """Launches grouped by everything but (n, k, m), largest group first (the pool's balance)."""
    groups: dict[tuple, list[Launch]] = defaultdict(list)
    for launch in dict.fromkeys(launches):  # drops repeats, keeps order
        groups[(launch.fmt, launch.group, launch.dtype, launch.bias, launch.cfg)].append(launch)
    return sorted(groups.values(), key=len, reverse=True)


_LAYERS: dict[tuple, tuple] = {}  # per worker: (fmt, group, n, k, device) -> the layer's tensors


def _layer(fmt: str, group: int, n: int, k: int, device: str) -> tuple:
    from common import random_daq

    from daq_vllm.format.codebooks import decode_kind, get_codebook
    from daq_vllm.kernels.triton_v2_layout import repack, v2_unsupported

    key = (fmt, group, n, k, device)
    if key not in _LAYERS:
        cb = get_codebook(fmt)
        q, s, b = random_daq(n, k, cb.bits, group, device)
        rp = None if v2_unsupported(cb.bits, group) else repack(q, s, b, cb.values, cb.bits, group, k)
        _LAYERS[key] = (q, s, b, cb.tensor(device), cb.bits, decode_kind(cb.values) == "e2m1", rp)
    return _LAYERS[key]


def run_job(job: list[Launch], device: str) -> list[str]:
    """Make every launch of one job once (compiling what the cache lacks); the failures as text."""
    from daq_vllm.kernels.triton_gemm import run_path

    failures = []
    for launch in job:
        q, s, b, cbt, bits, e2m1, rp = _layer(launch.fmt, launch.group, launch.n, launch.k, device)
        dtype = getattr(torch, launch.dtype)
        x = torch.zeros(launch.m, launch.k, dtype=dtype, device=device)
        bias = torch.zeros(launch.n, dtype=dtype, device=device) if launch.bias else None
        try:
            run_path(launch.cfg, x, q, s, b, cbt, bits, launch.group, e2m1, bias, rp)
            if device == "cuda":
                torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - reported; the tuner skips such a candidate too
            failures.append(f"{launch}: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")
    return failures


def warm(launches: list[Launch], workers: int, device: str = "cuda") -> Warmed:
    """Run `launches` in `workers` fresh processes (spawned: CUDA cannot be forked). A worker that
    dies (a kernel that crashes the process) ends the warm-up with that as a failure: the caller
    goes on, compiling what is left itself."""
    start = time.monotonic()
    grouped = jobs(launches)
    failures: list[str] = []
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=max(1, min(workers, len(grouped))), mp_context=ctx) as pool:
        try:
            for job_failures in pool.map(run_job, grouped, [device] * len(grouped)):
                failures += job_failures
        except BrokenProcessPool as e:
            failures.append(f"a worker process died, warm-up stopped: {e}")
    return Warmed(len(grouped), sum(len(j) for j in grouped), failures, time.monotonic() - start)
