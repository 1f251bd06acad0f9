"""`torch.ops.daq.linear`, the custom op that carries the Triton kernels (interpreter on CPU)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import require
from daq_vllm.format import num_groups
from daq_vllm.format.codebooks import get_codebook
from daq_vllm.kernels import daq_linear_reference, pack_codes

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False


@pytest.fixture(scope="module")
def op():
    require(HAVE_TRITON, "triton is not installed")
    from daq_vllm.kernels.op import daq_linear_op

    return daq_linear_op


def weights(n=24, k=96, g=64):
    cb = get_codebook("nf4")
    gen = torch.Generator().manual_seed(0)
    q = pack_codes(torch.randint(0, 16, (n, k), generator=gen), 4)
    groups = num_groups(k, g)
    return q, torch.rand(n, groups, generator=gen).half(), (torch.randn(n, groups, generator=gen) * 0.01).half(), cb


def test_op_is_registered_with_its_schema(op):
    schema = str(torch.ops.daq.linear.default._schema)
    assert schema.startswith("daq::linear(Tensor x, Tensor qweight, Tensor scales, Tensor offsets, Tensor codebook, "
                             "SymInt bits, SymInt group_size, bool e2m1")
    assert ("Tensor? bias=None, Tensor? v2_codes=None, Tensor? v2_scales=None, Tensor? v2_offsets=None, "
            'str v2_decode="", str v2_asm="", str v2_asm_bf16="") -> Tensor') in schema


def test_op_computes_the_reference(op):
    q, s, b, cb = weights()
    x, bias = torch.randn(2, 5, 96), torch.randn(24)
    y = torch.ops.daq.linear(x, q, s, b, cb.tensor(), 4, 64, False, bias)
    assert y.shape == (2, 5, 24)
    torch.testing.assert_close(y, daq_linear_reference(x, q, s, b, cb.tensor(), 4, 64, bias), rtol=1e-4, atol=1e-4)


def test_op_carries_the_v2_layout(op, monkeypatch):
    """The v2 tensors and decode reach the kernels: the interpreter's default is a v1 path, so the
    tuner is pointed at the v2 `mma` path here, and its result must be the reference."""
    from daq_vllm.kernels import triton_gemm
    from daq_vllm.kernels.triton_v2_layout import repack

    q, s, b, cb = weights()
    rp = repack(q, s, b, tuple(cb.values), 4, 64, 96)
    seen = []
    cfg = triton_gemm.KernelConfig("mma", block_m=16, block_n=16)
    monkeypatch.setattr(triton_gemm, "_tuned", lambda *args: seen.append(args[-1]) or cfg)
    x, bias = torch.randn(2, 5, 96), torch.randn(24)
    y = torch.ops.daq.linear(x, q, s, b, cb.tensor(), 4, 64, False, bias, rp.codes, rp.scales, rp.offsets,
                             rp.decode, rp.asm, rp.asm_bf16)
    assert seen[0].decode == "table" and torch.equal(seen[0].codes, rp.codes)
    torch.testing.assert_close(y, daq_linear_reference(x, q, s, b, cb.tensor(), 4, 64, bias), rtol=1e-4, atol=1e-4)


def test_fake_impl_gives_shape_and_dtype_for_torch_compile(op):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(3, 7, 96, dtype=torch.float16)
        q = torch.empty(24, 12, dtype=torch.int32)
        s = torch.empty(24, 2, dtype=torch.float16)
        out = torch.ops.daq.linear(x, q, s, s, torch.empty(16), 4, 64, False, None)
    assert out.shape == (3, 7, 24) and out.dtype == torch.float16


def test_op_is_defined_once_when_its_source_is_imported_under_a_second_name():
    """With the repository root on sys.path, `kernels/` is also the top-level package `kernels`, which
    transformers imports while it looks for Hugging Face's package of that name. Defining the op again
    there would free the first definition's registration under its callers (a use-after-free in torch)."""
    code = (
        "import sys, torch\n"
        "defined = []\n"
        "custom_op = torch.library.custom_op\n"
        "torch.library.custom_op = lambda name, *a, **k: defined.append(name) or custom_op(name, *a, **k)\n"
        "from daq_vllm.kernels.op import daq_linear_op\n"
        "import kernels.op\n"
        "assert kernels.op.__file__ == sys.modules['daq_vllm.kernels.op'].__file__, 'not the same source'\n"
        "assert kernels.op.daq_linear_op is torch.ops.daq.linear.default\n"
        "print(*[name for name in defined if name.startswith('daq::')])\n"
    )
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["daq::linear"]
