import math

from daq_vllm.format.codebooks import CODEBOOKS, get_codebook


def test_fp4_e2m1_code_order_is_sign_magnitude():
    values = get_codebook("fp4_e2m1").values
    assert values[:8] == (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
    assert values[8:] == tuple(-v for v in values[:8])
    assert math.copysign(1.0, values[8]) == -1.0  # code 8 is -0


def test_every_codebook_has_2_pow_bits_values():
    for cb in CODEBOOKS.values():
        assert len(cb.values) == 2**cb.bits, cb.name


def test_named_tables():
    assert get_codebook("int4").values == tuple(float(i) for i in range(16))
    assert get_codebook("int3").values == tuple(float(i) for i in range(8))
    assert get_codebook("fp3_e2m0").values == (0.0, 1.0, 2.0, 4.0, -0.0, -1.0, -2.0, -4.0)
    assert get_codebook("fp4_e2m1_ref").values[:8] == (0.0, 0.0625, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
    nf4 = get_codebook("nf4").values
    assert nf4[0] == -1.0 and nf4[7] == 0.0 and nf4[15] == 1.0 and list(nf4) == sorted(nf4)
    assert abs(nf4[8] - 0.07958029955625534) < 1e-12


def test_unknown_name_lists_choices():
    try:
        get_codebook("fp5")
    except ValueError as e:
        assert "fp4_e2m1" in str(e) and "fp5" in str(e)
    else:
        raise AssertionError("no error")
