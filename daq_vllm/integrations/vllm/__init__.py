"""vLLM plugin entry point (`vllm.general_plugins`): registers the `daq` quantization method.

vLLM loads general plugins in every process it starts (API server, engine core, each
tensor-parallel worker), so `register()` is idempotent. The method is then picked from
`quant_method: "daq"` in config.json, or by `--quantization daq`. Importing this module does not
import vllm; `register()` does.
"""

from __future__ import annotations

from ...format import QUANT_METHOD


def register() -> None:
    """Register `DAQConfig` with vLLM (idempotent)."""
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, register_quantization_config

    from .config import DAQConfig

    if QUANT_METHOD not in QUANTIZATION_METHODS:
        register_quantization_config(QUANT_METHOD)(DAQConfig)
