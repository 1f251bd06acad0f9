import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_contains_the_three_packages(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheel = next(tmp_path.glob("daq_vllm-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("daq_vllm/__init__.py", "daq_vllm/cli.py", "daq_vllm/plugin.py", "daq_vllm/vllm_method.py",
                   "daq_vllm/offline/pipeline.py", "daq_vllm/kernels/packing.py", "daq_vllm/kernels/triton_gemm.py"):
        assert module in names, module
    assert not any(n.startswith(("offline/", "kernels/", "tests/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    entry_text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "daq-vllm = daq_vllm.cli:main" in entry_text
    assert "[vllm.general_plugins]\ndaq = daq_vllm.plugin:register" in entry_text


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
