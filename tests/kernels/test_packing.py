import pytest
import torch

from daq_vllm.kernels import pack_codes, packed_words, unpack_codes


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("k", [1, 7, 10, 11, 31, 32, 33, 100, 576, 1000])
def test_round_trip(bits, k):
    codes = torch.randint(0, 2**bits, (6, k))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (6, -(-k * bits // 32)) == (6, packed_words(k, bits))
    assert torch.equal(unpack_codes(packed, bits, k), codes)


def test_4bit_layout_is_lsb_first():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 15]])
    words = pack_codes(codes, 4)
    assert words[0, 0].item() & 0xFFFFFFFF == 0x87654321
    assert words[0, 1].item() == 15  # ninth code in the low bits of word 1, rest zero padding


def test_3bit_code_straddles_words():
    # Code 10 starts at bit 30: its low 2 bits end word 0, its high bit opens word 1.
    codes = torch.zeros(1, 12, dtype=torch.int64)
    codes[0, 10] = 0b101
    words = pack_codes(codes, 3)
    assert words[0, 0].item() & 0xFFFFFFFF == 0b01 << 30
    assert words[0, 1].item() == 0b1


def test_rejects_out_of_range_codes_and_wrong_width():
    with pytest.raises(ValueError, match="codes must lie"):
        pack_codes(torch.tensor([[16]]), 4)
    with pytest.raises(ValueError, match="expected 2"):
        unpack_codes(torch.zeros(1, 3, dtype=torch.int32), 4, 10)
