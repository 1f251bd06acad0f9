"""The checkpoint's model card (README.md): what the Hub shows first.

YAML front matter (base model, library, tags), then the format, how the checkpoint was made, the
per-layer weight error from the report, and how to serve or load it. The source model's own card is
not copied (model_source._NOT_COPIED); it is referenced as `base_model`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from daq_vllm.format import DAQFormat
from daq_vllm.model_files import hub_ref_of, looks_like_hub_id

CARD_FILE = "README.md"


def base_model_name(source_name: str) -> str:
    """The Hub ID of the source when it is known (a Hub ID itself, or a snapshot in the Hub cache),
    else the source directory's (or .gguf file's) name."""
    hub = hub_ref_of(source_name)
    if hub is not None:
        return hub[0]
    path = Path(source_name)
    if not path.exists() and looks_like_hub_id(source_name):
        return source_name
    return path.name or source_name


def _front_matter(fmt: DAQFormat, base_model: str, config: dict[str, Any]) -> list[str]:
    """YAML front matter; scalars and lists are written as JSON, which YAML reads as is."""
    tags = ["daq", "quantized", *fmt.codebook_names(), f"{fmt.bits}-bit"]
    lines = ["---", f"base_model: {json.dumps(base_model)}", "library_name: transformers",
             f"tags: {json.dumps(tags)}"]
    if any(str(a).endswith("ForCausalLM") for a in config.get("architectures") or []):
        lines.append("pipeline_tag: text-generation")
    return [*lines, "---", ""]


def _codebook_line(fmt: DAQFormat, report: dict[str, Any]) -> str:
    if not fmt.module_formats:
        return f"- codebook: `{fmt.format}` ({fmt.bits}-bit codes, {len(fmt.codebook)} values)"
    counts = ", ".join(f"`{name}` {n}" for name, n in (report.get("formats") or {}).items())
    return (f"- codebooks, chosen per linear by calibration loss (`--format auto`): {counts} linears "
            f"({fmt.bits}-bit codes, {len(fmt.codebook)} values)")


def _format_section(fmt: DAQFormat, report: dict[str, Any]) -> list[str]:
    return [
        "## Format", "",
        _codebook_line(fmt, report),
        f"- group size: {fmt.group_size} weights per scale and offset (fp16)",
        f"- bits per weight: {fmt.bits_per_weight:.2f}",
        f"- format version: {fmt.format_version} (`quant_method: {fmt.quant_method}`)",
        "",
    ]


def _rounding(prov: dict[str, Any]) -> str:
    comp = prov.get("compensation")
    if not comp:
        return "nearest code"
    settings = ", ".join(f"{k} {v}" for k, v in comp.items())
    return f"error-compensated (GPTQ-style; {settings})"


def _method_section(prov: dict[str, Any]) -> list[str]:
    init = prov.get("init") or {}
    calib = prov.get("calibration")
    if calib:
        calibration = (f"{calib.get('nsamples')} samples of {calib.get('seqlen')} tokens from "
                       f"`{calib.get('source')}` (seed {calib.get('seed')})")
    else:
        calibration = "none (calibration-free)"
    skip = prov.get("skip") or []
    return [
        "## How it was made", "",
        f"- method: `{prov.get('method', 'unknown')}` (range initializer `{init.get('method', 'unknown')}`"
        f"{', LDRA tuning' if prov.get('ldra') else ''})",
        f"- calibration: {calibration}",
        f"- rounding: {_rounding(prov)}",
        *([f"- skipped by request: {', '.join(f'`{s}`' for s in skip)}"] if skip else []),
        f"- tool: {prov.get('tool', 'daq-vllm')} {prov.get('tool_version', '')}".rstrip(),
        "",
    ]


def _error_section(report: dict[str, Any], fmt: DAQFormat) -> list[str]:
    """Mean, min and max of the decoder layers' mean relative weight error, and the worst layer."""
    decoder = [e for e in report.get("layers", []) if isinstance(e["layer"], int)]
    lines = ["## Quantization error", "",
             f"- quantized linears: {report.get('quantized_linears', 0)}",
             f"- modules not converted (kept in the source dtype): {len(fmt.modules_not_converted)}"]
    if decoder:
        errors = [e["mean_rel_error"] for e in decoder]
        worst = max(decoder, key=lambda e: e["mean_rel_error"])
        lines += [
            f"- relative weight error ||W_hat - W|| / ||W||, mean per decoder layer over {len(decoder)} layers: "
            f"mean {sum(errors) / len(errors):.5f}, min {min(errors):.5f}, max {max(errors):.5f}",
            f"- worst layer: {worst['layer']} ({worst['mean_rel_error']:.5f})",
        ]
    lines += ["", "Per-linear errors are in `quantization_report.json`.", ""]
    return lines


def _usage_section() -> list[str]:
    return [
        "## Usage", "",
        "```bash", "pip install daq-vllm", "```", "",
        "Serve with vLLM (the daq-vllm plugin registers itself; no flag is needed):", "",
        "```bash", "daq-vllm serve DIR", "# or", "python -m vllm.entrypoints.openai.api_server --model DIR", "```",
        "",
        "Load with transformers:", "",
        "```python", "import daq_vllm  # registers the DAQ quantizer with transformers",
        "from transformers import AutoModelForCausalLM", "",
        'model = AutoModelForCausalLM.from_pretrained("DIR")', "```", "",
        "`DIR` is this checkpoint's directory or Hub ID. The checkpoint format is specified in "
        "`docs/FORMAT.md` of daq-vllm.", "",
    ]


def model_card(report: dict[str, Any], fmt: DAQFormat, source_name: str, config: dict[str, Any]) -> str:
    """README.md text for a checkpoint quantized from `source_name` (a path or Hub ID) with `config`."""
    base = base_model_name(source_name)
    lines = [
        *_front_matter(fmt, base, config),
        f"# {base} ({'+'.join(fmt.codebook_names())}, {fmt.bits}-bit DAQ)", "",
        f"Weight-only DAQ quantization of `{base}`: the decoder linears are stored as {fmt.bits}-bit codes "
        f"with a scale and offset per group of {fmt.group_size} weights; the other tensors are kept as in the source.",
        "",
        *_format_section(fmt, report),
        *_method_section(fmt.provenance),
        *_error_section(report, fmt),
        *_usage_section(),
    ]
    return "\n".join(lines)
