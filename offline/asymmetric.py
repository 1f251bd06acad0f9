"""Asymmetric calibration (GPTAQ, Li et al., ICML 2025): aim each linear at the float model's output
from the quantized model's input.

DAQ's rounding minimises a linear's output error on given inputs X~, ||X~ (W - W_hat)^T||^2. On the
float model's inputs (the default) it ignores the error the quantized earlier linears put into
X~; on the quantized model's inputs (`--sequential`) it aims at W X~, which carries that error.
The asymmetric objective ||X W^T - X~ W_hat^T||^2, X the float model's inputs, asks for the float
output from the quantized input. For any W_hat it equals ||X~ (W' - W_hat)^T||^2 plus a constant,
with the least-squares target

    W' = W X^T X~ (X~^T X~)^-1 = W + W (C - H~) H~^-1,   C = X^T X~ / T,  H~ = X~^T X~ / T

(the residual X W^T - X~ W'^T is orthogonal to X~'s columns), so DCA, LDRA and the GPTQ rounding
run unchanged on W' with the quantized stream's moment H~. `alpha` takes part of the step, W +
alpha W (C - H~)(H~ + damp)^-1, as GPTAQ does (alpha = 0.25 there): the full step also fits the
sampling noise of the calibration set.
"""

from __future__ import annotations

import torch

from daq_vllm.errors import DAQError


def asymmetric_target(w: torch.Tensor, h: torch.Tensor, c: torch.Tensor, alpha: float, damp: float) -> torch.Tensor:
    """W + alpha W (C - H~)(H~ + damp * mean(diag H~) I)^-1 for W [N, K], H~ and C [K, K]."""
    reg = h.clone()
    diag = reg.diagonal()
    diag.add_(damp * diag.mean().clamp_min(torch.finfo(h.dtype).tiny))
    factor, info = torch.linalg.cholesky_ex(reg)
    if int(info) != 0:
        raise DAQError("asymmetric calibration: the quantized inputs' second moment is not positive definite; "
                       "quantize without --asymmetric")
    reg = None
    step = torch.cholesky_solve((w @ (c - h)).T.contiguous(), factor).T
    return w + alpha * step
