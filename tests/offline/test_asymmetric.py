"""Asymmetric calibration (`--asymmetric`): the target, the paired moments, the pipeline and the CLI."""

import json

import pytest
import torch
from test_ldra import calib_file, daq_args

from daq_vllm import cli
from daq_vllm.format.codebooks import get_codebook
from daq_vllm.offline.asymmetric import asymmetric_target
from daq_vllm.offline.compensated import CompensationSpec, InputHessian, compensate
from daq_vllm.offline.grid import dequantize_weight
from daq_vllm.offline.ldra import LDRASpec, quantize_weight_ldra
from daq_vllm.offline.moments import SecondMoments, diagonal_blocks
from daq_vllm.offline.ranges import InitSpec


def streams(seed=0, t=600, k=48, n=12, noise=0.3):
    """Float inputs X with correlated channels, quantized-stream inputs X~ = X + error, a weight W."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(k) + 0.3 * torch.randn(k, k, generator=gen) / k**0.5
    x = torch.randn(t, k, generator=gen) @ mix
    x_q = x + noise * torch.randn(t, k, generator=gen) @ mix
    w = torch.randn(n, k, generator=gen) * 0.05
    return x.double(), x_q.double(), w.double()


def asymmetric_loss(x, x_q, w, w_hat):
    """||X W^T - X~ W_hat^T||^2: the float output against the quantized model's."""
    return (x @ w.T - x_q @ w_hat.T).square().sum().item()


def test_the_target_is_the_least_squares_aim_and_keeps_the_objective():
    x, x_q, w = streams()
    t = x.shape[0]
    h, c = x_q.T @ x_q / t, x.T @ x_q / t
    target = asymmetric_target(w, h, c, alpha=1.0, damp=0.0)
    lstsq = torch.linalg.lstsq(x_q, x @ w.T).solution.T
    torch.testing.assert_close(target, lstsq, rtol=1e-8, atol=1e-10)
    gen = torch.Generator().manual_seed(1)
    q1, q2 = (w + 0.01 * torch.randn(w.shape, generator=gen, dtype=torch.float64) for _ in range(2))
    symmetric = [(x_q @ (target - q).T).square().sum().item() for q in (q1, q2)]
    asymmetric = [asymmetric_loss(x, x_q, w, q) for q in (q1, q2)]
    assert asymmetric[0] - asymmetric[1] == pytest.approx(symmetric[0] - symmetric[1], rel=1e-9)


def test_no_step_without_alpha_or_without_a_difference():
    x, x_q, w = streams()
    h, c = x_q.T @ x_q, x.T @ x_q
    torch.testing.assert_close(asymmetric_target(w, h, c, 0.0, 0.01), w, rtol=0, atol=0)
    torch.testing.assert_close(asymmetric_target(w, h, h.clone(), 1.0, 0.01), w, rtol=0, atol=0)
    half = asymmetric_target(w, h, c, 0.5, 0.01)
    torch.testing.assert_close(half - w, (asymmetric_target(w, h, c, 1.0, 0.01) - w) / 2)


def test_paired_moments_hold_the_quantized_moment_and_the_cross_moment():
    x, x_q, _ = streams(t=100, k=40)
    x, x_q = x.float(), x_q.float()
    lin = torch.nn.Linear(40, 3, bias=False)
    acc = SecondMoments(16, paired=True)
    acc.attach(torch.nn.Sequential(lin), "m", ["m.0"])
    for part in (slice(0, 60), slice(60, 100)):  # two blocks, each a float then a quantized pass
        acc.new_pass()
        acc.recording = True
        lin(x[part])
        acc.recording = False
        acc.new_pass()
        lin(x_q[part])
        acc.reference.clear()
    acc.detach()
    torch.testing.assert_close(acc.full_moment("m.0"), x_q.T @ x_q / 100)
    torch.testing.assert_close(acc.cross_moment("m.0"), x.T @ x_q / 100)
    assert [b.shape for b in acc.moments("m.0")] == [(2, 16, 16), (1, 8, 8)]


def test_a_quantized_pass_without_its_float_pass_is_an_error():
    lin = torch.nn.Linear(8, 2, bias=False)
    acc = SecondMoments(8, paired=True)
    acc.attach(torch.nn.Sequential(lin), "m", ["m.0"])
    with pytest.raises(RuntimeError, match="float model's input of m.0 was not recorded"):
        lin(torch.randn(4, 8))


@pytest.mark.parametrize("fmt", ["nf4", "int4"])
def test_quantizing_the_target_lowers_the_asymmetric_error(fmt):
    """DAQ (LDRA + GPTQ rounding) on W' against H~ ends closer to the float output than on W."""
    x, x_q, w = (a.float() for a in streams(k=128, n=32))
    t, g, cb = x.shape[0], 64, get_codebook(fmt)
    h, c = x_q.T @ x_q / t, x.T @ x_q / t

    def daq(aim):
        qw, _ = quantize_weight_ldra(aim, diagonal_blocks(h, g), cb, g, InitSpec("dca"), LDRASpec())
        qw, _ = compensate(aim, InputHessian(h.clone(), CompensationSpec()), qw, cb, g)
        return dequantize_weight(qw, cb.tensor("cpu"), g)

    symmetric = asymmetric_loss(x, x_q, w, daq(w))
    asymmetric = asymmetric_loss(x, x_q, w, daq(asymmetric_target(w, h, c, 1.0, CompensationSpec.damp)))
    assert asymmetric < 0.9 * symmetric


def test_asymmetric_run_records_alpha_and_changes_the_codes(tiny_llama, tmp_path):
    calib = calib_file(tmp_path)
    assert cli.main(daq_args(tiny_llama, tmp_path / "sym", calib, "--sequential")) == 0
    assert cli.main(daq_args(tiny_llama, tmp_path / "asym", calib, "--asymmetric", "0.5")) == 0
    config = json.loads((tmp_path / "asym" / "config.json").read_text())["quantization_config"]
    assert config["provenance"]["calibration"]["asymmetric"] == 0.5
    from safetensors.torch import load_file

    sym = load_file(next((tmp_path / "sym").glob("model-*.safetensors")))
    asym = load_file(next((tmp_path / "asym").glob("model-*.safetensors")))
    first = [f"model.layers.0.self_attn.{p}_proj.qweight" for p in "qkv"]
    later = [k for k in sym if k.endswith("qweight") and k not in first]
    # q/k/v of layer 0 read the same input in both streams (nothing is quantized before them): the
    # codes of --sequential; every later input differs, as do the targets aimed from it
    assert all(torch.equal(sym[k], asym[k]) for k in first)
    assert later and all(not torch.equal(sym[k], asym[k]) for k in later)


@pytest.mark.parametrize("extra, message", [
    (["--asymmetric", "1.5"], "--asymmetric 1.5 is not a share of the step"),
    (["--asymmetric", "0.25", "--method", "rtn"], "--asymmetric needs calibration statistics"),
])
def test_bad_asymmetric_options_are_refused(tiny_llama, tmp_path, capsys, extra, message):
    code = cli.main(["quantize", str(tiny_llama), "--out", str(tmp_path / "o"), "--no-progress", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()
