"""Error-compensated (GPTQ-style) rounding and its polishing: full moments, loss, pipeline, CLI."""

import json

import pytest
import torch
from test_ldra import accumulate, calib_file, daq_args

from daq_vllm import cli
from daq_vllm.format.codebooks import get_codebook
from daq_vllm.offline.compensated import (
    CompensationSpec,
    InputHessian,
    compensate,
    compensated_codes,
    descend_codes,
    refit_grids,
    row_losses,
)
from daq_vllm.offline.grid import QuantizedWeight
from daq_vllm.offline.ldra import LDRASpec, quantize_weight_ldra
from daq_vllm.offline.ranges import InitSpec


def test_full_moment_blocks_equal_the_block_diagonal_accumulator():
    torch.manual_seed(0)
    k, g = 100, 32  # 3 full groups and a partial one of 4
    x = torch.randn(2, 37, k)
    blocks = accumulate([x[0], x[1]], k, g, full=False).moments("m.0")
    full = accumulate([x[0], x[1]], k, g, full=True)
    xt = x.reshape(-1, k)
    torch.testing.assert_close(full.full_moment("m.0"), xt.T @ xt / xt.shape[0])
    from_full = full.moments("m.0")
    assert [b.shape for b in from_full] == [b.shape for b in blocks] == [(3, 32, 32), (1, 4, 4)]
    for a, b in zip(from_full, blocks):
        torch.testing.assert_close(a, b)


def correlated_problem(fmt, seed=0, n=24, k=192, g=64):
    """Weights and an input second moment with strongly correlated channels (as in real layers)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.02
    mix = torch.eye(k) + 0.3 * torch.randn(k, k, generator=gen) / k**0.5
    x = (torch.randn(800, k, generator=gen) @ mix) * (torch.rand(k, generator=gen) * 3 + 0.2)
    full = accumulate([x], k, g, full=True)
    cb = get_codebook(fmt)
    qw, _ = quantize_weight_ldra(w, full.moments("m.0"), cb, g, InitSpec("dca"), LDRASpec())
    return w, full.full_moment("m.0"), qw, cb


def dequant(qw, cb, g, k):
    vals = cb.tensor("cpu")[qw.codes]
    return vals * qw.scales.float().repeat_interleave(g, 1)[:, :k] + qw.offsets.float().repeat_interleave(g, 1)[:, :k]


@pytest.mark.parametrize("fmt", ["fp4_e2m1", "nf4", "int3"])
def test_compensation_lowers_the_full_output_error_and_keeps_the_grids(fmt):
    w, h, qw, cb = correlated_problem(fmt)
    new, (before, after) = compensate(w, InputHessian(h.clone(), CompensationSpec(polish=0)), qw, cb, 64)
    assert torch.equal(new.scales, qw.scales) and torch.equal(new.offsets, qw.offsets)
    assert new.codes.shape == qw.codes.shape and int(new.codes.max()) < 2**cb.bits
    rows_before = row_losses(dequant(qw, cb, 64, 192), w, h)
    rows_after = row_losses(dequant(new, cb, 64, 192), w, h)
    assert (rows_after <= rows_before).all()
    assert (before, after) == pytest.approx((rows_before.sum().item(), rows_after.sum().item()), rel=1e-6)
    assert after < 0.9 * before  # correlated inputs: compensation must pay off clearly


@pytest.mark.parametrize("fmt", ["nf4", "int4", "fp3_e2m0"])
def test_polishing_lowers_every_rows_loss_below_gptq(fmt):
    w, h, qw, cb = correlated_problem(fmt)
    gptq, _ = compensate(w, InputHessian(h.clone(), CompensationSpec(polish=0)), qw, cb, 64)
    polished, (_, after) = compensate(w, InputHessian(h.clone(), CompensationSpec(polish=2)), qw, cb, 64)
    rows_gptq = row_losses(dequant(gptq, cb, 64, 192), w, h)
    rows_polished = row_losses(dequant(polished, cb, 64, 192), w, h)
    assert (rows_polished <= rows_gptq).all()
    assert after == pytest.approx(rows_polished.sum().item(), rel=1e-6)
    assert after < 0.97 * rows_gptq.sum().item()
    assert polished.scales.dtype == polished.offsets.dtype == torch.float16
    assert not torch.equal(polished.scales, qw.scales)  # the grids moved


def brute_force_descent(w, h, qw, cb, g):
    """One coordinate-descent pass written plainly: weight by weight in column order, every code tried."""
    codes = qw.codes.clone()
    scales = qw.scales.float().repeat_interleave(g, 1)[:, : w.shape[1]]
    offsets = qw.offsets.float().repeat_interleave(g, 1)[:, : w.shape[1]]
    grid = cb.tensor("cpu")[None, :] * scales[..., None] + offsets[..., None]  # [N, K, codes]
    for n in range(w.shape[0]):
        for j in range(w.shape[1]):
            current = grid[n, torch.arange(w.shape[1]), codes[n]]
            trial = current[:, None].repeat(1, grid.shape[2])
            trial[j] = grid[n, j]  # column c: row n's weights with weight j set to code c
            d = trial - w[n][:, None]
            loss = ((h @ d) * d).sum(0)
            codes[n, j] = int(torch.argmin(loss))
    return codes


def test_coordinate_descent_moves_each_weight_to_its_best_code():
    gen = torch.Generator().manual_seed(3)
    k, g = 40, 32  # a full group and a partial one
    w = torch.randn(3, k, generator=gen) * 0.02
    x = torch.randn(200, k, generator=gen) @ (torch.eye(k) + 0.4 * torch.randn(k, k, generator=gen) / k**0.5)
    h = x.T @ x / x.shape[0]
    cb = get_codebook("int4")
    blocks = [h[:32, :32][None], h[32:, 32:][None]]
    qw, _ = quantize_weight_ldra(w, blocks, cb, g, InitSpec("dca"), LDRASpec())
    new = descend_codes(w, InputHessian(h.clone(), CompensationSpec(act_order=False, block=16)), qw, cb, g)
    assert torch.equal(new.codes, brute_force_descent(w, h, qw, cb, g))
    assert torch.equal(new.scales, qw.scales) and torch.equal(new.offsets, qw.offsets)


def test_refit_solves_each_groups_least_squares_when_groups_are_uncorrelated():
    """With a block-diagonal H the groups decouple: the refit is each group's exact weighted least
    squares (s, b) for its codes, up to the fp16 the checkpoint stores."""
    gen = torch.Generator().manual_seed(4)
    k, g = 128, 64
    w = torch.randn(5, k, generator=gen) * 0.02
    h = torch.zeros(k, k)
    for i in (0, 64):
        x = torch.randn(300, g, generator=gen) * (torch.rand(g, generator=gen) + 0.3)
        h[i : i + g, i : i + g] = x.T @ x / 300
    cb = get_codebook("nf4")
    qw, _ = quantize_weight_ldra(w, [torch.stack([h[:64, :64], h[64:, 64:]])], cb, g, InitSpec("dca"), LDRASpec())
    qw = QuantizedWeight(qw.codes, (qw.scales.float() * 1.3).half(), qw.offsets)  # a grid worth refitting
    new = refit_grids(w, InputHessian(h.clone(), CompensationSpec()), qw, cb, g)
    assert torch.equal(new.codes, qw.codes)
    v = cb.tensor("cpu")[qw.codes]
    for n in range(5):
        for j, i in enumerate((0, 64)):
            a = torch.stack([v[n, i : i + g], torch.ones(g)], 1).double()
            hg = h[i : i + g, i : i + g].double()
            s, b = torch.linalg.solve(a.T @ hg @ a, a.T @ hg @ w[n, i : i + g].double())
            assert float(new.scales[n, j]) == pytest.approx(float(s), rel=2e-3, abs=1e-6)
            assert float(new.offsets[n, j]) == pytest.approx(float(b), rel=2e-3, abs=1e-6)


@pytest.mark.parametrize("act_order", [False, True])
def test_uncorrelated_inputs_give_the_nearest_codes(act_order):
    """With a diagonal H no error can be compensated: every code is the nearest one."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(8, 128, generator=gen) * 0.02
    h = torch.diag(torch.rand(128, generator=gen) + 0.1)
    cb = get_codebook("nf4")
    blocks = [torch.stack([h[i : i + 64, i : i + 64] for i in (0, 64)])]
    qw, _ = quantize_weight_ldra(w, blocks, cb, 64, InitSpec("dca"), LDRASpec())
    codes = compensated_codes(w, InputHessian(h, CompensationSpec(act_order=act_order, block=48)), qw, cb, 64)
    assert torch.equal(codes, qw.codes)


def test_pipeline_rounds_with_compensation_by_default(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    calib = calib_file(tmp_path)
    assert cli.main(daq_args(tiny_llama, tmp_path / "q", calib)) == 0
    report = json.loads((tmp_path / "q" / "quantization_report.json").read_text())
    losses = [info["full_loss"] for layer in report["layers"] for info in layer["linears"].values()]
    assert losses and all(after <= before for before, after in losses)
    assert sum(a for _, a in losses) < sum(b for b, _ in losses)
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["provenance"]["method"] == "daq+gptq"
    assert cfg["provenance"]["compensation"]["act_order"] is True
    assert cfg["provenance"]["compensation"]["polish"] == CompensationSpec.polish
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert torch.isfinite(model(torch.randint(3, 250, (1, 16))).logits).all()

    assert cli.main(daq_args(tiny_llama, tmp_path / "n", calib, "--rounding", "nearest")) == 0
    nearest = json.loads((tmp_path / "n" / "quantization_report.json").read_text())
    assert all("full_loss" not in info for layer in nearest["layers"] for info in layer["linears"].values())

    assert cli.main(daq_args(tiny_llama, tmp_path / "p2", calib, "--polish", "2")) == 0
    polished = json.loads((tmp_path / "p2" / "config.json").read_text())["quantization_config"]
    assert polished["provenance"]["compensation"]["polish"] == 2
    report = json.loads((tmp_path / "p2" / "quantization_report.json").read_text())
    polished_after = sum(info["full_loss"][1] for layer in report["layers"] for info in layer["linears"].values())
    assert polished_after < sum(a for _, a in losses)  # polishing lowers the loss GPTQ leaves


def test_gptq_rounding_without_calibration_is_refused(tiny_llama, tmp_path, capsys):
    code = cli.main(["quantize", str(tiny_llama), "--out", str(tmp_path / "o"), "--method", "rtn",
                     "--rounding", "gptq", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--rounding gptq needs calibration" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_negative_polish_is_refused(tiny_llama, tmp_path, capsys):
    code = cli.main(["quantize", str(tiny_llama), "--out", str(tmp_path / "o"), "--polish", "-1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--polish -1 is negative" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
