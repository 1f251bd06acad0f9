"""Perplexity, and the text it is computed on: packaged WikiText-2, its overrides and optional Hub datasets."""

import json
import lzma
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from daq_vllm import cli
from daq_vllm.data import wikitext
from daq_vllm.data.hub import HubText, parse_hub_source
from daq_vllm.data.wikitext import (
    WIKITEXT2_TEST,
    WIKITEXT2_VALID_TOKENS,
    is_standard_wikitext2,
    standard_eval_text,
    wikitext2_eval_text,
    wikitext2_test_text,
    wikitext2_valid_text,
)
from daq_vllm.errors import DAQError
from daq_vllm.eval.perplexity import perplexity, task_text
from daq_vllm.offline.calibration import calibration_text


def test_wikitext2_text_is_the_standard_one(wikitext2_raw):
    text = wikitext2_eval_text(wikitext2_raw)
    assert len(text) == 1_294_336
    assert is_standard_wikitext2(text)


def test_perplexity_equals_direct_token_mean(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    ids = torch.randint(3, 250, (3 * 32 + 5,), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, ids, seqlen=32, progress=False)
    assert result.windows == result.total_windows == 3 and result.tokens == 96
    total, count = 0.0, 0
    with torch.no_grad():
        for w in range(3):
            window = ids[w * 32 : (w + 1) * 32]
            logp = torch.log_softmax(model(window[None]).logits[0].double(), dim=-1)
            for t in range(31):
                total -= logp[t, window[t + 1]].item()
                count += 1
    assert math.isclose(result.perplexity, math.exp(total / count), rel_tol=1e-5)
    assert perplexity(model, ids, seqlen=32, max_windows=1, progress=False).windows == 1


# --- Where the text comes from: the packaged copy, checked; DAQ_DATA_DIR and --data win over it ---


def test_packaged_texts_are_the_pinned_files(monkeypatch):
    monkeypatch.delenv("DAQ_DATA_DIR", raising=False)
    assert is_standard_wikitext2(wikitext2_test_text())
    valid = wikitext2_valid_text()
    assert valid.startswith(" \n = Homarus gammarus = \n") and valid.count("\n") == 3760
    assert calibration_text("wikitext2-valid") == valid


def write_data_dir(root: Path, test: str | None = None, valid: str | None = None) -> Path:
    for relative, text in ((WIKITEXT2_TEST, test), (WIKITEXT2_VALID_TOKENS, valid)):
        if text is not None:
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            (root / relative).write_text(text, encoding="utf-8")
    return root


def test_daq_data_dir_wins_and_data_wins_over_it(monkeypatch, tmp_path):
    data_dir = write_data_dir(tmp_path / "d", test=" \n = A = \n \n b c \n", valid="v w\n")
    monkeypatch.setenv("DAQ_DATA_DIR", str(data_dir))
    assert wikitext2_test_text() == standard_eval_text(" \n = A = \n \n b c \n") == "\n\n = A = \n\n\n\n\n b c \n"
    assert wikitext2_valid_text() == "v w\n"
    other = tmp_path / "other.raw"
    other.write_text("x y \n", encoding="utf-8")
    assert wikitext2_test_text(str(other)) == "x y \n"
    with pytest.raises(DAQError, match="--data"):
        wikitext2_test_text(str(tmp_path / "missing.raw"))


def test_daq_data_dir_without_a_file_falls_back_to_the_packaged_one(monkeypatch, tmp_path):
    monkeypatch.setenv("DAQ_DATA_DIR", str(write_data_dir(tmp_path / "d", valid="only the valid split\n")))
    assert is_standard_wikitext2(wikitext2_test_text())
    assert wikitext2_valid_text() == "only the valid split\n"
    monkeypatch.setenv("DAQ_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DAQError, match="DAQ_DATA_DIR"):
        wikitext2_valid_text()


def fake_package(monkeypatch, root: Path, files: dict[str, bytes]) -> None:
    """Make importlib.resources find the package data under `root`, holding `files`."""
    (root / wikitext.PACKAGED_DIR).mkdir(parents=True)
    for name, data in files.items():
        (root / wikitext.PACKAGED_DIR / name).write_bytes(data)
    monkeypatch.setattr(wikitext.resources, "files", lambda package: root)
    monkeypatch.delenv("DAQ_DATA_DIR", raising=False)


def test_a_corrupt_packaged_copy_names_the_file_and_the_fix(monkeypatch, tmp_path):
    fake_package(monkeypatch, tmp_path, {"wiki.test.raw.xz": lzma.compress(b" \n = Robert Boulter = \n"),
                                         "wiki.valid.tokens.xz": b"not xz"})
    for load, name in ((wikitext2_test_text, "wiki.test.raw.xz"), (wikitext2_valid_text, "wiki.valid.tokens.xz")):
        with pytest.raises(DAQError) as err:
            load()
        message = str(err.value)
        assert name in message and "reinstall daq-vllm" in message and "\n" not in message


def test_a_missing_packaged_copy_names_the_fix(monkeypatch, tmp_path):
    fake_package(monkeypatch, tmp_path, {})
    with pytest.raises(DAQError, match=r"wiki\.test\.raw\.xz.*reinstall daq-vllm"):
        wikitext2_test_text()


def test_the_rebuilt_test_text_is_checked(monkeypatch):
    monkeypatch.delenv("DAQ_DATA_DIR", raising=False)
    monkeypatch.setattr(wikitext, "WIKITEXT2_TEST_TEXT_SHA256", "0" * 64)
    with pytest.raises(DAQError, match=r"wiki\.test\.raw\.xz does not rebuild the standard.*reinstall daq-vllm"):
        wikitext2_test_text()


# --- hf:NAME[:CONFIG[:SPLIT]]: optional Hub datasets, tested without network or `datasets` ---


def test_hub_source_parser():
    assert parse_hub_source("hf:wikitext", "test") == HubText("wikitext", None, "test")
    assert parse_hub_source("hf:wikitext:wikitext-2-raw-v1", "train") == HubText("wikitext", "wikitext-2-raw-v1",
                                                                                  "train")
    assert parse_hub_source("hf:allenai/c4:en:validation", "train") == HubText("allenai/c4", "en", "validation")
    assert parse_hub_source("hf:allenai/c4::validation", "train") == HubText("allenai/c4", None, "validation")
    assert str(HubText("allenai/c4", None, "train")) == "hf:allenai/c4::train"
    for bad in ("hf:", "hf::x", "hf:a:b:c:d", "hf: a", "wikitext"):
        with pytest.raises(DAQError, match=r"hf:NAME\[:CONFIG\[:SPLIT\]\]"):
            parse_hub_source(bad, "test")


@pytest.fixture
def no_datasets(monkeypatch):
    """`import datasets` fails, as in CI and for users without the optional library."""
    monkeypatch.setitem(sys.modules, "datasets", None)


def fake_datasets(monkeypatch, load_dataset) -> list:
    """A stand-in `datasets` module; returns the list of load_dataset calls."""
    calls = []
    module = types.ModuleType("datasets")

    def record(*args, **kwargs):
        calls.append((args, kwargs))
        return load_dataset(*args, **kwargs)

    module.load_dataset = record
    monkeypatch.setitem(sys.modules, "datasets", module)
    return calls


class FakeDataset:
    def __init__(self, columns: dict):
        self.columns = columns
        self.column_names = list(columns)

    def __getitem__(self, column: str) -> list:
        return self.columns[column]


def offline(*args, **kwargs):
    raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)\nsecond line")


@pytest.mark.usefixtures("no_datasets")
def test_hub_without_datasets_names_the_install_and_local_alternatives():
    with pytest.raises(DAQError) as err:
        calibration_text("hf:wikitext:wikitext-2-raw-v1")
    message = str(err.value)
    assert "pip install datasets" in message and "--calib wikitext2-valid" in message and "PATH.txt" in message
    assert "\n" not in message
    with pytest.raises(DAQError) as err:
        task_text("hf:wikitext:wikitext-2-raw-v1")
    message = str(err.value)
    assert "pip install datasets" in message and "--ppl wikitext2" in message and "--data" in message


def test_hub_offline_names_the_dataset_offline_mode_and_local_alternatives(monkeypatch):
    fake_datasets(monkeypatch, offline)
    for load, alternative in ((calibration_text, "--calib wikitext2-valid"), (task_text, "--ppl wikitext2")):
        with pytest.raises(DAQError) as err:
            load("hf:wikitext:wikitext-2-raw-v1")
        message = str(err.value)
        assert "hf:wikitext:wikitext-2-raw-v1" in message and "HF_DATASETS_OFFLINE" in message
        assert alternative in message and "ConnectionError" in message and "\n" not in message


def test_hub_text_joins_rows_and_defaults_the_split(monkeypatch):
    calls = fake_datasets(monkeypatch, lambda *a, **k: FakeDataset({"text": ["a b", "", "c"], "id": [1, 2, 3]}))
    assert calibration_text("hf:allenai/c4:en") == "a b\n\n\n\nc"
    assert task_text("hf:wikitext:wikitext-2-raw-v1") == "a b\n\n\n\nc"
    assert calls == [(("allenai/c4", "en"), {"split": "train"}), (("wikitext", "wikitext-2-raw-v1"), {"split": "test"})]
    fake_datasets(monkeypatch, lambda *a, **k: FakeDataset({"content": ["x"]}))
    with pytest.raises(DAQError, match='no "text" column'):
        calibration_text("hf:some/code")


# --- `daq-vllm eval --ppl`: wikitext2 or hf:..., one-line errors ---


def eval_error(capsys, *argv) -> str:
    assert cli.main(["eval", *argv, "--no-progress"]) == 2
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("daq-vllm")]
    assert len(lines) == 1
    return lines[0]


def test_eval_ppl_task_is_checked_in_one_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["eval", str(tmp_path), "--ppl", "c4"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'c4'" in err and "hf:NAME[:CONFIG[:SPLIT]]" in err
    with pytest.raises(SystemExit):
        cli.main(["eval", str(tmp_path), "--ppl", "hf:"])
    assert "hf:NAME" in capsys.readouterr().err
    data = tmp_path / "wiki.test.raw"
    data.write_text("w1 w2\n")
    assert "--data" in eval_error(capsys, str(tmp_path), "--ppl", "hf:wikitext", "--data", str(data))


def test_eval_on_a_hub_dataset(capsys, monkeypatch, tiny_llama):
    rng = torch.Generator().manual_seed(0)
    rows = [" ".join(f"w{int(i)}" for i in torch.randint(0, 250, (40,), generator=rng)) for _ in range(10)]
    calls = fake_datasets(monkeypatch, lambda *a, **k: FakeDataset({"text": rows}))
    argv = ["eval", str(tiny_llama), "--ppl", "hf:me/words", "--seqlen", "64", "--max-windows", "2", "--json"]
    assert cli.main([*argv, "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["task"] == "hf:me/words" and result["windows"] == 2 and 1 < result["perplexity"] < 1e4
    assert calls == [(("me/words", None), {"split": "test"})]


def test_eval_on_a_hub_dataset_without_datasets(capsys, monkeypatch, tiny_llama):
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert "pip install datasets" in eval_error(capsys, str(tiny_llama), "--ppl", "hf:wikitext:wikitext-2-raw-v1")


def test_eval_of_a_checkpoint_with_nan_scales_fails_at_load_in_one_line(capsys, tmp_path):
    from helpers import edit_shard, make_daq_checkpoint

    checkpoint = make_daq_checkpoint(tmp_path)
    name = "model.layers.0.mlp.down_proj.scales"

    def poison(tensors):
        tensors[name][1, 0] = float("nan")

    edit_shard(checkpoint, name, poison)
    capsys.readouterr()  # the quantizer's own output
    assert cli.main(["eval", str(checkpoint), "--max-windows", "1", "--seqlen", "32", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert "the scales of a DAQ linear [192, 320]" in err and "hold NaN or infinity: the checkpoint is corrupt" in err
