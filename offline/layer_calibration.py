"""Calibration state between decoder layers: the activations entering the current layer.

With LDRA, calibration blocks flow through the layers one at a time (GPTQ-style): a layer is
loaded, its linears' input statistics are collected while the activations pass through it, and
the activations move on to the next layer, through the float layer or (`sequential`) through the
quantized one. Asymmetric calibration (`asymmetric.py`) carries both, the float model's activations
and the quantized model's, and collects each input's statistics from paired passes of every block
(`collect_stage`). Run over several processes, each holds its share of the blocks and the statistics
are summed along them (`distributed.Ranks`); a rank hands its activations on as soon as it fed a
layer, and the linears it quantizes later are loaded again (`weight`).
"""

from __future__ import annotations

from typing import Callable

import torch

from daq_vllm.experts import expert_modules

from .calibration import calibration_blocks
from .distributed import Ranks
from .model_source import DecoderLayer, ModelSource
from .moments import SecondMoments
from .options import QuantizeOptions
from .runner import LayerRunner, materialize, release, set_parameter

Decoded = Callable[[str, int], torch.Tensor]  # (linear name, in_features) -> its quantized weight, float32


class LayerCalibration:
    """The activations entering the current decoder layer, for every calibration block."""

    def __init__(self, source: ModelSource, layers: list[DecoderLayer], opts: QuantizeOptions, ranks: Ranks):
        self.source, self.opts, self.ranks = source, opts, ranks
        blocks = calibration_blocks(source.tokenizer(), opts.calib)
        for experts in expert_modules(source.skeleton).values():
            experts.calibrate = opts.moe_calibration
        # all ranks' blocks: the token counts of the statistics are summed over the ranks too
        self.min_expert_tokens = opts.moe_min_token_share * blocks.numel()
        self.runner = LayerRunner(source, layers, opts.device, "cpu" if opts.offload_activations else None)
        self.hidden = self.runner.first_inputs(blocks[ranks.share(len(blocks))])
        # asymmetric: the float model's activations; `hidden` then holds the quantized model's
        self.float_hidden = self.hidden.clone() if opts.asymmetric else None

    def collect(self, layer: DecoderLayer, names: list[str]) -> tuple[SecondMoments, torch.Tensor]:
        """Load `layer` and pass the activations through it: its linears' input statistics (this
        rank's link of the chain, `Ranks.receive_sums`/`pass_on`), its float outputs."""
        materialize(self.source, layer.name, layer.module, self.opts.device)
        moments = self.new_moments()
        self.ranks.receive_sums(moments)
        moments.attach(layer.module, layer.name, names)
        try:
            if self.float_hidden is None:
                outputs = self.runner.forward(layer.module, self.hidden, moments.new_pass)
            else:
                outputs = self._float_forward(layer, moments)
        finally:
            moments.detach()
        self.ranks.pass_on(moments)
        return moments, outputs

    def _float_forward(self, layer: DecoderLayer, moments: SecondMoments) -> torch.Tensor:
        """Every block through the float `layer` on the float model's activations, the hooks only
        recording which linears read which input, in order (`moments.reference`, `alias`); returns
        the float model's outputs. The statistics come stage by stage (`collect_stage`)."""
        moments.recording = True
        try:
            return self.runner.forward(layer.module, self.float_hidden, moments.new_pass)
        finally:
            moments.recording = False

    def collect_stage(
        self, layer: DecoderLayer, readers: list[str], quantized: dict[str, tuple[torch.Tensor, torch.Tensor]]
    ) -> SecondMoments:
        """Asymmetric calibration of the linears `readers` (all reading one input, the first one
        hooked) after this layer's `quantized` linears (name -> float weight, decoded weight): each
        block runs up to that input twice, through the float weights on the float model's
        activations and through the decoded ones on the quantized model's."""
        moments = self.new_moments()
        moments.attach(layer.module, layer.name, readers[:1])
        moments.alias.update({r: readers[0] for r in readers[1:]})  # the pass stops before they run
        stop_at = layer.module.get_submodule(_local(layer, readers[0]))
        try:
            for i in range(self.hidden.shape[0]):
                for name, (w, _) in quantized.items():
                    set_parameter(layer.module, f"{_local(layer, name)}.weight", w)
                moments.new_pass()
                moments.recording = True
                try:
                    self.runner.block_until(layer.module, self.float_hidden[i], stop_at)
                finally:
                    moments.recording = False
                for name, (_, w_hat) in quantized.items():
                    set_parameter(layer.module, f"{_local(layer, name)}.weight", w_hat)
                moments.new_pass()
                self.runner.block_until(layer.module, self.hidden[i], stop_at)
                moments.reference.clear()
        finally:
            moments.detach()
        return moments

    def new_moments(self) -> SecondMoments:
        """An empty accumulator of the statistics the run's rounding needs."""
        return SecondMoments(self.opts.group_size, full=self.opts.compensation is not None,
                             paired=self.float_hidden is not None)

    @staticmethod
    def expert_tokens(moments: SecondMoments, names: list[str]) -> dict[str, int]:
        """How many calibration tokens the statistics of each expert projection of `names` hold
        (0 for an expert routing sent no token)."""
        return {n: moments.tokens.get(moments.input_owner(n), 0) for n in names}

    def weight(self, layer: DecoderLayer, name: str) -> torch.Tensor:
        """The float32 weight of linear `name`: as `collect` loaded it (no second copy), or loaded
        again if the layer was handed on already (`advance`)."""
        local = _local(layer, name)
        if layer.module.get_submodule(local).weight.is_meta:
            set_parameter(layer.module, f"{local}.weight",
                          self.source.tensor(f"{name}.weight").to(self.opts.device, torch.float32))
        return layer.module.get_submodule(local).weight.data

    def shape(self, layer: DecoderLayer, name: str) -> torch.Size:
        """The shape [N, K] of linear `name`'s weight, loaded or not."""
        return layer.module.get_submodule(_local(layer, name)).weight.shape

    def drop_weight(self, layer: DecoderLayer, name: str) -> None:
        """Free the float weight of linear `name` once quantized: the layer's float outputs are
        computed already, and `advance` loads what it needs again."""
        set_parameter(layer.module, f"{_local(layer, name)}.weight",
                      torch.empty_like(layer.module.get_submodule(_local(layer, name)).weight, device="meta"))

    def advance(
        self, layer: DecoderLayer, names: list[str], decoded: Decoded | None, float_outputs: torch.Tensor | None = None
    ) -> None:
        """Move the activations past `layer`, then drop its weights.

        `float_outputs` are the layer's full-precision outputs when `collect` already computed them
        (its weights are still loaded then); a resumed layer passes None. With `sequential`, the
        next layer sees this layer's outputs with the weights `decoded` gives for `names` instead
        (one process only: `check_distributed`); asymmetric calibration moves both streams, the
        float one by `float_outputs` (the float model's, from `_float_forward`).
        """
        if float_outputs is None:
            materialize(self.source, layer.name, layer.module, self.opts.device)
        if self.float_hidden is not None:
            self.float_hidden = (float_outputs if float_outputs is not None
                                 else self.runner.forward(layer.module, self.float_hidden))
        if self.opts.sequential or self.float_hidden is not None:
            for name in names:
                set_parameter(layer.module, f"{_local(layer, name)}.weight", decoded(name, self.shape(layer, name)[1]))
            outputs = self.runner.forward(layer.module, self.hidden)
        else:
            outputs = float_outputs if float_outputs is not None else self.runner.forward(layer.module, self.hidden)
        release(layer.module)
        self.hidden = outputs


def _local(layer: DecoderLayer, name: str) -> str:
    """The name of linear `name` (a full name) inside its decoder layer's module."""
    return name[len(layer.name) + 1 :]
