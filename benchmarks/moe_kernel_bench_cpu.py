"""DAQ MoE kernels on CPU: `cpu_moe` (one C++ call per layer) against `loop` and unquantized experts.

For the expert shapes of the SmolLM2 MoE that benchmarks/moe_quality.py builds, OLMoE-1B-7B and
Qwen1.5-MoE-A2.7B (experts, hidden, intermediate, top-k), 4-bit g128 experts with the nf4
codebook (`moe_kernel_bench.make_spec`: the table decode any learned codebook takes), random top-k
routing and T tokens, fp32 and bf16 activations: median times (`torch.utils.benchmark`, all torch threads) of
- `cpu_moe`: the fused kernel (`kernels/csrc/cpu_moe.cpp`), what `choose_moe_kernel` picks on CPU;
- `loop`: per expert with tokens, its two projections through the dense `cpu` kernel (Python glue);
- `unquantized`: the same experts dequantized to the activation dtype, a torch loop of `F.linear`
  per routed expert (the peer a full-precision checkpoint has in eager PyTorch);
with each kernel's largest error against `moe_reference` relative to its largest output, so a wrong
kernel cannot post a time. Decode reads every routed expert from memory, so each variant cycles
through copies of its layer that overflow the last-level cache (`--rotate-mib`), as
kernel_bench_cpu.py does. Writes benchmarks/results/moe-kernels-cpu.md and .json.

    python benchmarks/moe_kernel_bench_cpu.py                  # every shape (minutes on 2 cores)
    python benchmarks/moe_kernel_bench_cpu.py --models smollm2-moe-e4k2 --tokens 1 4
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from common import RESULTS, contention_line, cpu_info, cpu_line, cpu_seconds, others_busy, write_results
from kernel_bench_cpu import copies_for, cycling, last_level_cache_bytes, median_s
from moe_kernel_bench import fp16_experts, make_layer, make_spec, prepared, rel_err, routing, torch_loop

from daq_vllm.kernels import moe_reference

SHAPES = {  # experts, hidden, intermediate, top-k
    "smollm2-moe-e4k2": (4, 576, 1536, 2),
    "olmoe-1b-7b": (64, 2048, 1024, 8),
    "qwen1.5-moe-a2.7b": (60, 2048, 1408, 4),
}
TOKENS = [1, 4, 16, 128]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2}  # max |y - ref| / max |ref|
KERNELS = ("cpu_moe", "loop")


def layer_bytes(spec) -> int:
    """Bytes of one layer's packed codes, scales and offsets (what decode streams for every routed expert)."""
    e, h, i = spec.num_experts, spec.hidden_size, spec.intermediate_size
    weights, groups = 3 * h * i, 2 * i * -(-h // spec.group_size) + h * -(-i // spec.group_size)
    return e * (weights * spec.bits // 8 + 4 * groups)


def bench_model(name: str, shape: tuple[int, int, int, int], args: argparse.Namespace) -> list[dict]:
    experts, hidden, inter, top_k = shape
    rows = []
    for dname, dtype in DTYPES.items():
        spec = make_spec(experts, hidden, inter, dtype, "cpu")
        copies = copies_for(layer_bytes(spec), args.rotate_bytes)
        layers = [make_layer(spec, "cpu") for _ in range(copies)]
        for layer in layers:  # each kernel keeps what it prepares on the layer: one instance serves every copy
            kernels = {k: prepared(k, spec, layer) for k in KERNELS}
        dense_bytes = 3 * experts * hidden * inter * dtype.itemsize
        dense = [fp16_experts(spec, layer) for layer in layers[: copies_for(dense_bytes, args.rotate_bytes)]]
        for t in args.tokens:
            x = torch.randn(t, hidden).to(dtype)
            weights, ids = routing(t, experts, "cpu", top_k)
            ref = moe_reference(spec, layers[0], x, weights, ids)
            row = {"model": name, "experts": experts, "hidden": hidden, "intermediate": inter, "top_k": top_k,
                   "dtype": dname, "T": t, "copies": copies}
            for k, kernel in kernels.items():
                row[f"{k}_err"] = rel_err(kernel.apply(layers[0], x, weights, ids), ref)
                if not row[f"{k}_err"] < TOLERANCE[dname]:
                    raise SystemExit(f"{k} on {name} {dname} T={t}: relative error {row[f'{k}_err']:.2g}")
                call = cycling(layers, lambda lay, kernel=kernel: kernel.apply(lay, x, weights, ids))
                row[f"{k}_ms"] = 1e3 * median_s(call, args.min_run_time)
            row["unquantized_ms"] = 1e3 * median_s(cycling(dense, lambda w: torch_loop(x, weights, ids, *w)),
                                                   args.min_run_time)
            rows.append(row)
            print(f"{name} {dname} T={t}: cpu_moe {row['cpu_moe_ms']:.3f} ms, loop {row['loop_ms']:.3f} ms, "
                  f"unquantized {row['unquantized_ms']:.3f} ms", flush=True)
        del layers, kernels, dense
    return rows


def markdown(result: dict) -> str:
    lines = [
        "# DAQ MoE kernels on CPU: `cpu_moe` against `loop` and unquantized experts", "",
        f"{cpu_line(result['cpu'])}. {contention_line(result['others_busy'])} Measured {result['date']}.",
        "4-bit g128 experts, nf4 codebook (table decode), random top-k routing. Median ms per layer call, each",
        "variant cycling through layer copies that overflow the last-level cache. `unquantized`: the experts",
        "dequantized to the activation dtype, a torch loop of `F.linear` per routed expert. Errors: largest",
        "|y - ref| / largest |ref| against `moe_reference`.", "",
        "| model (E, H, I, k) | dtype | T | cpu_moe ms | loop ms | unquantized ms | cpu_moe / loop | "
        "cpu_moe / unquantized | err cpu_moe | err loop |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        shape = f"{r['model']} ({r['experts']}, {r['hidden']}, {r['intermediate']}, {r['top_k']})"
        lines.append(f"| {shape} | {r['dtype']} | {r['T']} | {r['cpu_moe_ms']:.3f} | {r['loop_ms']:.3f} | "
                     f"{r['unquantized_ms']:.3f} | {r['loop_ms'] / r['cpu_moe_ms']:.2f}x | "
                     f"{r['unquantized_ms'] / r['cpu_moe_ms']:.2f}x | {r['cpu_moe_err']:.1e} | {r['loop_err']:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    ap.add_argument("--min-run-time", type=float, default=0.5, help="seconds of timed calls per cell")
    ap.add_argument("--rotate-mib", type=float, default=None,
                    help="MiB of weights each variant cycles through (default: 2x the last-level cache; 0: one copy)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder for moe-kernels-cpu.md|json")
    args = ap.parse_args()
    args.rotate_bytes = int(2**20 * args.rotate_mib) if args.rotate_mib is not None else 2 * last_level_cache_bytes()
    torch.manual_seed(0)
    start, t0 = cpu_seconds(), time.perf_counter()
    result = {"device": "cpu", "cpu": cpu_info(), "daq_cpu_isa": os.environ.get("DAQ_CPU_ISA", ""),
              "date": time.strftime("%Y-%m-%d %H:%M"),
              "args": {k: v for k, v in vars(args).items() if k != "results"}, "rows": []}
    print(cpu_line(result["cpu"]), flush=True)
    for name in args.models:
        result["rows"] += bench_model(name, SHAPES[name], args)
    result["others_busy"] = others_busy(start, time.perf_counter() - t0)
    text = markdown(result)
    write_results("moe-kernels-cpu", result, text, args.results)
    print(text)


if __name__ == "__main__":
    main()
