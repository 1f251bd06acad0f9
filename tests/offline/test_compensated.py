"""Error-compensated (GPTQ-style) rounding onto LDRA's grids: full moments, loss, pipeline, CLI."""

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
    row_losses,
)
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
    new, (before, after) = compensate(w, InputHessian(h.clone(), CompensationSpec()), qw, cb, 64)
    assert torch.equal(new.scales, qw.scales) and torch.equal(new.offsets, qw.offsets)
    assert new.codes.shape == qw.codes.shape and int(new.codes.max()) < 2**cb.bits
    rows_before = row_losses(dequant(qw, cb, 64, 192), w, h)
    rows_after = row_losses(dequant(new, cb, 64, 192), w, h)
    assert (rows_after <= rows_before).all()
    assert (before, after) == pytest.approx((rows_before.sum().item(), rows_after.sum().item()), rel=1e-6)
    assert after < 0.9 * before  # correlated inputs: compensation must pay off clearly


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
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert torch.isfinite(model(torch.randint(3, 250, (1, 16))).logits).all()

    assert cli.main(daq_args(tiny_llama, tmp_path / "n", calib, "--rounding", "nearest")) == 0
    nearest = json.loads((tmp_path / "n" / "quantization_report.json").read_text())
    assert all("full_loss" not in info for layer in nearest["layers"] for info in layer["linears"].values())


def test_gptq_rounding_without_calibration_is_refused(tiny_llama, tmp_path, capsys):
    code = cli.main(["quantize", str(tiny_llama), "--out", str(tmp_path / "o"), "--method", "rtn",
                     "--rounding", "gptq", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--rounding gptq needs calibration" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
