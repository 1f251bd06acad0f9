"""Input statistics of a layer's linears: the second moments LDRA and GPTQ-style rounding weigh errors by.

Forward pre-hooks on the linears accumulate, batch by batch, the block-diagonal second moment of
their inputs per group, `sum_t x_t,j x_t,j^T` (or the full `X^T X` when error-compensated rounding
needs it). The blocks follow `grid.split_groups`: the full groups, then the partial last group.

With `paired` (asymmetric calibration, `asymmetric.py`), each block first runs through the layer
on the float model's activations while the hooks only record the linears' inputs (`recording`),
then on the quantized model's activations, and each input also accumulates the cross moment
`X^T X~` of the float inputs X with the quantized-stream inputs X~, token by token.

Memory: once read, the sums become moments in place (divided by the token count); a full moment's
diagonal blocks are copied out once, and `done` drops an input's statistics after its last reader,
so a layer holds the K x K moments of the inputs still to be quantized only (two with `paired`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .grid import split_groups


class SecondMoments:
    """Accumulates per-group `X_j^T X_j` and the token count for each linear of one layer.

    Linears that read the same input tensor in a pass (q/k/v, gate/up) share one accumulator.
    With `full`, the whole `X^T X` [K, K] is accumulated instead and the per-group blocks are its
    diagonal blocks (K^2 floats per distinct input: what GPTQ holds too).
    """

    def __init__(self, group_size: int, full: bool = False, paired: bool = False):
        self.group_size = group_size
        self.full = full or paired
        self.paired = paired
        self.recording = False  # paired: this pass records the float model's inputs (`reference`)
        self.reference: dict[str, torch.Tensor] = {}  # per linear, its float input in this block
        self.cross: dict[str, torch.Tensor] = {}  # per input, sum_t x_t x~_t^T (then / T)
        self.sums: dict[str, list[torch.Tensor]] = {}
        self.tokens: dict[str, int] = {}
        self.alias: dict[str, str] = {}
        self._pass_inputs: dict[int, tuple[str, torch.Tensor]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._blocks: dict[str, list[torch.Tensor]] | None = None  # per input, once finalized
        self._derived: dict[str, Any] = {}
        self._pending: dict[str, set[str]] = {}  # per input, its readers not yet `done`

    def attach(self, layer: nn.Module, prefix: str, linear_names: list[str]) -> None:
        """Hook the linears `linear_names` (full names, under `prefix`) of `layer`."""
        for full in linear_names:
            module = layer.get_submodule(full[len(prefix) + 1 :])
            self._handles.append(module.register_forward_pre_hook(self._hook(full)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def new_pass(self) -> None:
        """Start a forward pass: inputs are matched to earlier linears of the same pass only."""
        self._pass_inputs.clear()

    def _hook(self, name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            key = x.data_ptr()
            if key in self._pass_inputs:  # the tensor is kept alive for the pass: no address reuse
                self.alias.setdefault(name, self._pass_inputs[key][0])
                return
            self._pass_inputs[key] = (name, x)
            if self.recording:
                self.reference[name] = x.reshape(-1, x.shape[-1])
                return
            self._accumulate(name, x.reshape(-1, x.shape[-1]).float())
            if self.paired:
                self._accumulate_cross(name, x.reshape(-1, x.shape[-1]).float())

        return hook

    def _accumulate(self, name: str, x: torch.Tensor) -> None:
        if self._blocks is not None:
            raise RuntimeError("SecondMoments: statistics were already read; accumulate before reading them")
        t = x.shape[0]
        parts = [x.T @ x] if self.full else self._group_products(x)
        if name not in self.sums:
            self.sums[name], self.tokens[name] = parts, 0
        else:
            for acc, p in zip(self.sums[name], parts):
                acc += p
        self.tokens[name] += t

    def _accumulate_cross(self, name: str, x: torch.Tensor) -> None:
        """Add X^T X~ of this block: the float model's input of `name` (recorded) with `x`."""
        ref = self.reference.get(name)
        if ref is None or ref.shape != x.shape:
            raise RuntimeError(f"asymmetric calibration: the float model's input of {name} was not recorded "
                               f"for this block, or holds other tokens (routing differs between the two streams)")
        product = ref.float().T @ x
        if name in self.cross:
            self.cross[name] += product
        else:
            self.cross[name] = product

    def _group_products(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per block of groups: `X_j^T X_j` for the full groups [G, g, g], then the partial one [1, L, L]."""
        t = x.shape[0]
        parts = []
        for span in split_groups(x.shape[1], self.group_size):
            xs = x[:, span.start : span.stop]
            if span.partial:
                parts.append((xs.T @ xs)[None])
            else:
                xg = xs.reshape(t, span.count, span.length).transpose(0, 1)  # [G, T, g]
                parts.append(torch.bmm(xg.transpose(1, 2), xg))
        return parts

    def running_state(self) -> tuple[dict[str, list[torch.Tensor]], dict[str, int], dict[str, str]]:
        """The running sums, token counts and shared inputs, for another process to continue from."""
        return self.sums, self.tokens, self.alias

    def continue_from(self, state: tuple[dict[str, list[torch.Tensor]], dict[str, int], dict[str, str]]) -> None:
        """Go on from another accumulator's `running_state`: its blocks are summed first, then ours."""
        self.sums, self.tokens, self.alias = state[0], dict(state[1]), dict(state[2])

    def input_owner(self, name: str) -> str:
        """The first linear of the pass that read the same input as `name` (itself if none did)."""
        return self.alias.get(name, name)

    def _finalize(self) -> dict[str, list[torch.Tensor]]:
        """Sums -> moments in place (once), and each input's per-group blocks."""
        if self._blocks is None:
            self._blocks = {}
            for owner, sums in self.sums.items():
                for s in sums:
                    s.div_(self.tokens[owner])
                self._blocks[owner] = diagonal_blocks(sums[0], self.group_size) if self.full else sums
                if owner in self.cross:
                    self.cross[owner].div_(self.tokens[owner])
            for name in [*self.sums, *self.alias]:
                self._pending.setdefault(self.input_owner(name), set()).add(name)
        return self._blocks

    def moments(self, name: str) -> list[torch.Tensor]:
        """Per block of groups (full groups, then the partial one): H = X^T X / T, [G, L, L]."""
        return self._finalize()[self.input_owner(name)]

    def full_moment(self, name: str) -> torch.Tensor:
        """H = X^T X / T [K, K]; only with `full`, and only until `derive` took it over."""
        self._finalize()
        return self.sums[self.input_owner(name)][0]

    def cross_moment(self, name: str) -> torch.Tensor:
        """C = X^T X~ / T [K, K] of the float inputs X with the quantized-stream inputs X~; only with
        `paired`."""
        self._finalize()
        return self.cross[self.input_owner(name)]

    def drop_cross(self) -> None:
        """Free the cross moments once their last use (`asymmetric_target`) is over."""
        self.cross.clear()

    def derive(self, name: str, make: Callable[[torch.Tensor], Any]) -> Any:
        """`make(H)` for the input of `name`, made once per input: `make` takes H over (it may
        change it in place), so `full_moment` of that input is no longer available."""
        owner = self.input_owner(name)
        if owner not in self._derived:
            self._finalize()
            self._derived[owner] = make(self.sums.pop(owner)[0])
        return self._derived[owner]

    def done(self, name: str) -> None:
        """`name` is quantized: after the last reader of its input, drop that input's statistics."""
        self._finalize()
        owner = self.input_owner(name)
        pending = self._pending.get(owner)
        if pending is not None:
            pending.discard(name)
            if not pending:
                for held in (self.sums, self._blocks, self._derived, self._pending, self.cross):
                    held.pop(owner, None)


def diagonal_blocks(h: torch.Tensor, group_size: int) -> list[torch.Tensor]:
    """The g x g diagonal blocks of H [K, K] as `SecondMoments.moments` lays them out."""
    blocks = []
    for s in split_groups(h.shape[0], group_size):
        hs = h[s.start : s.stop, s.start : s.stop].reshape(s.count, s.length, s.count, s.length)
        blocks.append(hs.diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous())
    return blocks
