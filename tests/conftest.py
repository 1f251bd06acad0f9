"""Shared fixtures. With DAQ_REQUIRE_ALL=1 (CI), a missing optional dependency fails instead of skipping."""

from __future__ import annotations

import os

# Triton kernels run on CPU tensors through the interpreter. Triton reads this flag when it is
# imported (its own library functions are decorated then), so it is set before anything imports it.
os.environ.setdefault("TRITON_INTERPRET", "1")
from pathlib import Path

import pytest

from helpers import make_tiny_model

REQUIRE_ALL = os.environ.get("DAQ_REQUIRE_ALL") == "1"


def require(condition: bool, reason: str) -> None:
    """Skip when `condition` is false, or fail in CI, where every test must run."""
    if condition:
        return
    if REQUIRE_ALL:
        pytest.fail(f"DAQ_REQUIRE_ALL=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from daq_vllm.errors import DAQError
    from daq_vllm.models import smollm2_gguf as find

    try:
        return find()
    except DAQError as e:
        require(False, str(e))


@pytest.fixture(scope="session")
def wikitext2_raw() -> Path:
    from daq_vllm.data import WIKITEXT2_TEST, find_data_file
    from daq_vllm.errors import DAQError

    try:
        return find_data_file(WIKITEXT2_TEST)
    except DAQError as e:
        require(False, str(e))
