"""Optional Hugging Face Hub text: `hf:NAME[:CONFIG[:SPLIT]]` for `--calib` and `eval --ppl`.

One parser and one loader serve both commands. The `datasets` library is not a dependency of
daq-vllm and the Hub needs network access, so both failures end in one line that names the fix and
the local alternatives the caller passes in (the packaged default or a file).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from ..errors import DAQError, describe

HUB_PREFIX = "hf:"
HUB_FORMAT = "hf:NAME[:CONFIG[:SPLIT]]"


@dataclass(frozen=True)
class HubText:
    """A Hub dataset's "text" column: `name` may hold an owner ("allenai/c4"); config None = its default."""

    name: str
    config: str | None
    split: str

    def __str__(self) -> str:
        return f"{HUB_PREFIX}{self.name}:{self.config or ''}:{self.split}"


def is_hub_source(source: str) -> bool:
    return source.startswith(HUB_PREFIX)


def parse_hub_source(source: str, default_split: str) -> HubText:
    """`hf:NAME`, `hf:NAME:CONFIG`, `hf:NAME:CONFIG:SPLIT` or `hf:NAME::SPLIT` (default config)."""
    parts = source[len(HUB_PREFIX):].split(":") if is_hub_source(source) else []
    if not 1 <= len(parts) <= 3 or not parts[0] or any(p != p.strip() for p in parts):
        raise DAQError(f"{source!r} is not a Hub dataset; write {HUB_FORMAT}, e.g. hf:wikitext:wikitext-2-raw-v1:test")
    name, config, split = (parts + ["", ""])[:3]
    return HubText(name, config or None, split or default_split)


def require_datasets(spec: HubText, alternatives: str) -> ModuleType:
    """The optional `datasets` module; callers may ask early, before loading a model they could not use."""
    try:
        import datasets
    except ImportError:
        raise DAQError(f"{spec} needs the optional `datasets` library: pip install datasets; "
                       f"or use {alternatives}") from None
    return datasets


def hub_text(spec: HubText, alternatives: str, field: str = "text") -> str:
    """The dataset's `field` rows ("text" by default) joined by "\\n\\n" (as the GPTQ/AWQ loaders join them).

    `alternatives` names what works without the Hub, e.g. "the packaged --calib wikitext2-valid".
    """
    datasets = require_datasets(spec, alternatives)
    try:
        dataset = datasets.load_dataset(spec.name, spec.config, split=spec.split)
    except Exception as e:  # network, unknown name/config/split, cache misses: all end the same way
        raise DAQError(f"could not load Hub dataset {spec} ({describe(e)}); it needs network access, or a cached "
                       f"copy with HF_DATASETS_OFFLINE=1; or use {alternatives}") from None
    if field not in dataset.column_names:
        raise DAQError(f"Hub dataset {spec} has no \"{field}\" column (it has {', '.join(dataset.column_names)}); "
                       f"pick a text dataset or use {alternatives}")
    rows = dataset[field]
    if not all(isinstance(row, str) for row in rows):
        raise DAQError(f"Hub dataset {spec}'s \"{field}\" column does not hold text; "
                       f"pick a text column or use {alternatives}")
    return "\n\n".join(rows)
