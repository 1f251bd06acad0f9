"""Shared set-up for the benchmarks: the SmolLM2 float checkpoint, its default DAQ checkpoint, the machine."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from daq_vllm.demo.smollm2 import export_float_checkpoint, smollm2_gguf

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
CACHE = ROOT / ".cache"
CONTENTION_LIMIT = 0.1  # share of the cores other processes may use before a CPU timing is flagged
# The instruction-set extensions that decide which CPU kernel path can run (read from /proc/cpuinfo).
ISA_FLAGS = ("avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "amx_tile", "amx_bf16", "neon", "asimd", "sve")


def smollm2_float_dir() -> Path:
    """SmolLM2-135M as a float32 HF directory, exported once from the packaged GGUF."""
    return export_float_checkpoint(smollm2_gguf(), CACHE / "smollm2-135m-fp32")


def quantize_defaults() -> dict:
    """What `daq-vllm quantize MODEL --out DIR` resolves its options to today (CLI defaults and the
    recipe's own defaults), to tell a cached "default" checkpoint from one made under older defaults."""
    from daq_vllm.cli.main import build_parser
    from daq_vllm.offline.options import AUTO_CANDIDATES, DEFAULT_FORMAT

    args = vars(build_parser().parse_args(["quantize", "MODEL", "--out", "DIR"]))
    return {**{k: v for k, v in args.items() if k not in ("model", "out", "func")},
            "default_format": DEFAULT_FORMAT, "auto_candidates": list(AUTO_CANDIDATES)}


def default_daq_checkpoint(full: Path) -> Path:
    """`full` quantized with the default DAQ settings, made once (about 8 minutes for SmolLM2 on 2 cores)
    and again when the defaults change (a stamp file records those it was made with).

    The throughput and eval-speed benchmarks share it, so each measures the same checkpoint."""
    out = CACHE / "throughput-daq"
    stamp = CACHE / "throughput-daq.defaults.json"
    defaults = json.dumps(quantize_defaults(), sort_keys=True, default=str)
    if not (out / "config.json").is_file() or not stamp.is_file() or stamp.read_text() != defaults:
        subprocess.run([sys.executable, "-m", "daq_vllm.cli", "quantize", str(full), "--out", str(out), "--overwrite"],
                       check=True)
        stamp.write_text(defaults)
    return out


def machine() -> str:
    return f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def cpu_info() -> dict:
    """CPU model, the ISA extensions present and torch's view of them: CPU results depend on all three."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags.update(value.split())
    except OSError:
        pass  # not Linux: model from `platform`, no flags
    return {"model": model, "isa": [f for f in ISA_FLAGS if f in flags],
            "torch_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def cpu_line(info: dict) -> str:
    """`cpu_info()` as one line for a results header."""
    return (f"{info['model']}; ISA: {', '.join(info['isa']) or 'none found'} (torch uses {info['torch_capability']}); "
            f"{info['threads']} threads; torch {info['torch']}")


def cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, of this process and its reaped children) so far; (nan, own)
    where /proc/stat is missing. Two snapshots give `others_busy`."""
    t = os.times()
    own = t.user + t.system + t.children_user + t.children_system
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    except OSError:
        return float("nan"), own
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK"), own


def others_busy(start: tuple[float, float], wall_s: float, own_s: float | None = None) -> float:
    """Share of all cores that other processes kept busy since the `cpu_seconds()` snapshot `start`
    (`own_s`: this run's CPU seconds since then, where `cpu_seconds` cannot see them all).

    On a shared machine a timing is only as good as this is small: a stolen core stalls every
    parallel region (times snap to multiples of the scheduler tick)."""
    end = cpu_seconds()
    own = end[1] - start[1] if own_s is None else own_s
    return max(0.0, (end[0] - start[0]) - own) / (wall_s * (os.cpu_count() or 1))


class ProcessTreeCpu:
    """CPU seconds of this process and of every process it starts, sampled while they run.

    vLLM's engine and server processes are reaped late or not by us (a server's engine core by the
    server), so `os.times()` misses their time and `others_busy` would count it as another's."""

    def __init__(self, interval_s: float = 0.5):
        import threading

        import psutil  # a vLLM dependency; only the serving benchmark uses this

        self._me = psutil.Process()
        self._start = self._own()
        self._last: dict[int, float] = {}  # pid -> its user + system seconds when last seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(interval_s,), daemon=True)
        self._thread.start()

    def _own(self) -> float:
        t = self._me.cpu_times()
        return t.user + t.system

    def _poll(self, interval_s: float) -> None:
        import psutil

        while not self._stop.wait(interval_s):
            for child in self._me.children(recursive=True):
                try:
                    t = child.cpu_times()
                except psutil.Error:  # gone since the listing
                    continue
                self._last[child.pid] = t.user + t.system

    def seconds(self) -> float:
        """This process's CPU seconds since construction plus its descendants' (each last seen <= interval ago)."""
        self._stop.set()
        self._thread.join()
        return self._own() - self._start + sum(self._last.values())


def contention_line(share: float) -> str:
    """`others_busy` as one header line, with a warning when the numbers should be re-measured."""
    warn = " **Timings unreliable: rerun on idle cores.**" if share > CONTENTION_LIMIT else ""
    return f"Other processes kept {100 * share:.0f}% of the CPU busy during the run.{warn}"


def write_results(name: str, payload: dict, markdown: str, directory: Path = RESULTS) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (directory / f"{name}.md").write_text(markdown)


def random_daq(n: int, k: int, bits: int, group: int, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """Packed random codes, scales and offsets with the magnitudes of a real checkpoint (weights ~ 0.02)."""
    from daq_vllm.format import num_groups
    from daq_vllm.kernels import pack_codes

    codes = torch.randint(0, 2**bits, (n, k), device=device)
    groups = num_groups(k, group)
    scales = (torch.rand(n, groups, device=device) * 0.01 + 1e-3).half()
    offsets = (torch.randn(n, groups, device=device) * 1e-3).half()
    return pack_codes(codes, bits), scales, offsets


def capture_graph(fn):
    """`fn()` captured in a CUDA graph (after one warm-up call on a side stream, as torch asks):
    (the graph, the output tensor its replays write)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out
