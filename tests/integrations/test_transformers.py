"""transformers with the kernel layer: each kernel chosen once per layer gives the same greedy tokens."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from conftest import require
from helpers import make_daq_checkpoint

PROMPT = [[5, 17, 33, 101, 7, 64, 9, 220, 42, 3]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_daq_checkpoint(tmp_path_factory.mktemp("kernels"))


def greedy(checkpoint, monkeypatch, kernel: str) -> list[int]:
    from transformers import AutoModelForCausalLM

    import daq_vllm  # noqa: F401
    from daq_vllm.integrations.transformers import DAQLinear

    monkeypatch.setenv("DAQ_KERNEL", kernel)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    kernels = {m.kernel.name for m in model.modules() if isinstance(m, DAQLinear)}
    assert kernels == {kernel}  # chosen once per layer at load time, the forced one everywhere
    ids = torch.tensor(PROMPT)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def test_every_kernel_gives_equal_greedy_tokens(checkpoint, monkeypatch):
    try:
        import triton  # noqa: F401
    except ImportError:
        require(False, "triton is not installed")
    assert os.environ.get("TRITON_INTERPRET") == "1"  # conftest: Triton runs on CPU tensors
    tokens = {kernel: greedy(checkpoint, monkeypatch, kernel) for kernel in ("torch", "dense", "triton", "cpu")}
    assert len(tokens["torch"]) == 5
    assert tokens["torch"] == tokens["dense"] == tokens["triton"] == tokens["cpu"]


def test_forcing_a_kernel_that_cannot_run_fails_eval_with_one_line(checkpoint):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"DAQ_KERNEL": "triton"}
    proc = subprocess.run([sys.executable, "-m", "daq_vllm.cli", "eval", str(checkpoint), "--max-windows", "1",
                           "--seqlen", "64", "--no-progress"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("daq-vllm: error: DAQ_KERNEL=triton cannot run the layer ")
    assert "needs a CUDA device (or TRITON_INTERPRET=1 on CPU), the layer is on cpu" in proc.stderr


def test_gpu_loader_check_smoke_runs(tmp_path):
    """The GPU script's loader step in its CPU mode (benchmarks/gpu_loader_check.py; gpu_check.sh runs
    it on CUDA): a checkpoint through transformers with every linear on the triton kernel and its v2
    layout, logits equal to the torch kernel's."""
    import json
    from pathlib import Path

    require(importlib.util.find_spec("triton") is not None, "triton is not installed")
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_loader_check.py"
    proc = subprocess.run([sys.executable, str(script), "--smoke", "--results", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run,) = json.loads((tmp_path / "loader-smoke.json").read_text())["runs"]
    assert run["dtype"] == "float32" and run["kernels"] == ["triton"] and run["v2_layout"] == run["linears"] == 7
    assert set(run["rel_err"]) == {"32", "1"} and all(err < 1e-5 for err in run["rel_err"].values())
    assert "Result: ok." in (tmp_path / "loader-smoke.md").read_text()
