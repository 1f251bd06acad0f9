"""Compile-level checks of the v2 kernels for Hopper (sm_90a), without a GPU.

Every v2 config the tuner may pick is compiled with `triton.compile(..., target=GPUTarget("cuda",
90, 32))` for each asm decode (4-bit: e2m1, int and table in fp16, table in bf16; 3-bit: table in
fp16 and bf16), the way a launch on an H100/H200 would compile it (16-byte-aligned pointers and
strides, which the launcher detects and passes on). The point of the v2 design is checked in the
output:
- the `mma` main loop is a wgmma whose weight operand (A) comes from registers (`{%r..}` in PTX,
  a `dot_op` register tensor in TTGIR), so the decoded tile is never written to shared memory:
  no `st.shared` wider than the 16-bit per-row scale/offset vectors;
- ptxas (`-v`, a build bundled with Triton) reports no register spills.

The tests run with TRITON_INTERPRET=1 (conftest.py), under which kernels cannot be compiled, so
the compiling happens in one subprocess running this file as a script, which prints a JSON record
per (config, decode).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ARGS = {"x_ptr": "*ACT", "q_ptr": "*u8", "s_ptr": "*fp16", "b_ptr": "*fp16", "cb_ptr": "*fp32", "bias_ptr": "*ACT",
        "y_ptr": "*ACT", "M": "i32", "N": "i32", "K": "i32", "KP": "i32", "STEPS_PER_SPLIT": "i32",
        "stride_xm": "i32", "stride_qn": "i32", "stride_ym": "i32"}
ALIGNED = ("x_ptr", "q_ptr", "s_ptr", "b_ptr", "cb_ptr", "bias_ptr", "y_ptr", "N", "K", "KP", "stride_xm",
           "stride_qn", "stride_ym")  # what Triton's launcher marks divisible by 16 for Llama-sized layers
# (bits, activations, decode): every config for the fp16 4-bit decodes; one config per tile shape
# for the others (all compile the same loop around a different decode).
VARIANTS = [(4, "float16", "e2m1"), (4, "float16", "int"), (4, "float16", "table"), (4, "bfloat16", "table"),
            (3, "float16", "table"), (3, "bfloat16", "table")]
FULL = 3
TYPES = {"float16": "fp16", "bfloat16": "bf16"}
M_BUCKETS = (1, 4, 16, 32, 64, 256)


def _ptxas_report(ptx: str) -> str:
    """`ptxas -v` for sm_90a from the ptxas builds bundled with Triton (the first that reads this PTX)."""
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ptx"
        path.write_text(ptx)
        for name in ("ptxas-blackwell", "ptxas"):
            if not (bin_dir / name).exists():
                continue
            proc = subprocess.run([str(bin_dir / name), "-arch=sm_90a", "-v", str(path), "-o", os.devnull],
                                  capture_output=True, text=True)
            if proc.returncode == 0:
                return proc.stdout + proc.stderr
            errors.append(f"{name}: {proc.stderr.strip()[:200]}")
    raise RuntimeError(f"no bundled ptxas assembled the PTX: {errors}")


def _compile_all() -> list[dict]:
    """Compile every v2 candidate config for each decode; what the tests look at, per compile."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from daq_vllm.format.codebooks import get_codebook
    from daq_vllm.kernels import triton_v2
    from daq_vllm.kernels.triton_gemm import v2_candidate_configs
    from daq_vllm.kernels.triton_v2_decode import decode_asm

    # split-K changes only the epilogue (atomic adds): one compile per tile with and without it
    configs = {(c.path, c.block_n, c.block_m, c.num_warps, c.num_stages, c.split_k != 1): c
               for m in M_BUCKETS for c in v2_candidate_configs(m)}
    shapes = {(c.path, c.block_n, c.block_m, c.num_warps): c for c in configs.values()}
    records = []
    for cfg in configs.values():
        kernel = triton_v2._mma_kernel if cfg.path == "mma" else triton_v2._gemv2_kernel
        variants = VARIANTS if cfg in shapes.values() else VARIANTS[:FULL]
        for bits, dtype, decode in variants:
            values = tuple(get_codebook("nf4" if bits == 4 else "fp3_e2m0").values)
            const = dict(BITS=bits, GROUP=128, DECODE=decode, ASM=decode_asm(decode, values, bits, dtype),
                         HAS_BIAS=False, BLOCK_N=cfg.block_n, SPLIT_K=1 if cfg.split_k == 1 else 2)
            const.update(dict(UPCAST=False, BLOCK_M=cfg.block_m) if cfg.path == "mma" else dict(ROWS=4))
            attrs = {(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in ALIGNED}
            signature = {k: v.replace("ACT", TYPES[dtype]) for k, v in ARGS.items()}
            src = ASTSource(fn=kernel, signature={**signature, **{k: "constexpr" for k in const}}, constexprs=const,
                            attrs=attrs)
            compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
            ptx, ttgir = compiled.asm["ptx"], compiled.asm["ttgir"]
            report = _ptxas_report(ptx)
            records.append({
                "config": cfg.describe(), "path": cfg.path, "block_n": cfg.block_n, "block_m": cfg.block_m,
                "decode": f"{bits}-bit {decode} {dtype}",
                "wgmma_a": re.findall(r"wgmma\.mma_async\S*\s+\{[^}]*\},\s*(\S+)", ptx),
                "dot_a": re.findall(r"ttng\.warp_group_dot [^\n]*?\} : (tensor<[^*]*)\*", ttgir),
                "st_shared": sorted(set(re.findall(r"st\.shared\.[\w.]+", ptx))),
                "spill_stores": [int(v) for v in re.findall(r"(\d+) bytes spill stores", report)],
                "registers": [int(v) for v in re.findall(r"Used (\d+) registers", report)],
            })
    return records


@pytest.fixture(scope="module")
def records() -> list[dict]:
    from conftest import require

    try:
        import triton  # noqa: F401
    except ImportError:
        require(False, "triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=1200,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_v2_candidate_was_compiled(records):
    """Both paths, every decode, and the tile shapes of the research notes' table."""
    assert {r["path"] for r in records} == {"mma", "gemv2"}
    assert len({r["decode"] for r in records}) == len(VARIANTS)
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


if __name__ == "__main__":
    print(json.dumps(_compile_all()))
