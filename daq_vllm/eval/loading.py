"""`daq_vllm.load`: one call that opens a DAQ checkpoint, a full-precision directory or a .gguf file."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import DAQError, describe
from ..integrations.transformers import select_kernels
from ..model_files import load_gguf, resolve_model_path


def load(
    path: str | Path, dtype: torch.dtype | None = None, device: str = "cpu", kernel: str | None = None,
    revision: str | None = None,
):
    """Return `(model, tokenizer)` for a model directory (DAQ or not), a .gguf file or a Hugging Face
    Hub model ID (at `revision`; read from the Hub cache or downloaded), in eval mode.

    DAQ checkpoints load through transformers' quantizer registry (registered on `import daq_vllm`):
    their linears become `DAQLinear` modules holding the packed tensors. Their kernel is chosen for
    `device` once the model is there (on CPU the `cpu` kernel, whose prefill path makes evaluation as
    fast as fp32 at packed memory); `kernel` names a preferred one (e.g. `dense`: dequantized once,
    at full-precision memory). `dtype` defaults to the checkpoint's own (float32
    for GGUF files).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = resolve_model_path(path, revision)
    if p.is_file():
        model, tokenizer = load_gguf(p, dtype or torch.float32)
    else:
        try:
            json.loads((p / "config.json").read_text())  # a clear error for a corrupt config
            tokenizer = AutoTokenizer.from_pretrained(p)
            model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype or "auto")
        except DAQError:
            raise
        except (ValueError, KeyError, OSError, RuntimeError) as e:
            raise DAQError(f"cannot load {p}: {describe(e)}") from None
    model = model.to(device).eval()
    select_kernels(model, kernel)
    return model, tokenizer
