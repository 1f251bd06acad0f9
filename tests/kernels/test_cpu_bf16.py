"""`bf16_linear` (the C++ op for an unquantized bfloat16 weight, `csrc/cpu_bf16*.cpp`): agreement
with the float64 product on every tile remainder, and when it declines a weight."""

from __future__ import annotations

import pytest
import torch

from conftest import require, require_cpu_kernel
from daq_vllm.kernels import cpu_bf16
from daq_vllm.kernels.cpu_bf16 import bf16_linear, unavailable
from daq_vllm.kernels.cpu_linear import best_isa

# N: tiles of 4 weight rows and a remainder, past one thread task of 64 rows; K: whole runs of 16,
# a partial last run, a single short run.
SHAPES = [(1001, 576), (130, 577), (7, 9), (64, 16)]
ROWS = [1, 2, 3, 5, 16, 64]  # every remainder of the 3-row tiles


@pytest.fixture(scope="module", autouse=True)
def built():
    require_cpu_kernel()
    require(best_isa() != "scalar", "this CPU has no AVX2, which bf16_linear needs")


def reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(x.double(), w.double(), None if bias is None else bias.double())


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", ROWS)
def test_matches_the_float64_product_in_fp32(n, k, m):
    gen = torch.Generator().manual_seed(n * k + m)
    w = torch.randn(n, k, generator=gen).bfloat16()
    x, bias = torch.randn(m, k, generator=gen), torch.randn(n, generator=gen)
    y = bf16_linear(x, w, bias)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    torch.testing.assert_close(y.double(), reference(x, w, bias), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_activations_come_back_in_their_dtype(dtype):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(300, 577, generator=gen).bfloat16()
    x = torch.randn(2, 3, 577, generator=gen).to(dtype)
    y = bf16_linear(x, w)
    assert y.dtype == dtype and y.shape == (2, 3, 300)
    # fp32 sums rounded once: within one unit in the last place of the float64 product's rounding
    torch.testing.assert_close(y, reference(x, w, None).to(dtype), rtol=torch.finfo(dtype).eps, atol=1e-3)


def test_no_rows_and_wrong_inputs():
    w = torch.randn(8, 32).bfloat16()
    assert bf16_linear(torch.empty(0, 32), w).shape == (0, 8)
    with pytest.raises(RuntimeError, match="x has 31 inputs, the weight 32"):
        bf16_linear(torch.randn(2, 31), w)
    with pytest.raises(RuntimeError, match="bfloat16 \\[N, K\\]"):
        torch.ops.daq_cpu.bf16_linear(torch.randn(2, 32), w.float(), None)


def test_declines_weights_it_does_not_take_and_cpus_with_bfloat16(monkeypatch):
    assert "bfloat16 weight" in unavailable(torch.randn(4, 4))
    assert "bfloat16 weight" in unavailable(torch.randn(4).bfloat16())
    monkeypatch.setattr(cpu_bf16, "native_bf16", lambda: False)
    assert unavailable(torch.randn(4, 4).bfloat16()) is None
    monkeypatch.setattr(cpu_bf16, "native_bf16", lambda: True)
    assert "natively" in unavailable(torch.randn(4, 4).bfloat16())


def test_traces_with_torch_compile():
    w = torch.randn(40, 64).bfloat16()
    x = torch.randn(3, 64)
    compiled = torch.compile(lambda x: bf16_linear(x, w) * 2, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), bf16_linear(x, w) * 2)
