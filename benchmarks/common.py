"""Shared set-up for the benchmarks: the SmolLM2 float checkpoint and the WikiText-2 test tokens."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from daq_vllm.demo.smollm2 import export_float_checkpoint, smollm2_gguf

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
CACHE = ROOT / ".cache"


def smollm2_float_dir() -> Path:
    """SmolLM2-135M as a float32 HF directory, exported once from the packaged GGUF."""
    return export_float_checkpoint(smollm2_gguf(), CACHE / "smollm2-135m-fp32")


def machine() -> str:
    return f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def write_results(name: str, payload: dict, markdown: str, directory: Path = RESULTS) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (directory / f"{name}.md").write_text(markdown)
