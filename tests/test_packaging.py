"""The wheel: the three source trees as one package, the WikiText-2 data and its licence, the entry points."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from daq_vllm.kernels.cpu_build import HEADERS, SOURCES

CPU_SOURCES = (*SOURCES, *HEADERS)  # compiled on the user's machine: they must ship
ROOT = Path(__file__).resolve().parent.parent
MAX_WHEEL_BYTES = 10 * 1024 * 1024
DATA_FILES = ("daq_vllm/data/wikitext-2/wiki.test.raw.xz", "daq_vllm/data/wikitext-2/wiki.valid.tokens.xz",
              "daq_vllm/data/wikitext-2/LICENSE.md")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the source: setuptools builds in-tree, and a stale build/ would leak into the wheel."""
    source = tmp_path_factory.mktemp("source") / "daq-vllm"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".*cache", ".demo"))
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return next(out.glob("daq_vllm-*.whl"))


def test_wheel_contains_the_packages_and_the_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("daq_vllm/__init__.py", "daq_vllm/cli/main.py", "daq_vllm/integrations/vllm/__init__.py",
                   "daq_vllm/integrations/vllm/linear.py", "daq_vllm/offline/pipeline.py",
                   "daq_vllm/kernels/packing.py", "daq_vllm/kernels/triton_gemm.py", "daq_vllm/format/config.py",
                   "daq_vllm/kernels/cpu_build.py", *(f"daq_vllm/kernels/csrc/{f}" for f in CPU_SOURCES),
                   "daq_vllm/data/wikitext.py", "daq_vllm/data/hub.py", *DATA_FILES):
        assert module in names, module
    assert not any(n.startswith(("offline/", "kernels/", "tests/")) for n in names)
    assert wheel.stat().st_size < MAX_WHEEL_BYTES, f"wheel is {wheel.stat().st_size} bytes"
    licence = zipfile.ZipFile(wheel).read("daq_vllm/data/wikitext-2/LICENSE.md").decode()
    assert "CC BY-SA 3.0" in licence and "Merity" in licence and "Wikipedia" in licence
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    entry_text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "daq-vllm = daq_vllm.cli.main:main" in entry_text
    assert "[vllm.general_plugins]\ndaq = daq_vllm.integrations.vllm:register" in entry_text


def test_installed_wheel_finds_its_data_through_importlib_resources(wheel, tmp_path):
    """Install the wheel alone (no checkout on the path) and read both texts from that copy."""
    target = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)]
    proc = subprocess.run(install, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    code = (
        "import daq_vllm.data.wikitext as w;"
        "t = w.wikitext2_test_text(); v = w.wikitext2_valid_text();"
        "assert w.is_standard_wikitext2(t) and len(v) == 1_120_192;"
        "print(w.__file__)"
    )
    env = {k: v for k, v in os.environ.items() if k != "DAQ_DATA_DIR"}
    env["PYTHONPATH"] = str(target)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Path(proc.stdout.strip()).resolve().is_relative_to(target.resolve()), proc.stdout


def test_import_does_not_pull_vllm_and_registers_with_transformers():
    code = (
        "import sys, daq_vllm, daq_vllm.offline.pipeline, daq_vllm.kernels;"
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING;"
        "assert 'vllm' not in sys.modules, 'vllm imported';"
        "assert 'daq' in AUTO_QUANTIZER_MAPPING"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "daq-vllm"
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("daq-vllm ")
