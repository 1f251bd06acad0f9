"""The user-facing error type: its message is printed as one line by the CLI, without traceback."""


class DAQError(ValueError):
    """Bad input or environment; the message names the problem and the fix."""
