"""Perplexity by the standard GPTQ/AWQ protocol: non-overlapping windows, no BOS, exp(mean NLL)."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..data.hub import HUB_FORMAT, HubText, hub_text, is_hub_source, parse_hub_source, require_datasets
from ..data.wikitext import wikitext2_test_text
from ..errors import DAQError

WIKITEXT2 = "wikitext2"
LOCAL_EVALUATION = f"the packaged --ppl {WIKITEXT2} (with --data PATH for another wiki.test.raw)"


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


def parse_task(task: str) -> HubText | None:
    """A `--ppl` task: None for wikitext2, or its Hub dataset (split "test" by default)."""
    if task == WIKITEXT2:
        return None
    if not is_hub_source(task):
        raise DAQError(f"unknown perplexity task {task!r}; use {WIKITEXT2} or {HUB_FORMAT}")
    return parse_hub_source(task, default_split="test")


def check_task(task: str, data: str | None = None) -> HubText | None:
    """Everything about a task that can fail before a model is loaded: its form, --data, `datasets`."""
    spec = parse_task(task)
    if spec is not None:
        if data:
            raise DAQError(f"--data is a wiki.test.raw file for --ppl {WIKITEXT2}; drop it with --ppl {task}")
        require_datasets(spec, LOCAL_EVALUATION)
    return spec


def task_text(task: str = WIKITEXT2, data: str | None = None) -> str:
    """The evaluation text of a `--ppl` task: `wikitext2` (`data`: another wiki.test.raw) or a Hub dataset."""
    spec = check_task(task, data)
    return wikitext2_test_text(data) if spec is None else hub_text(spec, LOCAL_EVALUATION)


def wikitext2_perplexity(model, tokenizer, seqlen: int = 2048, max_windows: int | None = None,
                         data: str | None = None, progress: bool = True, task: str = WIKITEXT2) -> PerplexityResult:
    """Perplexity of a `--ppl` task by the standard protocol: task -> text -> tokens -> windows.

    Named for its default task, WikiText-2 test (`data`: another wiki.test.raw); `task` may also be
    `hf:NAME[:CONFIG[:SPLIT]]`, a Hub dataset's "text" column (split "test" by default).
    """
    ids = tokenize_text(tokenizer, task_text(task, data))
    try:
        return perplexity(model, ids, seqlen, max_windows, progress=progress)
    except ValueError as e:
        raise DAQError(str(e)) from None
