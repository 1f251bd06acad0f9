"""Per-layer results of a quantization run, saved atomically so a killed run can `--resume`.

They live in `.<out>.resume/` beside the output: one safetensors file per finished decoder layer
and a `state.json` with a fingerprint of the options, so a resume with other options is refused.
The directory is removed once the checkpoint is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from daq_vllm import __version__
from daq_vllm.errors import DAQError
from daq_vllm.model_files import resolve_model_path

from .options import QuantizeOptions

# free to change between tries (none changes a byte of the result)
_VOLATILE_OPTIONS = ("overwrite", "resume", "progress", "max_shard_bytes", "max_memory", "offload_activations")


def run_fingerprint(model_path: str, opts: QuantizeOptions) -> dict[str, Any]:
    """What a resumed run must share with the killed one: model files, options, tool version."""
    keep = asdict(opts)
    for volatile in _VOLATILE_OPTIONS:
        keep.pop(volatile)
    path = resolve_model_path(model_path, opts.revision).resolve()  # a Hub ID: its snapshot folder
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return {"model": str(path), "files": stats, "options": keep, "version": __version__}


class ResumeStore:
    """Finished layers' tensors and report entries, keyed by layer index, for one run's fingerprint."""

    def __init__(self, out: Path, fingerprint: dict, resume: bool):
        self.directory = out.parent / f".{out.name}.resume"
        self.fingerprint = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()
        state = self.directory / "state.json"
        if resume and state.is_file():
            saved = json.loads(state.read_text()).get("fingerprint")
            if saved != self.fingerprint:
                raise DAQError(
                    f"--resume: {self.directory} was made with other options or another model; "
                    "rerun with the same options, or without --resume to start over"
                )
            print(f"resuming from {self.finished()} finished layers in {self.directory}", file=sys.stderr)
        else:
            if self.directory.exists():
                shutil.rmtree(self.directory)
            self.directory.mkdir(parents=True)
            state.write_text(json.dumps({"fingerprint": self.fingerprint}) + "\n")

    def _file(self, layer: int) -> Path:
        return self.directory / f"layer-{layer:05d}.safetensors"

    def finished(self) -> int:
        return len(self.saved_layers())

    def saved_layers(self) -> set[int]:
        """The indices of the finished layers."""
        return {int(p.stem.removeprefix("layer-")) for p in self.directory.glob("layer-*.safetensors")}

    def load(self, layer: int) -> tuple[dict[str, torch.Tensor], dict[str, dict]] | None:
        """The saved tensors and per-linear report entries of `layer`, or None if it is not finished."""
        path = self._file(layer)
        if not path.is_file():
            return None
        with safe_open(str(path), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            info = json.loads(f.metadata()["info"])
        return tensors, info

    def save(self, layer: int, tensors: dict[str, torch.Tensor], info: dict[str, dict]) -> None:
        tmp = self.directory / f"layer-{layer:05d}.tmp"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"info": json.dumps(info)})
        os.replace(tmp, self._file(layer))

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
