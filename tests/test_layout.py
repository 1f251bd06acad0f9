"""The package's rooms import one way (README, Layout), read from the source, not from a run.

format <- kernels <- offline and integrations; `errors`, `data` and `model_files` are leaves any
room may use, `experts` (MoE modules of transformers models) one that offline and the integrations
use. A dispatch on `x.is_cuda` outside the kernel layer would bypass `choose_kernel`.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Source folder -> the package it is installed as (pyproject's package-dir).
ROOMS = {ROOT / "daq_vllm": "daq_vllm", ROOT / "offline": "daq_vllm.offline", ROOT / "kernels": "daq_vllm.kernels"}
FORBIDDEN = {
    "daq_vllm.format": ("daq_vllm.kernels", "daq_vllm.offline", "daq_vllm.integrations", "daq_vllm.eval",
                        "daq_vllm.cli", "daq_vllm.demo", "transformers", "vllm"),
    "daq_vllm.kernels": ("daq_vllm.offline", "daq_vllm.integrations", "daq_vllm.eval", "daq_vllm.cli",
                         "daq_vllm.demo", "transformers", "vllm"),
    "daq_vllm.offline": ("daq_vllm.integrations", "daq_vllm.eval", "daq_vllm.cli", "daq_vllm.demo", "vllm"),
    "daq_vllm.experts": ("daq_vllm.format", "daq_vllm.kernels", "daq_vllm.offline", "daq_vllm.integrations",
                         "daq_vllm.eval", "daq_vllm.cli", "daq_vllm.demo", "vllm"),
    "daq_vllm.data": ("daq_vllm.format", "daq_vllm.kernels", "daq_vllm.offline", "daq_vllm.integrations",
                      "daq_vllm.eval", "daq_vllm.cli", "daq_vllm.demo", "transformers", "vllm"),
}


def modules() -> dict[str, Path]:
    """Every module of the package by its installed name."""
    found = {}
    for folder, package in ROOMS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


def imports(name: str, path: Path) -> set[str]:
    """Absolute names of everything `path` imports (relative imports resolved), at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_imports_point_one_way(room):
    checked = {n: p for n, p in modules().items() if under(n, room)}
    assert checked, f"no module found for {room}"
    wrong = sorted(f"{name} imports {target}" for name, path in checked.items() for target in imports(name, path)
                   if any(under(target, banned) for banned in FORBIDDEN[room]))
    assert wrong == []


def test_the_checker_sees_relative_imports():
    """The rule test above would pass vacuously if relative imports were not resolved."""
    found = modules()
    assert "daq_vllm.kernels.base" in imports("daq_vllm.kernels.select", found["daq_vllm.kernels.select"])
    assert "daq_vllm.format.config" in imports("daq_vllm.format", found["daq_vllm.format"])
    assert "daq_vllm.errors" in imports("daq_vllm.format.check", found["daq_vllm.format.check"])


def test_no_device_dispatch_outside_the_kernel_layer():
    offenders = sorted(str(path.relative_to(ROOT)) for name, path in modules().items()
                       if not under(name, "daq_vllm.kernels") and ".is_cuda" in path.read_text())
    assert offenders == []
