"""`daq-vllm eval --write-card`: the perplexity result as a row of the "Evaluation" table in DIR/README.md.

One row per (task, windows, seqlen): a rerun with the same settings replaces its row, other rows stay.
The card is rewritten through a temp file and a rename, so a failed write leaves the old card whole.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import DAQError

CARD_FILE = "README.md"
HEADING = "## Evaluation"
_INTRO = "Perplexity measured with `daq-vllm eval --write-card` (lower is better)."
_TABLE = ["| task | windows | seqlen | perplexity |", "| --- | --- | --- | --- |"]


def _key(cells: list[str]) -> tuple[str, str, str]:
    """(task, windows evaluated, seqlen) of a table row; the windows cell reads "N/TOTAL"."""
    return cells[0], cells[1].split("/")[0], cells[2]


def _rows(section: list[str]) -> list[list[str]]:
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in section if ln.startswith("|")]
    return [r for r in rows if len(r) == 4 and r[0] != "task" and not r[0].startswith("---")]


def card_with_eval(text: str, task: str, windows: int, total_windows: int, seqlen: int, perplexity: float) -> str:
    """`text` (a model card, maybe empty) with this result in its Evaluation table."""
    lines = text.splitlines()
    start = lines.index(HEADING) if HEADING in lines else len(lines)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    row = [task, f"{windows}/{total_windows}", str(seqlen), f"{perplexity:.4f}"]
    rows = [r for r in _rows(lines[start:end]) if _key(r) != _key(row)] + [row]
    section = [HEADING, "", _INTRO, "", *_TABLE, *(f"| {' | '.join(r)} |" for r in rows), ""]
    before = lines[:start]
    if before and before[-1].strip():
        before.append("")
    return "\n".join([*before, *section, *lines[end:]]).rstrip("\n") + "\n"


def card_dir(model: str | Path) -> Path:
    """The model directory whose card --write-card updates, refused (before any loading) if not one."""
    directory = Path(model).expanduser()
    if not directory.is_dir():
        raise DAQError(f"--write-card needs a model directory; {directory} is not one")
    return directory


def write_eval_to_card(model_dir: str | Path, task: str, windows: int, total_windows: int, seqlen: int,
                       perplexity: float) -> Path:
    """Add (or replace) the result's row in `model_dir`/README.md, created if missing; returns its path."""
    directory = card_dir(model_dir)
    card = directory / CARD_FILE
    text = card.read_text(encoding="utf-8") if card.is_file() else ""
    new = card_with_eval(text, task, windows, total_windows, seqlen, perplexity)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".README.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(new)
        os.chmod(tmp, card.stat().st_mode & 0o777 if card.is_file() else 0o644)  # mkstemp's file is 0600
        os.replace(tmp, card)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise DAQError(f"writing {card} failed: {e.strerror or e}") from None
    return card
