"""Compile-level checks of the v2 kernels for Hopper (sm_90a), without a GPU.

`benchmarks/kernel_compile.py --json` compiles every v2 config the tuner may pick for each asm
decode, as a launch on an H100/H200 would, and reports what the compiler made (see its docstring).
The point of the v2 design is checked here:
- the `mma` main loop is a wgmma whose weight operand (A) comes from registers (`{%r..}` in PTX,
  a `dot_op` register tensor in TTGIR), so the decoded tile is never written to shared memory:
  no `st.shared` wider than the 16-bit per-row scale/offset vectors;
- ptxas (`-v`, a build bundled with Triton) reports no register spills.
The script runs in a subprocess: these tests run with TRITON_INTERPRET=1 (conftest.py), under which
kernels cannot be compiled.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = 8  # benchmarks/kernel_compile.py: 4-bit e2m1/int/table in fp16 and bf16, 3-bit table fp16/bf16


@pytest.fixture(scope="module")
def records() -> list[dict]:
    try:
        import triton  # noqa: F401
    except ImportError:
        require(False, "triton is not installed")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_compile.py"), "--json"],
                          capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_v2_candidate_was_compiled(records):
    """Both paths, every decode, and the tile shapes of the research notes' table."""
    assert {r["path"] for r in records} == {"mma", "gemv2"}
    assert len({r["decode"] for r in records}) == VARIANTS
    assert {(r["block_n"], r["block_m"]) for r in records if r["path"] == "mma"} >= {(64, 16), (128, 16), (128, 64),
                                                                                   (128, 128)}


def test_mma_reads_the_decoded_weights_from_registers(records):
    for r in (r for r in records if r["path"] == "mma"):
        what = f"{r['config']} {r['decode']}"
        assert r["wgmma_a"], f"{what}: no wgmma in the PTX"
        assert all(a.startswith("{") for a in r["wgmma_a"]), f"{what}: A is a shared-memory descriptor"
        assert r["dot_a"] and all("dot_op<{opIdx = 0" in d for d in r["dot_a"]), f"{what}: {r['dot_a']}"
        wide = [s for s in r["st_shared"] if not s.endswith(".b16")]
        assert not wide, f"{what}: shared-memory stores beyond the scale vectors: {wide}"


def test_no_config_spills(records):
    for r in records:
        assert r["spill_stores"] and max(r["spill_stores"]) == 0, (
            f"{r['config']} {r['decode']}: ptxas reports {r['spill_stores']} bytes of spill stores "
            f"({r['registers']} registers)")
