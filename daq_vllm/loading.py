"""`daq_vllm.load`: one call that opens a DAQ checkpoint, a full-precision directory or a .gguf file."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import DAQError


def _describe_load_error(path: Path, e: Exception) -> DAQError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return DAQError(f"cannot load {path}: {first}")


def strip_gguf_marker(model: torch.nn.Module) -> None:
    """A GGUF-loaded model carries a 'quantized' marker that makes save_pretrained refuse it."""
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load(path: str | Path, dtype: torch.dtype | None = None, device: str = "cpu"):
    """Return `(model, tokenizer)` for a model directory (DAQ or not) or a .gguf file, in eval mode.

    DAQ checkpoints load through transformers' quantizer registry (registered on `import daq_vllm`):
    their linears become `DAQLinear` modules holding the packed tensors. `dtype` defaults to the
    checkpoint's own (float32 for GGUF files).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path).expanduser()
    if not p.exists():
        raise DAQError(f"model path {p} does not exist; pass a model directory or a .gguf file")
    try:
        if p.is_file():
            if p.suffix != ".gguf":
                raise DAQError(f"{p} is not a model: pass a model directory or a .gguf file")
            tokenizer = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
            model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=dtype or torch.float32)
            strip_gguf_marker(model)
        else:
            if not (p / "config.json").is_file():
                raise DAQError(f"{p} is not a model directory (no config.json)")
            json.loads((p / "config.json").read_text())  # a clear error for a corrupt config
            tokenizer = AutoTokenizer.from_pretrained(p)
            model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype or "auto")
    except DAQError:
        raise
    except (ValueError, KeyError, OSError, RuntimeError, json.JSONDecodeError) as e:
        raise _describe_load_error(p, e) from None
    return model.to(device).eval(), tokenizer
