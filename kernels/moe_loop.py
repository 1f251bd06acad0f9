"""The `loop` MoE path: each expert's projections as ordinary DAQ linears, one expert at a time.

Every expert's slice of `w13_qweight` [E, 2I, W] (and of its scales and offsets) is exactly a 2-D
DAQ linear in the checkpoint format, so it runs through the dense-linear kernel layer: one
`ExpertLinear` holder per expert and projection gets its own `choose_kernel` choice and `prepare`
(on CPU the C++ `cpu` kernel repacks it; elsewhere whatever `choose_kernel` picks). Gate and up stay
one [2I, H] linear. At run time the token-expert pairs are grouped by expert with one sort and one
host sync (the per-expert counts), so experts without tokens cost nothing; this path is not
CUDA-graph capturable, and an integration calls it inside a custom op.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .base import LinearKernel, LinearSpec
from .select import choose_kernel


class ExpertLinear(torch.nn.Module):
    """One expert's projection: views of the layer's 3-D tensors, computed by its own `LinearKernel`."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, kernel: LinearKernel):
        super().__init__()
        self.qweight, self.scales, self.offsets = qweight, scales, offsets
        self.kernel = kernel
        kernel.prepare(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel.apply(self, x)


def expert_linears(layer: torch.nn.Module, projection: str, spec: LinearSpec) -> torch.nn.ModuleList:
    """An `ExpertLinear` per expert for `projection` ("w13" or "w2") of a layer with [E, ...] tensors."""
    qweight, scales, offsets = (getattr(layer, f"{projection}_{t}") for t in ("qweight", "scales", "offsets"))
    return torch.nn.ModuleList(ExpertLinear(qweight[e], scales[e], offsets[e], choose_kernel(spec))
                               for e in range(qweight.shape[0]))


def loop_moe(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w13: torch.nn.ModuleList,
             w2: torch.nn.ModuleList, gated: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """sum_j topk_weights[m, j] * w2_e(gated(w13_e(x[m]))), e = topk_ids[m, j], in float32; [M, H] in x's dtype.

    Ids outside [0, E) (-1: the expert lives on another rank) go to a last bucket that is skipped.
    """
    top_k = topk_ids.shape[1]
    experts = len(w13)
    ids = topk_ids.reshape(-1).long()
    ids = torch.where((ids >= 0) & (ids < experts), ids, experts)
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=experts + 1).tolist()
    weights = topk_weights.reshape(-1).float()
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    start = 0
    for e, count in enumerate(counts[:experts]):
        if count:
            pairs = order[start:start + count]
            tokens = pairs // top_k
            hidden = gated(w13[e](x[tokens])).to(x.dtype)
            out.index_add_(0, tokens, w2[e](hidden).float() * weights[pairs, None])
        start += count
    return out.to(x.dtype)
