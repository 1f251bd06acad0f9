"""`daq-vllm quantize` writes a model card (README.md) into the checkpoint; the source's card stays out."""

import json

import pytest
import torch
import yaml

from daq_vllm import cli
from daq_vllm.errors import DAQError
from daq_vllm.eval.card import HEADING, card_dir, card_with_eval
from daq_vllm.format import DAQFormat
from daq_vllm.offline.model_card import base_model_name, model_card
from daq_vllm.offline.pipeline import QuantizeOptions, quantize_model
from helpers import make_tiny_model

MARKER = "SOURCE-CARD-MARKER-7f3a"


def front_matter(text: str) -> dict:
    lines = text.splitlines()
    assert lines[0] == "---"
    end = lines.index("---", 1)
    return yaml.safe_load("\n".join(lines[1:end]))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("card")
    src = make_tiny_model(tmp / "src")
    (src / "README.md").write_text(f"# The source model\n\n{MARKER}\n")
    out = tmp / "out"
    report = quantize_model(str(src), out, QuantizeOptions(group_size=64, progress=False))
    return out, report


def test_card_front_matter(checkpoint):
    out, _ = checkpoint
    meta = front_matter((out / "README.md").read_text())
    assert meta["base_model"] == "src"
    assert meta["library_name"] == "transformers"
    assert meta["tags"] == ["daq", "quantized", "fp4_e2m1", "4-bit"]
    assert meta["pipeline_tag"] == "text-generation"


def test_card_body(checkpoint):
    out, report = checkpoint
    text = (out / "README.md").read_text()
    fmt = DAQFormat.from_dict(json.loads((out / "config.json").read_text())["quantization_config"])
    assert "`fp4_e2m1`" in text and "group size: 64" in text
    assert f"bits per weight: {fmt.bits_per_weight:.2f}" in text and "4.50" in text
    assert f"method: `{fmt.provenance['method']}`" in text and "calibration-free" in text
    assert f"quantized linears: {report['quantized_linears']}" in text
    assert f"modules not converted (kept in the source dtype): {len(fmt.modules_not_converted)}" in text
    decoder = [e for e in report["layers"] if isinstance(e["layer"], int)]
    worst = max(decoder, key=lambda e: e["mean_rel_error"])
    assert f"worst layer: {worst['layer']} ({worst['mean_rel_error']:.5f})" in text
    assert "pip install daq-vllm" in text and "daq-vllm serve" in text
    assert "vllm.entrypoints.openai.api_server" in text and "import daq_vllm" in text
    assert "AutoModelForCausalLM.from_pretrained" in text and "docs/FORMAT.md" in text


def test_source_card_not_copied(checkpoint):
    out, _ = checkpoint
    assert MARKER not in (out / "README.md").read_text()


def test_calibrated_provenance_and_no_causal_lm():
    fmt = DAQFormat("nf4", 4, 128, [0.0] * 16, modules_not_converted=["lm_head"], provenance={
        "tool": "daq-vllm", "tool_version": "9.9", "method": "daq+gptq", "init": {"method": "dca"},
        "ldra": {"steps": 1}, "compensation": {"damp": 0.01, "block": 128, "act_order": True},
        "calibration": {"source": "wikitext2-valid", "nsamples": 8, "seqlen": 256, "seed": 0},
    })
    report = {"quantized_linears": 0, "layers": []}
    text = model_card(report, fmt, "/models/mine", {"architectures": ["BertModel"]})
    meta = front_matter(text)
    assert meta["base_model"] == "mine" and "pipeline_tag" not in meta
    assert "8 samples of 256 tokens from `wikitext2-valid`" in text
    assert "error-compensated" in text and "daq-vllm 9.9" in text and "4.25" in text
    assert "modules not converted (kept in the source dtype): 1" in text
    assert "worst layer" not in text  # no decoder layers to summarise


def test_base_model_name(tmp_path):
    cache = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M" / "snapshots" / ("ab12" * 10)
    cache.mkdir(parents=True)
    assert base_model_name(str(cache)) == "HuggingFaceTB/SmolLM2-135M"
    assert base_model_name("/c/hub/models--gpt2/snapshots/" + "0" * 40) == "gpt2"
    assert base_model_name("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"
    assert base_model_name(str(tmp_path / "my-model")) == "my-model"
    assert base_model_name("/models/llama.Q8_0.gguf") == "llama.Q8_0.gguf"


# --- daq-vllm eval --write-card (daq_vllm/eval/card.py) -------------------------------------------


def eval_rows(text: str) -> list[list[str]]:
    section = text.split(HEADING, 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in section.splitlines() if ln.startswith("|")]
    return rows[2:]  # after the header and its separator


def test_card_with_eval_replaces_same_settings_only():
    card = "---\nbase_model: x\n---\n\n# x\n\n## Usage\n\ntext\n"
    once = card_with_eval(card, "wikitext2", 3, 140, 64, 12.345678)
    assert once.startswith(card) and eval_rows(once) == [["wikitext2", "3/140", "64", "12.3457"]]
    twice = card_with_eval(once, "wikitext2", 3, 140, 64, 11.0)
    assert eval_rows(twice) == [["wikitext2", "3/140", "64", "11.0000"]]
    other = card_with_eval(twice, "wikitext2", 5, 140, 64, 10.0)
    assert eval_rows(other) == [["wikitext2", "3/140", "64", "11.0000"], ["wikitext2", "5/140", "64", "10.0000"]]
    assert other.count(HEADING) == 1 and other.startswith(card)
    # a section after Evaluation survives an update
    moved = card_with_eval(once.replace(HEADING, "## Notes\n\nkeep me\n\n" + HEADING) + "\n## Later\n\nafter\n",
                           "hf:foo", 2, 2, 128, 9.5)
    assert "keep me" in moved and "## Later\n\nafter" in moved and moved.count(HEADING) == 1
    assert eval_rows(moved)[-1] == ["hf:foo", "2/2", "128", "9.5000"]
    assert eval_rows(card_with_eval("", "wikitext2", 1, 1, 8, 2.0)) == [["wikitext2", "1/1", "8", "2.0000"]]


def test_eval_write_card_cli(checkpoint, tmp_path, capsys):
    out, _ = checkpoint
    before = (out / "README.md").read_text()
    data = tmp_path / "words.raw"
    rng = torch.Generator().manual_seed(0)
    data.write_text(" \n".join(" ".join(f"w{int(i)}" for i in torch.randint(0, 250, (40,), generator=rng))
                               for _ in range(20)))
    args = ["eval", str(out), "--data", str(data), "--seqlen", "64", "--json", "--no-progress", "--write-card"]
    for windows in ("2", "2", "1"):
        assert cli.main([*args, "--max-windows", windows]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    text = (out / "README.md").read_text()
    assert text.startswith(before.rstrip("\n"))
    rows = eval_rows(text)
    assert [r[:3] for r in rows] == [["wikitext2", f"2/{result['total_windows']}", "64"],
                                     ["wikitext2", f"1/{result['total_windows']}", "64"]]
    assert rows[1][3] == f"{result['perplexity']:.4f}"
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert front_matter(text)["library_name"] == "transformers"


def test_write_card_needs_a_directory(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(DAQError, match="--write-card needs a model directory"):
        card_dir(gguf)
