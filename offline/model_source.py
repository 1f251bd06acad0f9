"""Read a model to quantize: a Hugging Face directory (streamed tensor by tensor) or a .gguf file.

The quantizer never needs the whole model in memory: it walks a skeleton built on the meta device
(for the module tree: which modules are decoder layers and linears) and reads each tensor from the
safetensors files only when it is processed. A .gguf file is dequantized by transformers in memory
(GGUF models are small enough for that); other inputs fail with a one-line DAQError.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from daq_vllm.errors import DAQError
from daq_vllm.experts import CheckpointNames, defuse_experts
from daq_vllm.model_files import load_gguf, resolve_model_path

if TYPE_CHECKING:  # transformers is imported lazily, when a model is opened
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
# README.md: the source's model card; the checkpoint gets its own (model_card.py)
_NOT_COPIED = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json", "README.md"}


@dataclass
class DecoderLayer:
    """One decoder layer: its module path and the full names of the linears inside it."""

    name: str
    module: nn.Module
    linears: list[str]


class ModelSource:
    """A model's config, module tree and tensors, read lazily where the storage allows it.

    Tensors and modules go by the model's names (transformers' module tree, experts defused:
    `daq_vllm.experts`); `checkpoint_name` gives the name a tensor or module has in checkpoints.
    """

    def __init__(self, path: Path, config: PretrainedConfig, skeleton: nn.Module):
        self.path = path
        self.config = config
        self.skeleton = skeleton
        self.names = CheckpointNames(skeleton)

    def checkpoint_name(self, name: str) -> str:
        """The name that the tensor or module `name` of the model has in the source checkpoint
        (and in the DAQ checkpoint written from it)."""
        return self.names.to_checkpoint(name)

    # Subclasses provide the tensors.
    def tensor_names(self) -> list[str]:
        raise NotImplementedError

    def tensor(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def copy_side_files(self, out_dir: Path) -> None:
        """Copy tokenizer and generation config into the output."""
        raise NotImplementedError

    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The model's tokenizer (calibration text is tokenized with it)."""
        raise NotImplementedError

    def decoder_layers(self) -> list[DecoderLayer]:
        """The decoder layers, found generically: the module list with one entry per hidden layer."""
        n_layers = getattr(self.config.get_text_config(), "num_hidden_layers", None)
        candidates = [
            (name, mod)
            for name, mod in self.skeleton.named_modules()
            if isinstance(mod, nn.ModuleList) and len(mod) == n_layers and n_layers
        ]
        if not candidates:
            raise DAQError(
                f"unsupported architecture {self.architecture}: no list of {n_layers} decoder layers "
                "found in the model; daq-vllm supports decoder-only LLaMA-family models"
            )
        list_name, layer_list = candidates[0]
        layers = []
        for i, layer in enumerate(layer_list):
            prefix = f"{list_name}.{i}"
            linears = [f"{prefix}.{n}" for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
            layers.append(DecoderLayer(prefix, layer, linears))
        if not any(layer.linears for layer in layers):
            raise DAQError(f"unsupported architecture {self.architecture}: its decoder layers hold no nn.Linear")
        return layers

    def config_dict(self) -> dict:
        """The config to write: the source's own config.json where there is one."""
        config_file = self.path / "config.json"
        if self.path.is_dir() and config_file.is_file():
            return json.loads(config_file.read_text())
        config = self.config.to_dict()
        config["architectures"] = config.get("architectures") or [type(self.skeleton).__name__]
        return config

    def input_embedding_name(self) -> str:
        """Checkpoint name of the input embedding (the tensor a tied lm_head shares)."""
        emb = self.skeleton.get_input_embeddings()
        return next(f"{n}.weight" for n, m in self.skeleton.named_modules() if m is emb)

    def linear_names(self) -> list[str]:
        return [n for n, m in self.skeleton.named_modules() if isinstance(m, nn.Linear)]

    @property
    def architecture(self) -> str:
        archs = getattr(self.config, "architectures", None) or [type(self.skeleton).__name__]
        return archs[0]


class SafetensorsSource(ModelSource):
    """A Hugging Face directory with safetensors weights, read one tensor at a time."""

    def __init__(self, path: Path, config: PretrainedConfig, skeleton: nn.Module, files: list[Path]):
        super().__init__(path, config, skeleton)
        from safetensors import safe_open

        self._where: dict[str, tuple[Path, str]] = {}  # model name -> (file, checkpoint name)
        self._handles = {}
        for f in files:
            handle = safe_open(str(f), framework="pt", device="cpu")
            self._handles[f] = handle
            for key in handle.keys():
                self._where[self.names.to_model(key)] = (f, key)
        expected = {n for n, _ in skeleton.named_parameters()}
        missing = sorted(n for n in expected - set(self._where) if not _is_tied(n, config))
        if missing:
            raise DAQError(
                f"unsupported architecture {self.architecture}: the checkpoint's tensor names do not match "
                f"the transformers model (e.g. {self.checkpoint_name(missing[0])!r} is missing)"
            )

    def tensor_names(self) -> list[str]:
        return list(self._where)

    def tensor(self, name: str) -> torch.Tensor:
        file, key = self._where[name]
        return self._handles[file].get_tensor(key)

    def tokenizer(self) -> PreTrainedTokenizerBase:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.path)
        except (ValueError, OSError) as e:
            raise DAQError(f"{self.path} has no usable tokenizer, which calibration needs ({e})") from None

    def copy_side_files(self, out_dir: Path) -> None:
        for f in self.path.iterdir():
            if f.is_file() and f.name not in _NOT_COPIED and not f.name.endswith(_WEIGHT_SUFFIXES):
                shutil.copy2(f, out_dir / f.name)


class InMemorySource(ModelSource):
    """A model transformers materialised in memory (GGUF, or .bin weights)."""

    def __init__(self, path: Path, model: nn.Module, tokenizer: PreTrainedTokenizerBase | None):
        defuse_experts(model)
        super().__init__(path, model.config, model)
        self._model = model
        self._tokenizer = tokenizer
        seen: set[int] = set()
        self._tensors: dict[str, torch.Tensor] = {}
        for name, t in model.state_dict().items():  # drop tied duplicates, as save_pretrained does
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            self._tensors[name] = t

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def tensor(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            raise DAQError(f"{self.path} has no tokenizer, which calibration needs")
        return self._tokenizer

    def copy_side_files(self, out_dir: Path) -> None:
        if self._tokenizer is not None:
            self._tokenizer.save_pretrained(out_dir)
        if getattr(self._model, "generation_config", None) is not None:
            self._model.generation_config.save_pretrained(out_dir)


def _is_tied(param_name: str, config: PretrainedConfig) -> bool:
    return param_name == "lm_head.weight" and bool(getattr(config, "tie_word_embeddings", False))


def _load_config(path: Path) -> PretrainedConfig:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError) as e:
        model_type = json.loads((path / "config.json").read_text()).get("model_type", "?")
        raise DAQError(
            f"unsupported architecture (model_type {model_type!r}): transformers cannot read it ({e})"
        ) from None


def _meta_skeleton(config: PretrainedConfig) -> nn.Module:
    """The model with parameters on the meta device, experts defused; buffers (rotary tables) stay
    real and small."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights(include_buffers=False):
            skeleton = AutoModelForCausalLM.from_config(config)
    except ValueError:
        raise DAQError(
            f"unsupported architecture {getattr(config, 'model_type', '?')!r}: not a causal language model "
            "that transformers can build"
        ) from None
    defuse_experts(skeleton)
    return skeleton


def open_model(path_str: str, revision: str | None = None) -> ModelSource:
    """Open a model (a directory, a .gguf file or a Hub ID at `revision`) for quantization, or raise
    DAQError naming what is wrong. A Hub ID opens its cached snapshot folder: `source.path`."""
    path = resolve_model_path(path_str, revision)
    if path.is_file():
        return InMemorySource(path, *load_gguf(path))
    config = _load_config(path)
    qcfg = getattr(config, "quantization_config", None)
    if qcfg:
        method = qcfg.get("quant_method") if isinstance(qcfg, dict) else getattr(qcfg, "quant_method", "?")
        raise DAQError(f"{path} is already quantized (quant_method {method!r}); pass a full-precision model")
    skeleton = _meta_skeleton(config)
    files = sorted(path.glob("*.safetensors"))
    if files:
        return SafetensorsSource(path, config, skeleton, files)
    if any(path.glob("pytorch_model*.bin")):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
        tokenizer = AutoTokenizer.from_pretrained(path) if _has_tokenizer(path) else None
        return InMemorySource(path, model, tokenizer)
    raise DAQError(f"{path} holds no weights (*.safetensors or pytorch_model*.bin)")


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
