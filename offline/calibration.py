"""Calibration data: text from a named source or a file, cut into fixed-length token blocks.

Sources: `wikitext2-valid` (the tokenized WikiText-2 validation split shipped in the package, or
`$DAQ_DATA_DIR`'s copy; it shares no article with the test split used for evaluation), `PATH.txt`
(plain text), `PATH.jsonl` (one JSON object per line with a "text" field) or `hf:NAME[:CONFIG[:SPLIT]]`
(a Hub dataset's "text" column, split "train" by default; needs the optional `datasets` library and
network). Blocks start at seeded random positions, as in the GPTQ/AWQ calibration loaders.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from daq_vllm.data.hub import HUB_FORMAT, hub_text, is_hub_source, parse_hub_source
from daq_vllm.data.wikitext import wikitext2_valid_text
from daq_vllm.errors import DAQError

WIKITEXT2_VALID = "wikitext2-valid"
LOCAL_CALIBRATION = f"the packaged --calib {WIKITEXT2_VALID} or a local --calib PATH.txt / PATH.jsonl"


@dataclass(frozen=True)
class CalibSpec:
    source: str = WIKITEXT2_VALID
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0


def calibration_text(source: str) -> str:
    if source == WIKITEXT2_VALID:
        return wikitext2_valid_text()
    if is_hub_source(source):
        return hub_text(parse_hub_source(source, default_split="train"), LOCAL_CALIBRATION)
    path = Path(source).expanduser()
    if not path.is_file():
        raise DAQError(f"calibration source {source!r} is neither {WIKITEXT2_VALID!r}, an existing .txt/.jsonl file "
                       f"nor {HUB_FORMAT}")
    if path.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DAQError(f"{path}:{i} is not a JSON object with a \"text\" field") from None
        return "\n\n".join(texts)
    return path.read_text(encoding="utf-8")


def calibration_blocks(tokenizer, spec: CalibSpec) -> torch.Tensor:
    """[nsamples, seqlen] token ids taken at seeded random offsets of the tokenized source."""
    if spec.nsamples < 1 or spec.seqlen < 2:
        raise DAQError("--nsamples must be >= 1 and --seqlen >= 2")
    ids = torch.tensor(tokenizer(calibration_text(spec.source), add_special_tokens=False)["input_ids"])
    if ids.numel() <= spec.seqlen:
        raise DAQError(
            f"calibration source {spec.source!r} has {ids.numel()} tokens, fewer than one block of {spec.seqlen}; "
            "give more text or a smaller --seqlen"
        )
    gen = torch.Generator().manual_seed(spec.seed)
    starts = torch.randint(0, ids.numel() - spec.seqlen, (spec.nsamples,), generator=gen)
    return torch.stack([ids[s : s + spec.seqlen] for s in starts.tolist()])
