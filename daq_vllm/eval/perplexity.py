"""Perplexity by the standard GPTQ/AWQ protocol: non-overlapping windows, no BOS, exp(mean NLL)."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..errors import DAQError
from ..data.wikitext import wikitext2_test_text


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
    nlls = []
    for i in tqdm(range(n), desc="perplexity", unit="window", disable=not progress, file=sys.stderr):
        window = token_ids[i * seqlen : (i + 1) * seqlen].to(device)[None]
        logits = model(window).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], window[0, 1:])
        nlls.append(nll.item())
    mean = sum(nlls) / n
    return PerplexityResult(math.exp(mean), mean, n, total, seqlen, n * seqlen)


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids of the whole text without special tokens (no BOS), as the protocol asks."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def wikitext2_perplexity(model, tokenizer, seqlen: int = 2048, max_windows: int | None = None,
                         data: str | None = None, progress: bool = True) -> PerplexityResult:
    """WikiText-2 test perplexity by the standard protocol (`data`: another wiki.test.raw)."""
    ids = tokenize_text(tokenizer, wikitext2_test_text(data))
    try:
        return perplexity(model, ids, seqlen, max_windows, progress=progress)
    except ValueError as e:
        raise DAQError(str(e)) from None
