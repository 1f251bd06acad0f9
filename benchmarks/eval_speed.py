"""`daq-vllm eval` speed: seconds per WikiText-2 window, full-precision fp32 model vs its DAQ checkpoint.

Times what `daq-vllm eval MODEL --ppl wikitext2` runs (`daq_vllm.load` with the evaluation kernel,
then `perplexity` over the windows), split into load time and seconds per window; tokenizing the
text is not counted, and one short forward pass warms each model up first (it also absorbs any
one-time kernel build). Issue 12's goal: DAQ no slower per window than the fp32 model.
Writes benchmarks/results/eval-speed-<device>.md and .json.

    python benchmarks/eval_speed.py                            # SmolLM2-135M, 4 windows of 2048 (~10 min on 2 cores)
    python benchmarks/eval_speed.py --quick --results DIR      # 1 window of 512 tokens
    python benchmarks/eval_speed.py --daq-kernels dense torch  # one DAQ row per preferred kernel
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import (  # noqa: E402
    RESULTS,
    contention_line,
    cpu_info,
    cpu_line,
    cpu_seconds,
    default_daq_checkpoint,
    others_busy,
    smollm2_float_dir,
    write_results,
)

from daq_vllm import load  # noqa: E402
from daq_vllm.eval.perplexity import perplexity, task_text, tokenize_text  # noqa: E402
from daq_vllm.integrations.transformers import DAQLinear  # noqa: E402

FULL_ROW = "fp32"
WARMUP_TOKENS = 64


def kernels_used(model: torch.nn.Module) -> str:
    """The kernels the model's DAQ linears compute with ("-" for a full-precision model)."""
    names = sorted({m.kernel.name for m in model.modules() if isinstance(m, DAQLinear)})
    return ", ".join(names) or "-"


def measure(model_dir: Path, kernel: str | None, args: argparse.Namespace) -> dict:
    """Load as `daq-vllm eval` does, warm up, then time the perplexity windows."""
    t0 = time.perf_counter()
    model, tokenizer = load(model_dir, device=args.device, kernel=kernel)
    load_s = time.perf_counter() - t0
    ids = tokenize_text(tokenizer, task_text())
    with torch.no_grad():
        model(ids[:WARMUP_TOKENS].to(args.device)[None])
    t0 = time.perf_counter()
    result = perplexity(model, ids, args.seqlen, args.windows, progress=False)
    seconds = time.perf_counter() - t0
    row = {"dir": str(model_dir), "kernel": kernels_used(model), "load_s": load_s, "windows": result.windows,
           "seqlen": result.seqlen, "eval_s": seconds, "s_per_window": seconds / result.windows,
           "tok_s": result.tokens / seconds, "perplexity": result.perplexity}
    del model
    gc.collect()
    return row


def goals(rows: dict) -> list[dict]:
    """Each DAQ row's seconds per window against the fp32 row's (issue 12: no slower)."""
    full = rows[FULL_ROW]["s_per_window"]
    return [{"goal": f"{name} no slower per window than fp32", "value": full / r["s_per_window"],
             "met": r["s_per_window"] <= full} for name, r in rows.items() if name != FULL_ROW]


def markdown(payload: dict) -> str:
    a = payload["args"]
    lines = ["# `daq-vllm eval` speed: fp32 vs DAQ", "",
             f"Device: {a['device']}. CPU: {cpu_line(payload['cpu'])}. WikiText-2 test, first {a['windows']} "
             f"window(s) of {a['seqlen']} tokens{'; --quick setting' if a['quick'] else ''}. "
             f"Measured {payload['date']}. {contention_line(payload['others_busy'])}",
             "DAQ rows load with the preferred kernel named in the row (`daq-vllm eval` takes the device's default); "
             "`kernel` is what the DAQ linears computed with. Load time includes reading the checkpoint and the "
             "kernels' `prepare` (and, for the first row, one-time imports).", "",
             "| model | kernel | load s | s / window | tokens/s | PPL |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for name, r in payload["rows"].items():
        lines.append(f"| {name} | {r['kernel']} | {r['load_s']:.1f} | {r['s_per_window']:.2f} | {r['tok_s']:.0f} | "
                     f"{r['perplexity']:.3f} |")
    lines += ["", "## Goals (issue 12)", "", "| goal | fp32 time / DAQ time | result |", "| --- | ---: | --- |"]
    lines += [f"| {g['goal']} | {g['value']:.2f}x | {'met' if g['met'] else 'missed'} |" for g in payload["goals"]]
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", type=Path, help="full-precision model dir (default: SmolLM2-135M fp32)")
    ap.add_argument("--daq", type=Path, help="DAQ checkpoint (default: SmolLM2 quantized with the default settings)")
    ap.add_argument("--daq-kernels", nargs="+", default=["default", "dense"],
                    help="preferred kernel of each DAQ row; `default`: the device's choice, what daq-vllm eval uses "
                         "(default: default dense)")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="smoke check: 1 window of 512 tokens")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.quick:
        args.windows, args.seqlen = 1, 512
    return args


def main() -> None:
    args = parse_args()
    full = args.full or smollm2_float_dir()
    daq = args.daq or default_daq_checkpoint(full)
    start, t0 = cpu_seconds(), time.perf_counter()
    rows = {FULL_ROW: measure(full, None, args)}
    for kernel in args.daq_kernels:
        rows[f"DAQ, prefers {kernel}"] = measure(daq, None if kernel == "default" else kernel, args)
    for name, r in rows.items():
        print(f"{name} ({r['kernel']}): {r['s_per_window']:.2f} s/window, load {r['load_s']:.1f} s", flush=True)
    payload = {"cpu": cpu_info(), "date": time.strftime("%Y-%m-%d %H:%M"),
               "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, list))},
               "rows": rows, "others_busy": others_busy(start, time.perf_counter() - t0)}
    payload["goals"] = goals(rows)
    write_results(f"eval-speed-{args.device}", payload, markdown(payload), args.results)
    print(markdown(payload))


if __name__ == "__main__":
    main()
