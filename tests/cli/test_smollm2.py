"""The real model: SmolLM2-135M from its GGUF file, quantized and evaluated on 2 windows (~2 min)."""

import json
import re
import subprocess
import sys

import pytest

from helpers import decode_from_spec, read_all

pytestmark = pytest.mark.slow


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daq_vllm.cli", *args], capture_output=True, text=True, timeout=900)


def test_quantize_and_evaluate_smollm2(smollm2_dca, wikitext2_raw):
    out, proc = smollm2_dca  # daq-vllm quantize GGUF --format fp4_e2m1 --group-size 64 --method dca
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "layer 30/30" in proc.stderr  # per-layer progress with the weight error
    report = json.loads((out / "quantization_report.json").read_text())
    assert report["quantized_linears"] == 30 * 7
    assert all(0 < layer["mean_rel_error"] < 0.3 for layer in report["layers"])
    memory = report["memory"]  # the pre-flight estimate against the measured peak (offline/memory.py)
    assert 0.75 <= memory["estimated_peak_bytes"] / memory["measured_peak_bytes"] <= 1.25, memory

    proc = cli("eval", str(out), "--ppl", "wikitext2", "--max-windows", "2", "--data", str(wikitext2_raw),
               "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    ppl = float(re.search(r"perplexity ([0-9.]+) \(2/148 windows", proc.stdout).group(1))
    assert 15 < ppl < 60  # fp32 gives 18.84 on these windows; DCA-fp4 without LDRA loses some

    # The weights the evaluation used are what docs/FORMAT.md decodes (checked on a few rows).
    from transformers import AutoModelForCausalLM

    import daq_vllm  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    tensors = read_all(out)
    name = "model.layers.7.self_attn.o_proj"
    q, s, b = (tensors[f"{name}.{t}"][:2].numpy() for t in ("qweight", "scales", "offsets"))
    decoded = decode_from_spec(q, s, b, cfg["codebook"], 4, 64, 576)
    assert (decoded == model.get_submodule(name).dequantized_weight()[:2].numpy()).all()
