"""Load DAQ checkpoints with `transformers.AutoModelForCausalLM.from_pretrained`.

Importing `daq_vllm` registers the `daq` quant method in transformers' quantizer registry. Before
the weights load, every converted nn.Linear is swapped for a `DAQLinear` holding the packed tensors,
which then load by name from the checkpoint; each then computes with the kernel chosen for it
(`daq_vllm.kernels.choose_kernel`). A mixture-of-experts layer's experts compute at once through
the MoE kernel layer (`choose_moe_kernel`, as in vLLM) where a fused kernel can run them
(`fuse_experts`); otherwise expert by expert through their own kernels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..experts import CheckpointNames, ExpertLinears, defuse_experts, expert_modules
from ..format import QUANT_METHOD, DAQFormat, num_groups, packed_words
from ..kernels import LinearKernel, LinearSpec, MoESpec, choose_kernel, choose_moe_kernel, dequantize


class DAQLinear(nn.Module):
    """A linear layer stored in the DAQ format; computes `x @ W_hat^T + bias` with its kernel.

    The kernel is chosen by `select_kernels` once the weights are loaded (transformers' loader
    does it, and `daq_vllm.load` again after moving the model to its device).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, fmt: DAQFormat):
        """`fmt` is this linear's single-codebook view (`DAQFormat.for_module`)."""
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.fmt = fmt
        groups = num_groups(in_features, fmt.group_size)
        self.qweight = nn.Parameter(
            torch.zeros(out_features, packed_words(in_features, fmt.bits), dtype=torch.int32), requires_grad=False
        )
        self.scales = nn.Parameter(torch.zeros(out_features, groups, dtype=torch.float16), requires_grad=False)
        self.offsets = nn.Parameter(torch.zeros(out_features, groups, dtype=torch.float16), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.kernel: LinearKernel | None = None

    def select_kernel(self, act_dtype: torch.dtype, preferred: Sequence[str] = ()) -> None:
        """Choose and prepare the kernel for where the weights are now."""
        spec = LinearSpec.of(self.fmt, self.in_features, self.out_features, act_dtype, self.qweight.device.type)
        self.kernel = choose_kernel(spec, preferred)
        self.kernel.prepare(self)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight [out, in] this layer computes with (docs/FORMAT.md)."""
        codebook = torch.tensor(self.fmt.codebook, dtype=torch.float32, device=self.qweight.device)
        return dequantize(self.qweight, self.scales, self.offsets, codebook, self.fmt.bits, self.fmt.group_size,
                          self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is None:
            raise RuntimeError("DAQLinear has no kernel: load the model with from_pretrained or daq_vllm.load (an "
                               "expert of a fused MoE layer computes only through its layer)")
        return self.kernel.apply(self, x, self.bias)

    def extra_repr(self) -> str:
        kernel = self.kernel.name if self.kernel is not None else None
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.fmt.bits}, "
                f"group_size={self.fmt.group_size}, kernel={kernel}")


def select_kernels(model: nn.Module, preferred: str | None = None) -> None:
    """(Re)choose every DAQLinear's kernel for its current device and the model's dtype (that of its
    input embedding: DAQLinear's own fp16 scales say nothing of it). Experts that a fused MoE kernel
    computes need none; a `preferred` (forced) dense kernel computes every linear, experts included."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    dtype = embedding.weight.dtype if embedding is not None else torch.float32
    fused: set[int] = set()
    for experts in expert_modules(model).values():
        experts.fused = None
        if not preferred:
            fused.update(id(linear) for linear in fuse_experts(experts, dtype))
    for module in model.modules():
        if isinstance(module, DAQLinear):
            if id(module) in fused:
                module.kernel = None
            else:
                module.select_kernel(dtype, (preferred,) if preferred else ())


def _activation(act_fn: nn.Module) -> str | None:
    """The MoE kernels' name for an expert's activation (`kernels.moe.ACTIVATIONS`), or None.

    Probed on a few values: transformers' activation classes differ between models and versions.
    """
    probe = torch.linspace(-6, 6, 25)
    for name, fn in (("silu", nn.functional.silu), ("gelu", nn.functional.gelu)):
        if torch.allclose(act_fn(probe), fn(probe), rtol=1e-6, atol=1e-7):
            return name
    return None


def fuse_experts(experts: ExpertLinears, act_dtype: torch.dtype) -> list[DAQLinear]:
    """Let one MoE kernel compute `experts` where one can; the DAQ linears it covers, or [] if none.

    It can when every projection is a DAQ linear without bias, all gate and up projections share a
    codebook and all down projections another (what the quantizer writes, and vLLM requires), bits
    and group size are the same, the activation is one the kernels compute, and the kernel chosen is
    not `loop` (the per-expert path this replaces). The packed tensors are stacked as vLLM holds them
    (`w13_*` [E, 2I, .], `w2_*` [E, H, .], non-persistent buffers of `experts`, so they move with the
    model) and dropped after `prepare` when the kernel keeps its own repacked copy.
    """
    projections = [[getattr(m, n) for n in (m.names.gate, m.names.up, m.names.down)] for m in experts]
    linears = [linear for p in projections for linear in p]
    if not all(isinstance(linear, DAQLinear) and linear.bias is None for linear in linears):
        return []

    def fmt(linear: DAQLinear) -> tuple[int, int, tuple[float, ...]]:
        return linear.fmt.bits, linear.fmt.group_size, tuple(linear.fmt.codebook)

    w13_formats = {fmt(linear) for gate, up, _ in projections for linear in (gate, up)}
    w2_formats = {fmt(down) for *_, down in projections}
    activation = _activation(experts[0].act_fn)
    if len(w13_formats) != 1 or len(w2_formats) != 1 or activation is None:
        return []
    (bits, group, w13_codebook), (w2_bits, w2_group, w2_codebook) = w13_formats.pop(), w2_formats.pop()
    if (bits, group) != (w2_bits, w2_group):
        return []
    gate = projections[0][0]
    kernel = choose_moe_kernel(MoESpec(bits, group, gate.in_features, gate.out_features, len(projections), act_dtype,
                                       gate.qweight.device.type, w13_codebook, w2_codebook, activation))
    if kernel.name == "loop":
        return []
    for suffix in ("qweight", "scales", "offsets"):
        tensors = [[getattr(linear, suffix).detach() for linear in p] for p in projections]
        experts.register_buffer(f"w13_{suffix}", torch.stack([torch.cat([g, u]) for g, u, _ in tensors]),
                                persistent=False)
        experts.register_buffer(f"w2_{suffix}", torch.stack([d for *_, d in tensors]), persistent=False)
    kernel.prepare(experts)
    if kernel.owns_weights:
        for name in kernel.spec.shapes():
            experts.register_buffer(name, getattr(experts, name).new_empty(0), persistent=False)
    experts.fused = lambda x, top_k_index, top_k_weights: kernel.apply(experts, x, top_k_weights, top_k_index)
    return linears


def replace_linears(model: nn.Module, fmt: DAQFormat) -> int:
    """Swap each converted nn.Linear of `model` for a DAQLinear with its own codebook; return how many.

    Fused experts become one linear per expert projection first (`daq_vllm.experts`), as the
    checkpoint stores them. `fmt` names modules as the checkpoint does, which for some models
    (Mixtral) is not as the transformers model does.
    """
    defuse_experts(model)
    names = CheckpointNames(model)
    swapped = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = names.to_checkpoint(f"{name}.{child_name}" if name else child_name)
            if isinstance(child, nn.Linear) and fmt.is_converted(full):
                with torch.device("meta"):
                    layer = DAQLinear(child.in_features, child.out_features, child.bias is not None,
                                      fmt.for_module(full))
                setattr(module, child_name, layer)
                swapped += 1
    return swapped


class DAQHfConfig(QuantizationConfigMixin):
    """transformers' view of a DAQ `quantization_config` (validated through DAQFormat)."""

    def __init__(self, **kwargs: Any):
        self.daq_format = DAQFormat.from_dict(kwargs)
        self.quant_method = QUANT_METHOD
        self.extra = {k: v for k, v in kwargs.items() if k not in self.daq_format.to_dict()}

    def to_dict(self) -> dict[str, Any]:
        return {**self.daq_format.to_dict(), **self.extra}

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()


class DAQHfQuantizer(HfQuantizer):
    """Loads pre-quantized DAQ checkpoints (quantizing on load is `daq-vllm quantize`'s job)."""

    requires_calibration = True

    def _process_model_before_weight_loading(self, model, **kwargs):
        fmt = self.quantization_config.daq_format
        if replace_linears(model, fmt) == 0:
            raise ValueError("DAQ checkpoint: no linear layer of the model is marked as quantized")
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        # The loader re-wraps float tensors as trainable parameters: kernels freeze them again.
        select_kernels(model)
        return model

    def is_serializable(self) -> bool:
        return False

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register the `daq` quant method with transformers (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(DAQHfConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(DAQHfQuantizer)
