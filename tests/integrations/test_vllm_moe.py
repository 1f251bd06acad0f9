"""DAQ mixture-of-experts checkpoints in vLLM's CPU build: a tiny 2-layer Mixtral (4 experts, top-2).

The oracle is plain transformers on the *dequantized* checkpoint (every DAQ linear decoded to a
float weight by the reference decoder), so it shares no code with the plugin's MoE path. vLLM runs
it three ways, one engine at a time (30-70 s to start each on 2 cores): TP=1, TP=2 (each rank holds
half of every expert's intermediate features) and TP=2 with expert parallelism (each rank holds
two whole experts). The method itself (loader checks, custom op under a fullgraph trace) is tested
without an engine, against the kernel layer's `moe_reference`.
"""

import json
import os
import re
import shutil
import time
from types import SimpleNamespace

import pytest
import torch

from conftest import HAVE_VLLM, require
from helpers import edit_shard, make_daq_checkpoint, read_all, transformers_greedy

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the tiny model needs little
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # lets LLM.apply_model send a function

PROMPTS = ["w1 w2 w3 w4", "w10 w20 w30", "w7", "w200 w100 w50 w25 w12"]
EXPERTS = "model.layers.{}.block_sparse_moe.experts"
ENGINES = {  # engine arguments; a parametrized module fixture runs one at a time
    "tp1": {},
    "tp2": dict(tensor_parallel_size=2),
    "tp2-ep": dict(tensor_parallel_size=2, enable_expert_parallel=True),
}


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    require(HAVE_VLLM, "vllm (vllm-cpu) is not installed")
    return make_daq_checkpoint(tmp_path_factory.mktemp("moe"), arch="mixtral")


def dequantized_copy(checkpoint, out):
    """`checkpoint` as a plain transformers checkpoint: each DAQ linear decoded to `<module>.weight` (float32)."""
    from safetensors.torch import save_file

    from daq_vllm.format import DAQFormat
    from daq_vllm.kernels import dequantize

    config = json.loads((checkpoint / "config.json").read_text())
    fmt = DAQFormat.from_dict(config.pop("quantization_config"))
    tensors = read_all(checkpoint)
    for name in [n for n in tensors if n.endswith(".qweight")]:
        module = name.removesuffix(".qweight")
        qweight, scales, offsets = (tensors.pop(f"{module}.{t}") for t in ("qweight", "scales", "offsets"))
        view = fmt.for_module(module)
        k = qweight.shape[1] * 32 // view.bits  # every K of this model fills its last word
        tensors[f"{module}.weight"] = dequantize(qweight, scales, offsets, torch.tensor(view.codebook), view.bits,
                                                 view.group_size, k).contiguous()
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config))
    for f in checkpoint.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def oracle(moe_checkpoint, tmp_path_factory):
    """Greedy tokens of transformers on the dequantized checkpoint."""
    plain = dequantized_copy(moe_checkpoint, tmp_path_factory.mktemp("dequantized") / "model")
    return transformers_greedy(plain, PROMPTS, 10)


@pytest.fixture(scope="module", params=list(ENGINES))
def engine(request, moe_checkpoint):
    from vllm import LLM

    kwargs = ENGINES[request.param]
    saved = dict(os.environ)
    if kwargs.get("tensor_parallel_size", 1) > 1:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"  # one core per worker
    start = time.monotonic()
    try:
        llm = LLM(str(moe_checkpoint), dtype="float32", max_model_len=128, enforce_eager=True, **kwargs)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    print(f"\nengine {request.param} started in {time.monotonic() - start:.0f} s")
    yield request.param, llm
    llm.llm_engine.engine_core.shutdown()


def test_greedy_tokens_equal_the_dequantized_model(engine, oracle):
    from vllm import SamplingParams

    _, llm = engine
    assert llm.llm_engine.vllm_config.model_config.quantization == "daq"  # read from config.json
    results = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=10))
    assert [list(r.outputs[0].token_ids) for r in results] == oracle


def test_daq_transformers_loading_gives_the_oracles_tokens(moe_checkpoint, oracle):
    """The same checkpoint through daq-vllm's transformers loader (per-expert DAQ linears): vLLM's tokens
    above equal transformers' on the DAQ checkpoint itself, not only on its dequantized copy."""
    assert transformers_greedy(moe_checkpoint, PROMPTS, 10) == oracle


def expert_layers(model) -> dict[str, str]:
    """Runs inside each vLLM worker: per experts layer, its method, kernel and packed shapes (as text, which
    survives the trip back unchanged). The shapes are the kernel's spec, which `prepare` checked the loaded
    tensors against: a kernel that owns its weights has freed them since."""
    def describe(m) -> str:
        shapes = m.quant_method.kernel.spec.shapes()
        return (f"{type(m.quant_method).__name__} {m.quant_method.kernel.name} w13 {list(shapes['w13_qweight'])} "
                f"w2 {list(shapes['w2_qweight'])}")

    return {name: describe(m) for name, m in model.named_modules() if hasattr(m, "w13_qweight")}


def test_each_rank_holds_its_share_of_the_experts(engine):
    name, llm = engine
    # [experts, N, int32 words of K]: H = I = 128 at 4 bits is 16 words; TP halves I, EP halves the experts
    w13, w2 = {"tp1": ([4, 256, 16], [4, 128, 16]), "tp2": ([4, 128, 16], [4, 128, 8]),
               "tp2-ep": ([2, 256, 16], [2, 128, 16])}[name]
    per_rank = llm.apply_model(expert_layers)
    assert len(per_rank) == ENGINES[name].get("tensor_parallel_size", 1)
    for layers in per_rank:
        assert layers == {f"{EXPERTS.format(i)}.routed_experts": f"DAQMoEMethod cpu_moe w13 {w13} w2 {w2}"
                          for i in range(2)}


def drop_scales(t):
    del t[f"{EXPERTS.format(1)}.2.w2.scales"]


def drop_expert_projection(t):
    for suffix in ("qweight", "scales", "offsets"):
        del t[f"{EXPERTS.format(0)}.3.w3.{suffix}"]


@pytest.mark.parametrize("corrupt, missing", [
    (drop_scales, f"{EXPERTS.format(1)}.2.w2.scales"),
    (drop_expert_projection, f"{EXPERTS.format(0)}.3.w3.qweight"),
], ids=["missing-scales", "missing-projection"])
def test_missing_expert_tensor_fails_at_start_naming_it(moe_checkpoint, tmp_path, corrupt, missing):
    """The pre-flight check (format/check.py) fails in the starting process, before any engine is spawned."""
    from vllm import LLM

    bad = tmp_path / "bad"
    shutil.copytree(moe_checkpoint, bad)
    edit_shard(bad, f"{EXPERTS.format(0)}.0.w1.qweight", corrupt)
    start = time.monotonic()
    with pytest.raises(Exception, match=re.escape(f"missing tensor {missing}")):
        LLM(str(bad), dtype="float32", max_model_len=128, enforce_eager=True)
    assert time.monotonic() - start < 30


# --- DAQMoEMethod without an engine -------------------------------------------------------------------------------


class FakeRoutedExperts(torch.nn.Module):
    """What DAQMoEMethod reads of vLLM's RoutedExperts (Mixtral's names, all experts local)."""

    ckpt_gate_proj_name, ckpt_up_proj_name, ckpt_down_proj_name = "w1", "w3", "w2"
    apply_router_weight_on_input = False
    expert_map = None

    def __init__(self, num_experts: int):
        super().__init__()
        self.expert_map_manager = SimpleNamespace(get_local_expert_ids=lambda: list(range(num_experts)))


def vllm_like_loader(param, loaded_weight, weight_name, shard_id, expert_id, return_success=False):
    """vLLM's expert loader at TP=1: gate into the first half of w13, up into the second, down whole."""
    dest = param.data[expert_id]
    if shard_id != "w2":
        half = dest.shape[0] // 2
        dest = dest[:half] if shard_id == "w1" else dest[half:]
    dest.copy_(loaded_weight)
    return True if return_success else None


@pytest.fixture(scope="module")
def layer0_tensors(moe_checkpoint):
    """Layer 0's expert tensors and its format view."""
    from daq_vllm.format import DAQFormat

    config = json.loads((moe_checkpoint / "config.json").read_text())
    fmt = DAQFormat.from_dict(config["quantization_config"]).for_module(f"{EXPERTS.format(0)}.0.w1")
    prefix = EXPERTS.format(0)
    return fmt, {n: t for n, t in read_all(moe_checkpoint).items() if n.startswith(prefix + ".")}


def method_and_layer(fmt, intermediate=128, activation=None):
    from vllm.model_executor.layers.fused_moe import MoEActivation

    from daq_vllm.integrations.vllm.moe import DAQMoEMethod

    moe = SimpleNamespace(intermediate_size=128, activation=activation or MoEActivation.SILU)
    method, layer = DAQMoEMethod(moe, fmt, fmt, EXPERTS.format(0)), FakeRoutedExperts(4)
    layer.quant_method = method
    method.create_weights(layer, num_experts=4, hidden_size=128, intermediate_size_per_partition=intermediate,
                          params_dtype=torch.float32, weight_loader=vllm_like_loader)
    return method, layer


def load(layer, tensors, skip=()):
    """Feed checkpoint tensors to the layer's parameter loaders, as vLLM's RoutedExperts.load_weights does."""
    stems = {"w1": "w13", "w3": "w13", "w2": "w2"}
    for name, tensor in tensors.items():
        if name in skip:
            continue
        expert, shard, suffix = name.split(".")[-3:]
        param = getattr(layer, f"{stems[shard]}_{suffix}")
        assert param.weight_loader(param, tensor, f"w13_{suffix}", shard, int(expert), return_success=True)


def test_custom_op_equals_the_reference_and_traces_in_one_graph(layer0_tensors):
    """vLLM's CPU build traces `apply` with Dynamo (fullgraph); the CPU kernels group the routed tokens on
    the host (`loop` with a host sync), so `apply` must be one opaque op to the trace."""
    require(HAVE_VLLM, "vllm (vllm-cpu) is not installed")
    from daq_vllm.kernels import moe_reference

    fmt, tensors = layer0_tensors
    method, layer = method_and_layer(fmt)
    load(layer, tensors)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 128, generator=gen)
    topk_weights, topk_ids = torch.randn(6, 4, generator=gen).softmax(-1).topk(2)
    want = moe_reference(method.kernel.spec, layer, x, topk_weights, topk_ids)  # before the kernel frees them
    method.process_weights_after_loading(layer)

    def apply(x, w, ids):
        return method.apply(layer, x, w, ids, None, None)

    torch.testing.assert_close(apply(x, topk_weights, topk_ids), want, rtol=1e-5, atol=1e-5)
    traced = torch.compile(apply, fullgraph=True, backend="eager")
    torch.testing.assert_close(traced(x, topk_weights, topk_ids), want, rtol=1e-5, atol=1e-5)


def test_loader_names_a_tensor_that_does_not_fit(layer0_tensors):
    require(HAVE_VLLM, "vllm (vllm-cpu) is not installed")
    fmt, tensors = layer0_tensors
    _, layer = method_and_layer(fmt)
    name = f"{EXPERTS.format(0)}.1.w2.scales"
    with pytest.raises(ValueError, match=re.escape(f"cannot load tensor {name}: the checkpoint holds float16 "
                                                   "[128, 1], expected float16 [128, 2]")):
        load(layer, {name: tensors[name][:, :1]})


def test_an_expert_tensor_never_loaded_is_named_after_loading(layer0_tensors):
    """The in-engine guard for checkpoints the pre-flight check does not see (not a local directory)."""
    require(HAVE_VLLM, "vllm (vllm-cpu) is not installed")
    fmt, tensors = layer0_tensors
    method, layer = method_and_layer(fmt)
    missing = f"{EXPERTS.format(0)}.2.w3.offsets"
    load(layer, tensors, skip={missing})
    with pytest.raises(ValueError, match=re.escape(f"checkpoint is missing tensor {missing} ")):
        method.process_weights_after_loading(layer)


def test_tensor_parallel_shard_that_cuts_a_group_is_refused(layer0_tensors):
    require(HAVE_VLLM, "vllm (vllm-cpu) is not installed")
    fmt, _ = layer0_tensors
    with pytest.raises(ValueError, match=re.escape("a tensor-parallel shard of 32 of the 128 expert intermediate "
                                                   f"features of {EXPERTS.format(0)} cuts a group of 64")):
        method_and_layer(fmt, intermediate=32)


def test_activation_other_than_silu_is_refused(layer0_tensors):
    require(HAVE_VLLM, "vllm (vllm-cpu) is not installed")
    from vllm.model_executor.layers.fused_moe import MoEActivation

    fmt, _ = layer0_tensors
    with pytest.raises(ValueError, match=r"use the activation 'gelu'; the DAQ MoE method supports silu"):
        method_and_layer(fmt, activation=MoEActivation.GELU)


# --- DAQConfig: which experts layers are quantized, with which codebooks ------------------------------------------


def daq_config(not_converted=(), module_formats=None):
    from daq_vllm.format import DAQFormat, get_codebook
    from daq_vllm.integrations.vllm.config import DAQConfig

    fp4, int4 = get_codebook("fp4_e2m1"), get_codebook("int4")
    mixed = dict(format_version=2, module_formats=module_formats, codebooks={"int4": list(int4.values)})
    fmt = DAQFormat(format="fp4_e2m1", bits=4, group_size=64, codebook=list(fp4.values),
                    modules_not_converted=list(not_converted), **(mixed if module_formats else {}))
    return DAQConfig(fmt)


def formats(config):
    return config.experts_formats(EXPERTS.format(0), 4, "w1", "w3", "w2")


def test_experts_formats_give_one_codebook_for_gate_up_and_one_for_down():
    require(HAVE_VLLM, "vllm (vllm-cpu) is not installed")
    gate_up, down = formats(daq_config(module_formats={f"{EXPERTS.format(0)}.{e}.w2": "int4" for e in range(4)}))
    assert (gate_up.format, down.format) == ("fp4_e2m1", "int4")
    assert down.codebook == [float(i) for i in range(16)]


def test_experts_all_not_converted_stay_unquantized_and_some_are_refused():
    require(HAVE_VLLM, "vllm (vllm-cpu) is not installed")
    assert formats(daq_config(not_converted=[EXPERTS.format(0)])) is None  # a parent covers every expert
    assert formats(daq_config(not_converted=["model.layers.0"])) is None
    assert formats(daq_config(not_converted=["model.layers.1"])) is not None
    experts = EXPERTS.format(0)
    with pytest.raises(ValueError, match=re.escape(f"modules_not_converted lists {experts}.2.w1 (3 of the 12 expert "
                                                   f"projections of {experts}) but not {experts}.0.w1;")):
        formats(daq_config(not_converted=[f"{experts}.2"]))


def test_experts_with_different_codebooks_are_refused():
    require(HAVE_VLLM, "vllm (vllm-cpu) is not installed")
    experts = EXPERTS.format(0)
    message = f"the gate/up projections of the experts of {experts} have different codebooks ({experts}.0.w1 " \
              f"fp4_e2m1, {experts}.1.w3 int4)"
    with pytest.raises(ValueError, match=re.escape(message)):
        formats(daq_config(module_formats={f"{experts}.1.w3": "int4"}))


def test_routers_stay_unquantized():
    """Qwen3-MoE hands its router (a GateLinear) the quantization config; DAQ keeps routers in full precision."""
    require(HAVE_VLLM, "vllm (vllm-cpu) is not installed")
    from vllm.model_executor.layers.fused_moe import GateLinear
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    router = GateLinear.__new__(GateLinear)  # dispatch only: building one needs a distributed context
    assert isinstance(daq_config().get_quant_method(router, "model.layers.0.mlp.gate"), UnquantizedLinearMethod)
