"""`DAQMoEMethod`: vLLM's fused-MoE method for DAQ experts, glue around the MoE kernel layer.

vLLM builds a MoE block's experts as one `RoutedExperts` layer of 3-D parameters [experts, N, ...].
Its weight loader copies each per-expert checkpoint linear (`experts.<e>.w1.qweight`, ...) into
its slot, takes this rank's rows of gate/up and columns of down for tensor parallelism, and drops
the experts of other expert-parallel ranks. This method declares the six DAQ tensors in that
N-first layout, chooses the MoE kernel once, and computes through one registered custom op: on
CPU vLLM's Dynamo traces into `apply` (fullgraph), and the CPU kernels group the routed tokens on
the host. Imports vllm.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable
from typing import Any

import torch
from vllm.model_executor.layers.fused_moe import (
    FusedMoEConfig,
    FusedMoEMethodBase,
    FusedMoeWeightScaleSupported,
    MoEActivation,
    RoutedExperts,
)
from vllm.model_executor.utils import set_weight_attrs
from vllm.utils.torch_utils import direct_register_custom_op

from ...errors import DAQError
from ...format import OFFSETS, PACKED, QWEIGHT, SCALES, DAQFormat, packed_shapes
from ...kernels import MoESpec, choose_moe_kernel

# vLLM's shard ids: w1 = gate and w3 = up (stacked into w13), w2 = down.
GATE_UP, DOWN = "w13", "w2"
SHARDS = ("w1", "w3", "w2")
DTYPES = {QWEIGHT: torch.int32, SCALES: torch.float16, OFFSETS: torch.float16}
SUPPORTED_ACTIVATIONS = (MoEActivation.SILU,)

# The layers the custom op computes, by a key unique in the process: an op takes tensors and
# strings only, and a key (not the layer name) keeps two models in one process apart.
_LAYERS: weakref.WeakValueDictionary[str, RoutedExperts] = weakref.WeakValueDictionary()
_keys = itertools.count()


def _vllm_moe(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, layer_key: str) -> torch.Tensor:
    """The experts of the layer `layer_key` applied to x [M, H] (topk_ids local, -1 = another rank's)."""
    layer = _LAYERS[layer_key]
    return layer.quant_method.kernel.apply(layer, x, topk_weights, topk_ids)


def _vllm_moe_fake(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                   layer_key: str) -> torch.Tensor:
    return torch.empty_like(x)


# `torch.ops.daq.vllm_moe`; the op lives as long as this library object (direct_register_custom_op).
_library = torch.library.Library("daq", "FRAGMENT")
direct_register_custom_op("vllm_moe", _vllm_moe, fake_impl=_vllm_moe_fake, target_lib=_library)


class DAQMoEMethod(FusedMoEMethodBase):
    """The experts of one MoE layer as DAQ linears: packed codes + fp16 scale/offset per group along K.

    All gate/up projections of the layer share one codebook and all down projections one
    (`DAQConfig.experts_formats`), so one kernel computes every expert.
    """

    def __init__(self, moe: FusedMoEConfig, gate_up: DAQFormat, down: DAQFormat, prefix: str):
        super().__init__(moe)
        self.formats = {GATE_UP: gate_up, DOWN: down}
        self.bits, self.group_size = gate_up.bits, gate_up.group_size
        self.prefix = prefix
        self.key = f"{prefix}#{next(_keys)}"
        self.checkpoint_shapes: dict[str, dict[str, tuple[int, int]]] = {}  # shard id -> suffix -> shape
        # (global expert, shard id, tensor suffix) of every checkpoint tensor loaded on this rank
        self.loaded: set[tuple[int, str, str]] = set()

    def create_weights(self, layer: RoutedExperts, num_experts: int, hidden_size: int,
                       intermediate_size_per_partition: int, params_dtype: torch.dtype, **extra_weight_attrs: Any):
        """Declare w13_* [E, 2I, .] and w2_* [E, H, .] (E local experts, I this rank's share) and choose the kernel."""
        h, i, full_i = hidden_size, intermediate_size_per_partition, self.moe.intermediate_size
        self._refuse_unsupported(layer, h, i, full_i, extra_weight_attrs.get("unpadded_hidden_size", h))
        # The whole checkpoint tensor of each projection, before vLLM takes this rank's part.
        self.checkpoint_shapes = {"w1": packed_shapes(full_i, h, self.bits, self.group_size),
                                  "w3": packed_shapes(full_i, h, self.bits, self.group_size),
                                  "w2": packed_shapes(h, full_i, self.bits, self.group_size)}
        local = {GATE_UP: packed_shapes(2 * i, h, self.bits, self.group_size),
                 DOWN: packed_shapes(h, i, self.bits, self.group_size)}
        attrs = {**extra_weight_attrs, "quant_method": FusedMoeWeightScaleSupported.GROUP.value, "is_transposed": False}
        loader = extra_weight_attrs["weight_loader"]
        for stem, shapes in local.items():
            for suffix in PACKED:
                param = torch.nn.Parameter(torch.empty(num_experts, *shapes[suffix], dtype=DTYPES[suffix]),
                                           requires_grad=False)
                layer.register_parameter(f"{stem}_{suffix}", param)
                set_weight_attrs(param, {**attrs, "weight_loader": self._checked_loader(layer, loader, suffix)})
        self.kernel = choose_moe_kernel(MoESpec(
            bits=self.bits, group_size=self.group_size, hidden_size=h, intermediate_size=i, num_experts=num_experts,
            act_dtype=params_dtype, device_type=layer.w13_qweight.device.type,
            w13_codebook=tuple(self.formats[GATE_UP].codebook), w2_codebook=tuple(self.formats[DOWN].codebook),
            activation=self.moe.activation.value))
        _LAYERS[self.key] = layer

    def _refuse_unsupported(self, layer: RoutedExperts, h: int, i: int, full_i: int, unpadded_h: int) -> None:
        """One-line errors, at load, for what this method cannot compute."""
        if self.moe.activation not in SUPPORTED_ACTIVATIONS:
            raise DAQError(f"DAQ: the experts of {self.prefix} use the activation {self.moe.activation.value!r}; the "
                           "DAQ MoE method supports silu (Mixtral, Qwen2/3-MoE, OLMoE): serve another model")
        if layer.apply_router_weight_on_input:
            raise NotImplementedError(f"DAQ: the experts of {self.prefix} apply the router weight to their input, "
                                      "which the DAQ MoE method does not support: serve another model")
        if h != unpadded_h:
            raise DAQError(f"DAQ: the MoE all-to-all backend pads the hidden size of {self.prefix} from {unpadded_h} "
                           f"to {h}, which DAQ's packed experts cannot hold; choose another --all2all-backend")
        g, bits = self.group_size, self.bits
        if i != full_i and (i % g or (i * bits) % 32):
            raise DAQError(f"DAQ: a tensor-parallel shard of {i} of the {full_i} expert intermediate features of "
                           f"{self.prefix} cuts a group of {g} or an int32 word of {bits}-bit codes; use a "
                           "tensor-parallel size that divides the groups evenly, or --enable-expert-parallel")

    def checkpoint_name(self, layer: RoutedExperts, expert: int, shard_id: str, suffix: str) -> str:
        """The checkpoint tensor of one expert projection, e.g. `...experts.3.w2.scales`."""
        proj = {"w1": layer.ckpt_gate_proj_name, "w3": layer.ckpt_up_proj_name, "w2": layer.ckpt_down_proj_name}
        return f"{self.prefix}.{expert}.{proj[shard_id]}.{suffix}"

    def _checked_loader(self, layer: RoutedExperts, loader: Callable[..., Any], suffix: str) -> Callable[..., Any]:
        """vLLM's expert weight loader, checking each checkpoint tensor first and recording it.

        vLLM's loader narrows its destination to fit a tensor that is too small and leaves the rest
        uninitialized, so a mis-shaped tensor would load silently wrong: it is refused here, named.
        """

        def load(param: torch.nn.Parameter, loaded_weight: torch.Tensor, weight_name: str, shard_id: str,
                 expert_id: int, return_success: bool = False) -> bool | None:
            name = self.checkpoint_name(layer, expert_id, shard_id, suffix)
            want = self.checkpoint_shapes[shard_id][suffix]
            if tuple(loaded_weight.shape) != want or loaded_weight.dtype != DTYPES[suffix]:
                got = f"{str(loaded_weight.dtype).removeprefix('torch.')} {list(loaded_weight.shape)}"
                raise DAQError(f"cannot load tensor {name}: the checkpoint holds {got}, expected "
                               f"{str(DTYPES[suffix]).removeprefix('torch.')} {list(want)} (docs/FORMAT.md); "
                               "the checkpoint does not match config.json: re-quantize")
            try:
                ok = loader(param, loaded_weight, weight_name, shard_id, expert_id, return_success=True)
            except (AssertionError, RuntimeError, ValueError) as e:
                raise DAQError(f"cannot load tensor {name} into {self.prefix} ({str(e) or type(e).__name__}); "
                               "the checkpoint does not match config.json: re-quantize") from e
            if ok:
                self.loaded.add((expert_id, shard_id, suffix))
            return ok if return_success else None

        return load

    def _check_complete(self, layer: RoutedExperts) -> None:
        """Every tensor of every expert of this rank was loaded: vLLM only checks that each 3-D
        parameter got one, and a missing expert would compute with uninitialized memory.

        A layer that got no tensor at all is left alone: vLLM names its parameters itself, and a
        dummy-weight load (`--load-format dummy`) calls no loader.
        """
        if not self.loaded:
            return
        for expert in layer.expert_map_manager.get_local_expert_ids():
            for shard_id, suffix in itertools.product(SHARDS, PACKED):
                if (expert, shard_id, suffix) not in self.loaded:
                    name = self.checkpoint_name(layer, expert, shard_id, suffix)
                    raise DAQError(f"checkpoint is missing tensor {name} (other experts of {self.prefix} have it); "
                                   "restore it or re-quantize")

    def get_fused_moe_quant_config(self, layer: RoutedExperts) -> None:
        """None: no vLLM modular kernel computes DAQ experts; the custom op does."""
        return None

    def process_weights_after_loading(self, layer: RoutedExperts) -> None:
        self._check_complete(layer)
        self.kernel.prepare(layer)
        if self.kernel.owns_weights:  # a server never saves the model: hold the weights once, not twice
            for stem in (GATE_UP, DOWN):
                for suffix in PACKED:
                    name = f"{stem}_{suffix}"
                    setattr(layer, name, torch.nn.Parameter(getattr(layer, name).data.new_empty(0),
                                                            requires_grad=False))

    def apply(self, layer: RoutedExperts, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              shared_experts: Any, shared_experts_input: torch.Tensor | None) -> torch.Tensor:
        """The routed experts' output for x [M, H]; vLLM's runner adds shared experts and reduces across ranks.

        Under expert parallelism the router gives global expert ids; `expert_map` turns them into
        this rank's slots (-1: another rank's expert, which the kernel skips).
        """
        expert_map = layer.expert_map
        if expert_map is not None:
            topk_ids = expert_map[topk_ids]
        return torch.ops.daq.vllm_moe(x, topk_weights, topk_ids, self.key)
