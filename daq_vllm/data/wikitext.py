"""Locate and rebuild evaluation text. Nothing is downloaded: data comes from disk.

Search order for the data directory: `--data` (a file), `$DAQ_DATA_DIR`, then `shared/data` beside
the source checkout (`<repo>/../shared/data`) and beside the working directory.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..errors import DAQError

WIKITEXT2_TEST = "wikitext-2-raw/wiki.test.raw"
WIKITEXT2_VALID_TOKENS = "wikitext-2-v1-tokens/wiki.valid.tokens"
# sha256 of the standard evaluation text (HF datasets' "\n\n".join of the test rows).
WIKITEXT2_TEST_TEXT_SHA256 = "696cca6b65a171b0a358a4be6732cdfdf2dd6164a32e20fd70e3c13fc4dfae83"


def data_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("DAQ_DATA_DIR"):
        dirs.append(Path(os.environ["DAQ_DATA_DIR"]))
    repo = Path(__file__).resolve().parent.parent
    dirs += [repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data", Path.cwd() / "shared" / "data"]
    return dirs


def find_data_file(relative: str, override: str | None = None) -> Path:
    """The path of a data file, or a DAQError telling how to point at it."""
    if override:
        p = Path(override).expanduser()
        if not p.is_file():
            raise DAQError(f"data file {p} does not exist; pass an existing file to --data")
        return p
    for d in data_dirs():
        if (d / relative).is_file():
            return d / relative
    raise DAQError(
        f"{relative} not found (looked in {', '.join(str(d) for d in data_dirs())}); "
        "pass --data PATH or set DAQ_DATA_DIR to the folder that holds it"
    )


def wikitext2_eval_text(raw_path: Path) -> str:
    """The standard WikiText-2 test text (`"\\n\\n".join` of the HF dataset rows) from wiki.test.raw."""
    raw = raw_path.read_text(encoding="utf-8")
    rows = [line if line.strip() else "" for line in raw.splitlines(keepends=True)]
    return "\n\n".join(rows)


def wikitext2_test_text(override: str | None = None) -> str:
    """The standard WikiText-2 test text; `override` is a path to another wiki.test.raw."""
    return wikitext2_eval_text(find_data_file(WIKITEXT2_TEST, override))


def is_standard_wikitext2(text: str) -> bool:
    return hashlib.sha256(text.encode()).hexdigest() == WIKITEXT2_TEST_TEXT_SHA256
