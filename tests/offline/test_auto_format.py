"""`--format auto`: the codebook of lowest calibration loss per linear, one per shared input, in a
checkpoint that mixes codebooks and still decodes from docs/FORMAT.md alone."""

import json

import numpy as np
import pytest
import torch

from daq_vllm.errors import DAQError
from daq_vllm.format.codebooks import get_codebook
from daq_vllm.offline.auto_format import AutoSpec, Screening, choose_codebooks, pick, screen_loss
from daq_vllm.offline.compensated import row_losses
from daq_vllm.offline.grid import dequantize_weight
from daq_vllm.offline.ldra import LDRASpec, quantize_weight_ldra
from daq_vllm.offline.moments import SecondMoments
from daq_vllm.offline.options import check_options, recipe_options
from daq_vllm.offline.ranges import InitSpec
from helpers import decode_from_spec, read_all
from mixed_checkpoint import make_mixed_checkpoint

CANDIDATES = [get_codebook(n) for n in ("nf4", "fp4_e2m1", "int4")]
G = 64
SCREEN_ALL_ROWS = Screening(G, InitSpec(), LDRASpec(), compensated=True, spec=AutoSpec(screen_stride=1))


def shared_input_moments(names: list[str], k: int = 128, seed: int = 0) -> SecondMoments:
    """Full second moments of one random input read by every linear of `names` (as q/k/v are)."""
    gen = torch.Generator().manual_seed(seed)
    block = torch.nn.ModuleDict({n: torch.nn.Linear(k, 4, bias=False) for n in names})
    moments = SecondMoments(G, full=True)
    moments.attach(block, "m", [f"m.{n}" for n in names])
    for _ in range(3):
        moments.new_pass()
        x = torch.randn(50, k, generator=gen) * torch.linspace(0.2, 2.0, k)
        for lin in block.values():
            lin(x)
    moments.detach()
    return moments


def weights(kind: str, n: int = 32, k: int = 128, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        return (torch.rand(n, k, generator=gen) * 2 - 1) * 0.05
    return torch.randn(n, k, generator=gen) * 0.02


def full_loss(w: torch.Tensor, name: str, moments: SecondMoments, codebook) -> float:
    """DCA + LDRA over all rows, nearest codes, scored by the full dw^T H dw: written out here."""
    qw, _ = quantize_weight_ldra(w, moments.moments(name), codebook, G, InitSpec(), LDRASpec())
    w_hat = dequantize_weight(qw, codebook.tensor(), G)
    return row_losses(w_hat, w, moments.full_moment(name)).sum().item()


@pytest.mark.parametrize("kind, expected", [("uniform", "int4"), ("gaussian", "nf4")])
def test_auto_picks_the_candidate_of_lowest_loss(kind, expected):
    moments = shared_input_moments(["a"])
    w = weights(kind)
    losses = {cb.name: full_loss(w, "m.a", moments, cb) for cb in CANDIDATES}
    choice = choose_codebooks({"m.a": w}, moments, CANDIDATES, SCREEN_ALL_ROWS)["m.a"]
    assert choice.codebook.name == min(losses, key=losses.__getitem__) == expected
    assert choice.losses == pytest.approx(losses, rel=1e-5)


def test_linears_reading_one_input_choose_together():
    moments = shared_input_moments(["q", "k"])
    ws = {"m.q": weights("uniform"), "m.k": weights("gaussian", seed=2)}
    alone = {n: choose_codebooks({n: w}, moments, CANDIDATES, SCREEN_ALL_ROWS)[n] for n, w in ws.items()}
    assert alone["m.q"].codebook.name != alone["m.k"].codebook.name  # each alone would differ
    together = choose_codebooks(ws, moments, CANDIDATES, SCREEN_ALL_ROWS)
    total = {cb.name: sum(alone[n].losses[cb.name] for n in ws) for cb in CANDIDATES}
    assert together["m.q"].codebook == together["m.k"].codebook
    assert together["m.q"].codebook.name == min(total, key=total.__getitem__)


def test_screening_a_row_subset_scores_those_rows():
    moments = shared_input_moments(["a"])
    w = weights("gaussian")
    every_fourth = Screening(G, InitSpec(), LDRASpec(), compensated=True, spec=AutoSpec(screen_stride=4))
    cb = get_codebook("nf4")
    assert screen_loss(w, cb, "m.a", moments, every_fourth) == pytest.approx(full_loss(w[::4], "m.a", moments, cb))


def test_ties_go_to_the_codebook_cheaper_to_decode():
    assert pick({"nf4": 1.0, "fp4_e2m1": 1.0, "int4": 1.0}, CANDIDATES, 0.0).name == "int4"
    assert pick({"nf4": 1.0, "fp4_e2m1": 1.001, "int4": 1.5}, CANDIDATES, 0.002).name == "fp4_e2m1"
    assert pick({"nf4": 1.0, "fp4_e2m1": 1.01, "int4": 1.5}, CANDIDATES, 0.002).name == "nf4"


@pytest.mark.parametrize("changes, message", [
    ({"format": "fp4_e2m1", "formats": ("nf4",)}, "--formats lists the candidates of --format auto"),
    ({"format": "auto", "formats": ("nf4", "int3")}, r"--formats mixes bit widths \(nf4 \(4-bit\), int3 \(3-bit\)\)"),
    ({"format": "auto", "formats": ("nf5",)}, "unknown format 'nf5'"),
])
def test_bad_auto_options_are_named(changes, message):
    with pytest.raises(DAQError, match=message):
        check_options(recipe_options("daq", **changes))


def test_auto_needs_calibration():
    with pytest.raises(DAQError, match="--format auto chooses each linear's codebook by its calibration loss; use it "
                                       "with --method daq, not rtn"):
        check_options(recipe_options("rtn", format="auto"))


def test_auto_checkpoint_mixes_codebooks_and_decodes_from_the_spec(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    import daq_vllm  # noqa: F401  (registers the transformers quantizer)

    out = make_mixed_checkpoint(tmp_path)
    printed = capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    report = json.loads((out / "quantization_report.json").read_text())
    chosen = {n: e["format"] for layer in report["layers"] for n, e in layer["linears"].items()}
    assert cfg["format_version"] == 2 and len(set(chosen.values())) > 1
    assert {n: cfg["module_formats"].get(n, cfg["format"]) for n in chosen} == chosen
    counts = report["formats"]
    assert sum(counts.values()) == 14 and counts == {f: list(chosen.values()).count(f) for f in counts}
    assert "codebooks chosen: " + ", ".join(f"{f} {c}" for f, c in counts.items()) in printed
    for i in range(2):
        p = f"model.layers.{i}."
        assert chosen[p + "self_attn.q_proj"] == chosen[p + "self_attn.k_proj"] == chosen[p + "self_attn.v_proj"]
        assert chosen[p + "mlp.gate_proj"] == chosen[p + "mlp.up_proj"]
    for entry in (e for layer in report["layers"] for e in layer["linears"].values()):
        assert set(entry["screen"]) == {"nf4", "fp4_e2m1", "int4"}
    assert cfg["provenance"]["formats"] == ["nf4", "fp4_e2m1", "int4"]
    assert "chosen per linear by calibration loss (`--format auto`)" in (out / "README.md").read_text()

    tensors = read_all(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    values = {cfg["format"]: cfg["codebook"], **cfg["codebooks"]}
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        q, s, b = (tensors[f"{name}.{t}"][:3].numpy() for t in ("qweight", "scales", "offsets"))
        k = model.get_submodule(name).in_features
        decoded = decode_from_spec(q, s, b, values[cfg["module_formats"].get(name, cfg["format"])], 4, 64, k)
        assert np.array_equal(decoded, model.get_submodule(name).dequantized_weight()[:3].numpy())
    ids = torch.randint(3, 250, (1, 16))
    assert torch.isfinite(model(ids).logits).all()
