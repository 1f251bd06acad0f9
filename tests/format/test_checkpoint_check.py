"""The pre-flight check names the first bad tensor or field of a corrupt checkpoint (no vLLM needed)."""

import json
import shutil
from pathlib import Path

import pytest

from daq_vllm.errors import DAQError
from daq_vllm.format.check import check_checkpoint
from helpers import edit_quant_config, edit_shard

MODULE = "model.layers.1.self_attn.k_proj"


@pytest.fixture(scope="module")
def daq_dir(tmp_path_factory) -> Path:
    from daq_vllm.offline.pipeline import QuantizeOptions, quantize_model
    from daq_vllm.offline.ranges import InitSpec
    from helpers import make_tiny_model

    root = tmp_path_factory.mktemp("check")
    src = make_tiny_model(root / "src")
    out = root / "daq"
    quantize_model(str(src), out, QuantizeOptions(format="fp4_e2m1", group_size=64, init=InitSpec("rtn"),
                                                  skip=["model.layers.0.mlp.down_proj"], progress=False))
    return out


@pytest.fixture
def copy(daq_dir, tmp_path) -> Path:
    return Path(shutil.copytree(daq_dir, tmp_path / "ckpt"))


def edit_tensors(directory: Path, edit) -> None:
    edit_shard(directory, f"{MODULE}.qweight", edit)


def test_a_good_checkpoint_passes(daq_dir):
    fmt = check_checkpoint(daq_dir, for_vllm=True)
    assert (fmt.bits, fmt.group_size) == (4, 64)
    assert "model.layers.0.mlp.down_proj" in fmt.modules_not_converted  # skipped in one layer only: fine


def test_missing_tensor_is_named(copy):
    edit_tensors(copy, lambda t: t.pop(f"{MODULE}.scales"))
    with pytest.raises(DAQError, match=rf"missing tensor {MODULE}\.scales"):
        check_checkpoint(copy)


def test_missing_module_in_one_layer_is_named(copy):
    edit_tensors(copy, lambda t: [t.pop(f"{MODULE}.{s}") for s in ("qweight", "scales", "offsets")])
    with pytest.raises(DAQError, match=rf"missing tensor {MODULE}\.qweight \(layer 1 of 2"):
        check_checkpoint(copy)


def test_tensor_listed_in_index_but_not_in_shard_is_named(copy):
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.1.mlp.up_proj.scales_extra"] = index["weight_map"][f"{MODULE}.qweight"]
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(DAQError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.scales_extra \(the index"):
        check_checkpoint(copy)


def test_wrong_shape_is_named(copy):
    def shrink(t):
        t[f"{MODULE}.qweight"] = t[f"{MODULE}.qweight"][:, :-1].contiguous()

    edit_tensors(copy, shrink)
    with pytest.raises(DAQError, match=rf"tensor {MODULE}\.qweight has shape \[64, 23\], expected \[64, 24\]"):
        check_checkpoint(copy)


def test_wrong_dtype_is_named(copy):
    edit_tensors(copy, lambda t: t.update({f"{MODULE}.scales": t[f"{MODULE}.scales"].float()}))
    with pytest.raises(DAQError, match=rf"tensor {MODULE}\.scales is F32"):
        check_checkpoint(copy)


@pytest.mark.parametrize("fields, message", [
    ({"format_version": 3}, r"quantization_config\.format_version 3 is not supported"),
    ({"codebook": [0.0] * 8}, r"quantization_config\.codebook must be a list of 16"),
    ({"bits": 5}, r"quantization_config\.bits 5 is not supported"),
    ({"group_size": 48}, r"quantization_config\.group_size 48 is not supported"),
])
def test_bad_config_field_is_named(copy, fields, message):
    edit_quant_config(copy, **fields)
    with pytest.raises(DAQError, match=message):
        check_checkpoint(copy)


def test_not_converted_but_quantized_is_named(copy):
    edit_quant_config(copy, modules_not_converted=[MODULE])
    with pytest.raises(DAQError,
                       match=rf"modules_not_converted lists {MODULE}, but the checkpoint stores it quantized"):
        check_checkpoint(copy)


def test_not_a_daq_checkpoint(tmp_path, tiny_llama):
    with pytest.raises(DAQError, match=r"is not a DAQ checkpoint"):
        check_checkpoint(tiny_llama)
    with pytest.raises(DAQError, match=r"no config\.json"):
        check_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(DAQError, match=r"is not valid JSON"):
        check_checkpoint(tmp_path)


def test_missing_shard_file_is_named(copy):
    shard = json.loads((copy / "model.safetensors.index.json").read_text())["weight_map"][f"{MODULE}.qweight"]
    (copy / shard).unlink()
    with pytest.raises(DAQError, match=rf"missing the file {shard}"):
        check_checkpoint(copy)


def test_quantized_lm_head_is_refused_for_vllm_only(tmp_path):
    from daq_vllm.offline.pipeline import QuantizeOptions, quantize_model
    from daq_vllm.offline.ranges import InitSpec
    from helpers import make_tiny_model

    src = make_tiny_model(tmp_path / "src")
    quantize_model(str(src), tmp_path / "daq",
                   QuantizeOptions(group_size=64, init=InitSpec("rtn"), quantize_lm_head=True, progress=False))
    check_checkpoint(tmp_path / "daq")
    with pytest.raises(DAQError, match=r"quantized lm_head.*without --quantize-lm-head"):
        check_checkpoint(tmp_path / "daq", for_vllm=True)


def test_module_format_of_a_module_not_stored_quantized_is_named(copy):
    from daq_vllm.format.codebooks import get_codebook

    edit_quant_config(copy, format_version=2, module_formats={"model.layers.0.mlp.down_proj": "int4"},
                      codebooks={"int4": list(get_codebook("int4").values)})
    with pytest.raises(DAQError, match=r"module_formats names model\.layers\.0\.mlp\.down_proj, which the "
                                       r"checkpoint does not store quantized"):
        check_checkpoint(copy)
