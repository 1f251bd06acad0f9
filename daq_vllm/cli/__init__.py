"""The `daq-vllm` command line: one module per command (`add_parser`, `run`), `main` in main.py."""

from .main import main

__all__ = ["main"]
