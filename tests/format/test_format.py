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
