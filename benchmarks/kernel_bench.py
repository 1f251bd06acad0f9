"""DAQ dequant-GEMM speed: our Triton kernels vs fp16 cuBLAS vs PyTorch's int4 weight-only kernel.

For the linear shapes of Llama-2-7B and Llama-3-8B (qkv, o, gate_up, down) and M in
{1, ..., 4096}: median times (`triton.testing.do_bench`) on fresh random data, speed-up over
fp16 `torch.nn.functional.linear` (cuBLAS), PyTorch's `_weight_int4pack_mm` (int4, g128) as the
int4 anchor, and the achieved memory bandwidth against the measured copy bandwidth.
Writes benchmarks/results/kernels-<gpu>.md and .json.

    python benchmarks/kernel_bench.py            # on a CUDA GPU
    python benchmarks/kernel_bench.py --smoke    # CPU, Triton interpreter, one tiny shape
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if "--smoke" in sys.argv:  # before triton is imported: it reads the flag then
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, write_results  # noqa: E402

from daq_vllm.codebooks import get_codebook  # noqa: E402
from daq_vllm.kernels import dequantize, pack_codes  # noqa: E402

SHAPES = {  # (N, K) of each linear (qkv and gate_up fused, as vLLM runs them)
    "llama-2-7b": {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)},
    "llama-3-8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)},
}
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096]
GROUP = 128


def random_daq(n: int, k: int, fmt: str, device: str):
    cb = get_codebook(fmt)
    codes = torch.randint(0, 2**cb.bits, (n, k), device=device)
    groups = -(-k // GROUP)
    scales = (torch.rand(n, groups, device=device) * 0.01 + 1e-3).half()
    offsets = (torch.randn(n, groups, device=device) * 1e-3).half()
    return pack_codes(codes, cb.bits), scales, offsets, cb


def int4_anchor(n: int, k: int, device: str):
    """PyTorch's int4 weight-only matmul (tinygemm), g128; None with the reason if unavailable."""
    try:
        w = torch.randint(0, 16, (n, k), dtype=torch.int32, device=device)
        packed_u8 = (w[:, ::2] << 4 | w[:, 1::2]).to(torch.uint8)
        packed = torch._convert_weight_to_int4pack(packed_u8, 8)
        sz = torch.rand(k // GROUP, n, 2, device=device, dtype=torch.bfloat16)
        return lambda x: torch._weight_int4pack_mm(x, packed, GROUP, sz), None
    except (RuntimeError, AttributeError, TypeError) as e:
        return None, str(e).splitlines()[0][:120]


def copy_bandwidth_gbs(device: str) -> float:
    from triton.testing import do_bench

    src = torch.empty(256 * 1024**2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def bench_gpu(fmt: str) -> dict:
    from triton.testing import do_bench

    from daq_vllm.kernels.triton_gemm import daq_linear_triton

    device = "cuda"
    bandwidth = copy_bandwidth_gbs(device)
    rows = []
    for model, layers in SHAPES.items():
        for name, (n, k) in layers.items():
            q, s, b, cb = random_daq(n, k, fmt, device)
            cbt = cb.tensor(device)
            w16 = torch.randn(n, k, device=device, dtype=torch.float16) * 0.02
            anchor, why = int4_anchor(n, k, device)
            weight_bytes = q.numel() * 4 + s.numel() * 2 + b.numel() * 2
            for m in MS:
                x = torch.randn(m, k, device=device, dtype=torch.float16)
                t_daq = do_bench(lambda: daq_linear_triton(x, q, s, b, cbt, cb.bits, GROUP), return_mode="median")
                t_fp16 = do_bench(lambda: torch.nn.functional.linear(x, w16), return_mode="median")
                t_int4 = do_bench(lambda: anchor(x.bfloat16()), return_mode="median") if anchor else None
                moved = weight_bytes + 2 * m * (k + n)
                rows.append({
                    "model": model, "linear": name, "N": n, "K": k, "M": m,
                    "daq_ms": t_daq, "fp16_ms": t_fp16, "int4_ms": t_int4, "int4_note": why,
                    "speedup_vs_fp16": t_fp16 / t_daq,
                    "speedup_vs_int4": (t_int4 / t_daq) if t_int4 else None,
                    "daq_gbs": moved / (t_daq * 1e-3) / 1e9,
                })
                print(f"{model} {name} M={m}: daq {t_daq:.4f} ms, fp16 {t_fp16:.4f} ms, x{t_fp16 / t_daq:.2f}", flush=True)
    return {"device": torch.cuda.get_device_name(), "copy_gbs": bandwidth, "format": fmt, "rows": rows}


def smoke(fmt: str) -> dict:
    """Tiny shape under the interpreter: correctness of each path, and that the script runs."""
    from daq_vllm.kernels.triton_gemm import daq_linear_triton

    n, k = 64, 160
    q, s, b, cb = random_daq(n, k, fmt, "cpu")
    w = dequantize(q, s, b, cb.tensor(), cb.bits, GROUP, k).half().float()
    rows = []
    for m in (1, 16, 1030):
        x = torch.randn(m, k).half()
        t0 = time.perf_counter()
        y = daq_linear_triton(x, q, s, b, cb.tensor(), cb.bits, GROUP)
        seconds = time.perf_counter() - t0
        err = ((y.float() - x.float() @ w.T).abs().max() / (x.float() @ w.T).abs().max()).item()
        if not err < 1e-2:
            raise SystemExit(f"smoke: M={m} relative error {err:.3g} is too large")
        rows.append({"N": n, "K": k, "M": m, "interpreter_s": seconds, "max_rel_err": err})
        print(f"smoke M={m}: rel err {err:.2e}, {seconds:.2f} s in the interpreter", flush=True)
    return {"device": "cpu (TRITON_INTERPRET=1)", "format": fmt, "rows": rows}


def markdown(result: dict, smoke_run: bool) -> str:
    lines = [f"# DAQ kernels: {result['device']}", ""]
    if smoke_run:
        lines += ["Not measured on GPU: this file comes from the CPU smoke run (Triton interpreter), which",
                  "checks correctness only. Run `python benchmarks/kernel_bench.py` on a CUDA machine for timings.", "",
                  "| N | K | M | max rel err | interpreter s |", "| ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['N']} | {r['K']} | {r['M']} | {r['max_rel_err']:.1e} | {r['interpreter_s']:.2f} |" for r in result["rows"]]
        return "\n".join(lines) + "\n"
    lines += [f"Format {result['format']}, g{GROUP}, fp16 activations; copy bandwidth {result['copy_gbs']:.0f} GB/s.", "",
              "| model | linear | M | DAQ ms | fp16 ms | int4 ms | x fp16 | x int4 | DAQ GB/s |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        int4 = f"{r['int4_ms']:.4f}" if r["int4_ms"] else "n/a"
        vs4 = f"{r['speedup_vs_int4']:.2f}" if r["speedup_vs_int4"] else "n/a"
        lines.append(f"| {r['model']} | {r['linear']} | {r['M']} | {r['daq_ms']:.4f} | {r['fp16_ms']:.4f} | {int4} | "
                     f"{r['speedup_vs_fp16']:.2f} | {vs4} | {r['daq_gbs']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU: one tiny shape under the Triton interpreter")
    ap.add_argument("--format", default="fp4_e2m1")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where the results files go")
    args = ap.parse_args()
    if args.smoke:
        result = smoke(args.format)
        write_results("kernels-smoke", result, markdown(result, True), args.results)
        return
    if not torch.cuda.is_available():
        raise SystemExit("kernel_bench.py needs a CUDA GPU; use --smoke on CPU")
    result = bench_gpu(args.format)
    gpu = result["device"].lower().replace(" ", "-")
    write_results(f"kernels-{gpu}", result, markdown(result, False), args.results)


if __name__ == "__main__":
    main()
