"""`daq_linear` as a torch custom op in vLLM's library: `torch.ops.vllm.daq_linear`.

vLLM compiles models with torch.compile and captures CUDA graphs; a Triton launch with Python-side
tuning inside a traced region would be traced into or break the graph. Registered through vLLM's
`direct_register_custom_op`, the kernel is one opaque op whose fake implementation gives
torch.compile the output's shape and dtype; the op's schema is read from `daq_linear`'s own
signature. Imports vllm; loaded by `vllm_method`.
"""

import torch
from vllm.utils.torch_utils import direct_register_custom_op

from .kernels import daq_linear

OP_NAME = "daq_linear"


def _daq_linear_fake(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    codebook: torch.Tensor,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


if not hasattr(torch.ops.vllm, OP_NAME):  # once per process, whoever imports first
    direct_register_custom_op(OP_NAME, daq_linear, mutates_args=[], fake_impl=_daq_linear_fake)


def daq_linear_op(x, qweight, scales, offsets, codebook, bits: int, group_size: int, bias=None) -> torch.Tensor:
    """The custom op (what `DAQLinearMethod.apply` calls on CUDA)."""
    return torch.ops.vllm.daq_linear(x, qweight, scales, offsets, codebook, bits, group_size, bias)
