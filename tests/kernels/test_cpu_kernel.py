"""The C++ CPU kernel (`cpu`): agreement with the float64 reference on every path, the repacked
layout, instruction-set forcing, torch.compile tracing, and the fallback when it cannot be built."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import require_cpu_kernel
from daq_vllm.errors import DAQError
from daq_vllm.format import DAQFormat, num_groups
from daq_vllm.format.codebooks import CODEBOOKS
from daq_vllm.kernels import LinearSpec, choose_kernel, dequantize, pack_codes
from daq_vllm.kernels.cpu_linear import BLOCK_N, ISAS, ORDERS, CpuKernel, best_isa, repack

# (N, K, group): N not a multiple of any block, K with a partial last group, every group size, and
# groups that end inside the AVX2 prefill's 256-row panels or with its last, partial panel.
SHAPES = [(200, 1000, 64), (48, 96, 32), (24, 300, 128), (33, 64, 64), (40, 600, 256)]
ROWS = [1, 2, 3, 11, 16, 64]  # every remainder of the 6-row tiles of the AVX2 prefill


@pytest.fixture(scope="module", autouse=True)
def built():
    require_cpu_kernel()


class Layer(torch.nn.Module):
    """The packed tensors of one random [N, K] linear, as vLLM and transformers layers hold them."""

    def __init__(self, fmt: str, n: int, k: int, group: int, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        cb = CODEBOOKS[fmt]
        groups = num_groups(k, group)
        self.qweight = torch.nn.Parameter(pack_codes(torch.randint(0, 2**cb.bits, (n, k), generator=gen), cb.bits),
                                          requires_grad=False)
        self.scales = torch.nn.Parameter((torch.rand(n, groups, generator=gen) * 0.2 + 0.01).half(),
                                         requires_grad=False)
        self.offsets = torch.nn.Parameter((torch.randn(n, groups, generator=gen) * 0.1).half(), requires_grad=False)
        self.fmt = DAQFormat(fmt, cb.bits, group, list(cb.values))
        self.k, self.n = k, n

    def spec(self, dtype: torch.dtype = torch.float32) -> LinearSpec:
        return LinearSpec.of(self.fmt, self.k, self.n, dtype, "cpu")

    def weight64(self) -> torch.Tensor:
        cb = torch.tensor(self.fmt.codebook)
        return dequantize(self.qweight, self.scales, self.offsets, cb, self.fmt.bits, self.fmt.group_size,
                          self.k).double()


def check_against_reference(layer: Layer, kernel, x: torch.Tensor, bias: torch.Tensor) -> None:
    """Within fp32 summation error of the float64 result (plus bf16 rounding of a bf16 output)."""
    y = kernel.apply(layer, x, bias)
    assert y.shape == (*x.shape[:-1], layer.n) and y.dtype == x.dtype
    w = layer.weight64()
    x64 = x.double()
    ref = x64 @ w.T + bias.double()
    bound = 1e-5 * (x64.abs() @ w.abs().T + 1)
    if x.dtype != torch.float32:
        bound += 2**-8 * ref.abs()
    assert ((y.double() - ref).abs() <= bound).all(), f"max error {(y.double() - ref).abs().max():.3g}"


@pytest.mark.parametrize("fmt", list(CODEBOOKS))
def test_every_path_matches_the_reference(isa, fmt, monkeypatch):
    import daq_vllm.kernels.cpu_linear as cpu_linear

    for n, k, group in SHAPES:
        layer = Layer(fmt, n, k, group)
        for dtype in (torch.float32, torch.bfloat16):
            kernel = CpuKernel(layer.spec(dtype))
            kernel.prepare(layer)
            assert kernel.isa == isa
            bias = torch.randn(n)
            for fused_up_to in (0, 1000):  # the prefill path, and the fused kernel, for every M
                monkeypatch.setattr(cpu_linear, "MAX_FUSED_M", dict.fromkeys(ISAS, fused_up_to))
                for m in ROWS:
                    check_against_reference(layer, kernel, torch.randn(m, k).to(dtype), bias)


@pytest.mark.parametrize("m", [121, 300])
def test_long_prompts_and_wide_layers_match_the_reference(isa, m):
    """The AVX2 prefill goes in chunks of 120 rows and groups of blocks whose output tiles fit L2:
    M past one chunk (a partial last one) and N past one group (19 blocks of 32) exercise both."""
    layer = Layer("nf4", 600, 300, 64)
    kernel = CpuKernel(layer.spec())
    kernel.prepare(layer)
    check_against_reference(layer, kernel, torch.randn(m, 300), torch.randn(600))


def test_leading_dimensions_and_no_bias():
    layer = Layer("nf4", 40, 128, 64)
    kernel = choose_kernel(layer.spec())
    kernel.prepare(layer)
    x = torch.randn(2, 3, 128)
    y = kernel.apply(layer, x)
    assert y.shape == (2, 3, 40)
    torch.testing.assert_close(y.double(), x.double() @ layer.weight64().T, rtol=1e-5, atol=1e-5)
    assert kernel.apply(layer, torch.randn(0, 128)).shape == (0, 40)


@pytest.mark.parametrize("fmt", ["nf4", "int3"])
@pytest.mark.parametrize("isa_name", list(ISAS))
def test_repacked_layout_holds_every_code_once(fmt, isa_name):
    from daq_vllm.kernels import unpack_codes

    layer = Layer(fmt, 37, 70, 32)
    block_n = BLOCK_N[isa_name]
    codes, scale_offset = repack(layer.qweight, layer.scales, layer.offsets, layer.fmt.bits, 70, isa_name)
    blocks = -(-37 // block_n)
    assert codes.shape == (blocks, 70, block_n // 2) and codes.dtype == torch.uint8
    assert scale_offset.shape == (blocks, num_groups(70, 32), 2, block_n)
    order = ORDERS[isa_name](block_n)
    assert sorted(o for pair in order for o in pair) == list(range(block_n))  # each output in one nibble
    unpacked = torch.empty(blocks, block_n, 70, dtype=torch.long)
    for j, (low, high) in enumerate(order):
        unpacked[:, low] = codes[:, :, j].long() & 15
        unpacked[:, high] = codes[:, :, j].long() >> 4
    unpacked = unpacked.reshape(blocks * block_n, 70)
    assert torch.equal(unpacked[:37], unpack_codes(layer.qweight, layer.fmt.bits, 70))
    assert not unpacked[37:].any()  # padded outputs: code 0 ...
    per_output = scale_offset.permute(0, 3, 2, 1).reshape(blocks * block_n, 2, -1)
    assert torch.equal(per_output[:37, 0], layer.scales) and torch.equal(per_output[:37, 1], layer.offsets)
    assert not per_output[37:].any()  # ... scale 0 and offset 0: they add nothing


def test_cpu_is_chosen_on_cpu_for_every_activation_dtype():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert choose_kernel(Layer("fp4_e2m1", 16, 64, 32).spec(dtype)).name == "cpu"


@pytest.mark.parametrize("value, message", [
    ("avx9", "DAQ_CPU_ISA=avx9 is not one of scalar, avx2, avx512; unset it or pick one of those"),
])
def test_a_bad_isa_override_is_one_line_error(value, message, monkeypatch):
    monkeypatch.setenv("DAQ_CPU_ISA", value)
    layer = Layer("nf4", 16, 64, 32)
    with pytest.raises(DAQError, match=f"^{message}$"):
        CpuKernel(layer.spec()).prepare(layer)


def test_an_isa_the_cpu_lacks_is_refused(monkeypatch):
    if best_isa() == "avx512":
        pytest.skip("this CPU runs every instruction set")
    monkeypatch.setenv("DAQ_CPU_ISA", "avx512")
    layer = Layer("nf4", 16, 64, 32)
    with pytest.raises(DAQError, match=f"^DAQ_CPU_ISA=avx512, but this CPU runs at most {best_isa()}"):
        CpuKernel(layer.spec()).prepare(layer)


def test_nan_scales_are_refused_at_load_by_every_kernel():
    layer = Layer("nf4", 16, 64, 32)
    layer.scales.data[3, 1] = float("nan")
    for name in ("cpu", "torch", "dense"):
        with pytest.raises(DAQError, match=r"^the scales of a DAQ linear \[16, 64\] .* hold NaN or infinity: the "
                                           "checkpoint is corrupt; quantize the model again$"):
            choose_kernel(layer.spec(), [name]).prepare(layer)


def test_traced_by_torch_compile_as_one_op():
    layer = Layer("fp4_e2m1", 48, 128, 64)
    kernel = choose_kernel(layer.spec())
    kernel.prepare(layer)
    x = torch.randn(5, 128)
    compiled = torch.compile(lambda t: kernel.apply(layer, t) * 2, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), kernel.apply(layer, x) * 2)


BUILD_AND_RUN = textwrap.dedent("""
    import torch
    from daq_vllm.format import DAQFormat
    from daq_vllm.format.codebooks import CODEBOOKS
    from daq_vllm.kernels import LinearSpec, choose_kernel, daq_linear_reference, pack_codes

    cb = CODEBOOKS["nf4"]
    fmt = DAQFormat("nf4", 4, 32, list(cb.values))
    layer = torch.nn.Module()
    layer.qweight = torch.nn.Parameter(pack_codes(torch.randint(0, 16, (24, 64)), 4), requires_grad=False)
    layer.scales = torch.nn.Parameter(torch.rand(24, 2).half(), requires_grad=False)
    layer.offsets = torch.nn.Parameter(torch.rand(24, 2).half(), requires_grad=False)
    x = torch.randn(2, 64)
    for _ in range(2):  # two layers: the cause is said once
        kernel = choose_kernel(LinearSpec.of(fmt, 64, 24, torch.float32, "cpu"))
        kernel.prepare(layer)
        ref = daq_linear_reference(x, layer.qweight, layer.scales, layer.offsets, layer.codebook, 4, 32)
        torch.testing.assert_close(kernel.apply(layer, x), ref, rtol=1e-5, atol=1e-5)
    print(kernel.name)
""")


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})


def test_without_a_compiler_layers_fall_back_to_torch_with_one_warning(tmp_path):
    proc = run_python(BUILD_AND_RUN, CXX="/nonexistent/c++", DAQ_CACHE_DIR=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "torch"
    warnings = [line for line in proc.stderr.splitlines() if "DAQ CPU kernel" in line]
    assert warnings == ["DAQ CPU kernel unavailable: no C++ compiler: '/nonexistent/c++' was not found; install "
                        "one (e.g. apt install g++) or point CXX at it. DAQ layers on CPU use the slower torch kernel"]


def test_first_use_compiles_once_even_past_a_stale_lock_then_loads_from_the_cache(tmp_path):
    from daq_vllm.kernels.cpu_build import build_name

    stale = tmp_path / "cpu_kernel" / build_name() / "lock"  # torch's lock, as a killed build leaves it
    stale.parent.mkdir(parents=True)
    stale.touch()
    first = run_python(BUILD_AND_RUN, DAQ_CACHE_DIR=str(tmp_path))
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "cpu"
    said = [line for line in first.stderr.splitlines() if "DAQ CPU kernel" in line]
    assert len(said) == 1 and said[0].startswith("compiling the DAQ CPU kernel, once, ~"), first.stderr
    again = run_python(BUILD_AND_RUN, DAQ_CACHE_DIR=str(tmp_path))
    assert again.returncode == 0 and again.stdout.strip() == "cpu"
    assert "DAQ CPU kernel" not in again.stderr
