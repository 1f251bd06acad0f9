"""Plan a run: which linears are quantized, layer by layer, and where the lm_head's weight comes from.

The decoder layers come from `ModelSource.decoder_layers` (a ModuleList of one entry per hidden
layer); every `nn.Linear` inside them is a target unless a `--skip` glob matches it. The lm_head
is a target only on request; a head tied to the input embedding is quantized from the embedding
and written untied. Architecture rules (MoE experts, other layer layouts) belong here.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from daq_vllm.errors import DAQError

from .model_source import DecoderLayer, ModelSource
from .options import QuantizeOptions


@dataclass
class Targets:
    """The linears a run quantizes: per decoder layer, then the head, with the tensor each is read from."""

    layers: list[DecoderLayer]
    linears: list[list[str]]  # per decoder layer, the full names of its quantized linears
    head: dict[str, str]  # lm_head linear name -> checkpoint tensor holding its weight
    tied_head: bool  # the head's weight is the input embedding's (the output config unties it)

    @property
    def quantized(self) -> set[str]:
        """Full names of every quantized linear, head included."""
        return {n for names in self.linears for n in names} | set(self.head)

    def untouched(self, source: ModelSource) -> list[str]:
        """Source tensors written as they are: all but the quantized linears' weights."""
        weights = {f"{n}.weight" for n in self.quantized}
        return [t for t in source.tensor_names() if t not in weights]

    def not_converted(self, source: ModelSource) -> list[str]:
        """Linears left in full precision, sorted (the checkpoint's `modules_not_converted`)."""
        quantized = self.quantized
        return sorted(n for n in source.linear_names() if n not in quantized)


def skipped(name: str, patterns: list[str]) -> bool:
    """Whether a `--skip` glob matches the linear `name`, in full or as a part of it."""
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, f"*{p}*") for p in patterns)


def plan_targets(source: ModelSource, opts: QuantizeOptions) -> Targets:
    """The run's targets, or a DAQError when --quantize-lm-head finds no head."""
    layers = source.decoder_layers()
    linears = [[n for n in layer.linears if not skipped(n, opts.skip)] for layer in layers]
    heads = [n for n in source.linear_names() if n.rsplit(".", 1)[-1] == "lm_head"] if opts.quantize_lm_head else []
    if opts.quantize_lm_head and not heads:
        raise DAQError("--quantize-lm-head: this model has no lm_head linear")
    tied = bool(heads) and "lm_head.weight" not in source.tensor_names()
    head = {n: source.input_embedding_name() if tied else f"{n}.weight" for n in heads}
    return Targets(layers, linears, head, tied)
