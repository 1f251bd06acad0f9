"""DAQ dequant-GEMM speed: our Triton kernels vs fp16 cuBLAS vs PyTorch's int4 weight-only kernel.

For the linear shapes of Llama-2-7B and Llama-3-8B (qkv, o, gate_up, down) and M in
{1, ..., 4096}: median times (`triton.testing.do_bench`) on fresh random data, speed-up over
fp16 `torch.nn.functional.linear` (cuBLAS), PyTorch's `_weight_int4pack_mm` (int4, g128) as the
int4 anchor, and the achieved memory bandwidth against the measured copy bandwidth.
Writes benchmarks/results/kernels-<gpu>.md and .json. Each layer carries the v2 layout
(`triton_v2_layout.repack`, as `prepare()` makes it), so the tuner measures the v1 and v2 paths
and the results record which config each shape chose; `--write-configs` ships those choices as
kernels/configs/<gpu>.json. `benchmarks/gpu_check.sh` is the one prepared GPU run.

    python benchmarks/kernel_bench.py            # on a CUDA GPU
    python benchmarks/kernel_bench.py --smoke    # CPU, Triton interpreter, one tiny shape
    python benchmarks/kernel_bench.py --device cpu [--quick] [--kernel NAME]  # the CPU kernel: kernel_bench_cpu.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if "--smoke" in sys.argv:  # before triton is imported: it reads the flag then
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, capture_graph, random_daq, write_results  # noqa: E402
from triton_warmup import Launch, exclude, faulty, tuner_launches, warm  # noqa: E402

from daq_vllm.errors import describe  # noqa: E402
from daq_vllm.format import num_groups  # noqa: E402
from daq_vllm.format.codebooks import decode_kind, get_codebook  # noqa: E402
from daq_vllm.kernels import dequantize, pack_codes  # noqa: E402
from daq_vllm.kernels.triton_v2_layout import repack  # noqa: E402

if TYPE_CHECKING:
    from daq_vllm.kernels.triton_gemm import KernelConfig

SHAPES = {  # (N, K) of each linear (qkv and gate_up fused, as vLLM runs them)
    "llama-2-7b": {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)},
    "llama-3-8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)},
}
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096]
GROUP = 128


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


def graph_ms(fn) -> float:
    """Median time of `fn` replayed from a CUDA graph (as vLLM runs decode): no launch overhead."""
    from triton.testing import do_bench

    fn()  # tunes our kernel outside the capture
    graph, _ = capture_graph(fn)
    return do_bench(graph.replay, return_mode="median")


def bench_gpu(fmts: list[str], dtype: torch.dtype, shapes: dict, ms_list: list[int], save, deadline: float) -> None:
    """Times per (shape, M) for each format, with activations (and the fp16 baseline) in `dtype`.

    Shapes outside, formats inside: a run cut short by `deadline` (checked before each shape) still
    has every format on the same shapes, as the paired goals (nf4 / fp4, 3-bit / 4-bit) need.
    `save(bench)` after each (shape, format), so a cut-off run keeps what it measured.
    """
    from daq_vllm.kernels import triton_gemm

    device = "cuda"
    dname = str(dtype).removeprefix("torch.")
    run = {"device": torch.cuda.get_device_name(), "triton": __import__("triton").__version__,
           "torch": torch.__version__, "copy_gbs": copy_bandwidth_gbs(device), "dtype": dname}
    benches = [{**run, "format": fmt, "rows": [], "errors": [], "tuned": [], "cut_short": False} for fmt in fmts]
    for model, layers in shapes.items():
        for name, (n, k) in layers.items():
            if time.monotonic() > deadline:
                print(f"{dname}: time budget spent, stopping before {model} {name}", flush=True)
                for bench in benches:
                    bench["cut_short"] = True
                    save(bench)
                return
            for bench in benches:
                bench["rows"] += bench_shape(bench["format"], dtype, model, name, n, k, ms_list, bench["errors"])
                bench["tuned"] = triton_gemm.tuned_configs()
                save(bench)


def bench_shape(fmt: str, dtype: torch.dtype, model: str, name: str, n: int, k: int, ms_list: list[int],
                errors: list[str]) -> list[dict]:
    """One linear of one format at every M: ours (graph and eager), the dtype's cuBLAS, int4. A
    failed M (say a capture error) is added to `errors` and the others still run."""
    from triton.testing import do_bench

    from daq_vllm.kernels import triton_gemm

    device = "cuda"
    dname = str(dtype).removeprefix("torch.")
    cb = get_codebook(fmt)
    q, s, b = random_daq(n, k, cb.bits, GROUP, device)
    rp = repack(q, s, b, cb.values, cb.bits, GROUP, k)
    cbt = cb.tensor(device)
    e2m1 = decode_kind(cb.values) == "e2m1"
    w16 = torch.randn(n, k, device=device, dtype=dtype) * 0.02
    anchor, why = int4_anchor(n, k, device)
    weight_bytes = q.numel() * 4 + s.numel() * 2 + b.numel() * 2

    def row(m: int) -> dict:
        x = torch.randn(m, k, device=device, dtype=dtype)
        xb = x.bfloat16()

        def ours():
            return triton_gemm.daq_linear_triton(x, q, s, b, cbt, cb.bits, GROUP, e2m1, None, rp)

        t_daq = graph_ms(ours)
        t_eager = do_bench(ours, return_mode="median")
        t_fp16 = graph_ms(lambda: torch.nn.functional.linear(x, w16))
        t_int4 = graph_ms(lambda: anchor(xb)) if anchor else None
        cfg = triton_gemm._tuned(x, q, s, b, cbt, cb.bits, GROUP, e2m1, None, rp)
        print(f"{fmt} {dname} {model} {name} M={m}: daq {t_daq * 1e3:.1f} us ({cfg.describe()}), "
              f"{dname} {t_fp16 * 1e3:.1f} us, "
              f"int4 {t_int4 * 1e3 if t_int4 else float('nan'):.1f} us, x{t_fp16 / t_daq:.2f}", flush=True)
        return {"model": model, "linear": name, "N": n, "K": k, "M": m, "config": cfg.describe(),
                "daq_ms": t_daq, "daq_eager_ms": t_eager, "fp16_ms": t_fp16, "int4_ms": t_int4, "int4_note": why,
                "speedup_vs_fp16": t_fp16 / t_daq, "speedup_vs_int4": (t_int4 / t_daq) if t_int4 else None,
                "daq_gbs": (weight_bytes + 2 * m * (k + n)) / (t_daq * 1e-3) / 1e9}

    rows = []
    for m in ms_list:
        try:
            rows.append(row(m))
        except Exception as e:  # noqa: BLE001 - reported with the results; the run goes on
            errors.append(f"{model} {name} M={m}: {describe(e)}")
            print(f"{fmt} {dname} FAILED {errors[-1]}", flush=True)
    return rows


def bench_launches(fmts: list[str], dtypes: list[str], shapes: dict, ms_list: list[int]) -> list[Launch]:
    """Every launch `bench_gpu` will make: the tuner's v1 and v2 candidates at each (shape, M)."""
    linears = [nk for layers in shapes.values() for nk in layers.values()]
    return [launch for dtype in dtypes for fmt in fmts
            for launch in tuner_launches(fmt, GROUP, dtype, linears, ms_list)]


CHECK_NK = 1000  # not a multiple of any block; g 64/128 leave a partial last group
CHECK_CASES = ([(fmt, g, "float16") for fmt in ("fp4_e2m1", "nf4", "int4", "fp3_e2m0", "int3") for g in (32, 64, 128)]
               + [(fmt, 64, "bfloat16") for fmt in ("fp4_e2m1", "nf4", "int4", "fp3_e2m0")])


def check_paths() -> list[tuple[int, KernelConfig]]:
    """(M, config) of every path `check_gpu` runs: v1 gemv, gemm, dequant; v2 gemv2, mma."""
    from daq_vllm.kernels.triton_gemm import KernelConfig

    return [(1, KernelConfig("gemv", block_n=16, chunks_per_iter=2, split_k=1)),
            (3, KernelConfig("gemv", block_n=8, chunks_per_iter=1, split_k=4)),
            (16, KernelConfig("gemm", block_m=16, block_n=64, split_k=4)),
            (64, KernelConfig("gemm", block_m=64, block_n=128, num_warps=4, num_stages=2)),
            (300, KernelConfig("gemm", block_m=128, block_n=64, num_warps=8, num_stages=3)),
            (300, KernelConfig("dequant")),
            (1, KernelConfig("gemv2", block_n=32, split_k=1)),
            (3, KernelConfig("gemv2", block_n=64, split_k=4)),
            (1, KernelConfig("mma", block_m=16, block_n=64, split_k=4, num_stages=3)),
            (16, KernelConfig("mma", block_m=16, block_n=128, split_k=1, num_stages=3)),
            (64, KernelConfig("mma", block_m=64, block_n=64, split_k=2, num_stages=3)),
            (300, KernelConfig("mma", block_m=128, block_n=128, num_warps=8, num_stages=2))]


def check_launches() -> list[Launch]:
    return [Launch(fmt, g, dtype, CHECK_NK, CHECK_NK, m, cfg, bias=True)
            for fmt, g, dtype in CHECK_CASES for m, cfg in check_paths()]


def check_gpu(crashed: list[Launch]) -> dict:
    """Every kernel path and format on the GPU against the torch reference, outputs poisoned with NaN;
    a config whose launch lost a warm-up worker's CUDA context (`crashed`) fails without running."""
    from daq_vllm.kernels import triton_gemm as tg

    tg._new_output = lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)
    n = k = CHECK_NK
    rows, worst = [], 0.0
    for fmt, g, dtype_name in CHECK_CASES:
        dtype = getattr(torch, dtype_name)
        cb = get_codebook(fmt)
        codes = torch.randint(0, 2**cb.bits, (n, k), device="cuda")
        groups = num_groups(k, g)
        s = (torch.rand(n, groups, device="cuda") * 0.05 + 0.01).half()
        b = (torch.randn(n, groups, device="cuda") * 0.02).half()
        q = pack_codes(codes, cb.bits)
        rp = repack(q, s, b, cb.values, cb.bits, g, k)
        w = dequantize(q, s, b, cb.tensor("cuda"), cb.bits, g, k).to(dtype).float()
        bias = torch.randn(n, device="cuda").to(dtype)
        for m, cfg in check_paths():
            x = torch.randn(m, k, device="cuda").to(dtype)
            tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
            if faulty(cfg, crashed):
                err, note = float("inf"), "left out: a launch of it lost the CUDA context in the warm-up"
            else:
                try:
                    y = tg.run_path(cfg, x, q, s, b, cb.tensor("cuda"), cb.bits, g, decode_kind(cb.values) == "e2m1",
                                    bias, rp)
                    ref = x.float() @ w.T + bias.float()
                    err = (float("inf") if torch.isnan(y).any()
                           else ((y.float() - ref).abs().max() / ref.abs().max()).item())
                    note = ""
                except Exception as e:  # noqa: BLE001 - recorded as a failed case
                    err, note = float("inf"), describe(e)
            rows.append({"format": fmt, "group": g, "dtype": str(dtype), "M": m, "config": cfg.describe(),
                         "max_rel_err": err, "ok": err < tol, "error": note})
            worst = max(worst, err / tol)
    bad = [r for r in rows if not r["ok"]]
    print(f"GPU check: {len(rows) - len(bad)}/{len(rows)} cases within tolerance", flush=True)
    for r in bad:
        print("  FAIL", r, flush=True)
    return {"device": torch.cuda.get_device_name(), "cases": len(rows), "failed": bad, "worst_err_over_tol": worst}


def smoke(fmt: str) -> dict:
    """Tiny shape under the interpreter: correctness of each path (v1 with its GPU default config, and
    the first v2 candidate of its M bucket)."""
    from daq_vllm.kernels.triton_gemm import DEQUANT_MIN_M, default_config, run_path, v2_candidate_configs

    n, k = 64, 160
    cb = get_codebook(fmt)
    q, s, b = random_daq(n, k, cb.bits, GROUP)
    rp = repack(q, s, b, cb.values, cb.bits, GROUP, k)
    w = dequantize(q, s, b, cb.tensor(), cb.bits, GROUP, k).half().float()
    rows = []
    runs = [(m, default_config(m, n, k, cuda=True)) for m in (1, 16, DEQUANT_MIN_M + 6)]  # gemv, gemm, dequant
    runs += [(m, v2_candidate_configs(m)[0]) for m in (1, 16)]  # gemv2, mma
    for m, cfg in runs:
        x = torch.randn(m, k).half()
        t0 = time.perf_counter()
        y = run_path(cfg, x, q, s, b, cb.tensor(), cb.bits, GROUP, decode_kind(cb.values) == "e2m1", None, rp)
        seconds = time.perf_counter() - t0
        err = ((y.float() - x.float() @ w.T).abs().max() / (x.float() @ w.T).abs().max()).item()
        if not err < 1e-2:
            raise SystemExit(f"smoke: M={m} relative error {err:.3g} is too large")
        rows.append({"N": n, "K": k, "M": m, "path": cfg.path, "interpreter_s": seconds, "max_rel_err": err})
        print(f"smoke M={m} ({cfg.path}): rel err {err:.2e}, {seconds:.2f} s in the interpreter", flush=True)
    return {"device": "cpu (TRITON_INTERPRET=1)", "format": fmt, "rows": rows}


def markdown(result: dict, smoke_run: bool) -> str:
    lines = [f"# DAQ kernels: {result['device']}", ""]
    if smoke_run:
        lines += ["Not measured on GPU: this file comes from the CPU smoke run (Triton interpreter), which",
                  "checks correctness only. Run `python benchmarks/kernel_bench.py` on a CUDA machine for timings.", "",
                  "| N | K | M | path | max rel err | interpreter s |", "| ---: | ---: | ---: | --- | ---: | ---: |"]
        lines += [f"| {r['N']} | {r['K']} | {r['M']} | {r['path']} | "
                  f"{r['max_rel_err']:.1e} | {r['interpreter_s']:.2f} |"
                  for r in result["rows"]]
        return "\n".join(lines) + "\n"
    lines += [f"Format {result['format']}, g{GROUP}, {result.get('dtype', 'float16')} activations (int4 anchor: bf16, "
              "its required dtype); "
              f"triton {result['triton']}, torch {result['torch']}; copy bandwidth {result['copy_gbs']:.0f} GB/s.",
              "Times are medians of `triton.testing.do_bench` over a CUDA-graph replay of one call (as vLLM runs",
              "decode; no Python launch overhead), L2 flushed between calls. `eager` is our call without a graph.", "",
              "| model | linear | M | DAQ us | eager us | fp16 us | int4 us | x fp16 | x int4 | DAQ GB/s | path |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in result["rows"]:
        int4 = f"{r['int4_ms'] * 1e3:.1f}" if r["int4_ms"] else "n/a"
        vs4 = f"{r['speedup_vs_int4']:.2f}" if r["speedup_vs_int4"] else "n/a"
        lines.append(f"| {r['model']} | {r['linear']} | {r['M']} | {r['daq_ms'] * 1e3:.1f} | "
                     f"{r['daq_eager_ms'] * 1e3:.1f} | {r['fp16_ms'] * 1e3:.1f} | {int4} | "
                     f"{r['speedup_vs_fp16']:.2f} | {vs4} | {r['daq_gbs']:.0f} | {r['config']} |")
    return "\n".join(lines) + "\n"


def summary(rows: list[dict]) -> list[str]:
    """The issue's goals, per M, as the worst and median speed-up over the eight shapes."""
    lines = ["| M | min x fp16 | median x fp16 | min x int4 |", "| ---: | ---: | ---: | ---: |"]
    for m in sorted({r["M"] for r in rows}):
        sub = [r for r in rows if r["M"] == m]
        vs16 = sorted(r["speedup_vs_fp16"] for r in sub)
        vs4 = [r["speedup_vs_int4"] for r in sub if r["speedup_vs_int4"]]
        lines.append(f"| {m} | {vs16[0]:.2f} | {vs16[len(vs16) // 2]:.2f} | {min(vs4):.2f} |" if vs4 else
                     f"| {m} | {vs16[0]:.2f} | {vs16[len(vs16) // 2]:.2f} | n/a |")
    return lines


SPEED_GOALS = [(1, 2.6), (16, 2.0), (64, 1.3), (256, 0.9), (1024, 0.95), (4096, 0.95)]  # issue 13: M, x fp16
NF4_WITHIN = 1.2  # nf4 at most 20% slower than fp4_e2m1 from M = 16 up


def _paired_ratio(faster: dict, slower: dict, m: int) -> float | None:
    """Median over shapes measured in both runs of time(slower) / time(faster) at M."""
    times = {(r["model"], r["linear"]): r["daq_ms"] for r in faster["rows"] if r["M"] == m}
    ratios = [r["daq_ms"] / times[(r["model"], r["linear"])] for r in slower["rows"]
              if r["M"] == m and (r["model"], r["linear"]) in times]
    return statistics.median(ratios) if ratios else None


def goals(result: dict) -> list[str]:
    """Issue 13's goals from one results file: met, missed, or not measured in this run."""
    runs = result["formats"]
    lines = ["| goal | measured | result |", "| --- | ---: | --- |"]

    def row(goal: str, value: float | None, ok: bool | None) -> None:
        lines.append(f"| {goal} | {'n/a' if value is None else f'{value:.2f}'} | "
                     f"{'not measured' if ok is None else 'met' if ok else 'missed'} |")

    fp4 = runs.get("fp4_e2m1")
    for m, target in SPEED_GOALS:
        sub = [r for r in fp4["rows"] if r["M"] == m] if fp4 else []
        value = statistics.median(r["speedup_vs_fp16"] for r in sub) if sub else None
        row(f"fp4_e2m1 M={m}: median x fp16 >= {target}", value, None if value is None else value >= target)
    vs4 = [r["speedup_vs_int4"] for r in (fp4["rows"] if fp4 else []) if r["M"] == 1 and r["speedup_vs_int4"]]
    vs4_median = statistics.median(vs4) if vs4 else None
    row("fp4_e2m1 M=1: median x PyTorch int4 >= 1.0", vs4_median, None if vs4_median is None else vs4_median >= 1.0)
    nf4 = runs.get("nf4")
    ms = sorted({r["M"] for r in nf4["rows"] if r["M"] >= 16}) if nf4 and fp4 else []
    ratios = [v for v in (_paired_ratio(fp4, nf4, m) for m in ms) if v is not None]
    worst = max(ratios) if ratios else None
    row(f"nf4 time / fp4_e2m1 time, worst M >= 16: <= {NF4_WITHIN}", worst,
        None if worst is None else worst <= NF4_WITHIN)
    for name in ("fp3_e2m0", "int3"):
        three = runs.get(name)
        value = _paired_ratio(three, fp4, 1) if three and fp4 else None
        row(f"{name} M=1: fp4_e2m1 time / {name} time > 1", value, None if value is None else value > 1.0)
    return lines


def markdown_gpu(result: dict) -> str:
    lines = [f"# DAQ kernels: {result['device']}", ""]
    if "fp4_e2m1" in result["formats"]:  # an fp16 run
        lines += ["## Goals (issue 13, g128 fp16, median over the shapes measured)", ""] + goals(result) + [""]
    warmed = result.get("warm_up")
    if warmed:
        lines += [f"Compile warm-up (benchmarks/triton_warmup.py, before any timing): {warmed['launches']} launches "
                  f"in {warmed['jobs']} jobs on {warmed['workers']} processes, {warmed['seconds']:.0f} s, "
                  f"{len(warmed['failures'])} failed (candidates the tuner then skips), "
                  f"{len(warmed['crashed'])} of them losing the CUDA context (their configs left out).", ""]
        lines += [f"- warm-up failure: {f}" for f in warmed["failures"][:10]] + ([""] if warmed["failures"] else [])
    check = result.get("check")
    if check:
        lines += ["## GPU correctness", "",
                  f"{check['cases'] - len(check['failed'])}/{check['cases']} cases "
                  "(5 formats x g32/64/128 in fp16, 4 formats "
                  "at g64 in bf16, x 12 path configs, v1 and v2; N = K = 1000, outputs poisoned with NaN) within "
                  "tolerance of the torch "
                  f"reference (worst error / tolerance {check['worst_err_over_tol']:.2f}).", ""]
        lines += [f"- FAIL {r}" for r in check["failed"]] + ([""] if check["failed"] else [])
    for run, bench in result["formats"].items():
        lines += [f"## {run}" + (" (cut short by the time budget)" if bench.get("cut_short") else ""), "",
                  f"Speed-ups over {bench.get('dtype', 'float16')} cuBLAS, worst and median over the shapes:", ""]
        lines += [f"- FAILED {e}" for e in bench.get("errors", [])] + ([""] if bench.get("errors") else [])
        lines += (summary(bench["rows"]) + [""]) if bench["rows"] else []
        lines += markdown(bench, False).splitlines()[2:] + [""]
    return "\n".join(lines) + "\n"


def device_option(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: the DAQ CPU kernel vs F.linear fp32/bf16 (its options: --device cpu --help)")


def main() -> None:
    pre = argparse.ArgumentParser(add_help=False)
    device_option(pre)
    known, rest = pre.parse_known_args()
    if known.device == "cpu":  # its own options, in its own module
        import kernel_bench_cpu

        return kernel_bench_cpu.main(rest)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    device_option(ap)
    ap.add_argument("--smoke", action="store_true", help="CPU: one tiny shape under the Triton interpreter")
    ap.add_argument("--formats", nargs="+", default=["fp4_e2m1", "nf4"])
    ap.add_argument("--ms", type=int, nargs="+", default=MS, help="batch sizes M")
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--check", action="store_true", help="GPU: also check every path against the reference first")
    ap.add_argument("--dtypes", nargs="+", default=["float16"], choices=["float16", "bfloat16"],
                    help="activation dtypes (the baseline is cuBLAS in the same dtype)")
    ap.add_argument("--budget-s", type=float, default=float("inf"),
                    help="stop starting new shapes after this many seconds of measuring, counted from the end of the "
                         "compile warm-up (results so far are kept)")
    ap.add_argument("--warm-workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                    help="processes that compile every kernel the run launches before timing starts "
                         "(benchmarks/triton_warmup.py; 0: none, the timing process compiles)")
    ap.add_argument("--tag", default="", help="results file kernels-<gpu>-<tag> (several runs side by side)")
    ap.add_argument("--write-configs", action="store_true",
                    help="ship the tuner's choices as kernels/configs/<gpu>.json (read before tuning at run time)")
    ap.add_argument("--results", type=Path, default=None,
                    help=f"where the results files go (default: {RESULTS.relative_to(RESULTS.parent.parent)} "
                         "for GPU runs; a smoke run writes files only when given this)")
    args = ap.parse_args()
    if args.smoke:
        result = smoke(args.formats[0])
        if args.results is not None:
            write_results("kernels-smoke", result, markdown(result, True), args.results)
        return
    args.results = args.results or RESULTS
    if not torch.cuda.is_available():
        raise SystemExit("kernel_bench.py needs a CUDA GPU; use --smoke on CPU")
    from daq_vllm.kernels import triton_gemm

    shapes = {m: SHAPES[m] for m in args.models}
    result = {"device": torch.cuda.get_device_name(), "formats": {}}
    crashed = []
    if args.warm_workers > 0:
        launches = (check_launches() if args.check else []) + bench_launches(args.formats, args.dtypes, shapes, args.ms)
        warmed = warm(launches, args.warm_workers)
        print(warmed.line(), flush=True)
        for failure in warmed.failures[:20]:
            print("  warm-up:", failure, flush=True)
        crashed = warmed.crashed
        exclude(crashed)
        result["warm_up"] = {"launches": warmed.launches, "jobs": warmed.jobs, "seconds": warmed.seconds,
                             "workers": args.warm_workers, "failures": warmed.failures,
                             "crashed": [str(launch) for launch in crashed]}
    deadline = time.monotonic() + args.budget_s  # compiles done: the budget is for measuring
    gpu = triton_gemm.gpu_slug(result["device"])

    def publish() -> None:
        write_results(f"kernels-{gpu}" + (f"-{args.tag}" if args.tag else ""), result, markdown_gpu(result),
                      args.results)

    if args.check:
        result["check"] = check_gpu(crashed)
        publish()

    def save(bench: dict) -> None:
        name = bench["format"] if bench["dtype"] == "float16" else f"{bench['format']} {bench['dtype']}"
        result["formats"][name] = bench
        publish()
        if args.write_configs:
            triton_gemm.save_configs(triton_gemm.CONFIGS_DIR / f"{gpu}.json", result["device"])

    for dtype in args.dtypes:
        bench_gpu(args.formats, getattr(torch, dtype), shapes, args.ms, save, deadline)


if __name__ == "__main__":
    main()
