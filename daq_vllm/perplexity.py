"""Perplexity by the standard GPTQ/AWQ protocol: non-overlapping windows, no BOS, exp(mean NLL)."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass
class PerplexityResult:
    perplexity: float
    mean_nll: float
    windows: int
    total_windows: int
    seqlen: int
    tokens: int


@torch.no_grad()
def perplexity(
    model, token_ids: torch.Tensor, seqlen: int = 2048, max_windows: int | None = None, progress: bool = True
) -> PerplexityResult:
    """Mean next-token NLL over the first `max_windows` windows of `seqlen` tokens.

    Every window predicts its seqlen-1 tokens after the first; windows have equal length, so the
    mean of per-window mean NLLs is the token mean.
    """
    total = token_ids.numel() // seqlen
    n = total if max_windows is None else min(max_windows, total)
    if n == 0:
        raise ValueError(f"the text has {token_ids.numel()} tokens, fewer than one window of {seqlen}")
    device = next(model.parameters()).device
    daq_layers = [m for m in model.modules() if hasattr(m, "cache_dequantized")]
    for module in daq_layers:  # dequantize once, not at every window
        module.cache_dequantized(True)
    nlls = []
    try:
        for i in tqdm(range(n), desc="perplexity", unit="window", disable=not progress, file=sys.stderr):
            window = token_ids[i * seqlen : (i + 1) * seqlen].to(device)[None]
            logits = model(window).logits.float()
            nll = torch.nn.functional.cross_entropy(logits[0, :-1], window[0, 1:])
            nlls.append(nll.item())
    finally:
        for module in daq_layers:
            module.cache_dequantized(False)
    mean = sum(nlls) / n
    return PerplexityResult(math.exp(mean), mean, n, total, seqlen, n * seqlen)


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids of the whole text without special tokens (no BOS), as the protocol asks."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
