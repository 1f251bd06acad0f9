"""The MoE families besides Mixtral in vLLM's CPU build: Qwen2-MoE (a shared expert behind a sigmoid
gate that stays float), Qwen3-MoE (q/k norms, renormalised top-k) and OLMoE (top-k weights not
renormalised). Tiny 2-layer, 4-expert, top-2 models; one engine each (30-70 s to start on 2 cores).

The oracle is transformers on the dequantized checkpoint, as in test_vllm_moe.py, which tests the
loader, tensor and expert parallelism on Mixtral.
"""

import os

import pytest
from test_vllm_moe import PROMPTS, dequantized_copy

from conftest import HAVE_VLLM, require
from helpers import make_daq_checkpoint, transformers_greedy

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the tiny model needs little
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # lets LLM.apply_model send a function

FAMILIES = ["qwen2_moe", "qwen3_moe", "olmoe"]


def expert_methods(model) -> list[str]:
    """Runs inside the vLLM worker: the quantization method of each experts layer."""
    return [type(m.quant_method).__name__ for m in model.modules() if hasattr(m, "w13_qweight")]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(family, DAQ checkpoint, transformers' greedy tokens on its dequantized copy)."""
    require(HAVE_VLLM, "vllm (vllm-cpu) is not installed")
    root = tmp_path_factory.mktemp(request.param)
    checkpoint = make_daq_checkpoint(root, arch=request.param)
    return request.param, checkpoint, transformers_greedy(dequantized_copy(checkpoint, root / "plain"), PROMPTS, 10)


def test_greedy_tokens_equal_the_dequantized_model(family):
    from vllm import LLM, SamplingParams

    _, checkpoint, oracle = family
    llm = LLM(str(checkpoint), dtype="float32", max_model_len=128, enforce_eager=True)
    try:
        assert llm.apply_model(expert_methods) == [["DAQMoEMethod"] * 2]  # both layers' experts, from the plugin
        results = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=10))
        assert [list(r.outputs[0].token_ids) for r in results] == oracle
    finally:
        llm.llm_engine.engine_core.shutdown()
