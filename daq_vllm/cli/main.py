"""The `daq-vllm` command line: `quantize`, `eval` and `serve`.

Bad input ends with one line on stderr (`daq-vllm: error: ...`), exit code 2 and no traceback.
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..errors import DAQError
from . import eval as eval_cmd
from . import quantize as quantize_cmd
from . import serve as serve_cmd

COMMANDS = {"quantize": quantize_cmd, "eval": eval_cmd, "serve": serve_cmd}

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but usage errors are one line like every other error."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="daq-vllm", description="DAQ weight-only quantization and serving")
    parser.add_argument("--version", action="version", version=f"daq-vllm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a command that relaunches itself passes on
    try:
        return COMMANDS[args.command].run(args)
    except DAQError as e:
        print(f"daq-vllm: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("daq-vllm: interrupted; no output was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except MemoryError:
        print("daq-vllm: error: out of memory; use a machine with more memory or --device cuda", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
