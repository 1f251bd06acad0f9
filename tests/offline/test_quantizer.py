import pytest
import torch

from daq_vllm.format.codebooks import CODEBOOKS, get_codebook
from daq_vllm.kernels import dequantize, expand_groups, pack_codes
from daq_vllm.offline.grid import NearestCode
from daq_vllm.offline.ranges import InitSpec, center_hist, center_kde, center_quantile, init_range, quantize_weight

SPECS = [
    InitSpec("rtn"), InitSpec("absmax"), InitSpec("dca"), InitSpec("dca", "kde"),
    InitSpec("dca", "hist"), InitSpec("dca", "zero"),
]


def weight(n=24, k=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02 + 0.004
    w[0, 3] = 0.3  # an outlier
    return w


@pytest.mark.parametrize("fmt", list(CODEBOOKS))
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.method}-{s.dca_center}")
def test_every_value_is_on_its_group_grid(fmt, spec):
    cb = get_codebook(fmt)
    w = weight()
    qw = quantize_weight(w, cb, 64, spec)
    assert qw.codes.shape == w.shape and qw.scales.shape == (24, 4) and qw.scales.dtype == torch.float16
    w_hat = dequantize(pack_codes(qw.codes, cb.bits), qw.scales, qw.offsets, cb.tensor(), cb.bits, 64, 200)
    s = expand_groups(qw.scales.float(), 64, 200)[..., None]
    b = expand_groups(qw.offsets.float(), 64, 200)[..., None]
    grid = s * cb.tensor() + b  # [N, K, 2**bits]: every value the group can take
    assert (grid - w_hat[..., None]).abs().min(dim=-1).values.max().item() == 0.0
    # The chosen code is the nearest grid point (ties aside, which random data does not hit).
    best = (grid - w[..., None]).abs().min(dim=-1).values
    assert torch.allclose((w_hat - w).abs(), best, atol=1e-7)


def test_rounding_saturates_and_breaks_ties_downwards():
    cb = get_codebook("fp4_e2m1")
    nearest = NearestCode(cb, "cpu")
    x = torch.tensor([100.0, -100.0, 0.25, 0.75, 5.0, -5.0, 0.1, -0.1])
    values = cb.tensor()[nearest(x)]
    assert values.tolist() == [6.0, -6.0, 0.0, 0.5, 4.0, -6.0, 0.0, 0.0]
    assert nearest(torch.tensor([-0.1])).item() == 0  # +0 (code 0) represents zero, not -0 (code 8)


def test_dca_centres_the_range_on_the_estimate():
    cb = get_codebook("fp4_e2m1")
    rows = weight(8, 128)
    s, z = init_range(rows, cb, InitSpec("dca", "quantile", dca_shrink=0.9))
    d = center_quantile(rows)
    assert torch.allclose(s * (0.0 - z), d, atol=1e-7)  # code value 0 lands on d
    extent = 0.9 * torch.maximum(rows.max(1).values - d, d - rows.min(1).values)
    assert torch.allclose(s * 6.0, extent, rtol=1e-6)
    s0, z0 = init_range(rows, cb, InitSpec("dca", "zero"))
    assert torch.equal(z0, torch.zeros_like(z0))


def test_quantile_centre_matches_torch_quantile():
    rows = weight(5, 128)
    expect = (torch.quantile(rows, 0.025, dim=1) + torch.quantile(rows, 0.975, dim=1)) / 2
    assert torch.allclose(center_quantile(rows), expect, atol=1e-7)


def test_density_estimators_find_the_dense_cluster():
    g = torch.Generator().manual_seed(1)
    dense = torch.randn(4, 112, generator=g) * 0.01 + 0.3
    sparse = torch.rand(4, 16, generator=g) * 2 - 1.5  # spread far left
    rows = torch.cat([dense, sparse], dim=1)
    for centre in (center_kde(rows), center_hist(rows, 16, 0.5)):
        assert (centre - 0.3).abs().max() < 0.02, centre
    assert (rows.mean(1) - 0.3).abs().min() > 0.05  # the plain mean is pulled away


def test_rtn_int4_equals_straightforward_min_max_quantizer():
    """An independent RTN (AWQ's pseudo-quantizer), using the same fp16-stored scale."""
    cb = get_codebook("int4")
    w = weight(32, 256)
    qw = quantize_weight(w, cb, 128, InitSpec("rtn"))
    groups = w.reshape(-1, 128)
    mx, mn = groups.amax(1, keepdim=True), groups.amin(1, keepdim=True)
    scale = ((mx - mn) / 15).half().float()
    zero = (-torch.round(mn / scale)).clamp(0, 15)
    q_ref = (torch.round(groups / scale) + zero).clamp(0, 15)
    ref = (q_ref - zero) * scale
    assert torch.equal(qw.scales.reshape(-1, 1).float(), scale)
    mine = qw.codes.reshape(-1, 128).float()
    assert (mine == q_ref).float().mean() > 0.999  # differs only where fp16 rounding of the offset tips a tie
    w_hat = cb.tensor()[qw.codes].reshape(-1, 128) * scale + qw.offsets.reshape(-1, 1).float()
    agree = mine == q_ref
    assert torch.allclose(w_hat[agree], ref[agree], atol=scale.max().item() * 15 * 2**-10)


def test_partial_last_group():
    cb = get_codebook("nf4")
    w = weight(4, 100)
    qw = quantize_weight(w, cb, 64, InitSpec("rtn"))
    assert qw.scales.shape == (4, 2)
    tail = w[:, 64:]
    s, z = init_range(tail, cb, InitSpec("rtn"))
    assert torch.equal(qw.scales[:, 1], s.half())


def test_scale_never_zero_for_constant_group():
    cb = get_codebook("fp4_e2m1")
    qw = quantize_weight(torch.zeros(2, 64), cb, 64, InitSpec("dca"))
    assert (qw.scales > 0).all()
    w_hat = cb.tensor()[qw.codes] * qw.scales.float() + qw.offsets.float()
    assert torch.equal(w_hat, torch.zeros(2, 64))
