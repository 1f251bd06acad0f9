"""The vLLM server's log as `serve` handles it: streamed through, its tail kept, and on a failed
start-up the most telling line (`startup_reason`) turned into one error line with a fix hint."""

from __future__ import annotations

import collections
import re

from .server_memory import KV_ENV

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# "(EngineCore pid=1) ERROR 11-30 00:29:29 [core.py:1510] " and the like
_LOG_PREFIX = re.compile(r"^(\([^)]*\)\s+)?(DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL)\s+"
                         r"\d\d-\d\d\s+[\d:.]+\s+\[[^\]]*\]\s?")
_EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Exit)|Exception): \S")
_GENERIC = ("Engine core initialization failed", "initialization failed due to an exception",
            "See root cause above", "See stack trace", "EngineCore failed to start")
_MEMORY = ("less than desired", "less than requested memory", "No available memory for the cache",
           "out of memory", "Cannot allocate memory", "OutOfMemory")
_CONTEXT = ("larger than the available KV cache",)
MEMORY_HINT = f"pass --gpu-memory-utilization 0.5 or set {KV_ENV}=2"
CONTEXT_HINT = f"pass a smaller --max-model-len, or a larger {KV_ENV} or --gpu-memory-utilization"


def log_message(line: str) -> str:
    """A log line without colours, vLLM's `(Proc pid=N) LEVEL date time [file:line]` prefix and edge blanks."""
    return _LOG_PREFIX.sub("", _ANSI.sub("", line).strip()).strip()


def startup_reason(lines: list[str]) -> tuple[str | None, str | None]:
    """(the most telling line of a failed start-up's log, a fix hint or None).

    Memory and context-length complaints first, then the last exception line (`ValueError: ...`)
    or argparse's `error:` line that is not a generic "see above", then the last line with "Error".
    """
    messages = [m for m in map(log_message, lines) if m and not any(g in m for g in _GENERIC)]

    def last(test) -> str | None:
        return next((m for m in reversed(messages) if test(m)), None)

    found = last(lambda m: any(k in m for k in _MEMORY))
    if found:
        return found, MEMORY_HINT
    found = last(lambda m: any(k in m for k in _CONTEXT))
    if found:
        return found, CONTEXT_HINT
    found = (last(lambda m: bool(_EXCEPTION.match(m)) or "error:" in m)
             or last(lambda m: "Error" in m and not m.startswith(("Traceback", "File ", "raise "))))
    return found, None


def startup_failure(code: int, lines: list[str]) -> str:
    """The one-line message for a server that exited with `code` before it answered /health."""
    reason, hint = startup_reason(lines)
    if reason is None:
        return f"the vLLM server exited with code {code} during start-up; its log above says why"
    reason = reason.rstrip(". ")
    return f"the vLLM server exited with code {code} during start-up: {reason}" + (f"; {hint}" if hint else "")


def echo_lines(pipe, out, tail: collections.deque) -> None:
    """Copy the child's output to ours line by line, keeping the last lines in tail."""
    for raw in iter(pipe.readline, b""):
        line = raw.decode(errors="replace")
        if not line.endswith("\n"):
            line += "\n"  # the child's last words: ours start on a line of their own
        tail.append(line)
        try:
            out.write(line)
            out.flush()
        except (OSError, ValueError):
            pass  # our stream is gone; keep draining so the child never blocks
    pipe.close()
