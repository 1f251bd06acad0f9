"""Open what a user points at: a model directory or a .gguf file, with one-line errors.

A leaf shared by the quantizer (`offline.model_source`) and evaluation (`eval.loading`): both
accept the same inputs and should refuse bad ones with the same words.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import DAQError

_WHAT = "pass a Hugging Face model directory or a .gguf file"


def resolve_model_path(path: str | Path) -> Path:
    """The path as given, once it is an existing .gguf file or a directory with a config.json."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DAQError(f"model path {p} does not exist; {_WHAT}")
    if p.is_file() and p.suffix != ".gguf":
        raise DAQError(f"{p} is not a model: {_WHAT}")
    if p.is_dir() and not (p / "config.json").is_file():
        raise DAQError(f"{p} is not a model directory (no config.json); {_WHAT}")
    return p


def strip_gguf_marker(model: torch.nn.Module) -> None:
    """A GGUF-loaded model carries a 'quantized' marker that makes save_pretrained refuse it."""
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_gguf(path: Path, dtype: torch.dtype = torch.float32):
    """`(model, tokenizer)` from a .gguf file, dequantized by transformers (float32 by default:
    float16 does not represent the dequantized GGUF values exactly)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        raise DAQError(f"cannot read GGUF file {path}: {str(e).splitlines()[0]}") from None
    strip_gguf_marker(model)
    return model, tokenizer
