"""Peak memory of `daq-vllm quantize`: the pre-flight estimate against the measured peak.

Each row is one `daq-vllm quantize` process; its `quantization_report.json` holds the estimate
printed before the first layer and the measured peak (anonymous RSS, sampled; `offline/memory.py`).
Rows: SmolLM2-135M (the default DAQ and calibration-free DCA), one Llama-2-7B-shaped decoder layer
(with the default `--rounding gptq` and with `--rounding nearest`) and one layer whose down_proj
reads K = 28672 inputs (Llama-2-70B's intermediate size; default rounding), random weights. Then the estimate
alone for a whole Llama-2-70B-shaped layer (hidden 8192, intermediate 28672, 128 x 512 tokens).

Writes benchmarks/results/quant_memory.md and .json.

    python benchmarks/quant_memory.py [--skip-smollm2] [--skip-70b-k]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CACHE, machine, smollm2_float_dir, write_results  # noqa: E402

GIB = 1024**3
WORDS = [f"w{i}" for i in range(2000)]


def random_layer_model(path: Path, hidden: int, intermediate: int) -> Path:
    """A one-layer Llama with random weights (std 0.02) and a word-level tokenizer, saved once."""
    if (path / "config.json").is_file():
        return path
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    cfg = LlamaConfig(vocab_size=len(WORDS) + 3, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=1, num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.no_grad():
        model = LlamaForCausalLM(cfg)
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    model.save_pretrained(path)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    return path


def random_text(path: Path, words: int = 40000) -> Path:
    gen = torch.Generator().manual_seed(0)
    path.write_text(" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (words,), generator=gen).tolist()))
    return path


ROWS = CACHE / "quant-memory-rows.json"  # finished rows, so an interrupted benchmark goes on where it stopped


def quantize(label: str, model: Path, args: list[str]) -> dict:
    """Run `daq-vllm quantize`; its report's memory entry, wall time and the command."""
    done = json.loads(ROWS.read_text()) if ROWS.is_file() else {}
    if label in done:
        return done[label]
    out = CACHE / "quant-memory-out"
    cmd = [sys.executable, "-m", "daq_vllm.cli", "quantize", str(model), "--out", str(out), "--overwrite",
           "--no-progress", *args]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    memory = json.loads((out / "quantization_report.json").read_text())["memory"]
    est, got = memory["estimated_peak_bytes"], memory["measured_peak_bytes"]
    row = {"run": label, "command": " ".join(["daq-vllm", *cmd[3:]]), "seconds": round(time.time() - t0, 1),
           "estimated_gib": round(est / GIB, 3), "measured_gib": round(got / GIB, 3),
           "estimate_over_measured": round(est / got, 3)}
    print(row, flush=True)
    ROWS.write_text(json.dumps({**done, label: row}, indent=1))
    return row


def estimate_70b_layer() -> dict:
    """The estimate alone for one Llama-2-70B-shaped layer (meta device), default rounding vs nearest."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from daq_vllm.offline.compensated import CompensationSpec
    from daq_vllm.offline.ldra import LDRASpec
    from daq_vllm.offline.memory import layer_memory
    from daq_vllm.offline.options import QuantizeOptions

    cfg = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8)
    with torch.device("meta"):
        layer = LlamaDecoderLayer(cfg, 0)
    names = [f"l.{n}" for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
    rows = {}
    for rounding, comp in (("gptq", CompensationSpec()), ("nearest", None)):
        opts = QuantizeOptions(ldra=LDRASpec(), compensation=comp)
        m = layer_memory("l", layer, names, opts, 8192, 64)
        rows[rounding] = {k: round(v / GIB, 2) for k, v in vars(m).items() if k != "name"}
    rows["gptq_over_nearest"] = round(rows["gptq"]["peak"] / rows["nearest"]["peak"], 2)
    return rows


def markdown(payload: dict) -> str:
    lines = ["# Quantization memory: estimate against measured peak", "", f"Machine: {payload['machine']}.", "",
             "Peak = anonymous resident memory of the `daq-vllm quantize` process (sampled every 5 ms); the "
             "estimate is the one printed before the first layer (`offline/memory.py`).", "",
             "| run | wall s | estimated GiB | measured GiB | estimate / measured | command |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for r in payload["runs"]:
        mark = " *" if r.get("note") else ""
        lines.append(f"| {r['run']}{mark} | {r['seconds']} | {r['estimated_gib']} | {r['measured_gib']} | "
                     f"{r['estimate_over_measured']} | `{r['command']}` |")
    notes = sorted({r["note"] for r in payload["runs"] if r.get("note")})
    lines += [f"\n\\* {n}: the fit in `offline/memory.py` (8 copies + 160 MiB) gives up to 0.4 GiB less here."
              for n in notes]
    est = payload["estimate_70b_layer"]
    lines += ["", "Estimate for one Llama-2-70B-shaped layer (hidden 8192, intermediate 28672, 128 x 512 "
              "calibration tokens), GiB:", "",
              "| rounding | peak | weights | activations | moments+rounding | working |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for rounding in ("gptq", "nearest"):
        e = est[rounding]
        lines.append(f"| {rounding} | {e['peak']} | {e['weights']} | {e['activations']} | {e['moments']} | "
                     f"{e['working']} |")
    lines += ["", f"Default rounding over nearest: {est['gptq_over_nearest']}x (goal: at most 2x).", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--skip-70b-k", action="store_true", help="skip the K = 28672 layer (about 15 min on 2 cores)")
    ap.add_argument("--fresh", action="store_true", help="measure every row again (default: keep finished rows)")
    args = ap.parse_args()
    if args.fresh:
        ROWS.unlink(missing_ok=True)
    runs = []
    if not args.skip_smollm2:
        smol = smollm2_float_dir()
        runs.append(quantize("SmolLM2-135M, daq (default)", smol, []))
        runs.append(quantize("SmolLM2-135M, dca (no calibration)", smol, ["--method", "dca"]))
    text = random_text(CACHE / "quant-memory-words.txt")
    calib = ["--calib", str(text), "--format", "nf4", "--nsamples", "16", "--seqlen", "512"]
    seven = random_layer_model(CACHE / "layer-7b", 4096, 11008)
    for rounding in ("gptq", "nearest"):
        runs.append(quantize(f"Llama-2-7B-shaped layer, {rounding}", seven, [*calib, "--rounding", rounding]))
    if not args.skip_70b_k:
        wide = random_layer_model(CACHE / "layer-k28672", 1024, 28672)
        runs.append(quantize("hidden 1024, intermediate 28672 (down_proj K = 28672), gptq", wide,
                             [*calib, "--nsamples", "4"]))
    payload = {"machine": machine(), "runs": runs, "estimate_70b_layer": estimate_70b_layer()}
    write_results("quant_memory", payload, markdown(payload))


if __name__ == "__main__":
    main()
