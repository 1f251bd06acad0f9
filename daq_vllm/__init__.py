"""daq-vllm: DAQ weight-only quantization, its checkpoint format, and serving in vLLM.

Importing this package registers the `daq` quant method with transformers, so
`AutoModelForCausalLM.from_pretrained(DIR)` loads DAQ checkpoints. It never imports vllm.
"""

__version__ = "0.1.0"

from .errors import DAQError  # noqa: E402
from .eval.loading import load  # noqa: E402
from .format import DAQFormat  # noqa: E402
from .integrations.transformers import register as _register_with_transformers  # noqa: E402

_register_with_transformers()

__all__ = ["DAQError", "DAQFormat", "__version__", "load"]
