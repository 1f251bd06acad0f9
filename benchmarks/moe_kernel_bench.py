"""The fused MoE kernel (`triton_moe`) on a GPU: correctness, CUDA-graph capture and speed.

For MoE layer shapes (experts, hidden, intermediate of Mixtral-8x7B and Qwen1.5-MoE-A2.7B), 4-bit
g128 experts with the nf4 codebook (decoded through the table, as any learned codebook is; a named
one so that `kernel_bench.py`'s compile warm-up serves the `loop` kernel too), top-2 routing and
T tokens:
- the largest error against `moe_reference` relative to its largest output (GEMM1's output poisoned
  with NaN, so a routed row the kernel forgets fails), fp16 and bf16;
- whether one call captures in a CUDA graph and its replay gives the eager output (vLLM decodes
  from graphs; the kernel avoids host syncs for this, untried before this script);
- median times (`do_bench`, L2 flushed) of `triton_moe` eager and replayed from a graph, the `loop`
  kernel (per expert through the dense Triton kernel) and the unquantized baseline: fp16 experts
  through a torch loop of `F.linear` per routed expert (eager, as `loop` is).
Writes benchmarks/results/moe-kernels-<gpu>.md and .json (part of benchmarks/gpu_check.sh).

    python benchmarks/moe_kernel_bench.py            # on a CUDA GPU
    python benchmarks/moe_kernel_bench.py --smoke    # CPU, Triton interpreter, one tiny shape
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

from common import RESULTS, capture_graph, write_results  # noqa: E402
from triton_warmup import Launch, exclude, m_classes, tuner_launches, warm  # noqa: E402

from daq_vllm.errors import describe  # noqa: E402
from daq_vllm.format import num_groups  # noqa: E402
from daq_vllm.format.codebooks import get_codebook  # noqa: E402
from daq_vllm.kernels import MoESpec, choose_moe_kernel, moe_reference, pack_codes  # noqa: E402

SHAPES = {"mixtral-8x7b": (8, 4096, 14336), "qwen1.5-moe-a2.7b": (60, 2048, 1408)}  # experts, hidden, intermediate
TOKENS = [1, 16, 256]
LOOP_MAX_T = 16  # `loop` is timed up to here: its dense tuner compiles per expert M class, minutes at T = 256
TOP_K = 2
GROUP = 128
CODEBOOK = "nf4"


def make_layer(spec: MoESpec, device: str) -> torch.nn.Module:
    """Random codes and checkpoint-like fp16 scales and offsets for every expert."""
    layer = torch.nn.Module()
    e, h, i, g = spec.num_experts, spec.hidden_size, spec.intermediate_size, spec.group_size
    for projection, n, k in (("w13", 2 * i, h), ("w2", h, i)):
        codes = torch.randint(0, 2**spec.bits, (e * n, k), device=device)
        tensors = {"qweight": pack_codes(codes, spec.bits).view(e, n, -1),
                   "scales": (torch.rand(e, n, num_groups(k, g), device=device) * 0.01 + 1e-3).half(),
                   "offsets": (torch.randn(e, n, num_groups(k, g), device=device) * 1e-3).half()}
        for name, tensor in tensors.items():
            setattr(layer, f"{projection}_{name}", torch.nn.Parameter(tensor, requires_grad=False))
    return layer


def make_spec(experts: int, hidden: int, inter: int, dtype: torch.dtype, device: str) -> MoESpec:
    values = get_codebook(CODEBOOK).values
    return MoESpec(4, GROUP, hidden, inter, experts, dtype, device, values, values, "silu")


def loop_launches(shapes: dict, tokens: list[int], dtypes: list[str]) -> list[Launch]:
    """What the `loop` kernel's dense tuner will launch: each expert projection at every M class an
    expert's token count can fall in (T up to LOOP_MAX_T), every candidate config."""
    projections = [nk for _, h, i in shapes.values() for nk in ((2 * i, h), (h, i))]
    ms = m_classes(min(max(tokens), LOOP_MAX_T))
    return [launch for dtype in dtypes for launch in tuner_launches(CODEBOOK, GROUP, dtype, projections, ms)]


def routing(tokens: int, experts: int, device: str, top_k: int = TOP_K) -> tuple[torch.Tensor, torch.Tensor]:
    """Random distinct experts per token (int32 ids) and softmax weights."""
    ids = torch.rand(tokens, experts, device=device).argsort(dim=1)[:, :top_k].to(torch.int32)
    return torch.softmax(torch.randn(tokens, top_k, device=device), dim=1), ids


def prepared(name: str, spec: MoESpec, layer: torch.nn.Module):
    os.environ["DAQ_MOE_KERNEL"] = name
    try:
        kernel = choose_moe_kernel(spec)
    finally:
        del os.environ["DAQ_MOE_KERNEL"]
    kernel.prepare(layer)
    return kernel


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    if torch.isnan(y).any():
        return float("inf")
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def fp16_experts(spec: MoESpec, layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Unquantized stand-ins: every expert's weights decoded once, in the activation dtype."""
    from daq_vllm.kernels import dequantize

    out = []
    for p, k in (("w13", spec.hidden_size), ("w2", spec.intermediate_size)):
        cb = torch.tensor(getattr(spec, f"{p}_codebook"), device=layer.w13_qweight.device)
        out.append(torch.stack([dequantize(getattr(layer, f"{p}_qweight")[e], getattr(layer, f"{p}_scales")[e],
                                           getattr(layer, f"{p}_offsets")[e], cb, 4, GROUP, k).to(spec.act_dtype)
                                for e in range(spec.num_experts)]))
    return out[0], out[1]


def torch_loop(x, weights, ids, w13, w2) -> torch.Tensor:
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    for e in ids.unique().tolist():
        rows, slots = (ids == e).nonzero(as_tuple=True)
        gate, up = torch.nn.functional.linear(x[rows], w13[e]).chunk(2, dim=-1)
        y = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, w2[e])
        out.index_add_(0, rows, y.float() * weights[rows, slots, None])
    return out.to(x.dtype)


def bench_gpu(shapes: dict, tokens: list[int], dtypes: list[torch.dtype], deadline: float, save) -> dict:
    """Rows per (shape, dtype, T); `save(result)` after each shape and dtype, so a cut-off run keeps them."""
    from triton.testing import do_bench

    from daq_vllm.kernels import triton_moe

    real_new_output = triton_moe._new_output
    result = {"device": torch.cuda.get_device_name(), "rows": [], "cut_short": False}
    rows = result["rows"]
    for name, (e, h, i) in shapes.items():
        for dtype in dtypes:
            if time.monotonic() > deadline:
                print(f"time budget spent, stopping before {name} {dtype}", flush=True)
                result["cut_short"] = True
                return result
            spec = make_spec(e, h, i, dtype, "cuda")
            layer = make_layer(spec, "cuda")
            fused, loop = prepared("triton_moe", spec, layer), prepared("loop", spec, layer)
            w13, w2 = fp16_experts(spec, layer)
            for t in tokens:
                x = torch.randn(t, h, device="cuda").to(dtype)
                weights, ids = routing(t, e, "cuda")
                ref = moe_reference(spec, layer, x, weights, ids)
                triton_moe._new_output = lambda shape, dt, device: torch.full(shape, float("nan"), dtype=dt,
                                                                               device=device)
                err = rel_err(fused.apply(layer, x, weights, ids), ref)
                triton_moe._new_output = real_new_output
                row = {"model": name, "experts": e, "hidden": h, "intermediate": i, "dtype": str(dtype), "T": t,
                       "max_rel_err": err, "ok": err < (2e-2 if dtype == torch.bfloat16 else 5e-3)}
                try:
                    graph, out = capture_graph(lambda: fused.apply(layer, x, weights, ids))
                    graph.replay()
                    torch.cuda.synchronize()
                    row["graph_equal"] = bool(torch.equal(out, fused.apply(layer, x, weights, ids)))
                    row["fused_graph_ms"] = do_bench(graph.replay, return_mode="median")
                except Exception as ex:  # noqa: BLE001 - recorded: capture is one of the things checked here
                    row["graph_equal"], row["graph_error"] = False, describe(ex)
                row["fused_ms"] = do_bench(lambda: fused.apply(layer, x, weights, ids), return_mode="median")
                row["loop_ms"] = (do_bench(lambda: loop.apply(layer, x, weights, ids), return_mode="median")
                                  if t <= LOOP_MAX_T else None)
                row["fp16_loop_ms"] = do_bench(lambda: torch_loop(x, weights, ids, w13, w2), return_mode="median")
                rows.append(row)
                print(f"{name} {dtype} T={t}: err {err:.1e}, graph {row['graph_equal']}, fused "
                      f"{row['fused_ms'] * 1e3:.0f} us, loop {(row['loop_ms'] or float('nan')) * 1e3:.0f} us, "
                      f"fp16 loop {row['fp16_loop_ms'] * 1e3:.0f} us", flush=True)
            save(result)
    return result


def smoke() -> dict:
    """A tiny layer under the interpreter: the fused kernel against the reference."""
    spec = make_spec(4, 128, 64, torch.float16, "cpu")
    layer = make_layer(spec, "cpu")
    fused = prepared("triton_moe", spec, layer)
    x = torch.randn(5, 128).half()
    weights, ids = routing(5, 4, "cpu")
    err = rel_err(fused.apply(layer, x, weights, ids), moe_reference(spec, layer, x, weights, ids))
    if not err < 5e-3:
        raise SystemExit(f"smoke: relative error {err:.3g} is too large")
    print(f"smoke triton_moe: rel err {err:.2e}", flush=True)
    return {"device": "cpu (TRITON_INTERPRET=1)", "rows": [{"T": 5, "max_rel_err": err}]}


def markdown(result: dict) -> str:
    lines = [f"# DAQ fused MoE kernel: {result['device']}", ""]
    if "fused_ms" not in (result["rows"][0] if result["rows"] else {}):
        return "\n".join(lines + ["Smoke run (Triton interpreter): correctness only.", ""]
                         + [f"- T={r['T']}: max rel err {r['max_rel_err']:.1e}" for r in result["rows"]]) + "\n"
    lines += [f"4-bit g128 experts ({CODEBOOK}), top-2, random routing. Times are medians of `do_bench` (L2 flushed);",
              "`graph` is the fused kernel replayed from a CUDA graph. fp16 loop: unquantized experts through a torch",
              f"loop. The `loop` kernel is timed up to T = {LOOP_MAX_T} (its tuner would compile for minutes above).",
              "Cut short by the time budget." if result.get("cut_short") else "", "",
              "| model | dtype | T | rel err | graph ok | fused us | graph us | loop us | fp16 loop us |",
              "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        graph = f"{r['fused_graph_ms'] * 1e3:.0f}" if "fused_graph_ms" in r else r.get("graph_error", "n/a")
        loop = "n/a" if r["loop_ms"] is None else f"{r['loop_ms'] * 1e3:.0f}"
        lines.append(f"| {r['model']} | {r['dtype'].removeprefix('torch.')} | {r['T']} | {r['max_rel_err']:.1e} | "
                     f"{r['graph_equal']} | {r['fused_ms'] * 1e3:.0f} | {graph} | {loop} | "
                     f"{r['fp16_loop_ms'] * 1e3:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU: one tiny layer under the Triton interpreter")
    ap.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"], choices=["float16", "bfloat16"])
    ap.add_argument("--budget-s", type=float, default=float("inf"),
                    help="stop starting new shapes after this many seconds of measuring, counted from the end of "
                         "the compile warm-up (results so far are kept)")
    ap.add_argument("--warm-workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                    help="processes that compile the `loop` kernel's launches before timing starts "
                         "(benchmarks/triton_warmup.py; 0: none)")
    ap.add_argument("--results", type=Path, default=None,
                    help="where the results files go (default: benchmarks/results on a GPU; a smoke run writes "
                         "files only when given this)")
    args = ap.parse_args()
    if args.smoke:
        result = smoke()
        if args.results is not None:
            write_results("moe-kernels-smoke", result, markdown(result), args.results)
        return
    if not torch.cuda.is_available():
        raise SystemExit("moe_kernel_bench.py needs a CUDA GPU; use --smoke on CPU")
    from daq_vllm.kernels.triton_gemm import gpu_slug

    def save(result: dict) -> None:
        write_results(f"moe-kernels-{gpu_slug(result['device'])}", result, markdown(result), args.results or RESULTS)

    shapes = {m: SHAPES[m] for m in args.models}
    if args.warm_workers > 0:
        warmed = warm(loop_launches(shapes, args.tokens, args.dtypes), args.warm_workers)
        print(warmed.line(), flush=True)
        exclude(warmed.crashed)
    save(bench_gpu(shapes, args.tokens, [getattr(torch, d) for d in args.dtypes], time.monotonic() + args.budget_s,
                   save))


if __name__ == "__main__":
    main()
