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
from collections.abc import Collection
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

from daq_vllm.errors import DAQError
from daq_vllm.format import OFFSETS, QWEIGHT, SCALES, Codebook, DAQFormat
from daq_vllm.kernels import dequantize, pack_codes

from .asymmetric import asymmetric_target
from .auto_format import Choice, Screening, choose_codebooks
from .checkpoint_writer import ShardedWriter, check_output, commit_output, prepare_output
from .compensated import CompensationSpec, InputHessian, compensate
from .distributed import Ranks, check_distributed
from .grid import row_chunks
from .layer_calibration import LayerCalibration
from .ldra import quantize_weight_ldra
from .memory import PeakMemory, check_memory, plan_memory, return_freed_memory
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

    def __init__(self, source: ModelSource, opts: QuantizeOptions, shared: dict[str, str] | None = None):
        """`shared`: linears that must share a codebook, by key (`Targets.expert_groups`)."""
        self.source, self.opts = source, opts
        self.shared = shared or {}
        self.candidates = candidate_codebooks(opts)
        self.codebooks = {cb.name: cb for cb in self.candidates}

    def choose(
        self, weights: dict[str, torch.Tensor], moments: SecondMoments | None, uncalibrated: Collection[str] = ()
    ) -> dict[str, Choice]:
        """Each linear's codebook among the run's candidates (`auto_format.choose_codebooks`)."""
        opts = self.opts
        how = Screening(opts.group_size, opts.init, opts.ldra, opts.compensation is not None, opts.auto)
        return choose_codebooks(weights, moments, self.candidates, how, self.shared, uncalibrated)

    def weight(self, tensor_name: str) -> torch.Tensor:
        """A source tensor on the compute device in float32, refused if it holds NaN or Inf."""
        return _checked(tensor_name, self.source.tensor(tensor_name)).to(self.opts.device, torch.float32)

    def __call__(
        self, name: str, w: torch.Tensor, moments: SecondMoments | None, choice: Choice, tokens: int | None = None
    ) -> QuantizedLinear:
        """Quantize W [N, K] of linear `name` with the codebook of `choice`: by the initializer alone
        without `moments`, else LDRA against its input statistics and, with compensation, GPTQ-style
        codes on the tuned grids. Rows go in chunks (`grid.row_chunks`), so the working memory of a
        large linear stays bounded; every step treats output rows independently. `tokens`: how many
        calibration tokens an expert projection's routing gave it (for the report)."""
        opts, codebook = self.opts, choice.codebook
        calibrated, compensated = moments is not None, moments is not None and opts.compensation is not None
        hess = moments.derive(name, partial(InputHessian, spec=opts.compensation)) if compensated else None
        ldra_loss, full_loss, err2 = [0.0, 0.0], [0.0, 0.0], 0.0
        parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for rows in row_chunks(*w.shape):
            wc = w[rows]
            if not calibrated:
                qw = quantize_weight(wc, codebook, opts.group_size, opts.init)
            else:
                qw, stats = quantize_weight_ldra(wc, moments.moments(name), codebook, opts.group_size, opts.init,
                                                 opts.ldra)
                ldra_loss = [ldra_loss[0] + stats.initial_loss, ldra_loss[1] + stats.final_loss]
                if hess is not None:
                    qw, (before, after) = compensate(wc, hess, qw, codebook, opts.group_size)
                    full_loss = [full_loss[0] + before, full_loss[1] + after]
            packed = pack_codes(qw.codes, codebook.bits)
            w_hat = self.dequantize(packed, qw.scales, qw.offsets, w.shape[1], codebook)
            err2 += (w_hat - wc).double().square().sum().item()
            parts.append((packed.cpu(), qw.scales.cpu(), qw.offsets.cpu()))
        rel_error = (err2 / max(w.double().square().sum().item(), 1e-60)) ** 0.5
        kinds = (QWEIGHT, SCALES, OFFSETS)
        tensors = {f"{name}.{kind}": torch.cat([p[i] for p in parts]) for i, kind in enumerate(kinds)}
        report = LinearReport(rel_error, tuple(ldra_loss) if calibrated else None,
                              tuple(full_loss) if compensated else None, codebook.name, choice.losses or None,
                              tokens)
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


def _layer_results(
    targets: Targets, quantizer: LinearQuantizer, calibration: LayerCalibration | None, store: ResumeStore | None,
    ranks: Ranks,
) -> Iterator[tuple[int, dict[str, torch.Tensor], dict[str, LinearReport]]]:
    """Each decoder layer's checkpoint tensors and reports, in order (on the leader; empty elsewhere).

    In step s, rank r feeds layer s - r forward (`_feed`: its link of the statistics chain), then
    every rank quantizes layer s - lag, whose statistics the last rank has just completed
    (`_finish`). With one process both are layer s.
    """
    saved = ranks.from_leader(store.saved_layers() if store is not None else set())
    n, lag = len(targets.layers), ranks.lag
    for step in range(n + lag):
        j, k = step - ranks.rank, step - lag  # on the last rank j == k: it quantizes what it just fed
        fed = (_feed(targets.layers[j], targets.linears[j], calibration, j in saved)
               if calibration is not None and 0 <= j < n else None)
        if 0 <= k < n:
            yield k, *_finish(k, targets.layers[k], targets.linears[k], quantizer, calibration, store, ranks,
                              k in saved, fed if ranks.last else None)
        ranks.wait_sent()


@dataclass
class _Fed:
    """What feeding a layer leaves for quantizing it in the same step (on the last rank): its
    statistics (None for a saved layer) and float outputs, its weights still loaded."""

    moments: SecondMoments | None
    outputs: torch.Tensor | None


def _feed(layer: DecoderLayer, names: list[str], calibration: LayerCalibration, saved: bool) -> _Fed:
    """This rank's blocks through `layer`: its statistics (unless the layer is saved) and outputs.

    The last rank keeps the layer for `_finish` in the same step; the others hand their activations
    on at once and reload the linears they own once the layer's statistics are complete.
    """
    moments, outputs = calibration.collect(layer, names) if not saved else (None, None)
    if not calibration.ranks.last:
        calibration.advance(layer, names, None, outputs)
    return _Fed(moments, outputs)


def _finish(
    i: int, layer: DecoderLayer, names: list[str], quantizer: LinearQuantizer, calibration: LayerCalibration | None,
    store: ResumeStore | None, ranks: Ranks, saved: bool, fed: _Fed | None,
) -> tuple[dict[str, torch.Tensor], dict[str, LinearReport]]:
    """Decoder layer i: its saved result on --resume, else quantize its linears `names`; then the
    last rank moves its activations past the layer and the leader saves the result for --resume.

    Over several processes the leader (the only one with a `store`) gets every result; the others
    return empty dicts.
    """
    if saved:
        loaded = store.load(i) if store is not None else None
        tensors, entries = loaded or ({}, {})
        reports = {n: LinearReport.from_dict(e) for n, e in entries.items()}
    else:
        tensors, reports = _quantize_layer(layer, names, quantizer, calibration, ranks, fed)
    if calibration is not None and ranks.last:
        calibration.advance(layer, names, partial(quantizer.decoded, tensors, reports), fed.outputs if fed else None)
    if store is not None and not saved:
        store.save(i, tensors, {n: r.to_dict() for n, r in reports.items()})
    return tensors, reports


def _quantize_layer(
    layer: DecoderLayer, names: list[str], quantizer: LinearQuantizer, calibration: LayerCalibration | None,
    ranks: Ranks, fed: _Fed | None,
) -> tuple[dict[str, torch.Tensor], dict[str, LinearReport]]:
    """Quantize the linears of `names` this rank owns, against the layer's statistics summed over
    every rank, which `Ranks.final_sums` hands to their owners; the leader returns every rank's
    tensors and reports."""
    if calibration is not None and quantizer.opts.asymmetric:  # one process (check_distributed)
        return _quantize_stages(layer, names, quantizer, calibration, fed.moments)
    if calibration is not None:
        moments = fed.moments if fed is not None and fed.moments is not None else calibration.new_moments()
        shapes = {n: calibration.shape(layer, n) for n in names}
        owner = ranks.final_sums(moments, partial(_owners, names, shapes=shapes, ranks=ranks, shared=quantizer.shared))
        mine = [n for n in names if owner[moments.input_owner(n)] == ranks.rank]
        weights = {n: _checked(f"{n}.weight", calibration.weight(layer, n)) for n in mine}
        for n in names:
            if n not in weights:
                moments.done(n)
                calibration.drop_weight(layer, n)
    else:
        moments = None
        weights = {n: quantizer.weight(f"{n}.weight") for n in names}
    experts = [n for n in weights if n in quantizer.shared]
    tokens = calibration.expert_tokens(moments, experts) if calibration is not None else {}
    starved = {n for n, t in tokens.items() if t < calibration.min_expert_tokens}
    choices = quantizer.choose(weights, moments, starved)
    results = {}
    for n in list(weights):  # each linear's statistics and float weight go as soon as it is quantized
        results[n] = quantizer(n, weights.pop(n), None if n in starved else moments, choices[n], tokens.get(n))
        if calibration is not None:
            moments.done(n)
            calibration.drop_weight(layer, n)
        return_freed_memory()
    gathered = ranks.gather(results)
    return _in_layer_order({n: r for part in gathered for n, r in part.items()} if gathered is not None else {}, names)


def _in_layer_order(
    results: dict[str, QuantizedLinear], names: list[str]
) -> tuple[dict[str, torch.Tensor], dict[str, LinearReport]]:
    """A layer's checkpoint tensors and reports from its quantized linears, in the order of `names`."""
    results = {n: results[n] for n in names if n in results}
    tensors = {k: v for r in results.values() for k, v in r.tensors.items()}
    return tensors, {n: r.report for n, r in results.items()}


def _quantize_stages(
    layer: DecoderLayer, names: list[str], quantizer: LinearQuantizer, calibration: LayerCalibration,
    layout: SecondMoments,
) -> tuple[dict[str, torch.Tensor], dict[str, LinearReport]]:
    """Asymmetric calibration of a layer, one input at a time in the order the forward pass reads
    them (GPTAQ's sequential stages: q/k/v, o, gate/up, down): the linears of an input are
    calibrated on the quantized model's activations through this layer's already quantized linears
    (`LayerCalibration.collect_stage`) and aimed at the float model's outputs (`asymmetric_target`).
    `layout`: the float pass's record of which linears read which input, in order."""
    opts = quantizer.opts
    damp = (opts.compensation or CompensationSpec()).damp
    stages = [[n for n in names if layout.input_owner(n) == owner] for owner in layout.reference]
    layout.reference.clear()
    quantized: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    results: dict[str, QuantizedLinear] = {}
    for readers in stages:
        moments = calibration.collect_stage(layer, readers, quantized)
        weights = {n: _checked(f"{n}.weight", calibration.weight(layer, n)) for n in readers}
        targets = {n: asymmetric_target(w, moments.full_moment(n), moments.cross_moment(n), opts.asymmetric, damp)
                   for n, w in weights.items()}
        moments.drop_cross()
        choices = quantizer.choose(targets, moments)
        for n in readers:
            results[n] = quantizer(n, targets.pop(n), moments, choices[n])
            moments.done(n)
            decoded = quantizer.decoded(results[n].tensors, {n: results[n].report}, n, weights[n].shape[1])
            quantized[n] = (weights[n], decoded)
            return_freed_memory()
    return _in_layer_order(results, names)


def _owners(
    names: list[str], moments: SecondMoments, shapes: dict[str, torch.Size], ranks: Ranks, shared: dict[str, str]
) -> dict[str, int]:
    """The rank that quantizes the readers of each input. Linears that read one input, or share a
    codebook (`shared`: a MoE layer's experts), go to one rank together, since they choose their
    codebook together (`auto_format.choose_codebooks`); the groups are balanced by work."""
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for n in names:
        for link in (moments.input_owner(n), f"codebook {shared[n]}" if n in shared else None):
            if link is not None and root(link) != root(n):
                parent[root(link)] = root(n)
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(root(n), []).append(n)
    owner = ranks.owners({g: [tuple(shapes[n]) for n in members] for g, members in groups.items()})
    return {moments.input_owner(n): owner[root(n)] for n in names}


def _quantize_targets(
    targets: Targets, quantizer: LinearQuantizer, calibration: LayerCalibration | None, store: ResumeStore | None,
    writer: ShardedWriter | None, progress: bool, ranks: Ranks,
) -> list[dict[str, Any]]:
    """Every decoder layer, then the head: their tensors go to `writer`; returns the report's `layers`
    (on the leader; the other ranks only take part in the layers and return [])."""
    entries = []
    n_layers = len(targets.layers)
    shown = progress and ranks.leader
    bar = tqdm(total=n_layers + bool(targets.head), desc="quantize", unit="layer", disable=not shown, file=sys.stderr)
    with bar:
        for i, tensors, reports in _layer_results(targets, quantizer, calibration, store, ranks):
            if not ranks.leader:
                continue
            _add_all(writer, tensors, quantizer.source)
            entries.append(layer_entry(i, {quantizer.source.checkpoint_name(n): r for n, r in reports.items()}))
            mean_err = entries[-1]["mean_rel_error"]
            bar.update()
            bar.set_postfix(rel_err=f"{mean_err:.4f}")
            if shown:
                tqdm.write(f"layer {i + 1}/{n_layers}: mean relative weight error {mean_err:.5f}", file=sys.stderr)
        for name, tensor_name in targets.head.items() if ranks.leader else ():
            w = quantizer.weight(tensor_name)
            q = quantizer(name, w, None, quantizer.choose({name: w}, None)[name])
            _add_all(writer, q.tensors, quantizer.source)
            entries.append(layer_entry(name, {quantizer.source.checkpoint_name(name): q.report}))
            bar.update()
    return entries


def _add_all(writer: ShardedWriter, tensors: dict[str, torch.Tensor], source: ModelSource) -> None:
    """Add tensors named as in the model to the checkpoint, under their checkpoint names."""
    for k, v in tensors.items():
        writer.add(source.checkpoint_name(k), v)


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
    except (KeyboardInterrupt, SystemExit):  # SystemExit: torchrun stopped this rank (SIGTERM)
        if store.finished():
            print(f"interrupted: {store.finished()} finished layers kept; rerun with --resume to continue",
                  file=sys.stderr)
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if committed or store.finished() == 0:
            store.remove()


def quantize_model(model_path: str, out_dir: str | Path, opts: QuantizeOptions) -> dict[str, Any] | None:
    """Quantize `model_path` into a DAQ checkpoint at `out_dir`; return the quantization report.

    Under `torchrun` every process calls this; rank 0 writes the checkpoint and returns the report,
    the others return None (`distributed.py`).
    """
    check_options(opts)
    ranks = Ranks.start(opts.device)
    try:
        check_distributed(opts, ranks.world)
        return _quantize(model_path, Path(out_dir).expanduser(), opts, ranks)
    finally:
        ranks.stop()


def _quantize(model_path: str, out: Path, opts: QuantizeOptions, ranks: Ranks) -> dict[str, Any] | None:
    check_output(out, opts.overwrite)  # fail before the (slow) model load
    t0 = time.time()
    source = open_model(model_path, opts.revision)
    targets = plan_targets(source, opts)
    if opts.asymmetric and targets.expert_groups:
        raise DAQError(f"--asymmetric cannot calibrate the experts of {source.architecture} (routing differs between "
                       "the float and the quantized model's activations); drop --asymmetric for MoE models")
    quantizer = LinearQuantizer(source, opts, targets.expert_groups)
    share = ranks.share(opts.calib.nsamples) if opts.ldra is not None else slice(0, opts.calib.nsamples)
    plan = plan_memory(source, targets, replace(opts, calib=replace(opts.calib, nsamples=share.stop - share.start)),
                       world=ranks.world)
    if ranks.leader:
        print(plan.summary() + (f" per process, {ranks.world} processes" if ranks.world > 1 else ""), file=sys.stderr)
    check_memory(source, targets, opts, plan)
    calibration = LayerCalibration(source, targets.layers, opts, ranks) if opts.ldra is not None else None
    if not ranks.leader:
        _quantize_targets(targets, quantizer, calibration, None, None, False, ranks)
        return None
    store = ResumeStore(out, run_fingerprint(model_path, opts), opts.resume)
    tmp = prepare_output(out, opts.overwrite)
    with PeakMemory(opts.device) as peak, _writing(tmp, store):
        writer = ShardedWriter(tmp, opts.max_shard_bytes)
        for name in targets.untouched(source):
            writer.add(source.checkpoint_name(name), _checked(name, source.tensor(name)))
        layers = _quantize_targets(targets, quantizer, calibration, store, writer, opts.progress, ranks)
        writer.finish()
        fmt = checkpoint_format(layers, opts, targets.not_converted(source), str(source.path))
        memory = {"device": opts.device, "estimated_peak_bytes": plan.device_peak,
                  "measured_peak_bytes": peak.device_peak}
        report = build_report(fmt, len(targets.quantized), time.time() - t0, layers, memory)
        _write_config(tmp, source, fmt, report, targets.tied_head)
        commit_output(tmp, out)
    return report
