"""Shared fixtures. With DAQ_REQUIRE_ALL=1 (CI), a missing optional dependency fails instead of skipping."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

# Triton kernels run on CPU tensors through the interpreter. Triton reads this flag when it is
# imported (its own library functions are decorated then), so it is set before anything imports it.
os.environ.setdefault("TRITON_INTERPRET", "1")
from pathlib import Path

import pytest
import torch

from daq_vllm.kernels.cpu_linear import ISAS, best_isa
from helpers import make_tiny_model

REQUIRE_ALL = os.environ.get("DAQ_REQUIRE_ALL") == "1"
HAVE_VLLM = importlib.util.find_spec("vllm") is not None  # found without importing it (seconds)


def require(condition: bool, reason: str) -> None:
    """Skip when `condition` is false, or fail in CI, where every test must run."""
    if condition:
        return
    if REQUIRE_ALL:
        pytest.fail(f"DAQ_REQUIRE_ALL=1 but {reason}")
    pytest.skip(reason)


def require_cpu_kernel() -> None:
    """Load the C++ CPU kernel, or skip (fail in CI) naming why it cannot be built here."""
    from daq_vllm.kernels.cpu_build import CpuKernelUnavailable, ensure_loaded

    try:
        ensure_loaded()
    except CpuKernelUnavailable as e:
        require(False, f"the DAQ CPU kernel cannot be built here: {e}")


@pytest.fixture(params=list(ISAS))
def isa(request, monkeypatch) -> str:
    """Each instruction-set path of the C++ CPU kernel forced in turn (`DAQ_CPU_ISA`); only one this CPU
    lacks may skip, and in CI only AVX-512."""
    require_cpu_kernel()
    if ISAS[request.param] > ISAS[best_isa()]:
        if request.param == "avx2" and REQUIRE_ALL:
            pytest.fail("DAQ_REQUIRE_ALL=1 but this CPU has no AVX2: the AVX2 path must run in CI")
        pytest.skip(f"this CPU has no {request.param}")
    monkeypatch.setenv("DAQ_CPU_ISA", request.param)
    return request.param


@pytest.fixture(scope="module")
def tg():
    """The Triton kernels module (`triton_gemm`), run on CPU tensors: the interpreter is on (above)."""
    require(importlib.util.find_spec("triton") is not None, "triton is not installed")
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from daq_vllm.kernels import triton_gemm

    return triton_gemm


@pytest.fixture
def poisoned(tg, monkeypatch):
    """`tg` with kernel outputs starting as NaN, so an element a kernel forgets to write fails the comparison."""
    monkeypatch.setattr(tg, "_new_output",
                        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))
    return tg


@pytest.fixture(scope="session", autouse=True)
def cpu_kernel_built() -> None:
    """Build the C++ CPU kernel once, first: a test's subprocess then loads it from the cache instead
    of printing the one-time "compiling" line into the stderr the test checks."""
    from daq_vllm.kernels.cpu_build import CpuKernelUnavailable, ensure_loaded

    try:
        ensure_loaded()
    except CpuKernelUnavailable:
        pass  # tests/kernels/test_cpu_kernel.py fails (CI) or skips with the reason


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from daq_vllm.demo.smollm2 import smollm2_gguf as find
    from daq_vllm.errors import DAQError

    try:
        return find()
    except DAQError as e:
        require(False, str(e))


@pytest.fixture(scope="session")
def wikitext2_raw(tmp_path_factory) -> Path:
    """The packaged wiki.test.raw (checked against its sha256), written out for tests that pass `--data`."""
    from daq_vllm.data.wikitext import WIKITEXT2_TEST, packaged_text

    path = tmp_path_factory.mktemp("wikitext2") / "wiki.test.raw"
    path.write_bytes(packaged_text(WIKITEXT2_TEST).encode("utf-8"))
    return path


@pytest.fixture(scope="session")
def smollm2_dca(smollm2_gguf, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """SmolLM2-135M quantized once per session by the CLI, calibration-free (DCA, fp4_e2m1, g64; ~35 s).

    Returns the output directory and the finished `daq-vllm quantize` process (tests check its exit).
    """
    out = tmp_path_factory.mktemp("smollm2") / "smol-dca-fp4-g64"
    proc = subprocess.run(
        [sys.executable, "-m", "daq_vllm.cli", "quantize", str(smollm2_gguf), "--format", "fp4_e2m1",
         "--group-size", "64", "--method", "dca", "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    return out, proc
