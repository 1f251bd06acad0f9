"""Mixture-of-experts models: defused experts, every expert quantized, per-expert checkpoint names,
reload through transformers, few-token experts, refusals. Tiny 2-layer, 4-expert, top-2 models."""

import copy
import json
import subprocess
import sys

import pytest
import torch

import daq_vllm  # noqa: F401  (registers the transformers quantizer)
from conftest import require_cpu_kernel
from daq_vllm.errors import DAQError
from daq_vllm.experts import CALIBRATE_ALL, defuse_experts, expert_modules
from daq_vllm.format.check import check_checkpoint
from daq_vllm.integrations.transformers import DAQLinear, select_kernels
from daq_vllm.offline.calibration import CalibSpec
from daq_vllm.offline.options import recipe_options
from daq_vllm.offline.pipeline import QuantizeOptions, quantize_model
from daq_vllm.offline.ranges import InitSpec
from helpers import MOE_MODELS, WORDS, edit_shard, make_tiny_model, read_all

# checkpoint names of an expert's projections, and the module holding the experts
PROJECTIONS = {"mixtral": ("block_sparse_moe", ("w1", "w3", "w2"))}
DEFAULT_PROJECTIONS = ("mlp", ("gate_proj", "up_proj", "down_proj"))
IDS = torch.randint(3, 250, (2, 19), generator=torch.Generator().manual_seed(0))


def expert_names(arch: str, layer: int) -> list[str]:
    block, projs = PROJECTIONS.get(arch, DEFAULT_PROJECTIONS)
    return [f"model.layers.{layer}.{block}.experts.{e}.{p}" for e in range(4) for p in projs]


@pytest.fixture(scope="module")
def moe_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {arch: make_tiny_model(root / arch, arch=arch) for arch in MOE_MODELS}


def calib_file(tmp_path, words=3000):
    gen = torch.Generator().manual_seed(0)
    path = tmp_path / "calib.txt"
    path.write_text(" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (words,), generator=gen).tolist()))
    return path


@pytest.mark.parametrize("arch", list(MOE_MODELS))
def test_defused_experts_compute_what_transformers_computes(moe_sources, arch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(moe_sources[arch], dtype=torch.float32).eval()
    defused = copy.deepcopy(model)
    assert defuse_experts(defused) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    with torch.no_grad():
        ref = model(IDS).logits
        routed = defused(IDS).logits
        experts = expert_modules(defused)
        assert len(experts) == 2 and all(len(e) == 4 for e in experts.values())
        for e in experts.values():
            e.calibrate = CALIBRATE_ALL
        every = defused(IDS).logits
    torch.testing.assert_close(routed, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(every, ref, rtol=1e-5, atol=1e-6)  # all experts compute, routed outputs flow on


def test_experts_with_their_own_codebooks_compute_one_by_one_in_transformers(moe_sources, tmp_path):
    """A layer whose experts do not share one codebook per projection (not what the quantizer writes,
    but a hand-edited format could say so) keeps the per-expert path; the other layer stays fused."""
    from dataclasses import replace

    from transformers import AutoModelForCausalLM

    require_cpu_kernel()
    out = tmp_path / "q"
    quantize_model(str(moe_sources["mixtral"]), out,
                   QuantizeOptions(format="fp4_e2m1", group_size=64, init=InitSpec("dca"), progress=False))
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        fused_logits = model(IDS).logits
    first, second = expert_modules(model).values()
    down = first[2].w2
    down.fmt = replace(down.fmt, codebook=[1.5 * v for v in down.fmt.codebook])  # its codes now mean other values
    select_kernels(model)
    assert first.fused is None and second.fused is not None
    assert down.kernel is not None  # it computes with its own kernel again
    with torch.no_grad():
        assert not torch.allclose(model(IDS).logits, fused_logits, atol=1e-4)  # the edited codebook is used


@pytest.mark.parametrize("arch", list(MOE_MODELS))
def test_every_expert_is_quantized_and_reloads_as_its_fake_quant(moe_sources, arch, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "q"
    report = quantize_model(str(moe_sources[arch]), out,
                            QuantizeOptions(format="fp4_e2m1", group_size=64, init=InitSpec("dca"), progress=False))
    tensors = read_all(out)
    for layer in (0, 1):
        quantized = set(report["layers"][layer]["linears"])
        assert set(expert_names(arch, layer)) <= quantized
        for name in expert_names(arch, layer):
            assert tensors[f"{name}.qweight"].shape == (128, 16) and f"{name}.weight" not in tensors
    assert not [n for n in tensors if ".experts." in n and n.endswith(".weight")]  # none left float
    block = PROJECTIONS.get(arch, DEFAULT_PROJECTIONS)[0]
    assert tensors[f"model.layers.0.{block}.gate.weight"].dtype == torch.float32  # the router stays float
    not_converted = json.loads((out / "config.json").read_text())["quantization_config"]["modules_not_converted"]
    if arch == "qwen2_moe":  # the shared expert is quantized, its sigmoid gate is not
        assert "model.layers.0.mlp.shared_expert.down_proj.qweight" in tensors
        assert "model.layers.0.mlp.shared_expert_gate" in not_converted
    check_checkpoint(out, for_vllm=True)

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(moe_sources[arch], dtype=torch.float32).eval()
    defuse_experts(reference)
    swapped = 0
    for name, module in model.named_modules():
        if isinstance(module, DAQLinear):
            reference.get_submodule(name).weight.data = module.dequantized_weight()
            swapped += 1
    assert swapped == report["quantized_linears"]
    # On CPU the fused `cpu_moe` kernel computes each layer's experts at once, as in vLLM.
    require_cpu_kernel()
    layers = expert_modules(model).values()
    assert len(layers) == 2 and all(e.fused is not None for e in layers)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, reference(IDS).logits, rtol=1e-5, atol=1e-5)
    select_kernels(model, "torch")  # a forced dense kernel computes every expert projection itself
    assert all(e.fused is None for e in layers)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, reference(IDS).logits, rtol=1e-5, atol=1e-5)


def test_calibrated_experts_report_their_tokens_and_fall_back_below_the_threshold(moe_sources, tmp_path):
    calib = CalibSpec(str(calib_file(tmp_path)), nsamples=4, seqlen=64)

    def run(out, **moe):
        opts = recipe_options("daq", "gptq", format="nf4", group_size=64, calib=calib, progress=False, **moe)
        return quantize_model(str(moe_sources["mixtral"]), tmp_path / out, opts)

    routed = run("routed", moe_calibration="routed", moe_min_token_share=0.0)
    entries = {n: e for n in (0, 1) for n, e in routed["layers"][n]["linears"].items() if ".experts." in n}
    assert len(entries) == 2 * 12
    per_layer = [sum(routed["layers"][i]["linears"][f"{n[:-2]}w1"]["tokens"]
                     for n in expert_names("mixtral", i)[::3]) for i in (0, 1)]
    assert per_layer == [4 * 64 * 2] * 2  # top-2: every token reaches two experts
    assert all(e["calibrated"] and e["full_loss"][1] <= e["full_loss"][0] for e in entries.values())

    starved = run("starved", moe_calibration="routed", moe_min_token_share=0.99)  # no expert has 99% of them
    entries = [e for n in (0, 1) for name, e in starved["layers"][n]["linears"].items() if ".experts." in name]
    assert entries and all(e["calibrated"] is False and "ldra_loss" not in e for e in entries)
    assert starved["layers"][0]["linears"]["model.layers.0.self_attn.q_proj"]["ldra_loss"]  # the rest calibrate

    every = run("all", moe_calibration="all", moe_min_token_share=0.99)
    entries = [e for n in (0, 1) for name, e in every["layers"][n]["linears"].items() if ".experts." in name]
    assert all(e["calibrated"] and e["tokens"] == 4 * 64 for e in entries)  # every expert saw every token


def test_auto_format_gives_a_layers_experts_one_codebook_per_fused_projection(moe_sources, tmp_path):
    calib = CalibSpec(str(calib_file(tmp_path)), nsamples=2, seqlen=64)
    opts = recipe_options("daq", "nearest", format="auto", formats=("nf4", "int4"), group_size=64, calib=calib,
                          progress=False)
    report = quantize_model(str(moe_sources["qwen3_moe"]), tmp_path / "q", opts)
    for layer in (0, 1):
        linears = report["layers"][layer]["linears"]
        names = expert_names("qwen3_moe", layer)
        gate_up = {linears[n]["format"] for n in names if not n.endswith("down_proj")}
        down = {linears[n]["format"] for n in names if n.endswith("down_proj")}
        assert len(gate_up) == 1 and len(down) == 1


def test_a_missing_expert_is_named_by_the_checkpoint_check(moe_sources, tmp_path):
    out = tmp_path / "q"
    quantize_model(str(moe_sources["mixtral"]), out,
                   QuantizeOptions(format="fp4_e2m1", group_size=64, init=InitSpec("dca"), progress=False))
    for layer in (0, 1):  # the same expert gone from every layer: only the expert count tells
        name = f"model.layers.{layer}.block_sparse_moe.experts.3.w2"
        edit_shard(out, f"{name}.qweight",
                   lambda t, n=name: [t.pop(f"{n}.{s}") for s in ("qweight", "scales", "offsets")])
    with pytest.raises(DAQError, match=r"missing tensor model\.layers\.0\.block_sparse_moe\.experts\.3\.w2\.qweight "
                                       r"\(expert 3 of 4"):
        check_checkpoint(out)


def test_skipping_some_experts_of_a_layer_is_refused(moe_sources, tmp_path):
    opts = QuantizeOptions(format="fp4_e2m1", group_size=64, init=InitSpec("dca"), progress=False,
                           skip=["block_sparse_moe.experts.1.*"])
    with pytest.raises(DAQError, match=r"--skip matches .*experts\.1\.w1 but not every projection of "
                                       r"model\.layers\.0\.block_sparse_moe\.experts"):
        quantize_model(str(moe_sources["mixtral"]), tmp_path / "q", opts)
    opts.skip = ["*.experts.*"]  # all or none is fine: vLLM then runs the experts unquantized
    report = quantize_model(str(moe_sources["mixtral"]), tmp_path / "q", opts)
    assert not [n for e in report["layers"] for n in e["linears"] if ".experts." in n]


def test_unmappable_experts_end_with_one_line(tmp_path):
    src = make_tiny_model(tmp_path / "granite", arch="granitemoe", hidden_size=128, intermediate_size=128,
                          num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    proc = subprocess.run([sys.executable, "-m", "daq_vllm.cli", "quantize", str(src), "--method", "dca",
                           "--out", str(tmp_path / "q")], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "GraniteMoeForCausalLM" in lines[0], proc.stderr
    assert "model.layers.0.block_sparse_moe.experts" in lines[0]
    assert not (tmp_path / "q").exists()


def test_asymmetric_calibration_of_experts_is_refused(moe_sources, tmp_path):
    opts = recipe_options("daq", format="fp4_e2m1", group_size=64, progress=False, asymmetric=0.25)
    with pytest.raises(DAQError, match=r"--asymmetric cannot calibrate the experts of MixtralForCausalLM"):
        quantize_model(str(moe_sources["mixtral"]), tmp_path / "q", opts)
    assert not (tmp_path / "q").exists()
