"""Speed and memory of DAQ quantization.

1. `daq-vllm quantize` of SmolLM2-135M with the default full DAQ (`--format auto`, g128 unless
   --format/--group-size say otherwise) in one process and in two (`--nproc 2`: torchrun, gloo; on
   2 cores the second row shows the distributed overhead, not a gain), and calibration-free DCA:
   wall time and peak RSS of the processes;
2. one Llama-2-7B-shaped decoder layer (hidden 4096, intermediate 11008, random weights): time of
   the calibration forward with second moments per token, of LDRA per solver and of the
   error-compensated rounding (`--rounding gptq`), on this machine.
   With --device cuda the same on a GPU.

Writes benchmarks/results/quant_speed.md and .json.

    python benchmarks/quant_speed.py [--device cuda] [--skip-model]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CACHE, RESULTS, machine, smollm2_float_dir, write_results  # noqa: E402

from daq_vllm.format.codebooks import get_codebook  # noqa: E402
from daq_vllm.offline.compensated import CompensationSpec, InputHessian, compensate  # noqa: E402
from daq_vllm.offline.ldra import LDRASpec, quantize_weight_ldra  # noqa: E402
from daq_vllm.offline.moments import SecondMoments  # noqa: E402
from daq_vllm.offline.ranges import InitSpec  # noqa: E402

LAYER_LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def time_cli_quantize(fmt: str | None, group_size: int, extra: list[str]) -> dict:
    """One `daq-vllm quantize` run: wall time and the peak its report measured (rank 0's process)."""
    out = CACHE / "quant-speed-out"
    cmd = [sys.executable, "-m", "daq_vllm.cli", "quantize", str(smollm2_float_dir()), "--out", str(out),
           "--overwrite", "--no-progress", *(["--format", fmt] if fmt else []), "--group-size", str(group_size),
           *extra]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    memory = json.loads((out / "quantization_report.json").read_text())["memory"]
    return {"command": " ".join(["daq-vllm", *cmd[3:]]), "seconds": round(seconds, 1),
            "peak_rss_mib": round(memory["measured_peak_bytes"] / 1024**2)}


def seven_b_layer(device: str, tokens: int, solvers: list[str], hidden: int = 4096, intermediate: int = 11008) -> dict:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    heads = hidden // 128
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                      num_key_value_heads=heads)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(cfg, 0).to(device).float()
    for p in layer.parameters():
        if p.dim() == 2:
            p.data.normal_(0, 0.02)
    rotary = LlamaRotaryEmbedding(cfg).to(device)
    seqlen = 512
    blocks = max(1, tokens // seqlen)
    x = torch.randn(blocks, seqlen, hidden, device=device)
    pos = rotary(x[:1], torch.arange(seqlen, device=device)[None])
    acc = SecondMoments(128, full=True)  # the full moment is a superset: gptq rounding needs it
    acc.attach(layer, "l", [f"l.{n}" for n in LAYER_LINEARS])

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    sync()
    t0 = time.time()
    with torch.no_grad():
        for i in range(blocks):
            acc.new_pass()
            layer(x[i : i + 1], position_embeddings=pos)
    sync()
    forward = time.time() - t0
    acc.detach()
    cb = get_codebook("fp4_e2m1")
    result = {"calib_tokens": blocks * seqlen, "forward_and_full_moments_s": round(forward, 2),
              "forward_s_per_1k_tokens": round(forward / (blocks * seqlen) * 1000, 3)}
    quantized = {}
    for solver in solvers:
        # The sign search is timed over 2 iterations and reported per iteration (its full schedule
        # runs up to 10 x 100 of them).
        spec = (LDRASpec(solver=solver, epochs=1, iters=2, patience=10, shrink_grid=()) if solver == "sign"
                else LDRASpec(solver=solver))
        sync()
        t0 = time.time()
        for name in LAYER_LINEARS:
            w = layer.get_submodule(name).weight.data
            quantized[name], _ = quantize_weight_ldra(w, acc.moments(f"l.{name}"), cb, 128, InitSpec(), spec)
        sync()
        elapsed = time.time() - t0
        if solver == "alt":
            result["ldra_alt_s (shrink grid + alternating)"] = round(elapsed, 2)
        else:
            result["ldra_sign_s_per_iteration"] = round(elapsed / 2, 2)
    sync()
    t0 = time.time()
    for name in LAYER_LINEARS:
        hess = acc.derive(f"l.{name}", partial(InputHessian, spec=CompensationSpec()))
        compensate(layer.get_submodule(name).weight.data, hess, quantized[name], cb, 128)
    sync()
    result["gptq_rounding_s"] = round(time.time() - t0, 2)
    return result


def markdown(payload: dict) -> str:
    lines = ["# Quantization speed", "", f"Machine: {payload['machine']}.", ""]
    if payload.get("smollm2"):
        lines += ["## SmolLM2-135M, `daq-vllm quantize` end to end", "",
                  "| command | wall s | peak RSS MiB (rank 0) |", "| --- | ---: | ---: |"]
        for r in payload["smollm2"]:
            peak = r["peak_rss_mib"] if r["peak_rss_mib"] is not None else "n/a"
            lines.append(f"| `{r['command']}` | {r['seconds']} | {peak} |")
        one, two = payload["smollm2"][:2]
        lines += ["", f"Two processes against one: {two['seconds'] / one['seconds']:.2f}x the wall time "
                  f"(distributed overhead {100 * (two['seconds'] / one['seconds'] - 1):+.0f}%, goal <= +15%).", ""]
    layer = payload["layer_7b"]
    lines += [f"## One Llama-2-7B-shaped decoder layer on {payload['device']}", "",
              "| step | seconds |", "| --- | ---: |"]
    for k, v in layer.items():
        lines.append(f"| {k} | {v} |")
    est = payload["estimate_7b"]
    lines += ["", "Estimate for Llama-2-7B (32 layers, 128 x 512 calibration tokens, alt solver):"]
    for rounding, e in est.items():
        lines.append(f"- `--rounding {rounding}`: {e['per_layer_s']:.0f} s per layer, {e['total_min']:.1f} min in all.")
    if "gptq" not in est:
        lines.append("- `--rounding gptq`: not measured on this layer yet "
                     "(these rows predate it; run without --skip-layer).")
    lines += ["", "End-to-end `daq-vllm quantize` of a 7B-shaped layer with the default rounding and with nearest, "
              "and every run's estimated against measured peak memory (a K = 28672 layer included): "
              "[quant_memory.md](quant_memory.md).", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-model", action="store_true", help="only the 7B-layer measurement")
    ap.add_argument("--skip-layer", action="store_true",
                    help="only the SmolLM2 measurement; the 7B-layer rows are kept from the previous results file")
    ap.add_argument("--layer-tokens", type=int, default=4096,
                    help="calibration tokens for the 7B layer (CPU: keep small)")
    ap.add_argument("--hidden", type=int, default=4096, help="layer shape (default: Llama-2-7B)")
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--format", default=None, help="codebook of the SmolLM2 rows (default: the quantizer's)")
    ap.add_argument("--group-size", type=int, default=128)
    args = ap.parse_args()
    payload = {"machine": machine(), "device": args.device}
    if not args.skip_model:
        payload["smollm2"] = [
            time_cli_quantize(args.format, args.group_size, []),
            time_cli_quantize(args.format, args.group_size, ["--nproc", "2"]),
            time_cli_quantize(args.format or "fp4_e2m1", args.group_size, ["--method", "dca"]),
        ]
        print(payload["smollm2"], flush=True)
    name = "quant_speed" if args.device == "cpu" else f"quant_speed-{args.device.replace(':', '')}"
    if args.skip_layer:
        layer = json.loads((RESULTS / f"{name}.json").read_text())["layer_7b"]
    else:
        layer = seven_b_layer(args.device, args.layer_tokens, ["alt", "sign"], args.hidden, args.intermediate)
    payload["layer_7b"] = layer
    per_layer = layer["forward_s_per_1k_tokens"] * 65.536 + layer["ldra_alt_s (shrink grid + alternating)"]
    payload["estimate_7b"] = {"nearest": {"per_layer_s": per_layer, "total_min": per_layer * 32 / 60}}
    if "gptq_rounding_s" in layer:  # measured since --rounding gptq exists
        with_gptq = per_layer + layer["gptq_rounding_s"]
        payload["estimate_7b"]["gptq"] = {"per_layer_s": with_gptq, "total_min": with_gptq * 32 / 60}
    print(layer, flush=True)
    write_results(name, payload, markdown(payload))


if __name__ == "__main__":
    main()
