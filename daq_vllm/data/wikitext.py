"""WikiText-2 text for evaluation and calibration, shipped inside the package: nothing is downloaded.

The packaged copies (`wikitext-2/*.xz` beside this module, read through `importlib.resources` so an
installed wheel, a zip import or an editable checkout all work) are the default. Overrides win over
them: `--data PATH` (evaluation, a wiki.test.raw file), then `$DAQ_DATA_DIR`, a folder holding
`wikitext-2-raw/wiki.test.raw` and/or `wikitext-2-v1-tokens/wiki.valid.tokens`. Packaged files are
checked against their pinned sha256 on every read, because a truncated or altered copy would shift
every perplexity without any other sign.
"""

from __future__ import annotations

import hashlib
import lzma
import os
from importlib import resources
from pathlib import Path

from ..errors import DAQError

# Paths below $DAQ_DATA_DIR, as in the original WikiText archives.
WIKITEXT2_TEST = "wikitext-2-raw/wiki.test.raw"
WIKITEXT2_VALID_TOKENS = "wikitext-2-v1-tokens/wiki.valid.tokens"
# sha256 of the standard evaluation text (HF datasets' "\n\n".join of the test rows).
WIKITEXT2_TEST_TEXT_SHA256 = "696cca6b65a171b0a358a4be6732cdfdf2dd6164a32e20fd70e3c13fc4dfae83"

PACKAGED_DIR = "wikitext-2"
# Original file -> (packaged xz file inside this package, sha256 of the original bytes).
# The sha256s are those pinned for the original files (see wikitext-2/LICENSE.md).
PACKAGED = {
    WIKITEXT2_TEST: ("wiki.test.raw.xz", "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"),
    WIKITEXT2_VALID_TOKENS: (
        "wiki.valid.tokens.xz", "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
    ),
}
_REINSTALL = "reinstall daq-vllm (pip install --force-reinstall --no-deps daq-vllm)"


def packaged_text(relative: str) -> str:
    """The packaged copy of `relative` (a key of PACKAGED), decompressed and checked against its sha256."""
    name, sha256 = PACKAGED[relative]
    resource = resources.files(__package__).joinpath(PACKAGED_DIR).joinpath(name)
    try:
        data = lzma.decompress(resource.read_bytes())
    except (OSError, lzma.LZMAError) as e:
        raise DAQError(f"packaged data file {resource} is missing or unreadable ({e}); {_REINSTALL}") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise DAQError(f"packaged data file {resource} does not match its pinned sha256 (corrupt copy); {_REINSTALL}")
    return data.decode("utf-8")


def _data_dir_file(relative: str) -> Path | None:
    """`$DAQ_DATA_DIR/relative` when the variable is set and the file is there, else None."""
    folder = os.environ.get("DAQ_DATA_DIR")
    if not folder:
        return None
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DAQError(f"DAQ_DATA_DIR={folder} is not a folder; unset it to use the packaged data or point it at one")
    path = root / relative
    return path if path.is_file() else None


def standard_eval_text(raw: str) -> str:
    """The text HF `datasets` builds from wiki.test.raw: blank lines become "" rows, rows joined by "\\n\\n"."""
    rows = [line if line.strip() else "" for line in raw.splitlines(keepends=True)]
    return "\n\n".join(rows)


def wikitext2_eval_text(raw_path: Path) -> str:
    """The standard evaluation text rebuilt from a wiki.test.raw file on disk."""
    return standard_eval_text(Path(raw_path).read_text(encoding="utf-8"))


def wikitext2_test_text(override: str | None = None) -> str:
    """The standard WikiText-2 test text; `override` is a path to another wiki.test.raw (`--data`)."""
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise DAQError(f"data file {path} does not exist; pass an existing wiki.test.raw file to --data")
        return wikitext2_eval_text(path)
    path = _data_dir_file(WIKITEXT2_TEST)
    if path is not None:
        return wikitext2_eval_text(path)
    text = standard_eval_text(packaged_text(WIKITEXT2_TEST))
    if not is_standard_wikitext2(text):
        name = f"{PACKAGED_DIR}/{PACKAGED[WIKITEXT2_TEST][0]}"
        raise DAQError(f"packaged {name} does not rebuild the standard WikiText-2 test text; {_REINSTALL}")
    return text


def wikitext2_valid_text() -> str:
    """The tokenized WikiText-2 validation split: the default calibration text (no article in the test split)."""
    path = _data_dir_file(WIKITEXT2_VALID_TOKENS)
    return path.read_text(encoding="utf-8") if path is not None else packaged_text(WIKITEXT2_VALID_TOKENS)


def is_standard_wikitext2(text: str) -> bool:
    """Whether `text` is exactly the evaluation text papers report perplexity on."""
    return hashlib.sha256(text.encode()).hexdigest() == WIKITEXT2_TEST_TEXT_SHA256
