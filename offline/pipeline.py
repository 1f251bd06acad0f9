"""`daq-vllm quantize`: walk a model decoder layer by decoder layer and write a DAQ checkpoint.

Only the current layer's weights are on the compute device, and only one shard of output is held
in host memory, so memory stays bounded for large models. With LDRA, calibration blocks flow
through the layers (GPTQ-style) and each layer's linears are tuned against their input statistics.

The run, in steps: plan the targets (`targets.py`) -> per decoder layer, its saved result on
--resume, else calibrate, choose each linear's codebook (`auto_format.py`; the one named unless
`--format auto`) and quantize its linears (`LinearQuantizer`) -> the head -> report, config.json
and an atomic commit (`report.py`, `checkpoint_writer.py`).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

from daq_vllm.errors import DAQError
from daq_vllm.format import OFFSETS, QWEIGHT, SCALES, Codebook, DAQFormat
from daq_vllm.kernels import dequantize, pack_codes

from .auto_format import Choice, Screening, choose_codebooks
from .checkpoint_writer import ShardedWriter, commit_output, prepare_output
from .compensated import compensate
from .layer_calibration import LayerCalibration
from .ldra import quantize_weight_ldra
from .model_card import CARD_FILE, model_card
from .model_source import DecoderLayer, ModelSource, open_model
from .moments import SecondMoments
from .options import QuantizeOptions, candidate_codebooks, check_options
from .ranges import quantize_weight
from .report import REPORT_FILE, LinearReport, build_report, checkpoint_format, layer_entry
from .resume import ResumeStore, run_fingerprint
from .targets import Targets, plan_targets

__all__ = ["REPORT_FILE", "LinearQuantizer", "QuantizeOptions", "QuantizedLinear", "quantize_model"]


def _checked(name: str, t: torch.Tensor) -> torch.Tensor:
    """`t`, refused with a DAQError if it holds NaN or Inf (a broken source, not a quantizer bug)."""
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise DAQError(f"tensor {name} holds NaN or Inf values; fix the source model before quantizing")
    return t


@dataclass
class QuantizedLinear:
    """One linear as the checkpoint stores it (qweight, scales, offsets; on the CPU) and its report."""

    tensors: dict[str, torch.Tensor]
    report: LinearReport


class LinearQuantizer:
    """The per-linear step: choose its codebook, round the weight, pack it into the checkpoint
    tensors, measure its error."""

    def __init__(self, source: ModelSource, opts: QuantizeOptions):
        self.source, self.opts = source, opts
        self.candidates = candidate_codebooks(opts)
        self.codebooks = {cb.name: cb for cb in self.candidates}

    def choose(self, weights: dict[str, torch.Tensor], moments: SecondMoments | None) -> dict[str, Choice]:
        """Each linear's codebook among the run's candidates (`auto_format.choose_codebooks`)."""
        opts = self.opts
        how = Screening(opts.group_size, opts.init, opts.ldra, opts.compensation is not None, opts.auto)
        return choose_codebooks(weights, moments, self.candidates, how)

    def weight(self, tensor_name: str) -> torch.Tensor:
        """A source tensor on the compute device in float32, refused if it holds NaN or Inf."""
        return _checked(tensor_name, self.source.tensor(tensor_name)).to(self.opts.device, torch.float32)

    def __call__(self, name: str, w: torch.Tensor, moments: SecondMoments | None, choice: Choice) -> QuantizedLinear:
        """Quantize W [N, K] of linear `name` with the codebook of `choice`: by the initializer alone
        without `moments`, else LDRA against its input statistics and, with compensation, GPTQ-style
        codes on the tuned grids."""
        opts, codebook = self.opts, choice.codebook
        ldra_loss = full_loss = None
        if moments is None:
            qw = quantize_weight(w, codebook, opts.group_size, opts.init)
        else:
            qw, stats = quantize_weight_ldra(w, moments.moments(name), codebook, opts.group_size, opts.init, opts.ldra)
            ldra_loss = (stats.initial_loss, stats.final_loss)
            if opts.compensation is not None:
                qw, full_loss = compensate(w, moments.full_moment(name), qw, codebook, opts.group_size,
                                           opts.compensation)
        packed = pack_codes(qw.codes, codebook.bits)
        w_hat = self.dequantize(packed, qw.scales, qw.offsets, w.shape[1], codebook)
        rel_error = ((w_hat - w).norm() / w.norm().clamp_min(1e-30)).item()
        tensors = {f"{name}.{QWEIGHT}": packed.cpu(), f"{name}.{SCALES}": qw.scales.cpu(),
                   f"{name}.{OFFSETS}": qw.offsets.cpu()}
        report = LinearReport(rel_error, ldra_loss, full_loss, codebook.name, choice.losses or None)
        return QuantizedLinear(tensors, report)

    def dequantize(
        self, packed: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, in_features: int, codebook: Codebook
    ) -> torch.Tensor:
        """The float32 weight [N, in_features] the checkpoint tensors decode to, on the compute device."""
        device = self.opts.device
        return dequantize(packed.to(device), scales.to(device), offsets.to(device), codebook.tensor(device),
                          codebook.bits, self.opts.group_size, in_features)

    def decoded(
        self, tensors: dict[str, torch.Tensor], reports: dict[str, LinearReport], name: str, in_features: int
    ) -> torch.Tensor:
        """The quantized weight of linear `name` from a layer's checkpoint `tensors` and its `reports`
        (which name its codebook)."""
        return self.dequantize(tensors[f"{name}.{QWEIGHT}"], tensors[f"{name}.{SCALES}"],
                               tensors[f"{name}.{OFFSETS}"], in_features, self.codebooks[reports[name].format])


def _layer_step(
    i: int, layer: DecoderLayer, names: list[str], quantizer: LinearQuantizer,
    calibration: LayerCalibration | None, store: ResumeStore,
) -> tuple[dict[str, torch.Tensor], dict[str, LinearReport]]:
    """One decoder layer: its saved result on --resume, else (calibrate and) quantize its linears `names`."""
    saved = store.load(i)
    if saved is not None:
        tensors, entries = saved
        reports = {n: LinearReport.from_dict(e) for n, e in entries.items()}
        if calibration is not None:
            calibration.advance(layer, names, partial(quantizer.decoded, tensors, reports))
        return tensors, reports
    moments, outputs = calibration.collect(layer, names) if calibration is not None else (None, None)
    weights = {n: quantizer.weight(f"{n}.weight") for n in names}
    choices = quantizer.choose(weights, moments)
    results = {n: quantizer(n, weights[n], moments, choices[n]) for n in names}
    tensors = {k: v for r in results.values() for k, v in r.tensors.items()}
    reports = {n: r.report for n, r in results.items()}
    if calibration is not None:
        calibration.advance(layer, names, partial(quantizer.decoded, tensors, reports), outputs)
    store.save(i, tensors, {n: r.to_dict() for n, r in reports.items()})
    return tensors, reports


def _quantize_targets(
    targets: Targets, quantizer: LinearQuantizer, calibration: LayerCalibration | None, store: ResumeStore,
    writer: ShardedWriter, progress: bool,
) -> list[dict[str, Any]]:
    """Every decoder layer, then the head: their tensors go to `writer`; returns the report's `layers`."""
    entries = []
    n_layers = len(targets.layers)
    bar = tqdm(total=n_layers + bool(targets.head), desc="quantize", unit="layer", disable=not progress,
               file=sys.stderr)
    with bar:
        for i, (layer, names) in enumerate(zip(targets.layers, targets.linears)):
            tensors, reports = _layer_step(i, layer, names, quantizer, calibration, store)
            _add_all(writer, tensors)
            entries.append(layer_entry(i, reports))
            mean_err = entries[-1]["mean_rel_error"]
            bar.update()
            bar.set_postfix(rel_err=f"{mean_err:.4f}")
            if progress:
                tqdm.write(f"layer {i + 1}/{n_layers}: mean relative weight error {mean_err:.5f}", file=sys.stderr)
        for name, tensor_name in targets.head.items():
            w = quantizer.weight(tensor_name)
            q = quantizer(name, w, None, quantizer.choose({name: w}, None)[name])
            _add_all(writer, q.tensors)
            entries.append(layer_entry(name, {name: q.report}))
            bar.update()
    return entries


def _add_all(writer: ShardedWriter, tensors: dict[str, torch.Tensor]) -> None:
    for k, v in tensors.items():
        writer.add(k, v)


def _write_config(tmp: Path, source: ModelSource, fmt: DAQFormat, report: dict, tied_head: bool) -> None:
    """The report, the source's side files, the model card (README.md), and config.json last (what
    makes a directory a checkpoint)."""
    (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    source.copy_side_files(tmp)
    config = source.config_dict()
    (tmp / CARD_FILE).write_text(model_card(report, fmt, str(source.path), config))
    config["quantization_config"] = fmt.to_dict()
    if tied_head:
        config["tie_word_embeddings"] = False
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")


@contextmanager
def _writing(tmp: Path, store: ResumeStore) -> Iterator[None]:
    """Around the writes into the temp dir `tmp`: a failed write is a DAQError naming the fix, Ctrl-C
    keeps the finished layers for --resume, and `tmp` never outlives the run. The resume store goes
    once the checkpoint is committed, or when it holds nothing worth resuming."""
    committed = False
    try:
        yield
        committed = True
    except OSError as e:
        raise DAQError(f"writing the checkpoint failed: {e.strerror or e} ({e.filename or tmp}); "
                       "check free disk space and permissions") from None
    except KeyboardInterrupt:
        if store.finished():
            print(f"interrupted: {store.finished()} finished layers kept; rerun with --resume to continue",
                  file=sys.stderr)
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if committed or store.finished() == 0:
            store.remove()


def quantize_model(model_path: str, out_dir: str | Path, opts: QuantizeOptions) -> dict[str, Any]:
    """Quantize `model_path` into a DAQ checkpoint at `out_dir`; return the quantization report."""
    check_options(opts)
    out = Path(out_dir).expanduser()
    if out.exists() and not opts.overwrite:  # fail before the (slow) model load
        raise DAQError(f"output directory {out} already exists; choose another --out or pass --overwrite")
    t0 = time.time()
    source = open_model(model_path, opts.revision)
    targets = plan_targets(source, opts)
    quantizer = LinearQuantizer(source, opts)
    calibration = LayerCalibration(source, targets.layers, opts) if opts.ldra is not None else None
    store = ResumeStore(out, run_fingerprint(model_path, opts), opts.resume)
    tmp = prepare_output(out, opts.overwrite)
    with _writing(tmp, store):
        writer = ShardedWriter(tmp, opts.max_shard_bytes)
        for name in targets.untouched(source):
            writer.add(name, _checked(name, source.tensor(name)))
        layers = _quantize_targets(targets, quantizer, calibration, store, writer, opts.progress)
        writer.finish()
        fmt = checkpoint_format(layers, opts, targets.not_converted(source), str(source.path))
        report = build_report(fmt, len(targets.quantized), time.time() - t0, layers)
        _write_config(tmp, source, fmt, report, targets.tied_head)
        commit_output(tmp, out)
    return report
