"""A tiny checkpoint that mixes codebooks: `--format auto` on a model whose MLP weights are uniform
(int4's grid) and attention weights Gaussian (nf4's), calibrated on random words (seconds)."""

from __future__ import annotations

from pathlib import Path

import torch

from helpers import WORDS, make_tiny_model


def make_mixed_model(root: Path) -> Path:
    """The tiny random model with every MLP weight redrawn uniformly."""
    from transformers import AutoModelForCausalLM

    src = make_tiny_model(root / "src")
    model = AutoModelForCausalLM.from_pretrained(src)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                lin.weight.copy_((torch.rand(lin.weight.shape, generator=gen) * 2 - 1) * 0.04)
    model.save_pretrained(src)
    return src


def make_mixed_checkpoint(root: Path) -> Path:
    """`daq-vllm quantize --format auto` of `make_mixed_model`, g64, 6 blocks of 48 tokens."""
    from daq_vllm import cli

    calib = root / "calib.txt"
    gen = torch.Generator().manual_seed(0)
    calib.write_text(" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (3000,), generator=gen).tolist()))
    out = root / "auto"
    code = cli.main(["quantize", str(make_mixed_model(root)), "--out", str(out), "--format", "auto",
                     "--group-size", "64", "--calib", str(calib), "--nsamples", "6", "--seqlen", "48", "--no-progress"])
    assert code == 0
    return out
