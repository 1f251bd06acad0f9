"""`daq-vllm quantize`: walk a model decoder layer by decoder layer and write a DAQ checkpoint.

Only the current layer's weights are on the compute device, and only one shard of output is held
in host memory, so memory stays bounded for large models. With LDRA, calibration blocks flow
through the layers (GPTQ-style) and each layer's linears are tuned against their input statistics.
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
from daq_vllm.format.codebooks import Codebook, get_codebook
from daq_vllm.errors import DAQError
from daq_vllm.format import OFFSETS, QWEIGHT, SCALES, SUPPORTED_GROUP_SIZES, DAQFormat
from daq_vllm.kernels import dequantize, pack_codes

from .calibration import CalibSpec, calibration_blocks
from .checkpoint_writer import ShardedWriter, commit_output, prepare_output
from .compensated import CompensationSpec, compensate
from .layerwise import LayerRunner, SecondMoments, materialize, release, set_parameter
from .ldra import LDRASpec, quantize_weight_ldra
from .model_source import DecoderLayer, ModelSource, open_model
from .quantizer import InitSpec, quantize_weight
from .resume import ResumeStore

REPORT_FILE = "quantization_report.json"


@dataclass
class QuantizeOptions:
    """Everything `quantize_model` needs besides the input and output paths.

    `ldra=None` quantizes from the initializer alone (no calibration); with an LDRASpec the run
    calibrates on `calib` and tunes each group (the full DAQ when `init.method` is "dca").
    `compensation` (with LDRA only) re-chooses the codes on the tuned grids GPTQ-style.
    """

    format: str = "fp4_e2m1"
    group_size: int = 128
    init: InitSpec = field(default_factory=InitSpec)
    ldra: LDRASpec | None = None
    compensation: CompensationSpec | None = None
    calib: CalibSpec = field(default_factory=CalibSpec)
    sequential: bool = False
    skip: list[str] = field(default_factory=list)
    quantize_lm_head: bool = False
    device: str = "cpu"
    max_shard_bytes: int = 2 * 1024**3
    overwrite: bool = False
    resume: bool = False
    progress: bool = True

    def method_name(self) -> str:
        name = "daq" if self.ldra is not None and self.init.method == "dca" else (
            f"{self.init.method}+ldra" if self.ldra is not None else self.init.method
        )
        return f"{name}+gptq" if self.compensation is not None else name


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
    if opts.compensation is not None and opts.ldra is None:
        raise DAQError(f"--rounding gptq needs calibration statistics; use it with --method daq, not {opts.init.method}")
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise DAQError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")


def _skipped(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, f"*{p}*") for p in patterns)


def _checked(name: str, t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise DAQError(f"tensor {name} holds NaN or Inf values; fix the source model before quantizing")
    return t


class _LinearQuantizer:
    """Quantizes one linear's weight and packs it into the checkpoint tensors."""

    def __init__(self, source: ModelSource, codebook: Codebook, opts: QuantizeOptions):
        self.source, self.codebook, self.opts = source, codebook, opts
        self.values = codebook.tensor(opts.device)

    def weight(self, tensor_name: str) -> torch.Tensor:
        return _checked(tensor_name, self.source.tensor(tensor_name)).to(self.opts.device, torch.float32)

    def __call__(self, name: str, w: torch.Tensor, moments: SecondMoments | None) -> tuple[dict, dict]:
        opts = self.opts
        info: dict = {}
        if moments is None:
            qw = quantize_weight(w, self.codebook, opts.group_size, opts.init)
        else:
            qw, stats = quantize_weight_ldra(w, moments.moments(name), self.codebook, opts.group_size, opts.init, opts.ldra)
            info["ldra_loss"] = [stats.initial_loss, stats.final_loss]
            if opts.compensation is not None:
                qw, info["full_loss"] = compensate(w, moments.full_moment(name), qw, self.codebook,
                                                   opts.group_size, opts.compensation)
        packed = pack_codes(qw.codes, self.codebook.bits)
        w_hat = self.dequantize(packed, qw.scales, qw.offsets, w.shape[1])
        info["rel_error"] = ((w_hat - w).norm() / w.norm().clamp_min(1e-30)).item()
        tensors = {f"{name}.{QWEIGHT}": packed.cpu(), f"{name}.{SCALES}": qw.scales.cpu(), f"{name}.{OFFSETS}": qw.offsets.cpu()}
        return tensors, info

    def dequantize(self, packed, scales, offsets, in_features: int) -> torch.Tensor:
        return dequantize(packed.to(self.opts.device), scales.to(self.opts.device), offsets.to(self.opts.device),
                          self.values, self.codebook.bits, self.opts.group_size, in_features)


class _Calibrated:
    """Layer-by-layer calibration state: the activations entering the current layer."""

    def __init__(self, source: ModelSource, layers: list[DecoderLayer], opts: QuantizeOptions):
        self.source, self.opts = source, opts
        blocks = calibration_blocks(source.tokenizer(), opts.calib)
        self.runner = LayerRunner(source, layers, opts.device)
        self.hidden = self.runner.first_inputs(blocks)

    def quantize_layer(self, layer: DecoderLayer, names: list[str], quantizer: _LinearQuantizer) -> tuple[dict, dict]:
        materialize(self.source, layer.name, layer.module, self.opts.device)
        moments = SecondMoments(self.opts.group_size, full=self.opts.compensation is not None)
        moments.attach(layer.module, layer.name, names)
        try:
            outputs = self.runner.forward(layer.module, self.hidden, before_each=moments.new_pass)
        finally:
            moments.detach()
        tensors, infos = {}, {}
        for name in names:
            t, infos[name] = quantizer(name, quantizer.weight(f"{name}.weight"), moments)
            tensors.update(t)
        self.advance(layer, names, tensors, quantizer, outputs)
        return tensors, infos

    def advance(self, layer: DecoderLayer, names: list[str], tensors: dict, quantizer: _LinearQuantizer,
                float_outputs: torch.Tensor | None = None) -> None:
        """Move the activations past `layer`, then drop its weights.

        `float_outputs` are the layer's full-precision outputs when the calibration pass already
        computed them (its weights are still loaded then); a resumed layer passes None. With
        `sequential`, the next layer sees this layer's quantized outputs instead.
        """
        if float_outputs is None:
            materialize(self.source, layer.name, layer.module, self.opts.device)
        if self.opts.sequential:
            for name in names:
                local = name[len(layer.name) + 1 :]
                in_features = layer.module.get_submodule(local).weight.shape[1]
                w_hat = quantizer.dequantize(tensors[f"{name}.{QWEIGHT}"], tensors[f"{name}.{SCALES}"],
                                             tensors[f"{name}.{OFFSETS}"], in_features)
                set_parameter(layer.module, f"{local}.weight", w_hat)
            outputs = self.runner.forward(layer.module, self.hidden)
        else:
            outputs = float_outputs if float_outputs is not None else self.runner.forward(layer.module, self.hidden)
        release(layer.module)
        self.hidden = outputs


def _fingerprint(model_path: str, opts: QuantizeOptions) -> dict:
    """What a resumed run must share with the killed one: model files, options, tool version."""
    keep = asdict(opts)
    for volatile in ("overwrite", "resume", "progress", "max_shard_bytes"):
        keep.pop(volatile)
    path = Path(model_path).expanduser().resolve()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return {"model": str(path), "files": stats, "options": keep, "version": __version__}


def quantize_model(model_path: str, out_dir: str | Path, opts: QuantizeOptions) -> dict:
    """Quantize `model_path` into a DAQ checkpoint at `out_dir`; return the quantization report."""
    _check_options(opts)
    out = Path(out_dir).expanduser()
    if out.exists() and not opts.overwrite:  # fail before the (slow) model load
        raise DAQError(f"output directory {out} already exists; choose another --out or pass --overwrite")
    t0 = time.time()
    source = open_model(model_path)
    codebook = get_codebook(opts.format)
    layers = source.decoder_layers()
    targets = [[n for n in layer.linears if not _skipped(n, opts.skip)] for layer in layers]
    head = [n for n in source.linear_names() if n.rsplit(".", 1)[-1] == "lm_head"] if opts.quantize_lm_head else []
    if opts.quantize_lm_head and not head:
        raise DAQError("--quantize-lm-head: this model has no lm_head linear")
    quantized = {n for group in targets for n in group} | set(head)
    tied_head = bool(head) and "lm_head.weight" not in source.tensor_names()
    quantizer = _LinearQuantizer(source, codebook, opts)
    calibrated = _Calibrated(source, layers, opts) if opts.ldra is not None else None
    store = ResumeStore(out, _fingerprint(model_path, opts), opts.resume)

    tmp = prepare_output(out, opts.overwrite)
    committed = False
    try:
        writer = ShardedWriter(tmp, opts.max_shard_bytes)
        quantized_weights = {f"{n}.weight" for n in quantized}
        for name in source.tensor_names():
            if name not in quantized_weights:
                writer.add(name, _checked(name, source.tensor(name)))
        layer_reports = []
        bar = tqdm(total=len(layers) + bool(head), desc="quantize", unit="layer", disable=not opts.progress, file=sys.stderr)
        for i, (layer, names) in enumerate(zip(layers, targets)):
            saved = store.load(i)
            if saved is not None:
                tensors, infos = saved
                if calibrated is not None:
                    calibrated.advance(layer, names, tensors, quantizer)
            else:
                if calibrated is not None:
                    tensors, infos = calibrated.quantize_layer(layer, names, quantizer)
                else:
                    tensors, infos = {}, {}
                    for name in names:
                        t, infos[name] = quantizer(name, quantizer.weight(f"{name}.weight"), None)
                        tensors.update(t)
                store.save(i, tensors, infos)
            for k, v in tensors.items():
                writer.add(k, v)
            mean_err = sum(v["rel_error"] for v in infos.values()) / max(len(infos), 1)
            layer_reports.append({"layer": i, "mean_rel_error": mean_err, "linears": infos})
            bar.update()
            bar.set_postfix(rel_err=f"{mean_err:.4f}")
            if opts.progress:
                tqdm.write(f"layer {i + 1}/{len(layers)}: mean relative weight error {mean_err:.5f}", file=sys.stderr)
        for name in head:
            tensor_name = source.input_embedding_name() if tied_head else f"{name}.weight"
            tensors, info = quantizer(name, quantizer.weight(tensor_name), None)
            for k, v in tensors.items():
                writer.add(k, v)
            layer_reports.append({"layer": name, "mean_rel_error": info["rel_error"], "linears": {name: info}})
            bar.update()
        bar.close()
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
                "method": opts.method_name(),
                "init": asdict(opts.init),
                "ldra": asdict(opts.ldra) if opts.ldra is not None else None,
                "compensation": asdict(opts.compensation) if opts.compensation is not None else None,
                "calibration": ({**asdict(opts.calib), "sequential": opts.sequential} if opts.ldra is not None else None),
                "source": str(source.path),
                "skip": list(opts.skip),
            },
        )
        report = {
            "format": fmt.to_dict(),
            "bits_per_weight": fmt.bits_per_weight,
            "quantized_linears": len(quantized),
            "seconds": round(time.time() - t0, 2),
            "layers": layer_reports,
        }
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        source.copy_side_files(tmp)
        config = source.config_dict()
        config["quantization_config"] = fmt.to_dict()
        if tied_head:
            config["tie_word_embeddings"] = False
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        commit_output(tmp, out)
        committed = True
    except OSError as e:
        raise DAQError(f"writing the checkpoint failed: {e.strerror or e} ({e.filename or tmp}); check free disk space and permissions") from None
    except KeyboardInterrupt:
        if store.finished():
            print(f"interrupted: {store.finished()} finished layers kept; rerun with --resume to continue", file=sys.stderr)
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if committed or store.finished() == 0:  # done, or nothing worth resuming
            store.remove()
    return report
