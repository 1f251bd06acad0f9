"""A DAQ checkpoint's full-precision lm_head on CPU: `bf16_linear` against what vLLM-CPU runs.

DAQ keeps the lm_head unquantized. Served in bfloat16 on a CPU without bfloat16 instructions,
vLLM-CPU's oneDNN refuses the weight and falls back to torch's `F.linear`; in fp32 it uses oneDNN.
For SmolLM2-135M's tied head (49152 x 576) and Llama-2-7B's (32000 x 4096) at M in {1, 4, 16, 64}
(M = sequences in the batch: vLLM computes logits for the last token of each), in one run: median
times of `F.linear` with bf16 weights and activations (vLLM's bf16 fallback), vLLM's oneDNN fp32
product (when vllm is installed), `F.linear` in fp32, and `daq_vllm.kernels.cpu_bf16.bf16_linear`
(bf16 weights, bf16 activations), each checked against the fp32 product. Each variant cycles
through copies of its weight beyond the last-level cache, as in kernel_bench_cpu.py. Writes
benchmarks/results/lm-head-cpu.md and .json.

    python benchmarks/lm_head_cpu.py            # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import RESULTS, contention_line, cpu_info, cpu_line, cpu_seconds, others_busy, write_results
from kernel_bench_cpu import copies_for, cycling, last_level_cache_bytes, median_s, rel_err

from daq_vllm.kernels.cpu_bf16 import bf16_linear, native_bf16, unavailable

HEADS = {"smollm2-135m": (49152, 576), "llama-2-7b": (32000, 4096)}
MS = [1, 4, 16, 64]
TOLERANCE = 2e-2  # max |y - ref| / max |ref| with bf16 activations


def onednn_fp32() -> object | None:
    """vLLM-CPU's fp32 product (`ops.onednn_mm` on a prepacked weight), or None without vllm."""
    try:
        from vllm import _custom_ops as ops
    except ImportError:
        return None
    return ops if ops._supports_onednn else None


def bench_head(model: str, n: int, k: int, args: argparse.Namespace, ops: object | None) -> list[dict]:
    w = torch.randn(n, k) / k**0.5
    wb = w.bfloat16()
    fp32s = [w.clone() for _ in range(copies_for(w.nbytes, args.rotate_bytes))]
    bf16s = [wb.clone() for _ in range(copies_for(wb.nbytes, args.rotate_bytes))]
    handles = [ops.create_onednn_mm(c.t(), 32) for c in fp32s] if ops else []
    rows = []
    for m in args.ms:
        x = torch.randn(m, k)
        xb = x.bfloat16()
        ref = F.linear(xb.float(), wb.float())
        row = {"model": model, "N": n, "K": k, "M": m,
               "linear_bf16_s": median_s(cycling(bf16s, lambda c: F.linear(xb, c)), args.min_run_time),
               "linear_fp32_s": median_s(cycling(fp32s, lambda c: F.linear(x, c)), args.min_run_time),
               "onednn_fp32_s": median_s(cycling(handles, lambda h: ops.onednn_mm(h, x, None)), args.min_run_time)
               if ops else None,
               "daq_s": median_s(cycling(bf16s, lambda c: bf16_linear(xb, c)), args.min_run_time),
               "err": rel_err(bf16_linear(xb, wb), ref)}
        fp32_s = row["onednn_fp32_s"] or row["linear_fp32_s"]
        row["x_bf16"], row["x_fp32"] = row["linear_bf16_s"] / row["daq_s"], fp32_s / row["daq_s"]
        print(f"{model} M={m}: F.linear bf16 {row['linear_bf16_s'] * 1e3:.2f} ms, bf16_linear {row['daq_s'] * 1e3:.2f} "
              f"ms ({row['x_bf16']:.2f}x), fp32 {fp32_s * 1e3:.2f} ms", flush=True)
        rows.append(row)
    return rows


def markdown(result: dict) -> str:
    lines = ["# A DAQ checkpoint's full-precision lm_head on CPU", "",
             f"CPU: {cpu_line(result['cpu'])}. bfloat16 in oneDNN: {result['native_bf16']}.",
             f"`bf16_linear`: {result['bf16_linear']}.",
             "Median of `torch.utils.benchmark` per cell; each variant cycles through copies of its weight beyond the "
             "last-level cache. `F.linear` bf16 is what vLLM-CPU runs for a bfloat16 lm_head where oneDNN refuses "
             "bfloat16; oneDNN fp32 what it runs in float32. x bf16 = F.linear bf16 / bf16_linear; x fp32 = the fp32 "
             "product (oneDNN if vllm is installed, else F.linear) / bf16_linear.",
             f"Measured {result['date']}. {contention_line(result['others_busy'])}", "",
             "| head | N x K | M | F.linear bf16 ms | bf16_linear ms | x bf16 | oneDNN fp32 ms | F.linear fp32 ms | "
             "x fp32 | max rel err |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in result["rows"]:
        onednn = "-" if r["onednn_fp32_s"] is None else f"{r['onednn_fp32_s'] * 1e3:.2f}"
        wrong = " **WRONG**" if r["err"] > TOLERANCE else ""
        lines.append(f"| {r['model']} | {r['N']}x{r['K']} | {r['M']} | {r['linear_bf16_s'] * 1e3:.2f} | "
                     f"{r['daq_s'] * 1e3:.2f} | {r['x_bf16']:.2f} | {onednn} | {r['linear_fp32_s'] * 1e3:.2f} | "
                     f"{r['x_fp32']:.2f} | {r['err']:.1e}{wrong} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ms", type=int, nargs="+", default=MS, help=f"batch sizes M (default: {MS})")
    ap.add_argument("--min-run-time", type=float, default=0.5, help="seconds of timed calls per cell")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder for lm-head-cpu.md|json")
    args = ap.parse_args(argv)
    args.rotate_bytes = 2 * last_level_cache_bytes()
    reason = unavailable(torch.empty(1, 1, dtype=torch.bfloat16))
    if reason:
        raise SystemExit(f"bf16_linear does not run here: {reason}")
    torch.manual_seed(0)
    ops = onednn_fp32()
    start, t0 = cpu_seconds(), time.perf_counter()
    result = {"device": "cpu", "cpu": cpu_info(), "date": time.strftime("%Y-%m-%d %H:%M"),
              "native_bf16": native_bf16(), "bf16_linear": "AVX2 (csrc/cpu_bf16*.cpp)",
              "args": {k: v for k, v in vars(args).items() if k != "results"}, "rows": []}
    for model, (n, k) in HEADS.items():
        result["rows"] += bench_head(model, n, k, args, ops)
    result["others_busy"] = others_busy(start, time.perf_counter() - t0)
    text = markdown(result)
    write_results("lm-head-cpu", result, text, args.results)
    print(text)


if __name__ == "__main__":
    main()
