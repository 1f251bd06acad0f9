"""End to end on tiny random models: quantize, write, reload through transformers, compare logits."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import daq_vllm  # noqa: F401  (registers the transformers quantizer)
from daq_vllm.format.codebooks import get_codebook
from daq_vllm.integrations.transformers import DAQLinear
from daq_vllm.offline.pipeline import QuantizeOptions, quantize_model
from daq_vllm.offline.ranges import InitSpec, quantize_weight
from helpers import decode_from_spec, make_tiny_model, read_all

LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def fake_quant_model(src: Path, fmt: str, group_size: int, spec: InitSpec):
    """The reference: the float model with each decoder linear's weight replaced by s*c[q]+b."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    cb = get_codebook(fmt)
    for layer in model.model.layers:
        for name in LINEARS:
            lin = layer.get_submodule(name)
            qw = quantize_weight(lin.weight.data, cb, group_size, spec)
            idx = torch.arange(lin.in_features) // group_size
            lin.weight.data = cb.tensor()[qw.codes] * qw.scales.float()[:, idx] + qw.offsets.float()[:, idx]
    return model.eval()


@pytest.mark.parametrize(
    "fmt, method, g", [("fp4_e2m1", "dca", 64), ("int4", "rtn", 128), ("fp3_e2m0", "dca", 128), ("nf4", "absmax", 32)]
)
def test_quantize_write_reload_matches_fake_quant(tiny_llama, tmp_path, fmt, method, g):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "q"
    spec = InitSpec(method)
    report = quantize_model(str(tiny_llama), out, QuantizeOptions(format=fmt, group_size=g, init=spec, progress=False))
    assert report["quantized_linears"] == 14
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(model.model.layers[1].self_attn.o_proj, DAQLinear)  # GQA o_proj is quantized too
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(model.lm_head, DAQLinear)
    ids = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(ids).logits
        ref = fake_quant_model(tiny_llama, fmt, g, spec)(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_checkpoint_follows_the_written_format(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "q"
    quantize_model(str(tiny_llama), out, QuantizeOptions(format="fp3_e2m0", group_size=128, progress=False))
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "daq" and cfg["format_version"] == 1 and cfg["bits"] == 3
    assert cfg["codebook"] == list(get_codebook("fp3_e2m0").values)
    assert cfg["modules_not_converted"] == ["lm_head"]
    assert cfg["provenance"]["method"] == "dca" and cfg["provenance"]["tool"] == "daq-vllm"
    tensors = read_all(out)
    name = "model.layers.0.mlp.down_proj"  # K = 320: two full groups of 128 and a partial one of 64
    q, s, b = tensors[f"{name}.qweight"], tensors[f"{name}.scales"], tensors[f"{name}.offsets"]
    assert q.dtype == torch.int32 and q.shape == (192, 30)  # ceil(320*3/32)
    assert s.dtype == b.dtype == torch.float16 and s.shape == b.shape == (192, 3)
    assert f"{name}.weight" not in tensors and "model.embed_tokens.weight" in tensors
    decoded = decode_from_spec(q[:4].numpy(), s[:4].numpy(), b[:4].numpy(), cfg["codebook"], 3, 128, 320)
    model = AutoModelForCausalLM.from_pretrained(out)
    used = model.get_submodule(name).dequantized_weight()[:4]
    assert np.array_equal(decoded, used.numpy())


def test_shards_are_bounded_and_indexed(tiny_llama, tmp_path):
    out = tmp_path / "q"
    quantize_model(str(tiny_llama), out, QuantizeOptions(group_size=64, max_shard_bytes=100_000, progress=False))
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 3
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    assert len(read_all(out)) == len(index["weight_map"])
    assert (out / "tokenizer.json").exists() and (out / "quantization_report.json").exists()


def test_skip_and_lm_head(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "q"
    opts = QuantizeOptions(group_size=64, skip=["*.mlp.down_proj"], quantize_lm_head=True, progress=False)
    quantize_model(str(tiny_llama), out, opts)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["modules_not_converted"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model.lm_head, DAQLinear)
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear


def test_tied_lm_head_is_untied_when_quantized(tmp_path):
    from transformers import AutoModelForCausalLM

    src = make_tiny_model(tmp_path / "tied", tie_word_embeddings=True)
    out = tmp_path / "q"
    quantize_model(str(src), out, QuantizeOptions(group_size=64, quantize_lm_head=True, progress=False))
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    model = AutoModelForCausalLM.from_pretrained(out)
    emb = model.get_input_embeddings().weight
    assert isinstance(model.lm_head, DAQLinear)
    assert (model.lm_head.dequantized_weight() - emb).abs().max() < 0.05


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_other_llama_family_architectures(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    src = make_tiny_model(tmp_path / arch, arch=arch)
    out = tmp_path / "q"
    report = quantize_model(str(src), out, QuantizeOptions(group_size=64, progress=False))
    assert report["quantized_linears"] == 14
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ref = fake_quant_model(src, "fp4_e2m1", 64, InitSpec())
    ids = torch.randint(3, 250, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


def test_dense_kernel_gives_the_torch_kernels_outputs(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "q"
    quantize_model(str(tiny_llama), out, QuantizeOptions(format="int3", group_size=64, progress=False))
    layer = AutoModelForCausalLM.from_pretrained(out).model.layers[0].mlp.down_proj
    assert layer.kernel.name == "cpu"  # the default on CPU: packed weights, the C++ kernel
    layer.select_kernel(torch.float32, ["torch"])
    x = torch.randn(3, 320)
    plain = layer(x)
    layer.select_kernel(torch.float32, ["dense"])
    assert layer.kernel.name == "dense" and layer.dense_weight.shape == (192, 320)
    assert torch.equal(layer(x), plain) and torch.equal(layer(x), plain)
