"""What a run records: per-linear errors, `quantization_report.json`, and the provenance in config.json.

The report's layout is read by people and tests alike: `layers[i]["linears"][name]` holds
`rel_error` and `format` (its codebook), for calibrated runs `ldra_loss` and `full_loss` as
[before, after] pairs, and with `--format auto` `screen` (its screening loss per candidate); each
layer entry has its `mean_rel_error`, the report its `formats` (linears per codebook). The resume
store keeps the same per-linear dicts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from daq_vllm import __version__
from daq_vllm.format import DAQFormat
from daq_vllm.model_files import hub_ref_of

from .options import AUTO, QuantizeOptions, candidate_codebooks

REPORT_FILE = "quantization_report.json"


@dataclass
class LinearReport:
    """How well one linear was quantized.

    `rel_error` is ||W_hat - W|| / ||W||; `ldra_loss` LDRA's summed group loss before and after
    tuning; `full_loss` the full-H output loss before and after error-compensated rounding;
    `format` the codebook it is stored with; `screen` `--format auto`'s loss per candidate;
    `tokens`, for an expert projection of a calibrated run, the calibration tokens its statistics
    hold (below the run's threshold it was quantized by the initializer alone: `calibrated` false).
    """

    rel_error: float
    ldra_loss: tuple[float, float] | None = None
    full_loss: tuple[float, float] | None = None
    format: str | None = None
    screen: dict[str, float] | None = None
    tokens: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The report's JSON entry: the losses a run computed, then `rel_error`."""
        entry: dict[str, Any] = {}
        if self.ldra_loss is not None:
            entry["ldra_loss"] = list(self.ldra_loss)
        if self.full_loss is not None:
            entry["full_loss"] = list(self.full_loss)
        entry["rel_error"] = self.rel_error
        if self.format is not None:
            entry["format"] = self.format
        if self.screen:
            entry["screen"] = dict(self.screen)
        if self.tokens is not None:
            entry["tokens"] = self.tokens
            entry["calibrated"] = self.ldra_loss is not None
        return entry

    @classmethod
    def from_dict(cls, entry: dict[str, Any]) -> LinearReport:
        """Inverse of `to_dict` (a resumed layer's saved entries)."""
        return cls(entry["rel_error"], _pair(entry.get("ldra_loss")), _pair(entry.get("full_loss")),
                   entry.get("format"), entry.get("screen"), entry.get("tokens"))


def _pair(values: list[float] | None) -> tuple[float, float] | None:
    return None if values is None else (values[0], values[1])


def layer_entry(layer: int | str, linears: dict[str, LinearReport]) -> dict[str, Any]:
    """One entry of the report's `layers`: a decoder layer's index (or the head's name) and its linears."""
    mean = sum(r.rel_error for r in linears.values()) / max(len(linears), 1)
    return {"layer": layer, "mean_rel_error": mean, "linears": {n: r.to_dict() for n, r in linears.items()}}


def provenance(opts: QuantizeOptions, source_path: str) -> dict[str, Any]:
    """How the checkpoint was made: tool, method and every spec, so a run can be repeated.

    A model read from the Hub cache (`source_path` a snapshot folder) also records its `hub_id` and
    `revision` (the snapshot's commit hash).
    """
    calibrated = opts.ldra is not None
    hub = hub_ref_of(source_path)
    return {
        "tool": "daq-vllm",
        "tool_version": __version__,
        "method": opts.method_name(),
        **({"formats": [cb.name for cb in candidate_codebooks(opts)], "auto": asdict(opts.auto)}
           if opts.format == AUTO else {}),
        "init": asdict(opts.init),
        "ldra": asdict(opts.ldra) if calibrated else None,
        "compensation": asdict(opts.compensation) if opts.compensation is not None else None,
        "calibration": {**asdict(opts.calib), "sequential": opts.sequential, "asymmetric": opts.asymmetric}
        if calibrated else None,
        "source": source_path,
        **({"hub_id": hub[0], "revision": hub[1]} if hub else {}),
        "skip": list(opts.skip),
    }


def checkpoint_format(
    layers: list[dict[str, Any]], opts: QuantizeOptions, not_converted: list[str], source_path: str
) -> DAQFormat:
    """The checkpoint's `quantization_config`, from each quantized linear's codebook in the report's
    `layers` (version 2 only when they differ)."""
    candidates = candidate_codebooks(opts)
    by_name = {cb.name: cb for cb in candidates}
    formats = {name: by_name[entry["format"]] for e in layers for name, entry in e["linears"].items()}
    if not formats:  # every linear skipped: the config still names a codebook
        formats = {"": candidates[0]}
    return DAQFormat.mixed(
        {name: (cb.name, list(cb.values)) for name, cb in formats.items()},
        bits=candidates[0].bits,
        group_size=opts.group_size,
        modules_not_converted=not_converted,
        provenance=provenance(opts, source_path),
    )


def format_counts(layers: list[dict[str, Any]]) -> dict[str, int]:
    """Quantized linears per codebook, most used first (the summary of a `--format auto` run)."""
    counts: dict[str, int] = {}
    for e in layers:
        for entry in e["linears"].values():
            counts[entry["format"]] = counts.get(entry["format"], 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def build_report(
    fmt: DAQFormat, quantized_linears: int, seconds: float, layers: list[dict], memory: dict[str, Any]
) -> dict[str, Any]:
    """The content of `quantization_report.json`; `memory` holds the estimated and measured peak."""
    return {
        "format": fmt.to_dict(),
        "bits_per_weight": fmt.bits_per_weight,
        "quantized_linears": quantized_linears,
        "formats": format_counts(layers),
        "seconds": round(seconds, 2),
        "memory": memory,
        "layers": layers,
    }
