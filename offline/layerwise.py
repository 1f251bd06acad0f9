"""Run calibration data through the decoder layers one layer at a time (GPTQ-style).

Only the current layer is materialised on the compute device; the activations of all calibration
blocks between two layers are kept there. Forward pre-hooks on the layer's linears accumulate the
block-diagonal second moment of their inputs per group, `sum_t x_t,j x_t,j^T`, batch by batch
(or the full `X^T X` when error-compensated rounding needs it).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .model_source import DecoderLayer, ModelSource


def set_parameter(root: nn.Module, name: str, tensor: torch.Tensor) -> None:
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
    pass


class _Catcher(nn.Module):
    """Stands in for decoder layer 0 to record its inputs, then stops the forward pass."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.hidden: list[torch.Tensor] = []
        self.args: tuple = ()
        self.kwargs: dict[str, Any] | None = None

    def forward(self, hidden_states, *args, **kwargs):
        self.hidden.append(hidden_states.detach())
        if self.kwargs is None:
            self.args, self.kwargs = args, kwargs
        raise _Stop

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # attributes the model reads off its layers (e.g. attention_type)
            return getattr(self._modules["layer"], name)


def _layer_list(skeleton: nn.Module, first_layer: DecoderLayer) -> tuple[nn.ModuleList, str]:
    list_name = first_layer.name.rsplit(".", 1)[0]
    return skeleton.get_submodule(list_name), list_name


class LayerRunner:
    """Feeds calibration blocks through the model's decoder layers, one layer at a time."""

    def __init__(self, source: ModelSource, layers: list[DecoderLayer], device: str):
        self.source, self.layers, self.device = source, layers, device
        self.args: tuple = ()
        self.kwargs: dict[str, Any] = {}

    def first_inputs(self, blocks: torch.Tensor) -> torch.Tensor:
        """Hidden states entering decoder layer 0 for each block: [S, T, D] float32."""
        skeleton = self.source.skeleton
        layer_list, list_name = _layer_list(skeleton, self.layers[0])
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
        catcher = _Catcher(layer_list[0])
        layer_list[0] = catcher
        try:
            with torch.no_grad():
                for block in blocks:
                    try:
                        skeleton(input_ids=block[None].to(self.device), use_cache=False)
                    except _Stop:
                        pass
        finally:
            layer_list[0] = catcher.layer
        self.args, self.kwargs = catcher.args, catcher.kwargs or {}
        return torch.cat(catcher.hidden, dim=0).float()

    @torch.no_grad()
    def forward(self, layer: nn.Module, hidden: torch.Tensor, before_each: Callable[[], None] | None = None) -> torch.Tensor:
        """Run every block through `layer` (batch 1, as captured); returns the outputs."""
        out = torch.empty_like(hidden)
        for i in range(hidden.shape[0]):
            if before_each is not None:
                before_each()
            y = layer(hidden[i : i + 1], *self.args, **self.kwargs)
            out[i] = (y[0] if isinstance(y, tuple) else y)[0]
        return out


class SecondMoments:
    """Accumulates per-group `X_j^T X_j` and the token count for each linear of one layer.

    Linears that read the same input tensor in a pass (q/k/v, gate/up) share one accumulator.
    With `full`, the whole `X^T X` [K, K] is accumulated instead and the per-group blocks are its
    diagonal blocks (K^2 floats per distinct input: what GPTQ holds too).
    """

    def __init__(self, group_size: int, full: bool = False):
        self.group_size = group_size
        self.full = full
        self.sums: dict[str, list[torch.Tensor]] = {}
        self.tokens: dict[str, int] = {}
        self.alias: dict[str, str] = {}
        self._pass_inputs: dict[int, tuple[str, torch.Tensor]] = {}
        self._handles: list = []

    def attach(self, layer: nn.Module, prefix: str, linear_names: list[str]) -> None:
        for full in linear_names:
            module = layer.get_submodule(full[len(prefix) + 1 :])
            self._handles.append(module.register_forward_pre_hook(self._hook(full)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def new_pass(self) -> None:
        self._pass_inputs.clear()

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            key = x.data_ptr()
            if key in self._pass_inputs:  # the tensor is kept alive for the pass: no address reuse
                self.alias.setdefault(name, self._pass_inputs[key][0])
                return
            self._pass_inputs[key] = (name, x)
            self._accumulate(name, x.reshape(-1, x.shape[-1]).float())

        return hook

    def _accumulate(self, name: str, x: torch.Tensor) -> None:
        t = x.shape[0]
        parts = [x.T @ x] if self.full else self._group_products(x)
        if name not in self.sums:
            self.sums[name], self.tokens[name] = parts, 0
        else:
            for acc, p in zip(self.sums[name], parts):
                acc += p
        self.tokens[name] += t

    def _group_products(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per block of groups: `X_j^T X_j` for the full groups [G, g, g], then the partial one [1, L, L]."""
        t, k = x.shape
        g = self.group_size
        full = k // g
        parts = []
        if full:
            xf = x[:, : full * g].reshape(t, full, g).transpose(0, 1)  # [G, T, g]
            parts.append(torch.bmm(xf.transpose(1, 2), xf))
        if k % g:
            xt = x[:, full * g :]
            parts.append((xt.T @ xt)[None])
        return parts

    def moments(self, name: str) -> list[torch.Tensor]:
        """Per block of groups (full groups, then the partial one): H = X^T X / T, [G, L, L]."""
        if self.full:
            return diagonal_blocks(self.full_moment(name), self.group_size)
        owner = self.alias.get(name, name)
        return [s / self.tokens[owner] for s in self.sums[owner]]

    def full_moment(self, name: str) -> torch.Tensor:
        """H = X^T X / T [K, K]; only with `full`."""
        owner = self.alias.get(name, name)
        return self.sums[owner][0] / self.tokens[owner]


def diagonal_blocks(h: torch.Tensor, group_size: int) -> list[torch.Tensor]:
    """The g x g diagonal blocks of H [K, K] as `SecondMoments.moments` lays them out."""
    k = h.shape[0]
    full = k // group_size
    blocks = []
    if full:
        hf = h[: full * group_size, : full * group_size].reshape(full, group_size, full, group_size)
        blocks.append(hf.diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous())
    if k % group_size:
        blocks.append(h[full * group_size :, full * group_size :][None].contiguous())
    return blocks
