import pytest

from daq_vllm.errors import DAQError
from daq_vllm.format import DAQFormat
from daq_vllm.format.codebooks import get_codebook


def valid() -> dict:
    cb = get_codebook("fp4_e2m1")
    return {"quant_method": "daq", "format_version": 1, "format": cb.name, "bits": 4, "group_size": 64,
            "codebook": list(cb.values), "modules_not_converted": ["lm_head"]}


def test_round_trip():
    fmt = DAQFormat.from_dict(valid())
    assert DAQFormat.from_dict(fmt.to_dict()) == fmt
    assert fmt.bits_per_weight == 4.5


@pytest.mark.parametrize(
    "change, field",
    [
        ({"format_version": 9}, "format_version"),
        ({"bits": 5}, "bits"),
        ({"group_size": 100}, "group_size"),
        ({"codebook": [0.0] * 8}, "codebook"),
        ({"codebook": [float("nan")] * 16}, "codebook"),
        ({"quant_method": "gptq"}, "quant_method"),
        ({"modules_not_converted": "lm_head"}, "modules_not_converted"),
    ],
)
def test_bad_field_is_named(change, field):
    with pytest.raises(DAQError, match=field):
        DAQFormat.from_dict({**valid(), **change})


def test_missing_field_is_named():
    cfg = valid()
    del cfg["codebook"]
    with pytest.raises(DAQError, match="missing the field 'codebook'"):
        DAQFormat.from_dict(cfg)


def test_is_converted_matches_names_and_prefixes():
    fmt = DAQFormat.from_dict({**valid(), "modules_not_converted": ["lm_head", "model.layers.1"]})
    assert not fmt.is_converted("lm_head")
    assert not fmt.is_converted("model.layers.1.mlp.up_proj")
    assert fmt.is_converted("model.layers.10.mlp.up_proj")


def mixed() -> dict:
    """Version 2: int4 for two modules, nf4 (the default) for the rest."""
    cfg = valid()
    cfg.update(format_version=2, format="nf4", codebook=list(get_codebook("nf4").values),
               module_formats={"model.layers.0.mlp.up_proj": "int4", "model.layers.0.mlp.gate_proj": "int4"},
               codebooks={"int4": list(get_codebook("int4").values)})
    return cfg


def test_mixed_codebooks_round_trip_and_give_each_module_its_own():
    fmt = DAQFormat.from_dict(mixed())
    assert DAQFormat.from_dict(fmt.to_dict()) == fmt
    up = fmt.for_module("model.layers.0.mlp.up_proj")
    assert up.format == "int4" and up.codebook == list(get_codebook("int4").values) and not up.module_formats
    down = fmt.for_module("model.layers.0.mlp.down_proj")
    assert down.format == "nf4" and down.codebook == list(get_codebook("nf4").values)


def test_a_single_codebook_is_written_as_version_1():
    nf4 = get_codebook("nf4")
    fmt = DAQFormat.mixed({"a": ("nf4", list(nf4.values)), "b": ("nf4", list(nf4.values))}, bits=4, group_size=64)
    assert fmt.format_version == 1 and "module_formats" not in fmt.to_dict() and "codebooks" not in fmt.to_dict()
    int4 = get_codebook("int4")
    fmt = DAQFormat.mixed({"a": ("int4", list(int4.values)), "b": ("nf4", list(nf4.values)),
                           "c": ("nf4", list(nf4.values))}, bits=4, group_size=64)
    assert (fmt.format_version, fmt.format, fmt.module_formats) == (2, "nf4", {"a": "int4"})
    assert fmt.codebooks == {"int4": list(int4.values)}


@pytest.mark.parametrize("change, message", [
    ({"format_version": 1}, "module_formats needs format_version 2"),
    ({"codebooks": {}}, r"module_formats gives model\.layers\.0\.mlp\.(up|gate)_proj the format 'int4', which "
                        r"quantization_config\.codebooks does not list"),
    ({"codebooks": {"int4": [0.0] * 8}}, r"codebooks\.int4 must be a list of 16 numbers"),
    ({"codebooks": {"int4": list(range(16)), "nf4": list(range(16))}}, "codebooks lists 'nf4', the default format"),
    ({"module_formats": ["int4"]}, "module_formats must map module names to format names"),
])
def test_bad_mixed_field_is_named(change, message):
    with pytest.raises(DAQError, match=message):
        DAQFormat.from_dict({**mixed(), **change})
