"""Calibration data: text from a named source or a file, cut into fixed-length token blocks.

Sources: `wikitext2-valid` (the tokenized WikiText-2 validation split shipped in the package, or
`$DAQ_DATA_DIR`'s copy; it shares no article with the test split used for evaluation), `PATH.txt`
(plain text), records (`PATH.jsonl`, `PATH.parquet` or a `datasets` save_to_disk folder; see
`calib_sources`: each record's `--calib-field`, default "text", or with `--chat-template` its "messages"
rendered by the tokenizer's chat template) or `hf:NAME[:CONFIG[:SPLIT]]` (a Hub dataset's
`--calib-field` column, split "train" by default; needs the optional `datasets` library and network).
Records are joined by "\n\n". Blocks start at seeded random positions, as in the GPTQ/AWQ loaders.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from daq_vllm.data.hub import HUB_FORMAT, hub_text, is_hub_source, parse_hub_source
from daq_vllm.data.wikitext import wikitext2_valid_text
from daq_vllm.errors import DAQError

from .calib_sources import RECORD_SOURCES, Render, chat_renderer, is_record_source, read_records, records_text

WIKITEXT2_VALID = "wikitext2-valid"
LOCAL_CALIBRATION = f"the packaged --calib {WIKITEXT2_VALID} or a local --calib PATH.txt / PATH.jsonl"


@dataclass(frozen=True)
class CalibSpec:
    source: str = WIKITEXT2_VALID
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    field: str = "text"  # the text field of record sources and the Hub column
    chat_template: bool = False  # render records' "messages" with the tokenizer's chat template


def calibration_text(source: str, field: str = "text", render: Render | None = None) -> str:
    """The source's text; `render` (from `chat_renderer`) turns records' "messages" into text."""
    if is_hub_source(source):
        _refuse_chat(source, render)
        return hub_text(parse_hub_source(source, default_split="train"), LOCAL_CALIBRATION, field)
    if source == WIKITEXT2_VALID:
        _refuse_chat(source, render)
        return wikitext2_valid_text()
    path = Path(source).expanduser()
    if not path.exists():
        raise DAQError(f"calibration source {source!r} does not exist; give {WIKITEXT2_VALID}, PATH.txt, "
                       f"{HUB_FORMAT}, {RECORD_SOURCES}")
    if is_record_source(path):
        return records_text(read_records(path), field, render)
    _refuse_chat(source, render)
    return path.read_text(encoding="utf-8")

def _refuse_chat(source: str, render: Render | None) -> None:
    if render is not None:
        raise DAQError(f"--chat-template renders the \"messages\" of records, and {source!r} has none: give "
                       f"{RECORD_SOURCES} (a Hub dataset: save_to_disk it first), or drop --chat-template")


def calibration_blocks(tokenizer, spec: CalibSpec) -> torch.Tensor:
    """[nsamples, seqlen] token ids taken at seeded random offsets of the tokenized source."""
    if spec.nsamples < 1 or spec.seqlen < 2:
        raise DAQError("--nsamples must be >= 1 and --seqlen >= 2")
    render = chat_renderer(tokenizer) if spec.chat_template else None
    text = calibration_text(spec.source, spec.field, render)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    if ids.numel() <= spec.seqlen:
        raise DAQError(
            f"calibration source {spec.source!r} has {ids.numel()} tokens, fewer than one block of {spec.seqlen}; "
            "give more text or a smaller --seqlen"
        )
    gen = torch.Generator().manual_seed(spec.seed)
    starts = torch.randint(0, ids.numel() - spec.seqlen, (spec.nsamples,), generator=gen)
    return torch.stack([ids[s : s + spec.seqlen] for s in starts.tolist()])
