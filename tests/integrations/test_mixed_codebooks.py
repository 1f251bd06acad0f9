"""A checkpoint that mixes codebooks (`--format auto`) in vLLM-CPU: greedy tokens equal transformers',
every layer computes with its own codebook, and fused parts with different codebooks are refused."""

import os

import pytest

from conftest import HAVE_VLLM, require
from mixed_checkpoint import make_mixed_checkpoint

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the tiny model needs little
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # lets LLM.apply_model send a function

PROMPTS = ["w1 w2 w3 w4", "w10 w20 w30", "w200 w100 w50 w25 w12"]


def layer_codebooks(model) -> dict[str, tuple[float, ...]]:
    """Runs inside the vLLM worker: each DAQ layer's codebook, as its kernel computes with it."""
    return {name: tuple(m.codebook.tolist()) for name, m in model.named_modules() if hasattr(m, "codebook")}


def test_mixed_codebooks_serve_with_greedy_tokens_equal_transformers(tmp_path):
    require(HAVE_VLLM, "vllm (vllm-cpu) is not installed")
    import json

    from vllm import LLM, SamplingParams

    from helpers import transformers_greedy

    checkpoint = make_mixed_checkpoint(tmp_path)
    cfg = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    assert cfg["format_version"] == 2
    llm = LLM(str(checkpoint), dtype="float32", max_model_len=128, enforce_eager=True)
    try:
        results = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=10))
        codebooks = llm.apply_model(layer_codebooks)[0]
    finally:
        llm.llm_engine.engine_core.shutdown()
    values = {cfg["format"]: cfg["codebook"], **cfg["codebooks"]}
    for i in range(2):
        layer = f"model.layers.{i}"
        for fused, part in (("self_attn.qkv_proj", "self_attn.q_proj"), ("mlp.gate_up_proj", "mlp.gate_proj"),
                            ("self_attn.o_proj", "self_attn.o_proj"), ("mlp.down_proj", "mlp.down_proj")):
            want = values[cfg["module_formats"].get(f"{layer}.{part}", cfg["format"])]
            assert list(codebooks[f"{layer}.{fused}"]) == pytest.approx(want), fused
    got = [list(r.outputs[0].token_ids) for r in results]
    assert got == transformers_greedy(checkpoint, PROMPTS, 10)


def test_fused_parts_with_different_codebooks_are_refused():
    require(HAVE_VLLM, "vllm (vllm-cpu) is not installed")
    from daq_vllm.format import DAQFormat
    from daq_vllm.format.codebooks import get_codebook
    from daq_vllm.integrations.vllm.config import DAQConfig

    attn = "model.layers.0.self_attn"
    fmt = DAQFormat(format="nf4", bits=4, group_size=64, codebook=list(get_codebook("nf4").values),
                    format_version=2, module_formats={f"{attn}.k_proj": "int4", f"{attn}.o_proj": "int4"},
                    codebooks={"int4": list(get_codebook("int4").values)})
    cfg = DAQConfig(fmt)
    cfg.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    assert cfg.layer_format(f"{attn}.o_proj").codebook == list(get_codebook("int4").values)
    assert cfg.layer_format("model.layers.1.self_attn.qkv_proj").format == "nf4"
    with pytest.raises(ValueError, match=rf"the parts of {attn}\.qkv_proj, which vLLM fuses into one layer, have "
                                         rf"different codebooks \({attn}\.q_proj nf4, {attn}\.k_proj int4, "):
        cfg.layer_format(f"{attn}.qkv_proj")
