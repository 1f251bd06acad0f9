"""Plan a run: which linears are quantized, layer by layer, and where the lm_head's weight comes from.

The decoder layers come from `ModelSource.decoder_layers` (a ModuleList of one entry per hidden
layer); every `nn.Linear` inside them is a target unless a `--skip` glob matches it or it routes
tokens to experts (a MoE block's own linears: `gate`, `shared_expert_gate`; they stay in full
precision, as in every peer tool and in vLLM's models). Experts are targets like any linear, one
per expert projection (`daq_vllm.experts`). The lm_head is a target only on request; a head tied
to the input embedding is quantized from the embedding and written untied.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn

from daq_vllm.errors import DAQError
from daq_vllm.experts import ExpertLinears

from .model_source import DecoderLayer, ModelSource
from .options import QuantizeOptions


@dataclass
class Targets:
    """The linears a run quantizes: per decoder layer, then the head, with the tensor each is read from."""

    layers: list[DecoderLayer]
    linears: list[list[str]]  # per decoder layer, the full names of its quantized linears
    head: dict[str, str]  # lm_head linear name -> checkpoint tensor holding its weight
    tied_head: bool  # the head's weight is the input embedding's (the output config unties it)
    # expert projection -> "<experts module>.gate_up" or ".down": the linears that share one codebook,
    # since vLLM computes all experts of a layer in one fused operator with one codebook for every
    # gate/up projection and one for every down projection
    expert_groups: dict[str, str]

    @property
    def quantized(self) -> set[str]:
        """Full names of every quantized linear, head included."""
        return {n for names in self.linears for n in names} | set(self.head)

    def untouched(self, source: ModelSource) -> list[str]:
        """Source tensors written as they are: all but the quantized linears' weights (model names)."""
        weights = {f"{n}.weight" for n in self.quantized}
        return [t for t in source.tensor_names() if t not in weights]

    def not_converted(self, source: ModelSource) -> list[str]:
        """Linears left in full precision, by checkpoint name, sorted (the checkpoint's `modules_not_converted`)."""
        quantized = self.quantized
        return sorted(source.checkpoint_name(n) for n in source.linear_names() if n not in quantized)


def skipped(name: str, patterns: list[str]) -> bool:
    """Whether a `--skip` glob matches the linear `name`, in full or as a part of it."""
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, f"*{p}*") for p in patterns)


def routers(source: ModelSource) -> set[str]:
    """The nn.Linear children of MoE blocks (modules that hold experts): they route, not compute."""
    found = set()
    for name, module in source.skeleton.named_modules():
        if any(isinstance(child, ExpertLinears) for child in module.children()):
            found |= {f"{name}.{c}" for c, child in module.named_children() if isinstance(child, nn.Linear)}
    return found


def expert_groups(source: ModelSource) -> dict[str, str]:
    """Each expert projection's codebook group: `<experts>.gate_up` or `<experts>.down`."""
    groups = {}
    for name, module in source.skeleton.named_modules():
        if isinstance(module, ExpertLinears):
            for e, expert in enumerate(module):
                names = expert.names
                groups.update({f"{name}.{e}.{names.gate}": f"{name}.gate_up",
                               f"{name}.{e}.{names.up}": f"{name}.gate_up", f"{name}.{e}.{names.down}": f"{name}.down"})
    return groups


def plan_targets(source: ModelSource, opts: QuantizeOptions) -> Targets:
    """The run's targets, or a DAQError when --quantize-lm-head finds no head."""
    layers = source.decoder_layers()
    routing = routers(source)
    dropped = {n for layer in layers for n in layer.linears
               if n in routing or skipped(n, opts.skip) or skipped(source.checkpoint_name(n), opts.skip)}
    groups = expert_groups(source)
    _check_whole_groups(source, groups, dropped)
    linears = [[n for n in layer.linears if n not in dropped] for layer in layers]
    heads = [n for n in source.linear_names() if n.rsplit(".", 1)[-1] == "lm_head"] if opts.quantize_lm_head else []
    if opts.quantize_lm_head and not heads:
        raise DAQError("--quantize-lm-head: this model has no lm_head linear")
    tied = bool(heads) and "lm_head.weight" not in source.tensor_names()
    head = {n: source.input_embedding_name() if tied else f"{n}.weight" for n in heads}
    return Targets(layers, linears, head, tied, groups)


def _check_whole_groups(source: ModelSource, groups: dict[str, str], dropped: set[str]) -> None:
    """--skip must take all experts of a layer or none: vLLM loads them as one fused layer."""
    members: dict[str, list[str]] = {}
    for name, group in groups.items():
        members.setdefault(group.rpartition(".")[0], []).append(name)
    for experts, names in members.items():
        left = [n for n in names if n in dropped]
        if left and len(left) != len(names):
            raise DAQError(f"--skip matches {source.checkpoint_name(left[0])} but not every projection of "
                           f"{source.checkpoint_name(experts)}, which vLLM loads as one fused layer; skip all of its "
                           "experts or none")
