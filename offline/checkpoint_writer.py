"""Write a checkpoint atomically: bounded safetensors shards plus an index, in a temp dir renamed at the end.

Nothing under the final name exists until every file is written; config.json is written last even
inside the temp dir, so an interrupted run never leaves a directory that looks like a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from daq_vllm.errors import DAQError


class ShardedWriter:
    """Collect tensors and flush them to safetensors shards of at most `max_shard_bytes`."""

    def __init__(self, directory: Path, max_shard_bytes: int):
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().to("cpu").contiguous()
        self._pending_bytes += size

    def _flush(self) -> None:
        index = len(self._shards)
        save_file(self._pending, str(self.directory / f"shard-{index:05d}.tmp"), metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self.total_bytes += self._pending_bytes
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> None:
        """Give shards their final names and write model.safetensors.index.json."""
        if self._pending:
            self._flush()
        total = len(self._shards)
        weight_map = {}
        for i, names in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            os.replace(self.directory / f"shard-{i:05d}.tmp", self.directory / final)
            os.chmod(self.directory / final, 0o644)  # safetensors creates files owner-only
            weight_map.update({n: final for n in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def check_output(out_dir: Path, overwrite: bool) -> None:
    """Refuse a destination that exists (unless `overwrite`) or is not a directory."""
    if out_dir.exists() and not overwrite:
        raise DAQError(f"output directory {out_dir} already exists; choose another --out or pass --overwrite")
    if out_dir.exists() and not out_dir.is_dir():
        raise DAQError(f"output path {out_dir} exists and is not a directory")


def prepare_output(out_dir: Path, overwrite: bool) -> Path:
    """Check the destination and make a fresh temp dir beside it."""
    check_output(out_dir, overwrite)
    parent = out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit_output(tmp: Path, out_dir: Path) -> None:
    """Move the finished temp dir to its final name, replacing an old output only now."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old)
