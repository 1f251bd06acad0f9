"""DAQ on CPU: the kernel the kernel layer chooses against torch `F.linear` with fp32 and bf16 weights.

For the linear shapes of SmolLM2-135M and Llama-2-7B and M in {1, ..., 256}, in one run: median
times (`torch.utils.benchmark`, all torch threads) of `F.linear` with fp32 weights (fp32
activations) and bf16 weights (bf16 activations), and of the DAQ kernel with fp32 and with bf16
activations; speed-ups (DAQ-fp32 over fp32, DAQ-bf16 over bf16); effective GB/s (weight bytes read
per call / time) against the measured copy bandwidth; issue 12's kernel goals, met or missed.
Each DAQ output is checked against the dequantized weight, so a wrong kernel cannot post a time.

Decode reads every weight from memory once per token, so each variant cycles through enough
copies of its weight to overflow the last-level cache (`--rotate-mib`); a single hot copy would
time the cache instead. Writes benchmarks/results/kernels-cpu.md and .json.

    python benchmarks/kernel_bench.py --device cpu                 # full run (tens of minutes on 2 cores)
    python benchmarks/kernel_bench.py --device cpu --quick         # goal shapes at M = 1 and 16 (minutes)
    python benchmarks/kernel_bench.py --device cpu --kernel torch  # force a kernel of daq_vllm.kernels.KERNELS
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from common import (
    RESULTS,
    contention_line,
    cpu_info,
    cpu_line,
    cpu_seconds,
    others_busy,
    random_daq,
    write_results,
)
from torch.utils import benchmark

from daq_vllm.format.codebooks import Codebook, get_codebook
from daq_vllm.kernels import KERNELS, LinearKernel, LinearSpec, choose_kernel, dequantize

SHAPES = {  # (N, K) of each linear; qkv and gate_up fused as vLLM runs them, Llama-2's up alone (11008 x 4096)
    "smollm2-135m": {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)},
    "llama-2-7b": {"qkv": (12288, 4096), "o": (4096, 4096), "up": (11008, 4096), "down": (4096, 11008)},
}
QUICK_SHAPES = {"llama-2-7b": {"o": (4096, 4096), "up": (11008, 4096)}}  # the shapes the goals name
MS = [1, 2, 4, 8, 16, 64, 256]
QUICK_MS = [1, 16]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOLERANCE = {"fp32": 1e-3, "bf16": 3e-2}  # max |y - ref| / max |ref|, ref in fp32 from the same inputs
GOAL_SHAPES = [(4096, 4096), (11008, 4096)]
GOALS = (  # (M, activation dtype, minimum speed-up of DAQ over F.linear with weights of that dtype)
    (1, "fp32", 4.0), (1, "bf16", 2.0), (16, "fp32", 1.5),
)
MAX_COPIES = 512


class DAQLayer(torch.nn.Module):
    """The minimum a kernel needs: the checkpoint tensors as parameters, as vLLM's layers hold them."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor):
        super().__init__()
        for name, t in (("qweight", qweight), ("scales", scales), ("offsets", offsets)):
            self.register_parameter(name, torch.nn.Parameter(t.clone(), requires_grad=False))


def make_kernel(spec: LinearSpec, forced: str | None) -> LinearKernel:
    """The kernel `choose_kernel` picks for the spec (what vLLM and transformers get), or `forced` by name."""
    if forced is None:
        return choose_kernel(spec)
    ok, why = KERNELS[forced].can_implement(spec)
    if not ok:
        raise SystemExit(f"--kernel {forced} cannot run {spec.describe()}: {why}")
    return KERNELS[forced](spec)


def copies_for(nbytes: int, rotate_bytes: int) -> int:
    """How many copies of an `nbytes` weight make a cycle of at least `rotate_bytes`."""
    return max(1, min(MAX_COPIES, math.ceil(rotate_bytes / nbytes)))


def median_s(fn: Callable[[], object], min_run_time: float) -> float:
    """Median seconds per call after a warm-up call (which also absorbs any one-time build)."""
    fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def copy_bandwidth_gbs(min_run_time: float) -> float:
    """(bytes read + bytes written) / time of a 512 MiB tensor copy: the machine's streaming ceiling."""
    src = torch.ones(512 * 2**20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    return 2 * src.numel() / median_s(lambda: dst.copy_(src), min_run_time) / 1e9


def cycling(items: list, call: Callable) -> Callable[[], object]:
    """A no-argument function that applies `call` to the next item of `items` on every call."""
    it = itertools.cycle(items)
    return lambda: call(next(it))


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).abs().max() / ref.abs().max()).item()


def daq_side(n: int, k: int, cb: Codebook, args: argparse.Namespace) -> dict:
    """For one shape: the DAQ weight's bytes, its dequantized fp32 weight, and per activation dtype the
    prepared layer copies and their kernel."""
    q, s, b = random_daq(n, k, cb.bits, args.group_size)
    nbytes = q.numel() * 4 + (s.numel() + b.numel()) * 2
    side = {"bytes": nbytes, "w_hat": dequantize(q, s, b, cb.tensor(), cb.bits, args.group_size, k)}
    for name, dtype in DTYPES.items():
        kernel = make_kernel(LinearSpec(cb.bits, args.group_size, k, n, dtype, "cpu", cb.values), args.kernel)
        layers = [DAQLayer(q, s, b) for _ in range(copies_for(nbytes, args.rotate_bytes))]
        for layer in layers:
            kernel.prepare(layer)
        side[name] = (kernel, layers)
    return side


def dense_side(w_hat: torch.Tensor, args: argparse.Namespace) -> dict:
    """Per dtype: copies of the full-precision weight for `F.linear` and their bytes."""
    side = {}
    for name, dtype in DTYPES.items():
        w = w_hat.to(dtype)
        nbytes = w.numel() * w.element_size()
        side[name] = (nbytes, [w.clone() for _ in range(copies_for(nbytes, args.rotate_bytes))])
    return side


def bench_shape(model: str, linear: str, n: int, k: int, cb: Codebook, args: argparse.Namespace) -> list[dict]:
    """One row per M: the four timings, speed-ups, GB/s, the DAQ outputs' errors and how busy other
    processes kept the CPU meanwhile."""
    daq = daq_side(n, k, cb, args)
    dense = dense_side(daq["w_hat"], args)
    rows = []
    for m in args.ms:
        start, t0 = cpu_seconds(), time.perf_counter()
        x32 = torch.randn(m, k)
        row = {"model": model, "linear": linear, "N": n, "K": k, "M": m, "daq_bytes": daq["bytes"]}
        for name, dtype in DTYPES.items():
            x = x32.to(dtype)
            kernel, layers = daq[name]
            row[f"err_{name}"] = rel_err(kernel.apply(layers[0], x), x.float() @ daq["w_hat"].T)
            row[f"kernel_{name}"] = kernel.name
            row[f"daq_{name}_s"] = median_s(cycling(layers, lambda layer: kernel.apply(layer, x)), args.min_run_time)
            dense_bytes, weights = dense[name]
            row[f"{name}_s"] = median_s(cycling(weights, lambda w: F.linear(x, w)), args.min_run_time)
            row[f"speedup_{name}"] = row[f"{name}_s"] / row[f"daq_{name}_s"]
            row[f"daq_{name}_gbs"] = daq["bytes"] / row[f"daq_{name}_s"] / 1e9
            row[f"{name}_gbs"] = dense_bytes / row[f"{name}_s"] / 1e9
        row["others_busy"] = others_busy(start, time.perf_counter() - t0)
        print(f"{model} {linear} [{n}x{k}] M={m}: " + "; ".join(
            f"{d} {row[f'{d}_s'] * 1e6:.0f} us, DAQ {row[f'daq_{d}_s'] * 1e6:.0f} us (x{row[f'speedup_{d}']:.2f})"
            for d in DTYPES), flush=True)
        rows.append(row)
    return rows


def goal_rows(rows: list[dict]) -> list[dict]:
    """Issue 12's kernel goals with the measured value; a goal whose shape or M was not run says so."""
    goals = []
    for m, dtype, need in GOALS:
        for n, k in GOAL_SHAPES:
            hit = [r for r in rows if (r["N"], r["K"], r["M"]) == (n, k, m)]
            value = hit[0][f"speedup_{dtype}"] if hit else None
            goals.append({"goal": f"{n}x{k} M={m}: DAQ-{dtype} >= {need:g}x {dtype} F.linear", "value": value,
                          "met": None if value is None else value >= need})
    worst = min(rows, key=lambda r: r["speedup_fp32"])
    goals.append({"goal": f"never slower than fp32 at any M (worst: {worst['model']} {worst['linear']} "
                          f"M={worst['M']})", "value": worst["speedup_fp32"], "met": worst["speedup_fp32"] >= 1.0})
    return goals


def markdown(result: dict) -> str:
    a, kernels = result["args"], result["kernels"]
    lines = ["# DAQ kernels: CPU", "",
             f"CPU: {cpu_line(result['cpu'])}. Copy bandwidth {result['copy_gbs']:.1f} GB/s "
             "(bytes read + written per second, 512 MiB tensor copy).",
             f"DAQ kernel: fp32 activations `{kernels['fp32']}`, bf16 activations `{kernels['bf16']}` "
             f"({'forced with --kernel' if a['kernel'] else 'chosen by choose_kernel'}"
             f"{', DAQ_CPU_ISA=' + result['daq_cpu_isa'] if result['daq_cpu_isa'] else ''}). "
             f"Format {a['format']} g{a['group_size']}.",
             f"Median of `torch.utils.benchmark` (min run time {a['min_run_time']} s per cell); each variant cycles "
             f"through copies of its weight totalling >= {a['rotate_bytes'] / 2**20:.0f} MiB, so weights come from "
             "memory as in a decode step. x fp32 = fp32 `F.linear` time / DAQ time with fp32 activations; x bf16 the "
             "same with bf16 weights and activations. GB/s = weight bytes read per call / time.",
             f"Measured {result['date']}. {contention_line(result['others_busy'])}", "",
             "## Goals (issue 12)", "", "| goal | measured | result |", "| --- | ---: | --- |"]
    for g in result["goals"]:
        shown = "not measured" if g["value"] is None else f"{g['value']:.2f}x"
        lines.append(f"| {g['goal']} | {shown} | {'-' if g['met'] is None else 'met' if g['met'] else 'missed'} |")
    lines += ["", "## Times", "",
              "| model | linear | N x K | M | fp32 us | DAQ-fp32 us | x fp32 | bf16 us | DAQ-bf16 us | x bf16 | "
              "DAQ-fp32 GB/s | fp32 GB/s | DAQ-fp32 % copy | max rel err fp32/bf16 | others' CPU % |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for r in result["rows"]:
        wrong = any(r[f"err_{d}"] > TOLERANCE[d] for d in DTYPES)
        lines.append(f"| {r['model']} | {r['linear']} | {r['N']}x{r['K']} | {r['M']} | {r['fp32_s'] * 1e6:.0f} | "
                     f"{r['daq_fp32_s'] * 1e6:.0f} | {r['speedup_fp32']:.2f} | {r['bf16_s'] * 1e6:.0f} | "
                     f"{r['daq_bf16_s'] * 1e6:.0f} | {r['speedup_bf16']:.2f} | {r['daq_fp32_gbs']:.2f} | "
                     f"{r['fp32_gbs']:.2f} | {100 * r['daq_fp32_gbs'] / result['copy_gbs']:.0f} | "
                     f"{r['err_fp32']:.1e} / {r['err_bf16']:.1e}{' **WRONG**' if wrong else ''} | "
                     f"{100 * r['others_busy']:.0f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="kernel_bench.py --device cpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke check: Llama-2 4096x4096 and 11008x4096, M = 1, 16")
    ap.add_argument("--kernel", choices=list(KERNELS), help="force this DAQ kernel (default: choose_kernel's pick)")
    ap.add_argument("--ms", type=int, nargs="+", help=f"batch sizes M (default: {MS})")
    ap.add_argument("--models", nargs="+", choices=list(SHAPES), help="shape sets (default: all)")
    ap.add_argument("--format", default="fp4_e2m1", help="codebook (default: fp4_e2m1, the fastest to decode)")
    ap.add_argument("--group-size", type=int, default=128, help="default: 128, the quantizer's default")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    ap.add_argument("--min-run-time", type=float, default=0.5, help="seconds of timed calls per cell")
    ap.add_argument("--rotate-mib", type=float, default=None,
                    help="MiB of weights each variant cycles through (default: 2x the last-level cache; 0: one copy)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder for kernels-cpu.md|json")
    args = ap.parse_args(argv)
    args.ms = args.ms or (QUICK_MS if args.quick else MS)
    args.rotate_bytes = int(2**20 * args.rotate_mib) if args.rotate_mib is not None else 2 * last_level_cache_bytes()
    return args


def last_level_cache_bytes() -> int:
    """Size of the largest cache of CPU 0 (Linux sysfs), or 32 MiB where sysfs does not say."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        sizes.append(int(text[:-1]) * {"K": 2**10, "M": 2**20}[text[-1]] if text[-1] in "KM" else int(text))
    return max(sizes, default=32 * 2**20)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cb = get_codebook(args.format)
    start, t0 = cpu_seconds(), time.perf_counter()
    shapes = QUICK_SHAPES if args.quick and not args.models else {m: SHAPES[m] for m in args.models or SHAPES}
    result = {"device": "cpu", "cpu": cpu_info(), "daq_cpu_isa": os.environ.get("DAQ_CPU_ISA", ""),
              "date": time.strftime("%Y-%m-%d %H:%M"), "copy_gbs": copy_bandwidth_gbs(args.min_run_time),
              "args": {k: v for k, v in vars(args).items() if k != "results"}, "rows": []}
    print(f"{cpu_line(result['cpu'])}; copy {result['copy_gbs']:.1f} GB/s", flush=True)
    for model, layers in shapes.items():
        for linear, (n, k) in layers.items():
            result["rows"] += bench_shape(model, linear, n, k, cb, args)
    result["others_busy"] = others_busy(start, time.perf_counter() - t0)
    result["kernels"] = {d: ", ".join(sorted({r[f"kernel_{d}"] for r in result["rows"]})) for d in DTYPES}
    result["goals"] = goal_rows(result["rows"])
    text = markdown(result)
    write_results("kernels-cpu", result, text, args.results)
    print(text)


if __name__ == "__main__":
    main()
