"""The recipe table, the report entries and the group split: the one-home pieces the pipeline is built from."""

import argparse

import pytest
import torch

from daq_vllm.cli.quantize import add_parser
from daq_vllm.errors import DAQError
from daq_vllm.offline.grid import group_blocks, merge_blocks, split_groups
from daq_vllm.offline.moments import diagonal_blocks
from daq_vllm.offline.options import AUTO, RECIPES, ROUNDINGS, check_options, recipe_options
from daq_vllm.offline.ranges import InitSpec
from daq_vllm.offline.report import LinearReport


def quantize_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return parser


def test_cli_methods_and_roundings_are_the_tables():
    parser = quantize_parser()
    assert parser.parse_args(["quantize", "m", "--out", "o"]).method == "daq"
    for method in RECIPES:
        for rounding in ROUNDINGS:
            args = parser.parse_args(["quantize", "m", "--out", "o", "--method", method, "--rounding", rounding])
            assert (args.method, args.rounding) == (method, rounding)
    with pytest.raises(SystemExit):
        parser.parse_args(["quantize", "m", "--out", "o", "--method", "gptq"])


@pytest.mark.parametrize("method", list(RECIPES))
@pytest.mark.parametrize("rounding", [None, *ROUNDINGS])
def test_a_recipe_names_itself_in_the_provenance(method, rounding):
    recipe = RECIPES[method]
    opts = recipe_options(method, rounding, init=InitSpec(method="rtn", dca_shrink=0.7))
    assert (opts.ldra is not None) == recipe.calibrated
    assert (opts.compensation is not None) == ((rounding or recipe.rounding) == "gptq")
    assert opts.init.dca_shrink == 0.7  # the caller's DCA settings are kept
    if recipe.calibrated:  # LDRA starts from the caller's initializer: not the recipe's own name
        assert opts.init.method == "rtn" and opts.method_name().startswith("rtn+ldra")
    else:
        assert opts.init.method == recipe.init
        assert opts.method_name() == method + ("+gptq" if opts.compensation is not None else "")
    assert recipe_options(method, rounding).method_name().split("+")[0] == method


def test_the_default_codebook_is_chosen_per_linear_when_calibrated():
    assert recipe_options("daq").format == AUTO
    for method in (name for name, recipe in RECIPES.items() if not recipe.calibrated):
        assert recipe_options(method).format == "fp4_e2m1"  # no calibration loss to choose by
    assert recipe_options("daq", format="nf4").format == "nf4"
    check_options(recipe_options("daq"))


def test_unknown_recipe_is_refused():
    with pytest.raises(DAQError, match="methods are daq"):
        recipe_options("gptq")


def test_linear_report_entries_round_trip_in_report_order():
    report = LinearReport(0.125, ldra_loss=(2.0, 1.0), full_loss=(1.0, 0.5))
    entry = report.to_dict()
    assert list(entry) == ["ldra_loss", "full_loss", "rel_error"] and entry["full_loss"] == [1.0, 0.5]
    assert LinearReport.from_dict(entry) == report
    assert LinearReport(0.5).to_dict() == {"rel_error": 0.5}


@pytest.mark.parametrize("k, g", [(320, 128), (256, 64), (40, 64), (100, 32)])
def test_one_group_split_serves_weights_and_moments(k, g):
    spans = split_groups(k, g)
    assert spans[0].start == 0 and spans[-1].stop == k
    assert all(a.stop == b.start for a, b in zip(spans, spans[1:]))
    assert sum(s.count * s.length for s in spans) == k
    w = torch.randn(3, k)
    blocks = group_blocks(w, g)
    assert [b.shape[1] for b in blocks] == [s.length for s in spans]
    assert torch.equal(merge_blocks(blocks, 3), w)
    h = torch.randn(k, k)
    for span, diag in zip(spans, diagonal_blocks(h, g)):
        for j in range(span.count):
            lo = span.start + j * span.length
            assert torch.equal(diag[j], h[lo : lo + span.length, lo : lo + span.length])
