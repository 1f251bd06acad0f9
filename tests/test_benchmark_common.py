"""The benchmarks' shared measurement helpers (benchmarks/common.py): what they report must be true,
or every results table built on them is wrong."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import psutil

COMMON = Path(__file__).resolve().parents[1] / "benchmarks" / "common.py"


def load_common():
    spec = importlib.util.spec_from_file_location("benchmarks_common", COMMON)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_process_tree_cpu_counts_a_child_we_have_not_reaped():
    """vLLM's engine processes run and end without our `os.times()` seeing them; the tree must."""
    common = load_common()
    tree = common.ProcessTreeCpu(interval_s=0.1)
    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.0: pass\ntime.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", busy])
    try:
        deadline = time.time() + 30
        while sum(psutil.Process(child.pid).cpu_times()[:2]) < 1.0 and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # a few samples after the busy second
        seen = tree.seconds()
    finally:
        child.kill()
        child.wait()
    assert seen >= 1.0, f"the tree saw {seen:.2f} CPU seconds of a child that burned 1"


def test_the_default_checkpoint_is_rebuilt_only_when_quantize_defaults_change(tmp_path, monkeypatch):
    from daq_vllm.offline import options

    common = load_common()
    monkeypatch.setattr(common, "CACHE", tmp_path)
    runs = []

    def fake_quantize(cmd, check):
        out = Path(cmd[cmd.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text("{}")
        runs.append(cmd)

    monkeypatch.setattr(common.subprocess, "run", fake_quantize)
    full = tmp_path / "full"
    assert common.default_daq_checkpoint(full) == tmp_path / "throughput-daq"
    common.default_daq_checkpoint(full)
    assert len(runs) == 1  # cached: same defaults
    monkeypatch.setattr(options, "DEFAULT_FORMAT", "int4")
    common.default_daq_checkpoint(full)
    assert len(runs) == 2  # the default format changed: quantized again
