"""Every Triton path against the torch reference, under TRITON_INTERPRET=1 on CPU tensors."""


import pytest
import torch

from conftest import require
from daq_vllm.format import num_groups
from daq_vllm.format.codebooks import decode_kind, get_codebook
from daq_vllm.kernels import dequantize, pack_codes

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

FORMATS = ["fp4_e2m1", "nf4", "fp3_e2m0", "int3"]
N, K = 40, 200  # neither is a multiple of the block sizes; K % g leaves a partial group for g = 64, 128


def e2m1(cb) -> bool:
    """Whether the kernels may decode this codebook from its bits (what `LinearSpec.decode` decides)."""
    return decode_kind(cb.values) == "e2m1"


def weights(fmt: str, g: int, seed: int = 0):
    cb = get_codebook(fmt)
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**cb.bits, (N, K), generator=gen)
    groups = num_groups(K, g)
    scales = (torch.rand(N, groups, generator=gen) * 0.05 + 0.01).half()
    offsets = (torch.randn(N, groups, generator=gen) * 0.02).half()
    return pack_codes(codes, cb.bits), scales, offsets, cb


def reference(x, q, s, b, cb, g, bias):
    """fp32 product of x with W_hat rounded to x's dtype (what the kernels compute), plus bias."""
    w = dequantize(q, s, b, cb.tensor(), cb.bits, g, K).to(x.dtype).float()
    return x.float() @ w.T + bias.float()


def check(y, ref, dtype):
    assert y.dtype == dtype and y.shape == ref.shape
    assert not torch.isnan(y).any()
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemv_and_gemm_match_reference(poisoned, fmt, g, dtype):
    q, s, b, cb = weights(fmt, g)
    bias = torch.randn(N).to(dtype)
    for m in (1, 3, 16, 64):
        x = torch.randn(m, K).to(dtype)
        kernel = poisoned.gemv_triton if m <= poisoned.GEMV_MAX_M else poisoned.gemm_triton
        y = kernel(x, q, s, b, cb.tensor(), cb.bits, g, e2m1(cb), bias)
        check(y, reference(x, q, s, b, cb, g, bias), dtype)


@pytest.mark.parametrize("fmt", ["fp4_e2m1", "nf4", "fp3_e2m0"])
@pytest.mark.parametrize("m, cfg", [
    (2, dict(path="gemv", block_n=8, chunks_per_iter=4, split_k=3)),  # split-K (atomic adds), 4 chunks a step
    (5, dict(path="gemm", block_m=16, block_n=16, split_k=2)),
    (40, dict(path="gemm", block_m=32, block_n=64)),
    (3, dict(path="dequant")),
])
def test_every_config_shape_matches_reference(poisoned, fmt, m, cfg):
    """The tuner's choices beyond the CPU defaults: split-K, wider steps, other tiles, dequant + matmul."""
    q, s, b, cb = weights(fmt, 64, seed=4)
    bias = torch.randn(N).half()
    x = torch.randn(m, K).half()
    config = poisoned.KernelConfig(**cfg)
    y = poisoned._PATHS[config.path](x, q, s, b, cb.tensor(), cb.bits, 64, e2m1(cb), bias, config)
    check(y, reference(x, q, s, b, cb, 64, bias), torch.float16)


def test_e2m1_bit_decoding_equals_the_table(poisoned):
    """fp4_e2m1 is decoded from its bits; the table lookup must give the same result."""
    q, s, b, cb = weights("fp4_e2m1", 32, seed=5)
    table = cb.tensor()
    assert e2m1(cb) and not e2m1(get_codebook("nf4")) and not e2m1(get_codebook("fp4_e2m1_ref"))
    x = torch.randn(3, K).half()

    def paths(bits_decoded: bool) -> list[torch.Tensor]:
        return [poisoned.gemv_triton(x, q, s, b, table, 4, 32, bits_decoded),
                poisoned.gemm_triton(x, q, s, b, table, 4, 32, bits_decoded),
                poisoned.dequantize_triton(q, s, b, table, 4, 32, bits_decoded, K, torch.float32)]

    for a, c in zip(paths(True), paths(False)):
        torch.testing.assert_close(a, c, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("fmt", ["fp4_e2m1", "fp3_e2m0"])
@pytest.mark.parametrize("groups_per_program", [1, 2])
def test_dequantize_kernel_is_exact(poisoned, fmt, groups_per_program):
    q, s, b, cb = weights(fmt, 64, seed=1)
    w = poisoned.dequantize_triton(q, s, b, cb.tensor(), cb.bits, 64, e2m1(cb), K, torch.float32,
                                   block_n=16, groups_per_program=groups_per_program)
    assert torch.equal(w, dequantize(q, s, b, cb.tensor(), cb.bits, 64, K))


def test_dispatch_covers_every_path(poisoned, monkeypatch):
    """The untuned GPU defaults (gemv, gemm, dequant by M) run through the public entry here too."""
    daq_linear = poisoned.daq_linear_triton
    q, s, b, cb = weights("nf4", 64, seed=2)
    bias = torch.randn(N).half()
    paths = {m: poisoned.default_config(m, N, K, cuda=True).path for m in (2, 40, poisoned.DEQUANT_MIN_M + 6)}
    assert list(paths.values()) == ["gemv", "gemm", "dequant"]
    cpu = [poisoned.default_config(m, N, K, cuda=False).path for m in paths]
    assert cpu == ["gemm", "gemm", "dequant"]  # the interpreter's defaults skip the slow-to-interpret gemv
    gpu_default = poisoned.default_config
    monkeypatch.setattr(poisoned, "default_config", lambda m, n, k, cuda: gpu_default(m, n, k, True))
    for m in paths:
        x = torch.randn(m, K).half()
        y = daq_linear(x, q, s, b, cb.tensor(), cb.bits, 64, False, bias)
        check(y, reference(x, q, s, b, cb, 64, bias), torch.float16)
    x3 = torch.randn(2, 3, K).half()  # leading dims are kept
    assert daq_linear(x3, q, s, b, cb.tensor(), cb.bits, 64, False, bias).shape == (2, 3, N)


def test_candidate_configs_cover_each_m_bucket(tg):
    """Decode buckets try the GEMV and a split-K GEMM; large M also tries dequantize + cuBLAS."""
    for m in (1, 2, 4, 8):
        assert {c.path for c in tg.candidate_configs(m)} == {"gemv", "gemm"}
    assert {c.path for c in tg.candidate_configs(32)} == {"gemm"}
    assert {c.path for c in tg.candidate_configs(4096)} == {"gemm", "dequant"}
    assert tg.m_bucket(3) == 4 and tg.m_bucket(1) == 1 and tg.m_bucket(1000) == 1024


def test_kernel_benchmark_smoke_runs(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    require(HAVE_TRITON, "triton is not installed")
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "kernel_bench.py"
    proc = subprocess.run([sys.executable, str(script), "--smoke", "--results", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for path in ("gemv", "gemm", "dequant", "gemv2", "mma"):
        assert f"({path}): rel err" in proc.stdout
    assert "Not measured on GPU" in (tmp_path / "kernels-smoke.md").read_text()


def test_gpu_script_runs_every_asked_step_and_lists_the_failures(tmp_path):
    """benchmarks/gpu_check.sh without a GPU: each asked-for step fails in its own way and the next
    still runs; the failures file lists them and the exit status is 1; an unknown step name exits 2
    before anything runs."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    require(not torch.cuda.is_available(), "a GPU is present: the script would run for minutes")
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"
    env = {**os.environ, "OUT": str(tmp_path), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(script), "loader", "moe"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 1, proc.stderr[-2000:]
    failures = (tmp_path / "failures.txt").read_text().splitlines()
    assert [line.split(": ", 1)[1].split()[1] for line in failures] == [
        "benchmarks/gpu_loader_check.py", "benchmarks/moe_kernel_bench.py"]
    assert all(line.startswith("exit 1: ") for line in failures)
    bad = subprocess.run(["bash", str(script), "loader", "bogus"], capture_output=True, text=True, env=env,
                         timeout=60)
    assert bad.returncode == 2 and "unknown step 'bogus' (steps: kernels loader 3bit moe bf16)" in bad.stderr
    assert "==" not in bad.stdout


def test_kernel_warmup_compiles_each_config_in_one_worker(monkeypatch):
    """The GPU benchmark's compile warm-up (benchmarks/triton_warmup.py): launches grouped so one job
    holds one config of one format (no two workers compile the same kernel), repeats dropped, every
    launch made in spawned workers, a failing one reported rather than raised."""
    from pathlib import Path

    require(HAVE_TRITON, "triton is not installed")
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from triton_warmup import Launch, jobs, warm

    from daq_vllm.kernels.triton_gemm import KernelConfig

    gemm = KernelConfig("gemm", block_m=16, block_n=64)
    mma = KernelConfig("mma", block_m=16, block_n=64, split_k=1)
    launches = [Launch("nf4", 64, "float16", N, K, m, gemm) for m in (1, 5)]
    launches += [Launch("nf4", 64, "float16", N, K, 1, gemm),  # a repeat
                 Launch("int3", 64, "float16", N, K, 1, gemm),  # another format: its own job
                 Launch("nf4", 48, "float16", N, 96, 1, mma)]  # g48: no v2 layout, so mma fails
    grouped = jobs(launches)
    assert [[(j.fmt, j.m) for j in job] for job in grouped] == [[("nf4", 1), ("nf4", 5)], [("int3", 1)], [("nf4", 1)]]
    warmed = warm(launches, workers=2, device="cpu")
    assert (warmed.jobs, warmed.launches) == (3, 4)
    assert len(warmed.failures) == 1
    assert "group=48" in warmed.failures[0] and "ValueError: the mma path needs the v2 layout" in warmed.failures[0]
    assert warmed.line().startswith("warm-up: 4 launches in 3 jobs, 1 failed")


def crashing_runner(job, device: str, crash_dir: str) -> list[str]:
    """A warm-up job runner (spawned, so module level) whose launches at M = 13 end their process the
    way a launch that loses the CUDA context does (`triton_warmup.note_crash`); it reports each
    launch at M = 2 it made, to count them."""
    from triton_warmup import note_crash

    for launch in job:
        if launch.m == 13:
            note_crash(crash_dir, launch, "RuntimeError: CUDA error: an illegal memory access was encountered")
    return [f"made {launch}" for launch in job if launch.m == 2]


def test_kernel_warmup_goes_on_without_a_config_that_crashed(monkeypatch):
    """A launch that loses its worker's CUDA context: recorded, its config dropped from the jobs left
    (which run in a new pool) and from the tuner's candidates; three crashed configs drop their path."""
    from pathlib import Path

    require(HAVE_TRITON, "triton is not installed")
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from triton_warmup import Launch, exclude, faulty, warm

    from daq_vllm.kernels import triton_gemm as tg

    bad, good = tg.candidate_configs(1)[:2]
    launches = [Launch("nf4", 64, "float16", N, K, m, bad) for m in (1, 13, 5)]
    launches += [Launch("nf4", 64, "float16", N, K, m, good) for m in (1, 2)]
    warmed = warm(launches, workers=2, device="cpu", runner=crashing_runner)
    assert warmed.crashed == [launches[1]]
    assert sum("illegal memory access" in f for f in warmed.failures) == 1
    assert sum(f.startswith("made ") for f in warmed.failures) == 1  # the other job ran, once, crash or not
    assert "(1 lost the CUDA context)" in warmed.line()

    mmas = [c for c in tg.v2_candidate_configs(16) if c.path == "mma"]
    assert faulty(bad, warmed.crashed) and not faulty(good, warmed.crashed)
    crashed_mma = [Launch("nf4", 64, "float16", N, K, 16, c) for c in mmas[:3]]
    assert faulty(mmas[3], crashed_mma) and not faulty(tg.v2_candidate_configs(1)[0], crashed_mma)

    monkeypatch.setattr(tg, "candidate_configs", tg.candidate_configs)  # restored after the test
    monkeypatch.setattr(tg, "v2_candidate_configs", tg.v2_candidate_configs)
    exclude(warmed.crashed + crashed_mma)
    assert bad not in tg.candidate_configs(1) and good in tg.candidate_configs(1)
    assert {c.path for c in tg.v2_candidate_configs(1)} == {"gemv2"}  # was gemv2 and mma


def load_kernel_bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "kernel_bench.py"
    spec = importlib.util.spec_from_file_location("kernel_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_kernel_benchmark_cut_short_keeps_formats_paired(monkeypatch):
    """The GPU benchmark runs every format on a shape before the next shape, so a run its time budget
    cuts short still pairs nf4 with fp4_e2m1 on the same shapes (the paired goals need that)."""
    from types import SimpleNamespace

    require(HAVE_TRITON, "triton is not installed")
    bench = load_kernel_bench()
    clock = iter(range(100))  # each deadline check is one second later
    monkeypatch.setattr(bench, "time", SimpleNamespace(monotonic=lambda: next(clock)))
    monkeypatch.setattr(bench, "copy_bandwidth_gbs", lambda device: 1.0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "GPU X")
    monkeypatch.setattr(bench, "bench_shape", lambda fmt, dtype, model, name, n, k, ms, errors:
                        [{"model": model, "linear": name, "M": m} for m in ms])
    saved = {}
    bench.bench_gpu(["fp4_e2m1", "nf4"], torch.float16, bench.SHAPES, [1, 16], lambda b: saved.update({b["format"]: b}),
                    deadline=1.5)  # the checks at 0 and 1 pass, the one at 2 stops the run
    first_two = [(model, name) for model, layers in bench.SHAPES.items() for name in layers][:2]
    for fmt in ("fp4_e2m1", "nf4"):
        assert saved[fmt]["cut_short"] and saved[fmt]["dtype"] == "float16"
        assert [(r["model"], r["linear"], r["M"]) for r in saved[fmt]["rows"]] == [
            (model, name, m) for model, name in first_two for m in (1, 16)]


def test_kernel_benchmark_goals_table():
    """The issue's goals computed from a results file: medians over shapes, paired nf4 / 3-bit ratios,
    and 'not measured' for what a run did not cover."""
    bench = load_kernel_bench()

    def rows(ms_by_m: dict[int, list[float]], fp16_ms: float = 1.0) -> dict:
        return {"rows": [{"model": "m", "linear": f"l{i}", "M": m, "daq_ms": t, "speedup_vs_fp16": fp16_ms / t,
                          "speedup_vs_int4": 1.5 if m == 1 else None}
                         for m, times in ms_by_m.items() for i, t in enumerate(times)]}

    result = {"formats": {"fp4_e2m1": rows({1: [0.5, 0.3, 0.2], 16: [0.6, 0.6, 0.4]}),
                          "nf4": rows({16: [0.66, 0.9, 0.44]}), "int3": rows({1: [0.25, 0.25, 0.1]})}}
    table = "\n".join(bench.goals(result))
    assert "| fp4_e2m1 M=1: median x fp16 >= 2.6 | 3.33 | met |" in table
    assert "| fp4_e2m1 M=16: median x fp16 >= 2.0 | 1.67 | missed |" in table
    assert "| fp4_e2m1 M=64: median x fp16 >= 1.3 | n/a | not measured |" in table
    assert "| fp4_e2m1 M=1: median x PyTorch int4 >= 1.0 | 1.50 | met |" in table
    assert "| nf4 time / fp4_e2m1 time, worst M >= 16: <= 1.2 | 1.10 | met |" in table  # ratios 1.1, 1.5, 1.1
    assert "| int3 M=1: fp4_e2m1 time / int3 time > 1 | 2.00 | met |" in table  # ratios 2, 1.2, 2
    assert "| fp3_e2m0 M=1: fp4_e2m1 time / fp3_e2m0 time > 1 | n/a | not measured |" in table
