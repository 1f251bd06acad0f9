"""Mixture-of-experts layers as one nn.Linear per expert projection, and checkpoint names.

transformers 5 keeps a MoE layer's experts fused in two 3-D parameters (`gate_up_proj` [E, 2I, H],
`down_proj` [E, H, I]) and renames some modules at load (Mixtral's `block_sparse_moe` is its
`mlp`), while checkpoints store every expert projection on its own, under the original names
(`block_sparse_moe.experts.<e>.w1.weight`), which is also what vLLM loads. The quantizer hooks
nn.Linear inputs and writes one DAQ linear per expert projection, and DAQ checkpoints load by
name; so both swap each fused experts module for `ExpertLinears` (`defuse_experts`), whose forward
is transformers' own loop over the same routing, and translate names with `CheckpointNames`.

Which projection is which comes from transformers' conversion mapping of the model (the patterns
it merges into `gate_up_proj` and `down_proj`), so a new architecture needs no table here; one
whose experts that mapping does not describe is refused, naming the module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import DAQError

FUSED_PARAMETERS = ("gate_up_proj", "down_proj")
CALIBRATE_ROUTED, CALIBRATE_ALL = "routed", "all"


@dataclass(frozen=True)
class ExpertProjections:
    """The checkpoint's names of an expert's three projections (Mixtral: w1, w3, w2)."""

    gate: str
    up: str
    down: str


class ExpertMLP(nn.Module):
    """One expert: `down(act(gate(x)) * up(x))`, each projection an nn.Linear under its checkpoint name."""

    def __init__(self, names: ExpertProjections, gate: nn.Linear, up: nn.Linear, down: nn.Linear, act_fn: nn.Module):
        super().__init__()
        self.names = names
        setattr(self, names.gate, gate)
        setattr(self, names.up, up)
        setattr(self, names.down, down)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in (self.names.gate, self.names.up, self.names.down))
        return down(self.act_fn(gate(x)) * up(x))


class ExpertLinears(nn.ModuleList):
    """A fused experts module's experts, one `ExpertMLP` each; called as transformers calls the fused one.

    `calibrate` is `routed` (each expert sees the tokens routed to it, as in inference) or `all`
    (every expert sees every token, so that rarely routed experts get statistics too; only the
    routed outputs are added, so the layer's output is unchanged).
    """

    def __init__(self, experts: list[ExpertMLP]):
        super().__init__(experts)
        self.num_experts = len(experts)
        self.calibrate = CALIBRATE_ROUTED
        # Set by the transformers loader when an MoE kernel computes these experts at once; called as
        # forward is. A plain attribute, not a submodule: iterating a ModuleList yields its experts only.
        self.fused: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        if self.fused is not None:
            return self.fused(hidden_states, top_k_index, top_k_weights)
        out = torch.zeros_like(hidden_states)
        every = self.calibrate == CALIBRATE_ALL
        for e, expert in enumerate(self):
            # positions first, then tokens: the order transformers adds the experts' outputs in
            top_k_pos, token_idx = torch.where((top_k_index == e).T)
            if token_idx.numel() == 0 and not every:
                continue
            y = expert(hidden_states)[token_idx] if every else expert(hidden_states[token_idx])
            out.index_add_(0, token_idx, (y * top_k_weights[token_idx, top_k_pos, None]).to(out.dtype))
        return out


def fused_experts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules of `model` that hold experts as fused 3-D parameters (name, module)."""
    found = []
    for name, module in model.named_modules():
        params = dict(module.named_parameters(recurse=False))
        if all(p in params and params[p].dim() == 3 for p in FUSED_PARAMETERS):
            found.append((name, module))
    return found


def _architecture(model: nn.Module) -> str:
    archs = getattr(getattr(model, "config", None), "architectures", None)
    return archs[0] if archs else type(model).__name__


def expert_projections(model: nn.Module, module_name: str) -> ExpertProjections:
    """The per-expert projection names transformers' conversion mapping merges into the fused
    parameters (`experts.*.w1.weight` + `experts.*.w3.weight` -> `experts.gate_up_proj`), or a
    DAQError naming the module and the architecture."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter

    merged: dict[str, list[str]] = {}
    for conv in get_model_conversion_mapping(model, add_legacy=False):
        if not isinstance(conv, WeightConverter):
            continue
        for target in conv.target_patterns:
            leaf = target.rstrip("$").rsplit(".", 1)[-1]
            if leaf in FUSED_PARAMETERS and target.rstrip("$").endswith(f"experts.{leaf}"):
                merged[leaf] = [_projection(p) for p in conv.source_patterns]
    gate_up, down = merged.get("gate_up_proj", []), merged.get("down_proj", [])
    if len(gate_up) != 2 or len(down) != 1 or None in (*gate_up, *down):
        raise DAQError(f"unsupported MoE architecture {_architecture(model)}: its experts {module_name} are fused "
                       "parameters that transformers' conversion mapping does not split into per-expert linears, "
                       "so daq-vllm cannot quantize them (it quantizes MoE models whose checkpoints store each "
                       "expert's gate, up and down projection: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and kin)")
    return ExpertProjections(gate_up[0], gate_up[1], down[0])


def _projection(pattern: str) -> str | None:
    """`w1` of `.experts.*.w1.weight`; None for a pattern of another shape."""
    parts = pattern.strip(".^$").split(".")
    if len(parts) >= 4 and parts[-4] == "experts" and parts[-3] == "*" and parts[-1] == "weight":
        return parts[-2]
    return None


def _check_standard(model: nn.Module, name: str, module: nn.Module) -> tuple[int, int, int]:
    """E, I, H of a fused module laid out as `[E, 2I, H]` + `[E, H, I]` with no other parameter
    (transposed or biased variants, such as gpt-oss's, are refused)."""
    gate_up, down = module.gate_up_proj, module.down_proj
    e, two_i, h = gate_up.shape
    extra = sorted(set(dict(module.named_parameters(recurse=False))) - set(FUSED_PARAMETERS))
    if extra or two_i % 2 or tuple(down.shape) != (e, h, two_i // 2) or not hasattr(module, "act_fn"):
        raise DAQError(f"unsupported MoE architecture {_architecture(model)}: its experts {name} are not laid out as "
                       f"gate_up_proj [E, 2I, H] + down_proj [E, H, I] with an act_fn"
                       f"{' (it also holds ' + ', '.join(extra) + ')' if extra else ''}; daq-vllm cannot quantize them")
    return e, two_i // 2, h


def defuse_module(model: nn.Module, name: str, module: nn.Module) -> ExpertLinears:
    """`ExpertLinears` with the same weights (sliced per expert; meta stays meta)."""
    names = expert_projections(model, name)
    e, i, h = _check_standard(model, name, module)

    def linear(weight: torch.Tensor) -> nn.Linear:
        with torch.device("meta"):
            lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
        lin.weight = nn.Parameter(weight.detach().clone() if weight.device.type != "meta" else
                                  torch.empty_like(weight, device="meta"), requires_grad=False)
        return lin

    experts = []
    for x in range(e):
        gate_up, down = module.gate_up_proj[x], module.down_proj[x]
        experts.append(ExpertMLP(names, linear(gate_up[:i]), linear(gate_up[i:]), linear(down), module.act_fn))
    return ExpertLinears(experts)


def defuse_experts(model: nn.Module) -> list[str]:
    """Swap every fused experts module of `model` for `ExpertLinears`, in place; their names."""
    swapped = []
    for name, module in fused_experts(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, defuse_module(model, name, module))
        swapped.append(name)
    return swapped


def expert_modules(model: nn.Module) -> dict[str, ExpertLinears]:
    """The `ExpertLinears` of a defused model, by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ExpertLinears)}


class CheckpointNames:
    """Model names <-> checkpoint names, by transformers' renaming rules for the model.

    transformers renames some checkpoint keys when it loads (Mixtral: `.block_sparse_moe.` ->
    `.mlp.`) and reverts that when it saves; a DAQ checkpoint keeps the source checkpoint's
    names, which vLLM's loaders expect. Most models have no rule: both directions are the identity.
    """

    def __init__(self, model: nn.Module | None):
        self._to_model: list[Any] = []
        self._to_checkpoint: list[Any] = []
        if model is None:
            return
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        renamings = [c for c in get_model_conversion_mapping(model, add_legacy=False) if isinstance(c, WeightRenaming)]
        self._to_model = renamings
        self._to_checkpoint = [r.reverse_transform() for r in renamings[::-1]]

    @staticmethod
    def _apply(rules: list[Any], name: str) -> str:
        for rule in rules:
            name, _ = rule.rename_source_key(name)
        return name

    def to_model(self, checkpoint_name: str) -> str:
        return self._apply(self._to_model, checkpoint_name)

    def to_checkpoint(self, model_name: str) -> str:
        return self._apply(self._to_checkpoint, model_name)
