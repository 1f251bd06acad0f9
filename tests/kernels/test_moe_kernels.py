"""MoE kernels (`cpu_moe`, `loop`, `triton_moe` under TRITON_INTERPRET=1) against `moe_reference`; their selection."""

import logging
import os
from dataclasses import replace

import pytest
import torch

from conftest import require, require_cpu_kernel
from daq_vllm.errors import DAQError
from daq_vllm.format import num_groups
from daq_vllm.kernels import MoESpec, choose_moe_kernel, moe_reference, pack_codes
from daq_vllm.kernels.cpu_build import CpuKernelUnavailable, ensure_loaded
from daq_vllm.kernels.moe import ACTIVATIONS, MOE_KERNELS

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

TOP_K = 2
# (E, H, I, g): whole groups; partial last groups along H and I at g = 64; at g = 32.
SHAPES = [(4, 128, 128, 64), (4, 80, 96, 64), (4, 80, 112, 32)]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ("DAQ_MOE_KERNEL", "DAQ_DISABLED_MOE_KERNELS", "DAQ_KERNEL", "DAQ_DISABLED_KERNELS"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def interpreted():
    """conftest.py turned the Triton interpreter on before triton was imported."""
    require(HAVE_TRITON, "triton is not installed")
    assert os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture
def cpu_moe():
    require_cpu_kernel()


def needs(request, name: str) -> None:
    """What running kernel `name` here requires: the C++ build, or Triton's interpreter; `loop` runs anywhere."""
    if name != "loop":
        request.getfixturevalue({"cpu_moe": "cpu_moe", "triton_moe": "interpreted"}[name])


@pytest.fixture
def poisoned(interpreted, monkeypatch):
    """GEMM1's output starts as NaN, so a routed row the kernel forgets to write fails the comparison."""
    from daq_vllm.kernels import triton_moe

    monkeypatch.setattr(triton_moe, "_new_output",
                        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))


def make_spec(shape=SHAPES[0], bits: int = 4, dtype=torch.float32, device: str = "cpu", activation: str = "silu",
              seed: int = 0) -> MoESpec:
    """A spec with random sorted codebooks, different for w13 and w2."""
    e, h, i, g = shape
    gen = torch.Generator().manual_seed(seed)
    w13_cb, w2_cb = (tuple(torch.sort(torch.rand(2**bits, generator=gen) * 2 - 1).values.tolist()) for _ in range(2))
    return MoESpec(bits, g, h, i, e, dtype, device, w13_cb, w2_cb, activation)


def make_layer(spec: MoESpec, seed: int = 0) -> torch.nn.Module:
    """A layer holding random codes, fp16 scales and offsets for every expert, as frozen parameters."""
    gen = torch.Generator().manual_seed(seed)
    layer = torch.nn.Module()
    e, h, i, g = spec.num_experts, spec.hidden_size, spec.intermediate_size, spec.group_size
    for projection, n, k in (("w13", 2 * i, h), ("w2", h, i)):
        codes = torch.randint(0, 2**spec.bits, (e * n, k), generator=gen)
        tensors = {"qweight": pack_codes(codes, spec.bits).view(e, n, -1),
                   "scales": (torch.rand(e, n, num_groups(k, g), generator=gen) * 0.1 + 0.05).half(),
                   "offsets": (torch.randn(e, n, num_groups(k, g), generator=gen) * 0.05).half()}
        for name, tensor in tensors.items():
            setattr(layer, f"{projection}_{name}", torch.nn.Parameter(tensor, requires_grad=False))
    return layer


def routing(m: int, experts: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct experts per token (int32 ids, as vLLM's top-k gives) and softmax weights (float32)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.rand(m, experts, generator=gen).argsort(dim=1)[:, :TOP_K].to(torch.int32)
    weights = torch.softmax(torch.randn(m, TOP_K, generator=gen), dim=1)
    return weights, ids


def inputs(spec: MoESpec, m: int, seed: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, spec.hidden_size, generator=gen).to(spec.act_dtype)


def prepared(name: str, spec: MoESpec, layer: torch.nn.Module):
    kernel = MOE_KERNELS[name](spec)
    ok, reason = kernel.can_implement(spec)
    assert ok, reason
    kernel.prepare(layer)
    return kernel


def check(y: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    assert y.dtype == ref.dtype and y.shape == ref.shape
    assert torch.isfinite(y).all()
    assert ref.abs().max() > 0.1  # the comparison compares something
    torch.testing.assert_close(y.float(), ref.float(), rtol=tol, atol=tol * ref.abs().max().item())


def cpu_kernel_builds() -> bool:
    try:
        ensure_loaded()
    except CpuKernelUnavailable:
        return False
    return True


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("linear", ["cpu", "torch"])
def test_loop_matches_reference_in_float32(monkeypatch, shape, bits, linear):
    if linear == "cpu":
        require(cpu_kernel_builds(), "the C++ CPU kernel does not build here")
    monkeypatch.setenv("DAQ_KERNEL", linear)
    spec = make_spec(shape, bits)
    layer = make_layer(spec)
    kernel = prepared("loop", spec, layer)
    assert {lin.kernel.name for lin in (*layer.daq_moe_w13, *layer.daq_moe_w2)} == {linear}
    for m in (1, 5, 37):
        x = inputs(spec, m)
        weights, ids = routing(m, spec.num_experts)
        check(kernel.apply(layer, x, weights, ids), moe_reference(spec, layer, x, weights, ids), 1e-5)


def test_loop_matches_reference_in_bfloat16():
    spec = make_spec(SHAPES[1], dtype=torch.bfloat16)
    layer = make_layer(spec)
    kernel = prepared("loop", spec, layer)
    x = inputs(spec, 37)
    weights, ids = routing(37, spec.num_experts)
    check(kernel.apply(layer, x, weights, ids), moe_reference(spec, layer, x, weights, ids), 2e-2)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits", [4, 3])
def test_cpu_moe_matches_reference_on_every_path(isa, shape, bits):
    """M = 1 and 5: every expert through the fused decode; 37 and 150: experts past MAX_FUSED_M rows
    take the prefill path (AVX2's panel GEMM, the others' decoded tiles), others stay fused."""
    spec = make_spec(shape, bits)
    layer = make_layer(spec)
    kernel = prepared("cpu_moe", spec, layer)
    assert kernel.isa == isa
    for m in (1, 5, 37, 150):
        x = inputs(spec, m)
        weights, ids = routing(m, spec.num_experts)
        check(kernel.apply(layer, x, weights, ids), moe_reference(spec, layer, x, weights, ids), 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_moe_in_half_precision_rounds_as_the_reference(cpu_moe, dtype):
    """act(gate) * up is rounded to x's dtype before w2, as the reference does: 1e-2, not 2e-2 as the loop."""
    spec = make_spec(SHAPES[1], dtype=dtype)
    layer = make_layer(spec)
    kernel = prepared("cpu_moe", spec, layer)
    for m in (1, 37):
        x = inputs(spec, m)
        weights, ids = routing(m, spec.num_experts)
        check(kernel.apply(layer, x, weights, ids), moe_reference(spec, layer, x, weights, ids), 1e-2)


def test_cpu_moe_never_reads_the_checkpoint_tensors_after_prepare(cpu_moe):
    """`owns_weights`: vLLM frees the checkpoint tensors after `prepare`; the results stay the same."""
    spec = make_spec(SHAPES[0])
    layer = make_layer(spec)
    kernel = prepared("cpu_moe", spec, layer)
    assert kernel.owns_weights
    x = inputs(spec, 5)
    weights, ids = routing(5, spec.num_experts)
    ref = moe_reference(spec, layer, x, weights, ids)
    for name in spec.shapes():
        setattr(layer, name, torch.nn.Parameter(torch.empty(0), requires_grad=False))
    check(kernel.apply(layer, x, weights, ids), ref, 1e-5)


def test_cpu_moe_is_traced_by_torch_compile_as_one_op(cpu_moe):
    spec = make_spec(SHAPES[0])
    layer = make_layer(spec)
    kernel = prepared("cpu_moe", spec, layer)
    x = inputs(spec, 5)
    weights, ids = routing(5, spec.num_experts)
    compiled = torch.compile(lambda t: kernel.apply(layer, t, weights, ids) * 2, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), kernel.apply(layer, x, weights, ids) * 2)


@pytest.mark.parametrize("shape", SHAPES)
# The interpreter rounds float32 to bfloat16 toward zero (GPUs round to nearest): its bf16 error is
# about 4x a GPU's (measured 2.7e-2 of the largest output against 6.8e-3 with rounding to nearest).
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_triton_matches_reference(poisoned, shape, dtype, tol):
    spec = make_spec(shape, dtype=dtype)
    layer = make_layer(spec)
    kernel = prepared("triton_moe", spec, layer)
    for m in (1, 5, 37):
        x = inputs(spec, m)
        weights, ids = routing(m, spec.num_experts)
        check(kernel.apply(layer, x, weights, ids), moe_reference(spec, layer, x, weights, ids), tol)


def test_triton_with_experts_spanning_several_blocks(poisoned):
    """150 tokens: BLOCK_M is 64 and each expert gets about 75 pairs, so its run covers two blocks."""
    spec = make_spec(SHAPES[2])
    layer = make_layer(spec)
    x = inputs(spec, 150)
    weights, ids = routing(150, spec.num_experts)
    assert torch.bincount(ids.flatten().long()).min() > 64
    y = prepared("triton_moe", spec, layer).apply(layer, x, weights, ids)
    check(y, moe_reference(spec, layer, x, weights, ids), 1e-5)


def test_the_activations_are_act_of_gate_times_up():
    h = torch.randn(3, 10, dtype=torch.float64)
    gate, up = h[:, :5], h[:, 5:]
    torch.testing.assert_close(ACTIVATIONS["silu"](h), (gate / (1 + torch.exp(-gate)) * up).float())
    torch.testing.assert_close(ACTIVATIONS["gelu"](h), (gate * (1 + torch.erf(gate / 2**0.5)) / 2 * up).float())


@pytest.mark.parametrize("name", ["cpu_moe", "loop", "triton_moe"])
def test_gelu_activation(request, name):
    needs(request, name)
    spec = make_spec(SHAPES[1], activation="gelu")
    layer = make_layer(spec)
    kernel = prepared(name, spec, layer)
    x = inputs(spec, 5)
    weights, ids = routing(5, spec.num_experts)
    ref = moe_reference(spec, layer, x, weights, ids)
    check(kernel.apply(layer, x, weights, ids), ref, 1e-5)
    silu = moe_reference(replace(spec, activation="silu"), layer, x, weights, ids)
    assert not torch.allclose(ref, silu, rtol=1e-2, atol=1e-3)  # the activation reaches the result


@pytest.mark.parametrize("name", ["cpu_moe", "loop", "triton_moe"])
def test_experts_off_this_rank_contribute_nothing(request, name):
    """-1 (and any id outside [0, E)) adds nothing: the same as a local expert with routing weight 0."""
    needs(request, name)
    if name == "triton_moe":
        request.getfixturevalue("poisoned")
    spec = make_spec(SHAPES[1])
    layer = make_layer(spec)
    kernel = prepared(name, spec, layer)
    m = 6
    x = inputs(spec, m)
    weights, ids = routing(m, spec.num_experts)
    remote = torch.zeros_like(ids, dtype=torch.bool)
    remote[1, 0] = remote[3, 1] = True
    remote[4] = True  # token 4 is routed to no local expert
    ids_remote = torch.where(remote, -1, ids)
    ids_remote[2, 1] = spec.num_experts + 3  # past the local experts: not on this rank either
    remote[2, 1] = True
    y = kernel.apply(layer, x, weights, ids_remote)
    assert torch.equal(y[4], torch.zeros_like(y[4]))
    check(y, kernel.apply(layer, x, torch.where(remote, 0.0, weights), ids), 1e-5)
    check(y, moe_reference(spec, layer, x, weights, ids_remote), 1e-5)
    every_remote = kernel.apply(layer, x, weights, torch.full_like(ids, -1))
    assert torch.equal(every_remote, torch.zeros_like(x))


@pytest.mark.parametrize("name", ["cpu_moe", "loop", "triton_moe"])
def test_an_empty_batch_gives_an_empty_output(request, name):
    needs(request, name)
    spec = make_spec(SHAPES[0])
    layer = make_layer(spec)
    weights, ids = routing(0, spec.num_experts)
    y = prepared(name, spec, layer).apply(layer, inputs(spec, 0), weights, ids)
    assert y.shape == (0, spec.hidden_size) and y.dtype == spec.act_dtype


def test_alignment_pads_each_expert_to_whole_blocks(interpreted):
    from daq_vllm.kernels.triton_moe import align_pairs

    ids = torch.tensor([[2, 0], [2, -1], [0, 2], [7, 2]], dtype=torch.int32)  # 4 experts: -1 and 7 are remote
    pair_ids, expert_of_block, padded = align_pairs(ids, 4, 4)
    assert padded.tolist() == [8]
    assert pair_ids[:8].tolist() == [1, 4, 8, 8, 0, 2, 5, 7]  # expert 0's pairs, padding (T = 8), expert 2's
    assert expert_of_block[:2].tolist() == [0, 2]
    assert len(pair_ids) == 4 * len(expert_of_block) >= 8


@pytest.mark.parametrize("name", ["cpu_moe", "loop", "triton_moe"])
@pytest.mark.parametrize("tensor", ["w13_scales", "w2_offsets"])
def test_non_finite_scales_or_offsets_are_refused_at_prepare(name, tensor):
    spec = make_spec()
    layer = make_layer(spec)
    getattr(layer, tensor).data[2, 5, 1] = float("nan") if tensor.endswith("scales") else float("inf")
    with pytest.raises(DAQError, match=f"the {tensor} of a DAQ MoE layer .* hold NaN or infinity"):
        MOE_KERNELS[name](spec).prepare(layer)


def test_a_wrongly_shaped_tensor_is_refused_at_prepare():
    spec = make_spec()
    layer = make_layer(make_spec(SHAPES[1]))
    with pytest.raises(DAQError, match=r"w13_qweight of a DAQ MoE layer .* has shape \(4, 192, 10\), "
                                       r"expected \(4, 256, 16\)"):
        MOE_KERNELS["loop"](spec).prepare(layer)


def test_priority_per_device(cpu_moe):
    assert choose_moe_kernel(make_spec(device="cpu")).name == "cpu_moe"
    assert choose_moe_kernel(make_spec(device="cpu", bits=3, dtype=torch.bfloat16)).name == "cpu_moe"
    assert choose_moe_kernel(make_spec(device="mps")).name == "loop"
    assert choose_moe_kernel(make_spec(device="cuda", dtype=torch.bfloat16)).name == "triton_moe"
    assert choose_moe_kernel(make_spec(device="cuda", bits=3)).name == "loop"  # triton_moe refuses 3-bit


def test_forcing_a_kernel(monkeypatch, interpreted):
    monkeypatch.setenv("DAQ_MOE_KERNEL", "triton_moe")
    assert choose_moe_kernel(make_spec()).name == "triton_moe"


def test_forcing_a_kernel_that_cannot_run_names_it_and_why(monkeypatch):
    monkeypatch.setenv("DAQ_MOE_KERNEL", "triton_moe")
    with pytest.raises(DAQError, match=r"^DAQ_MOE_KERNEL=triton_moe cannot run the MoE layer 4 experts "
                                       r"w13 \[256, 128\] w2 \[128, 128\] 3-bit g64 silu float32 on cpu: "
                                       r"reads 4-bit codes"):
        choose_moe_kernel(make_spec(bits=3))


@pytest.mark.parametrize("var", ["DAQ_MOE_KERNEL", "DAQ_DISABLED_MOE_KERNELS"])
def test_an_unknown_kernel_name_lists_the_known_ones(monkeypatch, var):
    monkeypatch.setenv(var, "marlin")
    with pytest.raises(DAQError, match=f"^{var} names no MoE kernel 'marlin'; "
                                       "choose one of: triton_moe, cpu_moe, loop$"):
        choose_moe_kernel(make_spec())


def test_a_dense_kernel_name_is_no_moe_kernel(monkeypatch):
    monkeypatch.setenv("DAQ_DISABLED_MOE_KERNELS", "loop, cpu")
    with pytest.raises(DAQError, match="DAQ_DISABLED_MOE_KERNELS names no MoE kernel 'cpu'"):
        choose_moe_kernel(make_spec())


def test_cuda_falls_back_to_loop_when_triton_moe_is_disabled(monkeypatch):
    monkeypatch.setenv("DAQ_DISABLED_MOE_KERNELS", "triton_moe")
    assert choose_moe_kernel(make_spec(device="cuda", dtype=torch.bfloat16)).name == "loop"


def test_disabling_every_kernel_is_one_error_listing_the_refusals(monkeypatch):
    monkeypatch.setenv("DAQ_DISABLED_MOE_KERNELS", "loop,cpu_moe")
    with pytest.raises(DAQError) as err:
        choose_moe_kernel(make_spec(device="cpu"))
    assert str(err.value) == (
        "no DAQ MoE kernel can run the layer 4 experts w13 [256, 128] w2 [128, 128] 4-bit g64 silu float32 on cpu "
        "(cpu_moe: disabled by DAQ_DISABLED_MOE_KERNELS; loop: disabled by DAQ_DISABLED_MOE_KERNELS); re-enable "
        "a kernel in DAQ_DISABLED_MOE_KERNELS, move the "
        "model to a supported device or change the layer's activation")
    with pytest.raises(DAQError) as err:  # on CUDA, triton_moe's and cpu_moe's own refusals are listed too
        choose_moe_kernel(make_spec(device="cuda", bits=3))
    message = str(err.value)
    assert "\n" not in message and message.startswith("no DAQ MoE kernel can run the layer 4 experts")
    assert "(triton_moe: reads 4-bit codes" in message and "; loop: disabled by DAQ_DISABLED_MOE_KERNELS)" in message


def test_forcing_wins_over_disabling(monkeypatch):
    monkeypatch.setenv("DAQ_DISABLED_MOE_KERNELS", "loop")
    monkeypatch.setenv("DAQ_MOE_KERNEL", "loop")
    assert choose_moe_kernel(make_spec()).name == "loop"


def test_no_kernel_left_joins_every_reason():
    with pytest.raises(DAQError) as err:
        choose_moe_kernel(make_spec(device="cuda", activation="relu"))
    message = str(err.value)
    assert message.startswith("no DAQ MoE kernel can run the layer 4 experts w13 [256, 128] w2 [128, 128] 4-bit g64 "
                              "relu float32 on cuda (triton_moe: the activation is 'relu'")
    assert "; loop: the activation is 'relu'; DAQ MoE kernels compute silu or gelu)" in message


def test_the_choice_is_logged_once_per_distinct_spec(caplog, cpu_moe):
    caplog.set_level(logging.INFO, logger="daq_vllm.kernels")
    first = make_spec(seed=10)
    for _ in range(3):
        choose_moe_kernel(first)
    choose_moe_kernel(make_spec(seed=11))
    assert [r.getMessage() for r in caplog.records] == [
        "DAQ MoE kernel cpu_moe chosen for 4 experts w13 [256, 128] w2 [128, 128] 4-bit g64 silu float32 on cpu"] * 2


def test_moe_kernel_benchmark_smoke_runs(tmp_path):
    """The GPU script's CPU mode (benchmarks/gpu_check.sh runs it on a GPU): the fused kernel on a
    tiny layer under the interpreter, against the reference."""
    import subprocess
    import sys
    from pathlib import Path

    require(HAVE_TRITON, "triton is not installed")
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "moe_kernel_bench.py"
    proc = subprocess.run([sys.executable, str(script), "--smoke", "--results", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "smoke triton_moe: rel err" in proc.stdout
    assert "correctness only" in (tmp_path / "moe-kernels-smoke.md").read_text()


def test_cpu_moe_kernel_benchmark_runs(tmp_path):
    """benchmarks/moe_kernel_bench_cpu.py on its smallest shape, two token counts, both dtypes: each
    kernel checked against `moe_reference` before it may post a time, the table written."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    require_cpu_kernel()
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "moe_kernel_bench_cpu.py"
    proc = subprocess.run([sys.executable, str(script), "--models", "smollm2-moe-e4k2", "--tokens", "1", "3",
                           "--min-run-time", "0.01", "--rotate-mib", "8", "--results", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "moe-kernels-cpu.json").read_text())["rows"]
    assert [(r["dtype"], r["T"]) for r in rows] == [("fp32", 1), ("fp32", 3), ("bf16", 1), ("bf16", 3)]
    assert all(r["cpu_moe_err"] < (1e-5 if r["dtype"] == "fp32" else 2e-2) and r["cpu_moe_ms"] > 0 for r in rows)
    assert "| smollm2-moe-e4k2 (4, 576, 1536, 2) | fp32 | 1 |" in (tmp_path / "moe-kernels-cpu.md").read_text()
