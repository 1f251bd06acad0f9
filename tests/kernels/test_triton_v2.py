"""The v2 Triton kernels: layout, bit-exact decode asm, and every path against the torch reference.

The asm decode cannot run here (no GPU; the Triton interpreter has no inline asm): its texts run in
a PTX simulator (`ptx_sim.py`) on random words. The kernels run under TRITON_INTERPRET=1 with the
plain decode, which the asm replaces for fp16 and bf16 activations on CUDA; the simulator also runs
the asm inside the interpreted kernels.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ptx_sim import bf16_to_float, decode_words, float_to_bf16, interpreter_inline_asm, run

from daq_vllm.format import num_groups
from daq_vllm.format.codebooks import get_codebook
from daq_vllm.kernels import dequantize, pack_codes
from daq_vllm.kernels.triton_v2_decode import (
    E2M1_ASM,
    E2M1_BF16_ASM,
    FMA_BF16X2,
    FMA_F16X2,
    INT_ASM,
    INT_BF16_ASM,
    decode_asm,
    table3_asm,
    table_asm,
)
from daq_vllm.kernels.triton_v2_layout import (
    E2M1_FOLD,
    chunk_group,
    pack_stored,
    padded_k,
    permute_k,
    repack,
    three_bit_slots,
    unpack_stored,
    unpermute_k,
    v2_unsupported,
)

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

N, K = 40, 200  # K leaves a partial 128-block and, for g 64/128, a partial group


def weights(fmt: str, g: int, seed: int = 0, n: int = N, k: int = K):
    cb = get_codebook(fmt)
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**cb.bits, (n, k), generator=gen)
    scales = (torch.rand(n, num_groups(k, g), generator=gen) * 0.05 + 0.01).half()
    offsets = (torch.randn(n, num_groups(k, g), generator=gen) * 0.02).half()
    return codes, pack_codes(codes, cb.bits), scales, offsets, cb


# ---------------------------------------------------------------------------------------------- layout

@pytest.mark.parametrize("bits", [3, 4])
def test_layout_round_trips_to_the_checkpoint_codes(bits, monkeypatch):
    from daq_vllm.kernels import triton_v2_layout

    monkeypatch.setattr(triton_v2_layout, "ROWS_PER_PASS", 16)  # N = 40: three passes
    fmt = "fp4_e2m1" if bits == 4 else "int3"
    codes, q, s, b, cb = weights(fmt, 64)
    rp = repack(q, s, b, cb.values, bits, 64, K)
    kp = padded_k(K)
    assert kp == 256 and rp.codes.dtype == torch.uint8 and rp.codes.shape == (N, kp * bits // 8)
    stored = unpack_stored(rp.codes, bits, kp)
    assert torch.equal(unpermute_k(stored)[:, :K], codes) and not unpermute_k(stored)[:, K:].any()
    assert torch.equal(pack_stored(stored, bits), rp.codes)
    assert rp.scales.shape == (kp // 64, N) and not rp.scales[num_groups(K, 64):].any()
    assert torch.equal(rp.offsets[: num_groups(K, 64)], b.t())


def test_each_thread_fragment_is_16_contiguous_bytes():
    """Stored positions 32t..32t+31 of a block are the logical k with (k // 2) % 4 == t: the values a
    wgmma thread holds for one row (kWidth 2), so its fragment is one 16-byte load."""
    k = torch.arange(128).repeat(2, 1)
    stored = permute_k(k)
    for t in range(4):
        assert torch.equal(torch.sort(stored[0, 32 * t:32 * t + 32]).values, k[0][(k[0] // 2) % 4 == t])
    assert torch.equal(unpermute_k(stored), k)


def test_three_bit_slots_fill_each_word_once():
    """Every bit of A, B and C holds one code's bit; each decode group's selector nibbles come from
    one shifted word (low bits at 4j + [0, 2, 16, 18], high bit at 4j + 2 after its shift)."""
    slots = three_bit_slots()
    low = {(w, b) for w, b, _ in slots} | {(w, b + 1) for w, b, _ in slots}
    assert len(low) == 64 and {h for _, _, h in slots} == set(range(32))
    assert sorted(chunk_group(m) for m in range(8)) == list(range(8))
    for offset, (word, low_bit, high_bit) in enumerate(slots):
        j, g = offset // 8, chunk_group(offset % 8)
        assert word == g // 4 and low_bit - [0, 2, 16, 18][g % 4] == 4 * j
        assert high_bit - 16 * (g // 4) - g % 4 == 4 * j


def test_e2m1_scales_are_folded_unless_they_overflow():
    """Folded scales stay within fp16 and, times the bf16 decode's 2**112, within bf16: a scale of
    3.99 (65372 folded, rounding to 2**16 in bf16) already sends the layer to the table."""
    _, q, s, b, cb = weights("fp4_e2m1", 32)
    rp = repack(q, s, b, cb.values, 4, 32, K)
    assert rp.decode == "e2m1" and torch.equal(rp.scales[: s.shape[1]].float(), s.t().float() * E2M1_FOLD)
    assert (rp.asm, rp.asm_bf16) == (E2M1_ASM, E2M1_BF16_ASM)
    for scale in (3.99, 8.0):
        big = s.clone()
        big[0, 0] = scale
        rp = repack(q, big, b, cb.values, 4, 32, K)
        assert rp.decode == "table" and rp.asm == table_asm(cb.values)
        assert rp.asm_bf16 == table_asm(cb.values, "bfloat16")
    big[0, 0] = 3.98  # 65208 folded: kept
    assert repack(q, big, b, cb.values, 4, 32, K).decode == "e2m1"
    assert repack(q, s, b, get_codebook("nf4").values, 4, 32, K).decode == "table"


def test_formats_the_layout_cannot_hold_are_named():
    assert v2_unsupported(4, 128) is None and v2_unsupported(3, 32) is None and v2_unsupported(4, 256) is None
    assert "2-bit codes" in v2_unsupported(2, 64)
    assert "group size 96" in v2_unsupported(4, 96)
    with pytest.raises(ValueError, match="group size 8"):
        _, q, s, b, cb = weights("nf4", 8)
        repack(q, s, b, cb.values, 4, 8, K)


# ---------------------------------------------------------------------------------------------- decode asm

def random_words(count: int = 20000) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 2**32, count, dtype=np.uint64).astype(np.uint32)


@pytest.mark.parametrize("fmt, asm, factor", [("fp4_e2m1", E2M1_ASM, 2.0**-14), ("int4", INT_ASM, 1.0)])
def test_bit_decodes_equal_the_codebook_bit_for_bit(fmt, asm, factor):
    words = random_words()
    codes = np.stack([(words >> (4 * i)) & 15 for i in range(8)], axis=-1)
    got = decode_words(asm, words)
    want = (np.asarray(get_codebook(fmt).values) * factor).astype(np.float16)[codes]
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))  # -0.0 included


@pytest.mark.parametrize("values", [get_codebook("nf4").values, get_codebook("fp4_e2m1_ref").values,
                                    tuple(np.random.default_rng(3).standard_normal(16).tolist())])
def test_table_decode_equals_the_codebook_bit_for_bit(values):
    words = random_words()
    codes = np.stack([(words >> (4 * i)) & 15 for i in range(8)], axis=-1)
    want = np.asarray(values, dtype=np.float16)[codes]
    assert np.array_equal(decode_words(table_asm(values), words).view(np.uint16), want.view(np.uint16))
    assert decode_asm("table", values) == table_asm(values)


@pytest.mark.parametrize("fmt, asm, factor", [("fp4_e2m1", E2M1_BF16_ASM, 2.0**-126), ("int4", INT_BF16_ASM, 1.0),
                                               ("nf4", table_asm(get_codebook("nf4").values, "bfloat16"), 1.0)])
def test_bf16_decodes_equal_the_codebook_bit_for_bit(fmt, asm, factor):
    """bf16 activations: the E2M1 bits as a bf16 pattern worth value * 2**-126 (subnormal for the
    exponent-0 codes), the int codes under 128, other codebooks through the table."""
    words = random_words()
    codes = np.stack([(words >> (4 * i)) & 15 for i in range(8)], axis=-1)
    values = get_codebook(fmt).values
    want = float_to_bf16(np.asarray(values, dtype=np.float64) * factor)[codes]
    got = decode_words(asm, words).view(np.uint16).astype(np.uint32)
    assert np.array_equal(got, want)
    assert np.allclose(bf16_to_float(got), np.asarray(values)[codes] * factor, rtol=2**-8, atol=0)
    assert decode_asm("e2m1" if fmt == "fp4_e2m1" else "int" if fmt == "int4" else "table", values, 4,
                      "bfloat16") == asm


def test_bf16_e2m1_decode_and_refolded_scale_give_the_table_decodes_weights():
    """The packed bf16 FMA of a subnormal decoded value with the scale times 2**112 rounds to the
    same bf16 weight as the table path's value / 2**14 times the folded scale."""
    rng = np.random.default_rng(4)
    codes = rng.integers(0, 16, 4000)
    folded = float_to_bf16(rng.uniform(0.01, 3.98, 4000) * 2.0**14)  # scales as the kernel rounds them
    offset = float_to_bf16(rng.standard_normal(4000) * 0.02)
    values = np.asarray(get_codebook("fp4_e2m1").values)

    def fma(w_bits, s_bits):
        pair = [np.asarray(v, dtype=np.uint32) for v in (w_bits, s_bits, offset)]
        (out,) = run(FMA_BF16X2, [v | (v << 16) for v in pair], 1)
        assert np.array_equal(out & 0xFFFF, out >> 16)
        return out & 0xFFFF

    bit_decode = fma(float_to_bf16(values * 2.0**-126)[codes], float_to_bf16(bf16_to_float(folded) * 2.0**112))
    table = fma(float_to_bf16(values * 2.0**-14)[codes], folded)
    assert np.array_equal(bit_decode, table)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("values", [get_codebook("fp3_e2m0").values, get_codebook("int3").values,
                                    tuple(np.random.default_rng(5).standard_normal(8).tolist())])
def test_three_bit_decode_equals_the_codebook_bit_for_bit(dtype, values):
    """Words A, B, C of random chunks: output g's element j is the code at offset 8j + m (g = the
    reversal of m), as `three_bit_slots` places it."""
    rng = np.random.default_rng(2)
    codes = rng.integers(0, 8, (5000, 32))
    words = np.zeros((3, 5000), dtype=np.uint64)
    for offset, (word, low_bit, high_bit) in enumerate(three_bit_slots()):
        words[word] |= (codes[:, offset] & 3).astype(np.uint64) << np.uint64(low_bit)
        words[2] |= (codes[:, offset] >> 2).astype(np.uint64) << np.uint64(high_bit)
    regs = run(table3_asm(values, dtype), [w.astype(np.uint32) for w in words], 16)
    want = (np.asarray(values, dtype=np.float16).view(np.uint16).astype(np.uint32) if dtype == "float16"
            else float_to_bf16(np.asarray(values)))
    for g in range(8):
        m = next(m for m in range(8) if chunk_group(m) == g)
        got = [regs[2 * g] & 0xFFFF, regs[2 * g] >> 16, regs[2 * g + 1] & 0xFFFF, regs[2 * g + 1] >> 16]
        for j in range(4):
            assert np.array_equal(got[j], want[codes[:, 8 * j + m]]), (g, j)


def test_packed_fma_rounds_once():
    rng = np.random.default_rng(1)
    w, s, b = (rng.standard_normal((3, 2, 5000)) * [[[1.0]], [[0.05]], [[0.02]]]).astype(np.float16)

    def pack(v):
        return v[0].view(np.uint16).astype(np.uint32) | (v[1].view(np.uint16).astype(np.uint32) << 16)

    (out,) = run(FMA_F16X2, [pack(w), pack(s), pack(b)], 1)
    got = np.stack([(out & 0xFFFF).astype(np.uint16), (out >> 16).astype(np.uint16)]).view(np.float16)
    want = (w.astype(np.float64) * s + b).astype(np.float16)
    assert np.array_equal(got, want)


# ---------------------------------------------------------------------------------------------- kernels

def check(y, x, q, s, b, cb, g, bias, k=K):
    w = dequantize(q, s, b, cb.tensor(), cb.bits, g, k).to(x.dtype).float()
    ref = x.float() @ w.T + bias.float()
    assert y.dtype == x.dtype and y.shape == ref.shape and not torch.isnan(y).any()
    tol = 2e-2 if x.dtype == torch.bfloat16 else 4e-3
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("fmt", ["fp4_e2m1", "nf4", "int4", "fp3_e2m0", "int3"])
@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_v2_paths_match_reference(poisoned, fmt, g, dtype):
    _, q, s, b, cb = weights(fmt, g)
    rp = repack(q, s, b, cb.values, cb.bits, g, K)
    bias = torch.randn(N).to(dtype)
    runs = [(1, dict(path="gemv2", block_n=16)), (3, dict(path="gemv2", block_n=32, split_k=2)),
            (1, dict(path="mma", block_m=16, block_n=16, split_k=2)), (3, dict(path="mma", block_m=16, block_n=32)),
            (16, dict(path="mma", block_m=16, block_n=16, split_k=2)), (64, dict(path="mma", block_m=32, block_n=32)),
            (300, dict(path="mma", block_m=64, block_n=32))]
    for m, cfg in runs:
        x = torch.randn(m, K).to(dtype)
        y = poisoned.run_path(poisoned.KernelConfig(**cfg), x, q, s, b, cb.tensor(), cb.bits, g, False, bias, rp)
        check(y, x, q, s, b, cb, g, bias)


@pytest.mark.parametrize("fmt", ["fp4_e2m1", "nf4", "int4", "fp3_e2m0", "int3"])
@pytest.mark.parametrize("g", [32, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_asm_path_matches_reference_in_the_simulator(poisoned, monkeypatch, fmt, g, dtype):
    """The paths as they run on CUDA: the interpreter executes their inline asm (decode and packed
    FMA) through the PTX simulator, so the joins and the K un-permutation after the decode are
    checked too. fp16 weights are `c * s + b` rounded once, as the reference's are."""
    from triton.runtime import interpreter

    from daq_vllm.kernels import triton_v2

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_inline_asm", interpreter_inline_asm)
    monkeypatch.setattr(triton_v2, "asm_decode_applies", lambda x: x.dtype in (torch.float16, torch.bfloat16))
    _, q, s, b, cb = weights(fmt, g, seed=7)
    rp = repack(q, s, b, cb.values, cb.bits, g, K)
    bias = torch.randn(N).to(dtype)
    for m, cfg in [(2, dict(path="gemv2", block_n=16, split_k=2)), (17, dict(path="mma", block_m=16, block_n=32))]:
        x = torch.randn(m, K).to(dtype)
        y = poisoned.run_path(poisoned.KernelConfig(**cfg), x, q, s, b, cb.tensor(), cb.bits, g, False, bias, rp)
        check(y, x, q, s, b, cb, g, bias)


def test_group_larger_than_a_step(poisoned):
    """g = 256 spans two 128-code steps: both read the same group's scale and offset."""
    _, q, s, b, cb = weights("nf4", 256, k=600)
    rp = repack(q, s, b, cb.values, 4, 256, 600)
    x, bias = torch.randn(5, 600).half(), torch.zeros(N).half()
    y = poisoned.run_path(poisoned.KernelConfig("mma", block_m=16, block_n=32, split_k=3), x, q, s, b, cb.tensor(), 4,
                          256, False, bias, rp)
    check(y, x, q, s, b, cb, 256, bias, k=600)


def test_v2_path_without_the_layout_is_refused(tg):
    _, q, s, b, cb = weights("nf4", 64)
    with pytest.raises(ValueError, match="needs the v2 layout"):
        tg.run_path(tg.KernelConfig("mma"), torch.randn(2, K).half(), q, s, b, cb.tensor(), 4, 64, False)


def test_v2_candidates_join_the_tuner_per_m_bucket(tg):
    for m in (1, 4):
        assert {c.path for c in tg.v2_candidate_configs(m)} == {"gemv2", "mma"}
    for m in (16, 64, 4096):
        cfgs = tg.v2_candidate_configs(m)
        assert {c.path for c in cfgs} == {"mma"} and all(c.block_m >= min(tg.m_bucket(m), 16) for c in cfgs)
    assert all(c.split_k != 1 for c in tg.v2_candidate_configs(16))  # small M fills the SMs by splitting K
    assert any(c.split_k == 0 for c in tg.v2_candidate_configs(1))  # ... sized to the GPU among them


def test_auto_split_k_fills_two_waves(poisoned, monkeypatch):
    from daq_vllm.kernels import triton_v2

    assert triton_v2.waves_split_k(tiles=32, steps=32, sms=132) == 8  # N=K=4096, BN 128: 9 -> 8 (4 steps each)
    assert triton_v2.waves_split_k(tiles=32, steps=112, sms=132) == 9
    assert triton_v2.waves_split_k(tiles=600, steps=32, sms=132) == 1 and triton_v2.waves_split_k(4, 3, 132) == 1
    monkeypatch.setattr(triton_v2, "sm_count", lambda device: 16)
    _, q, s, b, cb = weights("nf4", 64, k=1100)
    rp = repack(q, s, b, cb.values, 4, 64, 1100)
    x, bias = torch.randn(3, 1100).half(), torch.randn(N).half()
    for cfg in (dict(path="mma", block_m=16, block_n=32, split_k=0), dict(path="gemv2", block_n=32, split_k=0)):
        y = poisoned.run_path(poisoned.KernelConfig(**cfg), x, q, s, b, cb.tensor(), 4, 64, False, bias, rp)
        check(y, x, q, s, b, cb, 64, bias, k=1100)


def test_triton_kernel_prepares_the_v2_layout_and_computes_the_reference(tg):
    from daq_vllm.format import DAQFormat
    from daq_vllm.kernels import LinearSpec
    from daq_vllm.kernels.triton_linear import TritonKernel

    _, q, s, b, cb = weights("fp4_e2m1", 64)
    layer = torch.nn.Module()
    layer.qweight, layer.scales, layer.offsets = (torch.nn.Parameter(t, requires_grad=False) for t in (q, s, b))
    fmt = DAQFormat(format="fp4_e2m1", bits=4, group_size=64, codebook=list(cb.values))
    spec = LinearSpec.of(fmt, K, N, torch.float16, "cpu")
    kernel = TritonKernel(spec)
    kernel.prepare(layer)
    assert kernel.v2_decode == "e2m1" and kernel.v2_asm == E2M1_ASM
    assert torch.equal(layer.v2_codes, repack(q, s, b, cb.values, 4, 64, K).codes)
    x, bias = torch.randn(3, K).half(), torch.randn(N).half()
    check(kernel.apply(layer, x, bias), x, q, s, b, cb, 64, bias)


def test_v2_layout_can_be_turned_off(tg, monkeypatch):
    from daq_vllm.format import DAQFormat
    from daq_vllm.kernels import LinearSpec
    from daq_vllm.kernels.triton_linear import TritonKernel

    monkeypatch.setenv("DAQ_TRITON_V2", "0")
    _, q, s, b, cb = weights("nf4", 64)
    layer = torch.nn.Module()
    layer.qweight, layer.scales, layer.offsets = (torch.nn.Parameter(t, requires_grad=False) for t in (q, s, b))
    fmt = DAQFormat(format="nf4", bits=4, group_size=64, codebook=list(cb.values))
    kernel = TritonKernel(LinearSpec.of(fmt, K, N, torch.float16, "cpu"))
    kernel.prepare(layer)
    assert kernel.v2_decode == "" and not hasattr(layer, "v2_codes")
    x, bias = torch.randn(2, K).half(), torch.randn(N).half()
    check(kernel.apply(layer, x, bias), x, q, s, b, cb, 64, bias)


def test_shipped_configs_round_trip_and_are_found_by_gpu_name(tg, tmp_path, monkeypatch):
    key = (16, 4096, 4096, 4, 128, "float16", "e2m1+v2", False)
    cfg = tg.KernelConfig("mma", block_m=16, block_n=128, split_k=8, num_warps=4, num_stages=3)
    monkeypatch.setattr(tg, "_TUNED", {key: (cfg, 0.0123)})
    monkeypatch.setattr(tg, "_SHIPPED", {})
    monkeypatch.setattr(tg, "CONFIGS_DIR", tmp_path)
    assert tg.gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    tg.save_configs(tmp_path / "nvidia-h200.json", "NVIDIA H200")
    data = json.loads((tmp_path / "nvidia-h200.json").read_text())
    assert data["device"] == "NVIDIA H200" and data["configs"][0]["ms"] == 0.0123
    assert tg.shipped_config(key, "NVIDIA H200") == cfg
    assert tg.shipped_config((32, *key[1:]), "NVIDIA H200") is None
    assert tg.shipped_config(key, "NVIDIA A100-SXM4-80GB") is None  # no file: tuned on first use


def test_a_key_the_gpu_file_lacks_gets_the_nearest_shipped_config(tg, tmp_path, monkeypatch):
    """What a CUDA-graph capture runs for an untuned key: the config shipped for the nearest M bucket,
    then the nearest shape, with the same format, dtype, decode and bias; None when there is no such row."""
    key = (1, 11008, 4096, 4, 128, "float16", "e2m1+v2", False)  # Llama-2-7B's down_proj is not in the file
    near = tg.KernelConfig("gemv2", block_n=64, split_k=0)
    far = tg.KernelConfig("mma", block_m=16, block_n=64, split_k=8, num_stages=3)
    other = tg.KernelConfig("gemv", block_n=32, chunks_per_iter=8, split_k=4)
    big = tg.KernelConfig("mma", block_m=128, block_n=128, num_warps=8, num_stages=3)
    tuned = {(1, 14336, 4096, *key[3:]): (near, 0.01), (1, 4096, 4096, *key[3:]): (far, 0.01),
             (1, 11008, 4096, 4, 128, "bfloat16", "e2m1+v2", False): (other, 0.01),
             (2, 11008, 4096, *key[3:]): (other, 0.01), (256, 4096, 4096, *key[3:]): (big, 0.01)}
    monkeypatch.setattr(tg, "_TUNED", tuned)
    monkeypatch.setattr(tg, "_SHIPPED", {})
    monkeypatch.setattr(tg, "CONFIGS_DIR", tmp_path)
    tg.save_configs(tmp_path / "nvidia-h200.json", "NVIDIA H200")
    assert tg.shipped_config(key, "NVIDIA H200") is None  # no exact row: an eager call tunes it
    assert tg.nearest_shipped_config(key, "NVIDIA H200") == near  # |ln(11008/14336)| < |ln(11008/4096)|
    assert tg.nearest_shipped_config((1, 4000, 4096, *key[3:]), "NVIDIA H200") == far
    assert tg.nearest_shipped_config((4, *key[1:]), "NVIDIA H200") == other  # bucket 2 is nearer than 1
    assert tg.nearest_shipped_config((512, *key[1:]), "NVIDIA H200") == big  # vLLM captures up to 512
    assert tg.nearest_shipped_config((1, 11008, 4096, 4, 128, "float16", "table+v2", False), "NVIDIA H200") is None
    assert tg.nearest_shipped_config(key, "NVIDIA A100-SXM4-80GB") is None
