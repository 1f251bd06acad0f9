"""`daq-vllm quantize`: walk a model decoder layer by decoder layer and write a DAQ checkpoint.

Only the current layer's weights are on the compute device, and only one shard of output is held
in host memory, so memory stays bounded for large models.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from daq_vllm import __version__
from daq_vllm.codebooks import get_codebook
from daq_vllm.errors import DAQError
from daq_vllm.format import OFFSETS, QWEIGHT, SCALES, SUPPORTED_GROUP_SIZES, DAQFormat
from daq_vllm.kernels import dequantize, pack_codes

from .checkpoint_writer import ShardedWriter, commit_output, prepare_output
from .model_source import ModelSource, open_model
from .quantizer import InitSpec, quantize_weight

REPORT_FILE = "quantization_report.json"


@dataclass
class QuantizeOptions:
    """Everything `quantize_model` needs besides the input and output paths."""

    format: str = "fp4_e2m1"
    group_size: int = 128
    init: InitSpec = field(default_factory=InitSpec)
    skip: list[str] = field(default_factory=list)
    quantize_lm_head: bool = False
    device: str = "cpu"
    max_shard_bytes: int = 2 * 1024**3
    overwrite: bool = False
    progress: bool = True


def _check_options(opts: QuantizeOptions) -> None:
    try:
        get_codebook(opts.format)
    except ValueError as e:
        raise DAQError(str(e)) from None
    if opts.group_size not in SUPPORTED_GROUP_SIZES:
        raise DAQError(
            f"group size {opts.group_size} is not supported; choose one of "
            f"{', '.join(map(str, SUPPORTED_GROUP_SIZES))}"
        )
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise DAQError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")


def _skipped(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, f"*{p}*") for p in patterns)


def _checked(name: str, t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise DAQError(f"tensor {name} holds NaN or Inf values; fix the source model before quantizing")
    return t


def _linear_targets(source: ModelSource, opts: QuantizeOptions) -> list[list[str]]:
    """Per decoder layer, the linears to quantize (a last pseudo-layer holds lm_head if asked)."""
    groups = [[n for n in layer.linears if not _skipped(n, opts.skip)] for layer in source.decoder_layers()]
    if opts.quantize_lm_head:
        head = [n for n in source.linear_names() if n.rsplit(".", 1)[-1] == "lm_head"]
        if not head:
            raise DAQError("--quantize-lm-head: this model has no lm_head linear")
        groups.append(head)
    return groups


def quantize_model(model_path: str, out_dir: str | Path, opts: QuantizeOptions) -> dict:
    """Quantize `model_path` into a DAQ checkpoint at `out_dir`; return the quantization report."""
    _check_options(opts)
    out = Path(out_dir).expanduser()
    if out.exists() and not opts.overwrite:  # fail before the (slow) model load
        raise DAQError(f"output directory {out} already exists; choose another --out or pass --overwrite")
    t0 = time.time()
    source = open_model(model_path)
    codebook = get_codebook(opts.format)
    targets = _linear_targets(source, opts)
    quantized = {n for group in targets for n in group}
    quantized_weights = {f"{n}.weight" for n in quantized}
    tied_head = "lm_head" in quantized and "lm_head.weight" not in source.tensor_names()
    embedding = source.input_embedding_name()

    tmp = prepare_output(out, opts.overwrite)
    try:
        writer = ShardedWriter(tmp, opts.max_shard_bytes)
        for name in source.tensor_names():
            if name not in quantized_weights:
                writer.add(name, _checked(name, source.tensor(name)))
        cb_values = codebook.tensor(opts.device)
        layer_errors = []
        bar = tqdm(targets, desc="quantize", unit="layer", disable=not opts.progress, file=sys.stderr)
        for i, group in enumerate(bar):
            errors = {}
            for name in group:
                tensor_name = embedding if (name == "lm_head" and tied_head) else f"{name}.weight"
                w = _checked(tensor_name, source.tensor(tensor_name)).to(opts.device, torch.float32)
                qw = quantize_weight(w, codebook, opts.group_size, opts.init)
                packed = pack_codes(qw.codes, codebook.bits)
                w_hat = dequantize(packed, qw.scales, qw.offsets, cb_values, codebook.bits, opts.group_size, w.shape[1])
                errors[name] = ((w_hat - w).norm() / w.norm().clamp_min(1e-30)).item()
                writer.add(f"{name}.{QWEIGHT}", packed)
                writer.add(f"{name}.{SCALES}", qw.scales)
                writer.add(f"{name}.{OFFSETS}", qw.offsets)
            mean_err = sum(errors.values()) / max(len(errors), 1)
            layer_errors.append({"layer": i, "mean_rel_error": mean_err, "linears": errors})
            bar.set_postfix(rel_err=f"{mean_err:.4f}")
            if opts.progress:
                tqdm.write(f"layer {i + 1}/{len(targets)}: mean relative weight error {mean_err:.5f}", file=sys.stderr)
        writer.finish()

        fmt = DAQFormat(
            format=codebook.name,
            bits=codebook.bits,
            group_size=opts.group_size,
            codebook=list(codebook.values),
            modules_not_converted=sorted(n for n in source.linear_names() if n not in quantized),
            provenance={
                "tool": "daq-vllm",
                "tool_version": __version__,
                "method": opts.init.method,
                "init": asdict(opts.init),
                "calibration": None,
                "source": str(source.path),
                "skip": list(opts.skip),
            },
        )
        report = {
            "format": fmt.to_dict(),
            "bits_per_weight": fmt.bits_per_weight(),
            "quantized_linears": len(quantized),
            "seconds": round(time.time() - t0, 2),
            "layers": layer_errors,
        }
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        source.copy_side_files(tmp)
        config = source.config_dict()
        config["quantization_config"] = fmt.to_dict()
        if tied_head:
            config["tie_word_embeddings"] = False
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        commit_output(tmp, out)
    except OSError as e:
        raise DAQError(f"writing the checkpoint failed: {e.strerror or e} ({e.filename or tmp}); check free disk space and permissions") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return report
