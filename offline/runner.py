"""Activation capture: run calibration data through the decoder layers one layer at a time (GPTQ-style).

Only the current layer is materialised on the compute device; the activations of all calibration
blocks between two layers are kept there. The inputs of layer 0 are captured by running the model
with a stand-in (`_Catcher`) in its place, so whatever the architecture computes before its layers
(embeddings, rotary tables, masks) comes from the model itself.
"""

from __future__ import annotations

from typing import Any, Callable, NoReturn

import torch
from torch import nn

from .model_source import DecoderLayer, ModelSource


def set_parameter(root: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace the parameter `name` (dotted, under `root`) by `tensor`, frozen."""
    module_name, _, leaf = name.rpartition(".")
    module = root.get_submodule(module_name) if module_name else root
    module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)


def materialize(source: ModelSource, prefix: str, module: nn.Module, device: str) -> None:
    """Load `module`'s parameters (checkpoint names under `prefix`) onto `device` in float32."""
    for name, _ in list(module.named_parameters()):
        set_parameter(module, name, source.tensor(f"{prefix}.{name}").to(device, torch.float32))
    for name, buf in list(module.named_buffers()):
        owner, _, leaf = name.rpartition(".")
        (module.get_submodule(owner) if owner else module)._buffers[leaf] = buf.to(device)


def release(module: nn.Module) -> None:
    """Drop a layer's weights (parameters back to the meta device; buffers stay)."""
    for name, p in list(module.named_parameters()):
        set_parameter(module, name, torch.empty_like(p, device="meta"))


class _Stop(Exception):
    """Ends a forward pass once the inputs it was run for are recorded."""


class _Catcher(nn.Module):
    """Stands in for decoder layer 0 to record its inputs, then stops the forward pass."""

    def __init__(self, layer: nn.Module, keep_on: str):
        super().__init__()
        self.layer, self.keep_on = layer, keep_on
        self.hidden: list[torch.Tensor] = []
        self.args: tuple = ()
        self.kwargs: dict[str, Any] | None = None

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> NoReturn:
        self.hidden.append(hidden_states.detach().to(self.keep_on))
        if self.kwargs is None:
            self.args, self.kwargs = args, kwargs
        raise _Stop

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:  # attributes the model reads off its layers (e.g. attention_type)
            return getattr(self._modules["layer"], name)


class LayerRunner:
    """Feeds calibration blocks through the model's decoder layers, one layer at a time."""

    def __init__(self, source: ModelSource, layers: list[DecoderLayer], device: str, keep_on: str | None = None):
        """`keep_on`: where the activations between layers live (default: `device`)."""
        self.source, self.layers, self.device = source, layers, device
        self.keep_on = keep_on or device
        self.args: tuple = ()
        self.kwargs: dict[str, Any] = {}

    def first_inputs(self, blocks: torch.Tensor) -> torch.Tensor:
        """Hidden states entering decoder layer 0 for each block: [S, T, D] float32."""
        list_name = self.layers[0].name.rsplit(".", 1)[0]
        layer_list = self.source.skeleton.get_submodule(list_name)
        self._load_outside(list_name)
        catcher = _Catcher(layer_list[0], self.keep_on)
        layer_list[0] = catcher
        try:
            with torch.no_grad():
                for block in blocks:
                    try:
                        self.source.skeleton(input_ids=block[None].to(self.device), use_cache=False)
                    except _Stop:
                        pass
        finally:
            layer_list[0] = catcher.layer
        self.args, self.kwargs = catcher.args, catcher.kwargs or {}
        return torch.cat(catcher.hidden, dim=0).float()

    def _load_outside(self, list_name: str) -> None:
        """Materialise what runs before the decoder layers: every parameter and float buffer outside
        the layer list, except the output head's."""
        skeleton = self.source.skeleton
        head = skeleton.get_output_embeddings()
        head_name = next((n for n, m in skeleton.named_modules() if m is head), None)
        outside = [
            n for n, _ in skeleton.named_parameters()
            if not n.startswith(list_name + ".") and not (head_name and n.startswith(head_name + "."))
        ]
        for name in outside:
            set_parameter(skeleton, name, self.source.tensor(name).to(self.device, torch.float32))
        for name, buf in list(skeleton.named_buffers()):
            if buf.is_floating_point() and not name.startswith(list_name + "."):
                owner, _, leaf = name.rpartition(".")
                skeleton.get_submodule(owner)._buffers[leaf] = buf.to(self.device, torch.float32)

    @torch.no_grad()
    def forward(
        self, layer: nn.Module, hidden: torch.Tensor, before_each: Callable[[], None] | None = None
    ) -> torch.Tensor:
        """Run every block through `layer` (batch 1, as captured); returns the outputs, on `hidden`'s
        device (the host with --offload-activations)."""
        out = torch.empty_like(hidden)
        for i in range(hidden.shape[0]):
            if before_each is not None:
                before_each()
            out[i] = self.block(layer, hidden[i])
        return out

    @torch.no_grad()
    def block(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """One block [T, D] through `layer`: its output [T, D] on the compute device."""
        y = layer(hidden[None].to(self.device), *self.args, **self.kwargs)
        return (y[0] if isinstance(y, tuple) else y)[0]

    @torch.no_grad()
    def block_until(self, layer: nn.Module, hidden: torch.Tensor, stop_at: nn.Module) -> None:
        """One block [T, D] through `layer` up to `stop_at`: its forward pre-hooks registered so far
        run, `stop_at` and what follows it do not."""

        def stop(module: nn.Module, args: tuple) -> NoReturn:
            raise _Stop

        handle = stop_at.register_forward_pre_hook(stop)
        try:
            self.block(layer, hidden)
        except _Stop:
            pass
        finally:
            handle.remove()
