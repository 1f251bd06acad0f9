"""Reading vLLM server arguments the way its own parser does (only the few `serve` needs)."""

from __future__ import annotations

from ..errors import DAQError

DEFAULT_PORT = 8000  # vLLM's default


def option_value(args: list[str], name: str) -> str | None:
    """The last value of `--name VALUE` or `--name=VALUE` among the server arguments."""
    value = None
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def asks_for_help(args: list[str]) -> bool:
    """`-h`, `--help` or `--help=TOPIC`: vLLM prints help and starts nothing, so no defaults apply."""
    return "-h" in args or any(a == "--help" or a.startswith("--help=") for a in args)


def server_address(args: list[str]) -> tuple[str, int]:
    """(host to poll and print, port) from the pass-through arguments; vLLM binds all interfaces by default."""
    host = option_value(args, "--host")
    port = option_value(args, "--port")
    try:
        port_number = int(port) if port is not None else DEFAULT_PORT
    except ValueError:
        raise DAQError(f"--port {port!r} is not a port number") from None
    if not host or host in ("0.0.0.0", "::"):
        host = "localhost"
    return (f"[{host}]" if ":" in host else host), port_number
