"""Kernel selection alone: priority per device, reasons joined, DAQ_KERNEL and DAQ_DISABLED_KERNELS."""

import logging

import pytest
import torch

from daq_vllm.errors import DAQError
from daq_vllm.format import DAQFormat, get_codebook
from daq_vllm.kernels import KERNELS, LinearSpec, choose_kernel


def spec(fmt: str = "fp4_e2m1", device: str = "cpu", dtype=torch.float32, n: int = 48) -> LinearSpec:
    cb = get_codebook(fmt)
    return LinearSpec.of(DAQFormat(fmt, cb.bits, 64, list(cb.values)), 96, n, dtype, device)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv("DAQ_KERNEL", raising=False)
    monkeypatch.delenv("DAQ_DISABLED_KERNELS", raising=False)


def test_the_decode_kind_comes_from_the_codebook_values():
    assert [spec(f).decode for f in ("fp4_e2m1", "int4", "int3", "nf4", "fp4_e2m1_ref", "fp3_e2m0")] == [
        "e2m1", "int", "int", "table", "table", "table"]


def test_priority_per_device():
    assert choose_kernel(spec(device="cpu")).name == "cpu"
    assert choose_kernel(spec(device="mps")).name == "torch"
    assert choose_kernel(spec(device="cuda", dtype=torch.float16)).name == "triton"


def test_cuda_falls_back_to_torch_when_triton_is_disabled(monkeypatch):
    monkeypatch.setenv("DAQ_DISABLED_KERNELS", "triton")
    assert choose_kernel(spec(device="cuda")).name == "torch"


def test_preferred_kernels_come_first_but_never_an_unable_one(monkeypatch):
    assert choose_kernel(spec(), ["dense"]).name == "dense"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert choose_kernel(spec(), ["triton"]).name == "cpu"  # triton cannot run on CPU: next in line


def test_no_kernel_left_joins_every_reason(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("DAQ_DISABLED_KERNELS", "cpu,torch")
    with pytest.raises(DAQError) as err:
        choose_kernel(spec(), ["triton"])
    message = str(err.value)
    assert "\n" not in message and message.startswith("no DAQ kernel can run the layer [48, 96] 4-bit g64 e2m1")
    assert "triton: needs a CUDA device (or TRITON_INTERPRET=1 on CPU), the layer is on cpu" in message
    assert "cpu: disabled by DAQ_DISABLED_KERNELS; torch: disabled by DAQ_DISABLED_KERNELS" in message


def test_forcing_a_kernel_that_cannot_run_names_it_and_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("DAQ_KERNEL", "triton")
    with pytest.raises(DAQError, match=r"^DAQ_KERNEL=triton cannot run the layer .*: needs a CUDA device"):
        choose_kernel(spec())


def test_forcing_wins_over_the_priority_list(monkeypatch):
    monkeypatch.setenv("DAQ_KERNEL", "dense")
    assert choose_kernel(spec(), ["torch"]).name == "dense"


@pytest.mark.parametrize("var", ["DAQ_KERNEL", "DAQ_DISABLED_KERNELS"])
def test_an_unknown_kernel_name_lists_the_known_ones(monkeypatch, var):
    monkeypatch.setenv(var, "marlin")
    with pytest.raises(DAQError, match=f"{var} names no kernel 'marlin'; choose one of: " + ", ".join(KERNELS)):
        choose_kernel(spec())


def test_the_moe_variables_do_not_steer_dense_kernels(monkeypatch):
    monkeypatch.setenv("DAQ_MOE_KERNEL", "loop")
    monkeypatch.setenv("DAQ_DISABLED_MOE_KERNELS", "loop")
    assert choose_kernel(spec()).name == "cpu"


def test_the_choice_is_logged_once_per_distinct_spec(caplog):
    caplog.set_level(logging.INFO, logger="daq_vllm.kernels")
    first = spec(n=1000)
    for _ in range(3):
        choose_kernel(first)
    choose_kernel(spec(n=1001))
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["DAQ kernel cpu chosen for [1000, 96] 4-bit g64 e2m1 float32 on cpu",
                     "DAQ kernel cpu chosen for [1001, 96] 4-bit g64 e2m1 float32 on cpu"]


def test_the_triton_kernel_refuses_other_activation_dtypes():
    ok, reason = KERNELS["triton"].can_implement(spec(device="cuda", dtype=torch.float64))
    assert not ok and "float64" in reason
