"""The user-facing error type: its message is printed as one line by the CLI, without traceback."""


class DAQError(ValueError):
    """Bad input or environment; the message names the problem and the fix."""


def describe(error: BaseException) -> str:
    """`Type: first line of its message` (at most 200 characters), or the type alone: a caught
    exception quoted inside a one-line DAQError."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__
