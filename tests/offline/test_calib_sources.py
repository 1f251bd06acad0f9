"""Calibration records: .jsonl / .parquet / save_to_disk folders, --calib-field, --chat-template, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import require
from daq_vllm.errors import DAQError
from daq_vllm.offline.calib_sources import chat_renderer
from daq_vllm.offline.calibration import CalibSpec, calibration_blocks, calibration_text
from helpers import WORDS, make_tiny_model, tiny_tokenizer

try:
    import pyarrow as pa
    import pyarrow.parquet as pq

    HAVE_PYARROW = True
except ImportError:
    HAVE_PYARROW = False

try:
    import datasets

    HAVE_DATASETS = True
except ImportError:
    HAVE_DATASETS = False

TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
ROWS = {"id": [1, 2, 3], "body": ["w1 w2 w3", "w4 w5", "w6"]}
JOINED = "w1 w2 w3\n\nw4 w5\n\nw6"
CHAT_TEXT = "user: w1 w2\nassistant: w3\n\n\nuser: w4\n"  # two rendered records joined by "\n\n"


def words(n: int, start: int = 0) -> str:
    return " ".join(WORDS[(start + i) % len(WORDS)] for i in range(n))


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def chat_tokenizer():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def one_line_error(call, *args) -> str:
    with pytest.raises(DAQError) as err:
        call(*args)
    assert "\n" not in str(err.value)
    return str(err.value)


# --- sources and --calib-field ---


def test_jsonl_takes_the_chosen_field(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"id": i, "body": b} for i, b in zip(ROWS["id"], ROWS["body"])])
    assert calibration_text(path, "body") == JOINED
    blocks = calibration_blocks(tiny_tokenizer(), CalibSpec(path, nsamples=2, seqlen=3, field="body"))
    assert blocks.shape == (2, 3)


def test_parquet_takes_the_chosen_field(tmp_path):
    require(HAVE_PYARROW, "pyarrow is not installed")
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table(ROWS), path)
    assert calibration_text(str(path), "body") == JOINED


def test_saved_dataset_folder(tmp_path):
    require(HAVE_DATASETS, "datasets is not installed")
    datasets.Dataset.from_dict(ROWS).save_to_disk(str(tmp_path / "ds"))
    assert calibration_text(str(tmp_path / "ds"), "body") == JOINED


def test_saved_dataset_dict_takes_train_else_the_only_split(tmp_path):
    require(HAVE_DATASETS, "datasets is not installed")
    other = datasets.Dataset.from_dict({"body": ["w9"]})
    datasets.DatasetDict(train=datasets.Dataset.from_dict(ROWS), test=other).save_to_disk(str(tmp_path / "dd"))
    assert calibration_text(str(tmp_path / "dd"), "body") == JOINED
    datasets.DatasetDict(validation=other).save_to_disk(str(tmp_path / "one"))
    assert calibration_text(str(tmp_path / "one"), "body") == "w9"
    datasets.DatasetDict(validation=other, test=other).save_to_disk(str(tmp_path / "two"))
    message = one_line_error(calibration_text, str(tmp_path / "two"), "body")
    assert "validation, test" in message and '"train"' in message


def test_plain_folder_is_not_a_dataset(tmp_path):
    assert "save_to_disk" in one_line_error(calibration_text, str(tmp_path))


# --- --chat-template ---


def chat_records():
    return [
        {"messages": [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3"}]},
        {"messages": [{"role": "user", "content": "w4"}]},
    ]


def test_messages_are_rendered_with_the_chat_template(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", chat_records())
    tokenizer = chat_tokenizer()
    assert calibration_text(path, render=chat_renderer(tokenizer)) == CHAT_TEXT
    ids = tokenizer(CHAT_TEXT, add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["<unk>", "w1", "w2", "<unk>", "w3", "<unk>", "w4"]  # roles: <unk>
    # a block one token shorter than the rendered text can only start at 0: every block is its first tokens
    blocks = calibration_blocks(tokenizer, CalibSpec(path, nsamples=3, seqlen=len(ids) - 1, chat_template=True))
    assert blocks.tolist() == [ids[:-1]] * 3


def test_saved_dataset_messages_are_rendered(tmp_path):
    require(HAVE_DATASETS, "datasets is not installed")
    datasets.Dataset.from_list(chat_records()).save_to_disk(str(tmp_path / "chat"))
    assert calibration_text(str(tmp_path / "chat"), render=chat_renderer(chat_tokenizer())) == CHAT_TEXT


def test_messages_without_chat_template_suggest_it(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", chat_records())
    message = one_line_error(calibration_blocks, chat_tokenizer(), CalibSpec(path))
    assert "--chat-template" in message and "chat.jsonl:1" in message


def test_chat_template_without_a_template_is_one_line(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", chat_records())
    message = one_line_error(calibration_blocks, tiny_tokenizer(), CalibSpec(path, chat_template=True))
    assert "no chat template" in message


def test_chat_template_on_plain_text_is_refused(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(words(100))
    message = one_line_error(calibration_blocks, chat_tokenizer(), CalibSpec(str(path), chat_template=True))
    assert "--chat-template" in message and "c.txt" in message


# --- one-line errors ---


def test_missing_field_lists_the_fields_found(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"id": 1, "body": "w1"}])
    message = one_line_error(calibration_text, path)
    assert '"text"' in message and "id, body" in message and "--calib-field" in message


def test_non_text_field_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"id": 1, "body": "w1"}])
    assert "--calib-field" in one_line_error(calibration_text, path, "id")


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    path = tmp_path / "c.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    message = one_line_error(calibration_text, str(path), "body")
    assert "pip install pyarrow" in message and "PATH.jsonl" in message and "PATH.txt" in message


def test_saved_dataset_without_datasets(tmp_path, monkeypatch):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "state.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)
    message = one_line_error(calibration_text, str(tmp_path / "ds"))
    assert "pip install datasets" in message and "PATH.jsonl" in message and "PATH.txt" in message


# --- CLI ---


def test_cli_quantize_on_a_parquet_field(tmp_path):
    require(HAVE_PYARROW, "pyarrow is not installed")
    src = make_tiny_model(tmp_path / "src")
    data = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": list(range(20)), "body": [words(30, 7 * i) for i in range(20)]}), data)
    out = tmp_path / "q"
    proc = subprocess.run(
        [sys.executable, "-m", "daq_vllm.cli", "quantize", str(src), "--out", str(out), "--calib", str(data),
         "--calib-field", "body", "--nsamples", "4", "--seqlen", "32", "--no-progress"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    calibration = json.loads((out / "config.json").read_text())["quantization_config"]["provenance"]["calibration"]
    assert calibration["source"] == str(data) and calibration["field"] == "body"
    assert calibration["chat_template"] is False
