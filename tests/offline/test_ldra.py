"""LDRA: the objective identity, monotone solvers, calibrated pipeline and bit-identical resume."""

import json

import pytest
import torch
from safetensors.torch import load_file

from daq_vllm import cli
from daq_vllm.errors import DAQError
from daq_vllm.format.codebooks import get_codebook
from daq_vllm.offline import ldra as ldra_mod
from daq_vllm.offline import pipeline
from daq_vllm.offline.calibration import CalibSpec, calibration_blocks
from daq_vllm.offline.ldra import GroupProblem, LDRASpec, _weighted_fit, group_loss, ldra
from daq_vllm.offline.moments import SecondMoments
from daq_vllm.offline.ranges import InitSpec, init_range
from helpers import WORDS, tiny_tokenizer


def accumulate(x_batches, k, g, full=False):
    """The hook-based accumulator of one linear "m.0", fed batch by batch through a real nn.Linear."""
    lin = torch.nn.Linear(k, 3, bias=False)
    acc = SecondMoments(g, full=full)
    acc.attach(torch.nn.Sequential(lin), "m", ["m.0"])
    for x in x_batches:
        acc.new_pass()
        lin(x)
    acc.detach()
    return acc


def moments_of(x_batches, k, g):
    """Per-group H from the hook-based accumulator."""
    return accumulate(x_batches, k, g).moments("m.0")


def test_objective_equals_mean_squared_partial_output_error():
    torch.manual_seed(0)
    n, k, g = 5, 100, 32  # 3 full groups and a partial one of 4
    x = torch.randn(2, 37, k) * torch.linspace(0.1, 2, k)  # two batches, uneven channel scales
    w, w_hat = torch.randn(n, k), torch.randn(n, k)
    hs = moments_of([x[0], x[1]], k, g)
    assert [h.shape for h in hs] == [(3, 32, 32), (1, 4, 4)]
    xt = x.reshape(-1, k).double()
    dw = (w_hat - w).double()
    for block, (start, length) in enumerate([(0, 96), (96, 4)]):
        h = hs[block]
        groups = length // h.shape[1]
        got = group_loss(w_hat[:, start : start + length].reshape(n, groups, -1),
                         w[:, start : start + length].reshape(n, groups, -1), h)
        for j in range(groups):
            cols = slice(start + j * h.shape[1], start + (j + 1) * h.shape[1])
            direct = ((xt[:, cols] @ dw[:, cols].T) ** 2).mean(dim=0)  # per output row
            torch.testing.assert_close(got[:, j].double(), direct, rtol=1e-4, atol=1e-6)


def problem(seed=0, n=16, groups=4, g=32):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, groups * g, generator=gen) * 0.02
    x = torch.randn(400, groups * g, generator=gen) * torch.rand(groups * g, generator=gen) * 3
    h = moments_of([x], groups * g, g)[0]
    return w, h


@pytest.mark.parametrize("fmt", ["fp4_e2m1", "nf4", "int4", "fp3_e2m0"])
@pytest.mark.parametrize("solver", ["alt", "sign"])
def test_no_group_loss_increases(fmt, solver):
    cb = get_codebook(fmt)
    w, h = problem()
    s, z = init_range(w.reshape(-1, 32), cb, InitSpec("dca"))
    p = GroupProblem(w.reshape(16, 4, 32), h, cb)
    before = p.loss(s.reshape(16, 4), z.reshape(16, 4))
    spec = LDRASpec(solver=solver, epochs=2, iters=30)
    q, stats = ldra(w.reshape(16, 4, 32), h, s.reshape(16, 4), z.reshape(16, 4), cb, spec)
    after = group_loss(p.w_hat(q), p.w, h)
    assert (after <= before + 1e-12).all()
    assert stats.final_loss < 0.9 * stats.initial_loss  # and it does improve
    assert abs(stats.final_loss - after.sum().item()) < 1e-6 * stats.initial_loss


def test_more_sign_epochs_never_hurt():
    cb = get_codebook("fp4_e2m1")
    w, h = problem(1)
    s, z = init_range(w.reshape(-1, 32), cb, InitSpec("dca"))
    args = (w.reshape(16, 4, 32), h, s.reshape(16, 4), z.reshape(16, 4), cb)
    one = ldra(*args, LDRASpec("sign", epochs=1, iters=20, min_epoch_gain=0))[1].final_loss
    two = ldra(*args, LDRASpec("sign", epochs=2, iters=20, min_epoch_gain=0))[1].final_loss
    assert two <= one


def test_weighted_fit_is_the_least_squares_optimum():
    cb = get_codebook("nf4")
    w, h = problem(2, n=4, groups=2)
    p = GroupProblem(w.reshape(4, 2, 32), h, cb)
    s0, z0 = init_range(w.reshape(-1, 32), cb, InitSpec("dca"))
    codes_vals = cb.tensor()[p.quantize(s0, z0).codes].reshape(4, 2, 32)  # codes as the solver sees them
    s, b, ok = _weighted_fit(p, codes_vals)
    assert ok.all()

    def loss(s_, b_):
        return group_loss(codes_vals * s_[..., None] + b_[..., None], p.w, h)

    best = loss(s, b)
    for ds, db in [(1e-3, 0), (-1e-3, 0), (0, 1e-3), (0, -1e-3)]:
        assert (loss(s + ds * s.abs(), b + db * (b.abs() + 1e-3)) >= best - 1e-9).all()


def test_shared_inputs_share_one_accumulator(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    layer = model.model.layers[0]
    linears = ("self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    names = [f"m.{n}" for n in linears]
    acc = SecondMoments(64)
    acc.attach(layer, "m", names)
    x = torch.randn(1, 8, 192)
    pos = model.model.rotary_emb(x, torch.arange(8)[None])
    acc.new_pass()
    with torch.no_grad():
        layer(x, position_embeddings=pos)
    acc.detach()
    assert acc.alias == {"m.self_attn.k_proj": "m.self_attn.q_proj", "m.mlp.up_proj": "m.mlp.gate_proj"}
    normed = layer.input_layernorm(x).reshape(-1, 192)
    torch.testing.assert_close(acc.moments("m.self_attn.k_proj")[0], moments_of([normed.detach()], 192, 64)[0])


def calib_file(tmp_path, words=3000):
    gen = torch.Generator().manual_seed(0)
    path = tmp_path / "calib.txt"
    path.write_text(" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (words,), generator=gen).tolist()))
    return path


def test_calibration_blocks_are_seeded(tmp_path):
    path = calib_file(tmp_path)
    a = calibration_blocks(tiny_tokenizer(), CalibSpec(str(path), nsamples=4, seqlen=64, seed=1))
    b = calibration_blocks(tiny_tokenizer(), CalibSpec(str(path), nsamples=4, seqlen=64, seed=1))
    assert a.shape == (4, 64) and torch.equal(a, b)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "w1 w2"}\n{"txt": 1}\n')
    with pytest.raises(DAQError, match=r"bad.jsonl:2 is not a JSON object"):
        calibration_blocks(tiny_tokenizer(), CalibSpec(str(bad)))
    with pytest.raises(DAQError, match="fewer than one block"):
        calibration_blocks(tiny_tokenizer(), CalibSpec(str(path), seqlen=100_000))


def daq_args(src, out, calib, *extra):
    return ["quantize", str(src), "--out", str(out), "--method", "daq", "--format", "fp4_e2m1", "--group-size", "64",
            "--calib", str(calib), "--nsamples", "6", "--seqlen", "48", "--no-progress", *extra]


def test_daq_reduces_the_output_error_and_loads(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    calib = calib_file(tmp_path)
    assert cli.main(daq_args(tiny_llama, tmp_path / "daq", calib, "--rounding", "nearest")) == 0
    report = json.loads((tmp_path / "daq" / "quantization_report.json").read_text())
    for layer in report["layers"]:
        for name, info in layer["linears"].items():
            initial, final = info["ldra_loss"]
            assert final <= initial, name
    cfg = json.loads((tmp_path / "daq" / "config.json").read_text())["quantization_config"]
    assert cfg["provenance"]["method"] == "daq"
    assert cfg["provenance"]["calibration"]["nsamples"] == 6
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "daq")
    ids = torch.randint(3, 250, (1, 16))
    assert torch.isfinite(model(ids).logits).all()


def killed_in_layer_two():
    """quantize_weight_ldra that raises KeyboardInterrupt at its 9th call (layer 2 of 7 linears each)."""
    real, calls = ldra_mod.quantize_weight_ldra, []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == 9:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("extra", [[], ["--sequential"], ["--sequential", "--format", "auto"],
                                   ["--asymmetric", "0.25"]])
def test_resume_is_bit_identical(tiny_llama, tmp_path, monkeypatch, capsys, extra):
    """Also with --format auto: a resumed layer's codebooks come from its saved report entries."""
    calib = calib_file(tmp_path)
    assert cli.main(daq_args(tiny_llama, tmp_path / "full", calib, *extra)) == 0

    monkeypatch.setattr(pipeline, "quantize_weight_ldra", killed_in_layer_two())
    assert cli.main(daq_args(tiny_llama, tmp_path / "resumed", calib, *extra)) == 130
    assert "rerun with --resume" in capsys.readouterr().err
    assert not (tmp_path / "resumed").exists()
    monkeypatch.undo()
    assert cli.main(daq_args(tiny_llama, tmp_path / "resumed", calib, *extra, "--resume")) == 0
    assert "resuming from 1 finished layers" in capsys.readouterr().err

    a = load_file(next((tmp_path / "full").glob("model-*.safetensors")))
    b = load_file(next((tmp_path / "resumed").glob("model-*.safetensors")))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "full" / "config.json").read_text() == (tmp_path / "resumed" / "config.json").read_text()
    assert not (tmp_path / ".resumed.resume").exists()


def test_resume_with_other_options_is_refused(tiny_llama, tmp_path, monkeypatch, capsys):
    calib = calib_file(tmp_path)
    monkeypatch.setattr(pipeline, "quantize_weight_ldra", killed_in_layer_two())
    assert cli.main(daq_args(tiny_llama, tmp_path / "o", calib)) == 130
    code = cli.main(daq_args(tiny_llama, tmp_path / "o", calib, "--resume", "--nsamples", "7"))
    assert code == 2 and "other options" in capsys.readouterr().err


def test_shrink_grid_start_is_never_worse_than_dca():
    from daq_vllm.offline.ldra import best_initial_range

    cb = get_codebook("fp4_e2m1")
    w, h = problem(3)
    p = GroupProblem(w.reshape(16, 4, 32), h, cb)
    rows = w.reshape(-1, 32)
    s0, z0 = init_range(rows, cb, InitSpec("dca"))
    dca = p.loss(s0.reshape(16, 4), z0.reshape(16, 4))
    s, z = best_initial_range(p, rows, cb, InitSpec("dca"), (0.6, 0.8, 1.0))
    grid = p.loss(s, z)
    assert (grid <= dca).all() and grid.sum() < dca.sum()
    s_none, _ = best_initial_range(p, rows, cb, InitSpec("dca"), ())
    assert torch.equal(s_none, s0.reshape(16, 4))
