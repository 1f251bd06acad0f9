"""Compile every Triton kernel a GPU benchmark will launch, in parallel, before anything is timed.

Why: a GPU session has about 15 minutes in all. `kernel_bench.py --check` launches 12 path configs
for 19 (format, group, dtype) cases, and the tuner measures 20-33 candidate configs per (M bucket,
format); every distinct constexpr set (config, bits, group, decode, split-K, M == 1, ...) is one
JIT compile, one after another in the timing process. Counted for gpu_check.sh's first step
(check, then fp4_e2m1 + nf4 over the benchmark's shapes and M): 832 distinct compiles, at 0.8-1 s
each for sm_90a on one core here: 11-14 minutes of a budget meant for measuring. Triton keeps
compiled kernels in its on-disk cache (`~/.triton/cache`), keyed by the source and its
specialization, so the same launches made first by worker processes, one per spare host core,
leave the timing process only cache hits. Each worker makes the real launch (same tensors' shapes,
dtypes and strides), so the cache keys are exactly those of the later calls.

Launches are grouped into jobs by everything but the shape and M: one job holds one config of one
format, so no two workers compile the same kernel (a worker reuses its own compiles across shapes).
A launch that fails (a candidate that does not fit this GPU, which the tuner skips too) is counted
and reported, not raised. A launch that loses the worker's CUDA context (an illegal address: every
later call in that process fails) is noted, the worker ends, and the jobs it left run in a new
pool without that config (`faulty`: the config, or its whole path once CRASHES_PER_PATH of its
configs crashed); `exclude` keeps the same out of the timing process's tuner, so a faulty kernel
costs its own numbers, not the run's.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from daq_vllm.errors import describe

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
    """What a warm-up did: jobs (one per worker task), launches, the failed ones (text), the ones
    that lost their process's CUDA context, and the wall time."""

    jobs: int
    launches: int
    failures: list[str]
    crashed: list[Launch]
    seconds: float

    def line(self) -> str:
        return (f"warm-up: {self.launches} launches in {self.jobs} jobs, {len(self.failures)} failed "
                f"({len(self.crashed)} lost the CUDA context), {self.seconds:.0f} s")


def tuner_launches(fmt: str, group: int, dtype: str, shapes: list[tuple[int, int]], ms: list[int]) -> list[Launch]:
    """What `triton_gemm`'s tuner launches for layers of these (N, K) at these M: every v1 and v2
    candidate of each M's bucket (the layers carry the v2 layout, as `prepare()` makes it)."""
    from daq_vllm.kernels.triton_gemm import candidate_configs, v2_candidate_configs

    return [Launch(fmt, group, dtype, n, k, m, cfg)
            for n, k in shapes for m in ms for cfg in candidate_configs(m) + v2_candidate_configs(m)]


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


def note_crash(crash_dir: str, launch: Launch, error: str) -> None:
    """Leave word of the launch that lost this process's CUDA context, then end the process (nothing
    more can run in it)."""
    Path(crash_dir, f"{os.getpid()}.json").write_text(json.dumps({"launch": asdict(launch), "error": error}))
    os._exit(70)


def _read_crashes(crash_dir: str) -> list[tuple[Launch, str]]:
    from daq_vllm.kernels.triton_gemm import KernelConfig

    found = []
    for path in sorted(Path(crash_dir).glob("*.json")):
        note = json.loads(path.read_text())
        fields = note["launch"]
        found.append((Launch(**{**fields, "cfg": KernelConfig(**fields["cfg"])}), note["error"]))
        path.unlink()
    return found


def run_job(job: list[Launch], device: str, crash_dir: str) -> list[str]:
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
            error = describe(e)
            if device == "cuda" and not _context_alive():
                note_crash(crash_dir, launch, error)
            failures.append(f"{launch}: {error}")
    return failures


def _context_alive() -> bool:
    try:
        torch.cuda.synchronize()
        torch.zeros(1, device="cuda").add_(1).item()
        return True
    except RuntimeError:
        return False


Runner = Callable[[list[Launch], str, str], list[str]]
CRASHES_PER_PATH = 3  # crashed configs after which a whole path (say every `mma` config) is left out


def faulty(cfg: KernelConfig, crashed: list[Launch]) -> bool:
    """Whether `cfg` is left out after the `crashed` launches: its own crash, or its path's."""
    bad = {launch.cfg for launch in crashed}
    return cfg in bad or sum(c.path == cfg.path for c in bad) >= CRASHES_PER_PATH


def warm(launches: list[Launch], workers: int, device: str = "cuda", runner: Runner = run_job) -> Warmed:
    """Run `launches` (`runner(job, device, crash_dir)` per job) in `workers` fresh processes
    (spawned: CUDA cannot be forked). When a worker ends on a lost context, the launch that lost it
    is recorded and dropped, and the jobs not finished run again in a new pool."""
    start = time.monotonic()
    grouped = jobs(launches)
    pending, failures, crashed = list(grouped), [], []
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as crash_dir:
        while pending:
            done: set[int] = set()
            with ProcessPoolExecutor(max_workers=max(1, min(workers, len(pending))), mp_context=ctx) as pool:
                futures = {pool.submit(runner, job, device, crash_dir): i for i, job in enumerate(pending)}
                for future in as_completed(futures):
                    try:
                        failures += future.result()
                    except BrokenProcessPool:  # a worker ended: the jobs not done run again below
                        break
                    except Exception as e:  # noqa: BLE001 - outside any launch (say, making the layer)
                        failures.append(f"a job failed: {describe(e)}")
                    done.add(futures[future])
            lost = _read_crashes(crash_dir)
            if len(done) < len(pending) and not lost:
                failures.append("a worker process died without a note (not a CUDA error): warm-up stopped")
                break
            crashed += [launch for launch, _ in lost]
            failures += [f"{launch}: {error} (lost the CUDA context)" for launch, error in lost]
            pending = [[launch for launch in job if not faulty(launch.cfg, crashed)]
                       for i, job in enumerate(pending) if i not in done]
            pending = [job for job in pending if job]
    return Warmed(len(grouped), sum(len(j) for j in grouped), failures, crashed, time.monotonic() - start)


def exclude(crashed: list[Launch]) -> None:
    """Keep the `faulty` configs out of this process's tuner (`triton_gemm`'s candidate lists):
    trying one again would lose the timing process's CUDA context."""
    from daq_vllm.kernels import triton_gemm

    if not crashed:
        return
    for name in ("candidate_configs", "v2_candidate_configs"):
        configs = getattr(triton_gemm, name)
        setattr(triton_gemm, name, lambda m, configs=configs: [c for c in configs(m) if not faulty(c, crashed)])
