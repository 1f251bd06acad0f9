"""Bounded memory: the pre-flight estimate against the measured peak, the refusal, and the float32,
in-place GPTQ factorisation (no float64 K x K temporary)."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from test_ldra import calib_file
from torch.utils._python_dispatch import TorchDispatchMode

from daq_vllm import cli
from daq_vllm.errors import DAQError
from daq_vllm.format.codebooks import get_codebook
from daq_vllm.offline.compensated import (
    CompensationSpec,
    InputHessian,
    _upper_inverse_cholesky,
    compensate,
    permute_symmetric_,
)
from daq_vllm.offline.ldra import LDRASpec, quantize_weight_ldra
from daq_vllm.offline.memory import check_memory, layer_memory, plan_memory
from daq_vllm.offline.model_source import open_model
from daq_vllm.offline.moments import SecondMoments
from daq_vllm.offline.options import recipe_options
from daq_vllm.offline.ranges import InitSpec
from daq_vllm.offline.targets import plan_targets
from helpers import make_tiny_model


def test_the_estimate_is_within_25_percent_of_the_measured_peak(tmp_path):
    """A layer large enough that the quantizer's own memory dominates (K^2 moments of 64 MiB)."""
    src = make_tiny_model(tmp_path / "src", hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                          num_key_value_heads=4, num_hidden_layers=1)
    out = tmp_path / "q"
    proc = subprocess.run(
        [sys.executable, "-m", "daq_vllm.cli", "quantize", str(src), "--out", str(out), "--format", "nf4",
         "--calib", str(calib_file(tmp_path, words=20000)), "--nsamples", "32", "--seqlen", "128", "--no-progress"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "memory estimate: peak" in proc.stderr and "peak memory on cpu:" in proc.stdout
    memory = json.loads((out / "quantization_report.json").read_text())["memory"]
    ratio = memory["estimated_peak_bytes"] / memory["measured_peak_bytes"]
    assert 0.75 <= ratio <= 1.25, memory


def _plans(tiny_llama, opts):
    source = open_model(str(tiny_llama))
    targets = plan_targets(source, opts)
    return source, targets, plan_memory(source, targets, opts, process=0)


def test_a_budget_below_the_estimate_is_refused_naming_what_fits(tiny_llama):
    opts = recipe_options("daq")
    source, targets, gptq = _plans(tiny_llama, opts)
    nearest = _plans(tiny_llama, recipe_options("daq", "nearest"))[2]
    assert nearest.device_peak < gptq.device_peak
    opts.max_memory = (nearest.device_peak + gptq.device_peak) / 2 / 1024**3
    with pytest.raises(DAQError, match=r"more than the .* of --max-memory .*; it fits with --rounding nearest \("):
        check_memory(source, targets, opts, gptq)
    opts.max_memory = gptq.device_peak / 1024**3
    check_memory(source, targets, opts, gptq)  # enough: no error


def test_the_cli_refuses_a_tiny_budget_in_one_line(tiny_llama, tmp_path, capsys):
    out = tmp_path / "o"
    code = cli.main(["quantize", str(tiny_llama), "--out", str(out), "--max-memory", "0.01", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("daq-vllm: error:")]
    assert len(lines) == 1 and "of --max-memory 0.01" in lines[0] and "quantizing needs about" in lines[0]
    assert not (tmp_path / "o").exists()


def test_a_70b_shaped_layer_with_gptq_needs_at_most_twice_nearest():
    """The goal, on the estimate (the shapes need 15 GiB here; measured rows: benchmarks/quant_memory.py)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    cfg = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8)
    with torch.device("meta"):
        layer = LlamaDecoderLayer(cfg, 0)
    names = [f"l.{n}" for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
    gptq, nearest = (layer_memory("l", layer, names, recipe_options("daq", r), 8192, 64) for r in ("gptq", "nearest"))
    assert gptq.moments >= 2 * 28672**2 * 4  # the down_proj input's moment and its factor are counted
    assert gptq.peak <= 2 * nearest.peak
    # a rank of a distributed run also holds the sums it sends on: every input's K^2 floats once more
    sent = layer_memory("l", layer, names, recipe_options("daq", "gptq"), 8192, 64, world=2)
    assert sent.peak - gptq.peak == (3 * 8192**2 + 28672**2) * 4


class _Float64Watch(TorchDispatchMode):
    """Records the largest float64 tensor any op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                self.largest = max(self.largest, t.numel())
        return out


def test_gptq_rounding_makes_no_float64_k_by_k_temporary():
    gen = torch.Generator().manual_seed(0)
    k, g = 256, 64
    x = torch.randn(600, k, generator=gen) @ (torch.eye(k) + 0.2 * torch.randn(k, k, generator=gen) / k**0.5)
    h = x.T @ x / 600
    w = torch.randn(32, k, generator=gen) * 0.02
    cb = get_codebook("nf4")
    blocks = [torch.stack([h[i : i + g, i : i + g] for i in range(0, k, g)])]
    qw, _ = quantize_weight_ldra(w, blocks, cb, g, InitSpec(), LDRASpec())
    watch = _Float64Watch()
    with watch:
        new, (before, after) = compensate(w, InputHessian(h.clone(), CompensationSpec()), qw, cb, g)
    assert after < before
    assert watch.largest < k * k


def test_symmetric_permutation_is_in_place_and_exact():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(50, 50, generator=gen)
    h = a @ a.T
    order = torch.randperm(50, generator=gen)
    expected = h[order][:, order]
    storage = h.data_ptr()
    permute_symmetric_(h, order)
    assert h.data_ptr() == storage and torch.equal(h, expected)


def test_float32_factor_matches_float64_and_keeps_h():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 96, generator=gen) * torch.linspace(0.1, 3, 96)
    h = x.T @ x / 400
    h[5, :] = h[:, 5] = 0  # a dead input
    kept = h.clone()
    u = _upper_inverse_cholesky(h, 0.01)
    ref = h.double().clone()
    ref[5, 5] = 1
    ref.diagonal().add_(0.01 * ref.diagonal().mean())
    expected = torch.linalg.cholesky(torch.linalg.inv(ref), upper=True)
    assert u.dtype == torch.float32 and torch.equal(h, kept)
    torch.testing.assert_close(u.double(), expected, rtol=1e-3, atol=1e-4)


def test_dampening_grows_until_the_factor_exists_else_one_line():
    u = _upper_inverse_cholesky(torch.tensor([[1.0, 2.0], [2.0, 1.0]]), 0.01)  # indefinite: needs damp > 1
    assert torch.isfinite(u).all()
    refused = "not positive definite even with dampening 10; quantize with --rounding nearest"
    with pytest.raises(DAQError, match=refused):
        _upper_inverse_cholesky(torch.tensor([[1.0, 100.0], [100.0, 1.0]]), 0.01)


def test_an_inputs_statistics_go_after_its_last_reader():
    lins = torch.nn.ModuleDict({n: torch.nn.Linear(64, 4, bias=False) for n in ("q", "k", "o")})
    moments = SecondMoments(32, full=True)
    moments.attach(lins, "m", ["m.q", "m.k", "m.o"])
    moments.new_pass()
    x = torch.randn(10, 64)
    lins["q"](x), lins["k"](x), lins["o"](torch.randn(10, 64))
    moments.detach()
    moments.moments("m.q")
    assert set(moments.sums) == {"m.q", "m.o"}
    moments.done("m.q")
    assert "m.q" in moments.sums  # k still reads that input
    moments.done("m.k")
    assert set(moments.sums) == {"m.o"}


def test_offloading_moves_the_activations_from_the_gpu_to_the_host(tiny_llama):
    opts = recipe_options("daq", device="cuda")  # the plan reads shapes only: no GPU needed
    source, targets, on_gpu = _plans(tiny_llama, opts)
    off = plan_memory(source, targets, replace(opts, offload_activations=True), process=0)
    moved = on_gpu.largest.activations
    assert moved == 2 * 128 * 512 * 192 * 4  # 2 x nsamples x seqlen x hidden x float32
    assert off.device_peak == on_gpu.device_peak - moved and off.host_peak == on_gpu.host_peak + moved
