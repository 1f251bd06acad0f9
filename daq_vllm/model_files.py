"""Open what a user points at: a model directory, a .gguf file or a Hugging Face Hub model ID.

A leaf shared by the quantizer (`offline.model_source`) and evaluation (`eval.loading`): both
accept the same inputs and should refuse bad ones with the same words.

A Hub ID (`org/name` or `name`) that is not an existing path is resolved by
`huggingface_hub.snapshot_download`, fetching only the weights, configs and tokenizer files. It
honours `HF_HOME`, `HF_HUB_OFFLINE` and the local cache by itself: offline (or with the network
failing) it returns the cached snapshot folder, `<cache>/models--org--name/snapshots/<commit>`,
when `refs/<revision>` (or the commit itself) is there; checked by hand with huggingface_hub 2.4
and a cache laid out as the tests do (`refs/main` + `snapshots/<commit>/`, no other metadata).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DAQError, describe

_WHAT = "pass a Hugging Face model directory, a .gguf file or a Hub model ID (org/name)"

# What a model needs from a Hub repository: weights (safetensors only), configs, tokenizer files.
HUB_PATTERNS = [
    "*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
    "tokenizer*", "special_tokens_map.json", "vocab.*", "merges.txt", "*.model", "chat_template*",
]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_SNAPSHOT = re.compile(r"/models--(?P<repo>[^/]+)/snapshots/(?P<commit>[0-9a-f]{40})/?$")


@dataclass(frozen=True)
class ModelRef:
    """A resolved model: its local path and, when it came from the Hub, its ID and commit hash."""

    path: Path
    hub_id: str | None = None
    revision: str | None = None


def looks_like_hub_id(arg: str | Path) -> bool:
    """`org/name` or `name`: at most one slash, no leading `.`, `/` or `~`, not a .gguf file name."""
    s = str(arg)
    return bool(_HUB_ID.fullmatch(s)) and not s.endswith(".gguf") and ".." not in s


def hub_ref_of(path: str | Path) -> tuple[str, str] | None:
    """`(hub_id, commit)` when `path` is a snapshot folder of a Hub cache, else None."""
    m = _SNAPSHOT.search(Path(path).as_posix())
    if m is None:
        return None
    return m["repo"].replace("--", "/"), m["commit"]  # the folder is "models--" + the ID with "/" -> "--"


def resolve_model(arg: str | Path, revision: str | None = None) -> ModelRef:
    """An existing .gguf file or model directory as given, else a Hub ID resolved to its snapshot.

    `revision` (a branch, tag or commit) applies to Hub IDs only; a local path with a revision is
    refused rather than silently ignored.
    """
    p = Path(arg).expanduser()
    if p.exists() or not looks_like_hub_id(arg):
        if revision is not None:
            if not p.exists():
                raise DAQError(f"model path {p} does not exist; {_WHAT}")
            raise DAQError(f"--revision {revision} applies to Hub model IDs only, not to the local path {p}; drop it")
        ref = hub_ref_of(p.resolve()) if p.is_dir() else None
        return ModelRef(_check_local(p), *(ref or (None, None)))
    hub_id = str(arg)
    path = _snapshot(hub_id, revision)
    if not (path / "config.json").is_file():
        raise DAQError(f"Hub model {hub_id} ({path}) is not a model directory (no config.json); {_WHAT}")
    return ModelRef(path, hub_id, path.name)


def resolve_model_path(path: str | Path, revision: str | None = None) -> Path:
    """The local path of what `resolve_model` accepts (a Hub ID becomes its cached snapshot folder)."""
    return resolve_model(path, revision).path


def _check_local(p: Path) -> Path:
    if not p.exists():
        raise DAQError(f"model path {p} does not exist; {_WHAT}")
    if p.is_file() and p.suffix != ".gguf":
        raise DAQError(f"{p} is not a model: {_WHAT}")
    if p.is_dir() and not (p / "config.json").is_file():
        raise DAQError(f"{p} is not a model directory (no config.json); {_WHAT}")
    return p


def _snapshot(hub_id: str, revision: str | None) -> Path:
    """The snapshot folder of `hub_id` at `revision`, from the cache or downloaded; one-line errors."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

    at = f" at revision {revision}" if revision else ""
    try:
        return Path(snapshot_download(hub_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except HFValidationError:
        raise DAQError(f"model path {hub_id} does not exist and is not a valid Hub model ID; {_WHAT}") from None
    except RevisionNotFoundError:
        raise DAQError(f"Hub model {hub_id} has no revision {revision}; pass an existing branch, tag or commit "
                       "with --revision") from None
    except RepositoryNotFoundError:
        raise DAQError(f"model path {hub_id} does not exist and the Hub has no model {hub_id} (or it is private "
                       f"or gated: log in with `hf auth login`); {_WHAT}") from None
    except Exception as e:  # offline and not cached: LocalEntryNotFoundError, HTTP or connection errors
        from huggingface_hub.constants import HF_HUB_CACHE as cache

        rev = f" --revision {revision}" if revision else ""
        raise DAQError(
            f"model {hub_id}{at} is not a local path and not in the local Hub cache ({cache}; $HF_HOME or "
            f"~/.cache/huggingface), and the network is off or failing ({type(e).__name__}); download it where "
            f"there is network with `hf download {hub_id}{rev}` (`huggingface-cli download` with older "
            f"huggingface_hub) and copy the cache here, or pass a local model directory"
        ) from None


def strip_gguf_marker(model: torch.nn.Module) -> None:
    """A GGUF-loaded model carries a 'quantized' marker that makes save_pretrained refuse it."""
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_gguf(path: Path, dtype: torch.dtype = torch.float32):
    """`(model, tokenizer)` from a .gguf file, dequantized by transformers (float32 by default:
    float16 does not represent the dequantized GGUF values exactly)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        raise DAQError(f"cannot read GGUF file {path}: {describe(e)}") from None
    strip_gguf_marker(model)
    return model, tokenizer
