"""Pre-flight check of a DAQ checkpoint directory against its config, from the safetensors headers.

vLLM loads weights inside its engine process: a missing or mis-shaped tensor shows up there as a
bare assertion, as "weights were not initialized", or not at all (a missing shard of a fused
qkv_proj leaves uninitialised memory). This check runs first, in the process that starts the
engine (`DAQConfig.maybe_update_config`) and in `daq-vllm serve`, reads only the JSON headers
(milliseconds, no tensor data), and names the first bad tensor or field. It never imports vllm.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

from ..errors import DAQError
from .architectures import expected_shapes
from .config import QUANT_METHOD, DAQFormat
from .layout import PACKED, PACKED_DTYPES, QWEIGHT, packed_shapes, packed_words

INDEX_FILE = "model.safetensors.index.json"
_LAYER = re.compile(r"^(?P<stack>.*\.layers)\.(?P<index>\d+)\.(?P<rest>.+)$")
_WEIGHT_LIKE = {*PACKED, "weight"}
_EXPERT = re.compile(r"^(?P<experts>.*\.experts)\.(?P<index>\d+)\.(?P<proj>[^.]+)\.(?P<suffix>[^.]+)$")


def read_header(path: Path) -> dict[str, dict[str, Any]]:
    """Tensor name -> {"dtype", "shape"} of one safetensors file, from its JSON header only."""
    try:
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100 * 2**20:
                raise ValueError("header too large")
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error) as e:
        raise DAQError(f"cannot read {path}: not a valid safetensors file ({e}); "
                       "restore the file or re-quantize") from None
    header.pop("__metadata__", None)
    return header


def read_tensors(directory: Path) -> dict[str, dict[str, Any]]:
    """All tensors of the checkpoint; every tensor the index names must be in its shard."""
    index_path = directory / INDEX_FILE
    if not index_path.is_file():
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise DAQError(f"{directory} holds no .safetensors files; "
                           "it is not a DAQ checkpoint (see daq-vllm quantize)")
        return {name: info for f in files for name, info in read_header(f).items()}
    try:
        weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DAQError(f"{index_path} is not a valid index ({e!r}); restore it or re-quantize") from None
    headers: dict[str, dict[str, dict[str, Any]]] = {}
    tensors: dict[str, dict[str, Any]] = {}
    for name, file in sorted(weight_map.items()):
        if file not in headers:
            if not (directory / file).is_file():
                raise DAQError(f"checkpoint {directory} is missing the file {file} (holds tensor {name}); "
                               "restore it or re-quantize")
            headers[file] = read_header(directory / file)
        if name not in headers[file]:
            raise DAQError(f"checkpoint {directory} is missing tensor {name} (the index puts it in {file}); "
                           "restore it or re-quantize")
        tensors[name] = headers[file][name]
    return tensors


def _check_packed(directory: Path, module: str, tensors: dict[str, dict[str, Any]], fmt: DAQFormat,
                  expected: tuple[int, int] | None) -> None:
    """One quantized linear: all three tensors, their dtypes, and shapes that agree (with N, K if known)."""
    for suffix in PACKED:
        name = f"{module}.{suffix}"
        if name not in tensors:
            raise DAQError(f"checkpoint {directory} is missing tensor {name} ({module}.qweight/.scales/.offsets "
                           "belong together); restore it or re-quantize")
        info = tensors[name]
        if info.get("dtype") != PACKED_DTYPES[suffix] or len(info.get("shape", ())) != 2:
            raise DAQError(f"checkpoint {directory}: tensor {name} is {info.get('dtype')} {info.get('shape')}, "
                           f"expected a 2-D {PACKED_DTYPES[suffix]} tensor (docs/FORMAT.md); re-quantize")
    (n, words), scales, offsets = (tensors[f"{module}.{s}"]["shape"] for s in PACKED)
    bits, g = fmt.bits, fmt.group_size
    if expected is not None:
        en, k = expected
        want = packed_shapes(en, k, bits, g)
        for suffix, shape in zip(PACKED, ([n, words], scales, offsets)):
            if tuple(shape) != want[suffix]:
                raise DAQError(f"checkpoint {directory}: tensor {module}.{suffix} has shape {list(shape)}, "
                               f"expected {list(want[suffix])} for a [{en}, {k}] linear at {bits} bits, "
                               f"group size {g}; re-quantize")
        return
    if list(scales) != list(offsets) or scales[0] != n:
        raise DAQError(f"checkpoint {directory}: tensors {module}.scales {list(scales)} and .offsets {list(offsets)} "
                       f"must have shape [{n}, groups] like .qweight [{n}, {words}]; re-quantize")
    groups = scales[1]
    if groups < 1 or not packed_words((groups - 1) * g + 1, bits) <= words <= packed_words(groups * g, bits):
        raise DAQError(f"checkpoint {directory}: tensor {module}.qweight has {words} words per row, which does not fit "
                       f"{groups} groups of {g} inputs at {bits} bits; re-quantize")


def _check_layers(directory: Path, tensors: dict[str, dict[str, Any]], num_layers: int) -> None:
    """Every decoder layer holds the same modules (quantized or not) as the others.

    A module counts as present in a layer by its `.weight` or its packed tensors, so a module left
    in full precision in one layer only (`--skip`) is not reported.
    """
    layers: dict[tuple[str, int], dict[str, str]] = {}  # (stack, i) -> module -> one of its tensors
    for name in tensors:
        m = _LAYER.match(name)
        if m is None or int(m["index"]) >= num_layers:
            continue
        module, _, suffix = m["rest"].rpartition(".")
        entry = module if module and suffix in _WEIGHT_LIKE else m["rest"]
        layers.setdefault((m["stack"], int(m["index"])), {}).setdefault(entry, m["rest"])
    for stack in sorted({s for s, _ in layers}):
        union: dict[str, str] = {}
        for (s, _), entries in sorted(layers.items()):
            if s == stack:
                for entry, rest in entries.items():
                    union.setdefault(entry, rest)
        for i in range(num_layers):
            missing = sorted(set(union) - set(layers.get((stack, i), {})))
            if missing:
                rest = union[missing[0]]
                if rest.rpartition(".")[2] in PACKED:
                    rest = f"{missing[0]}.{QWEIGHT}"
                raise DAQError(f"checkpoint {directory} is missing tensor {stack}.{i}.{rest} "
                               f"(layer {i} of {num_layers}; the other layers have it); restore it or re-quantize")


def _check_experts(directory: Path, tensors: dict[str, dict[str, Any]], config: dict[str, Any]) -> None:
    """Every MoE layer stores every expert's every projection (vLLM loads them as one fused layer, and
    a missing one would stay uninitialised memory there): experts 0..E-1, E from config.json where
    it says (`num_local_experts`, `num_experts`), else as many as any projection has."""
    stored: dict[str, dict[str, set[int]]] = {}  # experts module -> projection -> expert indices
    for name in tensors:
        m = _EXPERT.match(name)
        if m is not None and m["suffix"] in _WEIGHT_LIKE:
            stored.setdefault(m["experts"], {}).setdefault(m["proj"], set()).add(int(m["index"]))
    declared = next((config[k] for k in ("num_local_experts", "num_experts") if isinstance(config.get(k), int)), None)
    for experts, projections in sorted(stored.items()):
        count = declared or 1 + max(max(ids) for ids in projections.values())
        for proj, ids in sorted(projections.items()):
            missing = sorted(set(range(count)) - ids)
            if missing:
                raise DAQError(f"checkpoint {directory} is missing tensor {experts}.{missing[0]}.{proj}.{QWEIGHT} "
                               f"(expert {missing[0]} of {count}; the other experts have it); "
                               "restore it or re-quantize")


def check_checkpoint(path: str | Path, *, for_vllm: bool = False) -> DAQFormat:
    """Validate a DAQ checkpoint directory; return its format or raise DAQError naming the problem.

    `for_vllm` adds what the vLLM plugin cannot serve (a quantized `lm_head`).
    """
    directory = Path(path).expanduser()
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise DAQError(f"{directory} is not a model directory (no config.json); "
                       "pass a checkpoint written by daq-vllm quantize")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as e:
        raise DAQError(f"{config_path} is not valid JSON ({e}); restore it or re-quantize") from None
    qcfg = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(qcfg, dict) or qcfg.get("quant_method") != QUANT_METHOD:
        raise DAQError(f"{directory} is not a DAQ checkpoint (config.json has no quantization_config with "
                       "quant_method 'daq'); quantize it first with daq-vllm quantize")
    fmt = DAQFormat.from_dict(qcfg)
    tensors = read_tensors(directory)
    quantized = {name.rsplit(".", 1)[0] for name in tensors if name.rsplit(".", 1)[-1] in PACKED}
    if not quantized:
        raise DAQError(f"checkpoint {directory} holds no quantized linears (no .qweight tensors); re-quantize")
    shapes = expected_shapes(config)
    for module in sorted(quantized):
        if f"{module}.weight" in tensors:
            raise DAQError(f"checkpoint {directory} holds both {module}.weight and {module}.qweight; re-quantize")
        if not fmt.is_converted(module):
            raise DAQError(f"quantization_config.modules_not_converted lists {module}, but the checkpoint stores it "
                           "quantized; re-quantize")
        if for_vllm and module.rsplit(".", 1)[-1] == "lm_head":
            raise DAQError(f"checkpoint {directory} has a quantized lm_head, which the vLLM plugin does not serve yet; "
                           "re-quantize without --quantize-lm-head")
        expected = shapes.get(module.rsplit(".", 1)[-1]) if _LAYER.match(module) else None
        _check_packed(directory, module, tensors, fmt, expected)
    stray = sorted(set(fmt.module_formats) - quantized)
    if stray:
        raise DAQError(f"quantization_config.module_formats names {stray[0]}, which the checkpoint does not store "
                       "quantized (no .qweight); re-quantize")
    num_layers = config.get("num_hidden_layers")
    if isinstance(num_layers, int):
        _check_layers(directory, tensors, num_layers)
    _check_experts(directory, tensors, config)
    return fmt
