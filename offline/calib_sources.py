"""Calibration records: `.jsonl`, `.parquet` or a `datasets` `save_to_disk` folder, one text per record.

A record gives its `field` (`--calib-field`, default "text") or, with `--chat-template`, its "messages"
(a list of {"role", "content"} dicts) rendered by the tokenizer's chat template, as llm-compressor
calibrates instruct models. `pyarrow` (.parquet) and `datasets` (folders) are optional: without them
the error names the install and the local alternatives (.txt/.jsonl).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daq_vllm.errors import DAQError, describe

RECORD_SOURCES = "PATH.jsonl, PATH.parquet or a folder saved by datasets' save_to_disk"  # records: a field each
PLAIN_ALTERNATIVES = "or use a --calib PATH.txt / PATH.jsonl"
MESSAGES = "messages"

Render = Callable[[Any], str]  # a record's "messages" -> chat-formatted text
Record = tuple[str, Any]  # (where it is, e.g. "data.jsonl:3", the record)


def is_record_source(path: Path) -> bool:
    return path.is_dir() or path.suffix in (".jsonl", ".parquet")


def read_records(path: Path) -> list[Record]:
    if path.is_dir():
        return _saved_dataset_records(path)
    if path.suffix == ".jsonl":
        return _jsonl_records(path)
    return _parquet_records(path)


def _jsonl_records(path: Path) -> list[Record]:
    records = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append((f"{path}:{i}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise DAQError(f"{path}:{i} is not a JSON object ({e.msg})") from None
    return records


def _parquet_records(path: Path) -> list[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DAQError(f"{path} needs the optional `pyarrow` library: pip install pyarrow; "
                       f"{PLAIN_ALTERNATIVES}") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # not parquet, truncated: one line
        raise DAQError(f"could not read {path} as parquet ({describe(e)})") from None
    return [(f"{path} row {i}", row) for i, row in enumerate(rows, 1)]


def _saved_dataset_records(path: Path) -> list[Record]:
    if not any((path / name).is_file() for name in ("state.json", "dataset_dict.json")):
        raise DAQError(f"{path} is a folder but not one saved by datasets' save_to_disk (no state.json or "
                       "dataset_dict.json); give one, or a file: PATH.txt, PATH.jsonl or PATH.parquet")
    try:
        import datasets
    except ImportError:
        raise DAQError(f"{path} needs the optional `datasets` library: pip install datasets; "
                       f"{PLAIN_ALTERNATIVES}") from None
    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DAQError(f"could not load {path} with datasets.load_from_disk ({describe(e)})") from None
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset[_pick_split(path, list(dataset))]
    return [(f"{path} row {i}", row) for i, row in enumerate(dataset.to_list(), 1)]


def _pick_split(path: Path, splits: list[str]) -> str:
    if "train" in splits or len(splits) == 1:
        return "train" if "train" in splits else splits[0]
    raise DAQError(f"{path} holds splits {', '.join(splits) or '(none)'} and none is \"train\"; "
                   "save the one to calibrate on by itself (dataset_dict[SPLIT].save_to_disk)")


def records_text(records: list[Record], field: str, render: Render | None) -> str:
    """The records' texts joined by "\\n\\n", as a plain-text source is read."""
    first = records[0][1] if records else None  # no records: "0 tokens, fewer than one block" follows
    return "\n\n".join(_record_text(where, record, field, render, first) for where, record in records)


def _record_text(where: str, record: Any, field: str, render: Render | None, first: Any) -> str:
    has = isinstance(record, dict)
    if has and render is not None and record.get(MESSAGES) is not None:
        return render(record[MESSAGES])
    if has and isinstance(record.get(field), str):
        return record[field]
    if has and field in record:
        raise DAQError(f"{where}: \"{field}\" holds {type(record[field]).__name__}, not text; "
                       "pick the text field with --calib-field NAME")
    if has and MESSAGES in record:
        raise DAQError(f"{where} holds chat \"messages\" but no \"{field}\" field; add --chat-template to render "
                       "them with the tokenizer's chat template")
    fields = ", ".join(first) if isinstance(first, dict) and first else "none"
    noun = "a JSON object" if ".jsonl:" in where else "a record"
    raise DAQError(f"{where} is not {noun} with a \"{field}\" field or \"{MESSAGES}\" (fields in the first record: "
                   f"{fields}); pick the text field with --calib-field NAME")


def chat_renderer(tokenizer) -> Render:
    """`messages` -> the tokenizer's chat template as text; a one-line error if it has none."""
    if not getattr(tokenizer, "chat_template", None):
        raise DAQError("--chat-template: the model's tokenizer has no chat template; drop --chat-template "
                       "and calibrate on a text field (--calib-field NAME)")

    def render(messages: Any) -> str:
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise DAQError(f"--chat-template: \"{MESSAGES}\" must be a list of {{\"role\", \"content\"}} objects, "
                           f"got {type(messages).__name__}")
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception as e:  # template errors (roles it refuses, missing keys): one line
            raise DAQError(f"--chat-template: the chat template failed on a record ({describe(e)})") from None

    return render
