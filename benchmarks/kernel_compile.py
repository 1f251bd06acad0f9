"""The v2 Triton kernels compiled for Hopper (sm_90a) without a GPU: what the compiler made of them.

Every v2 config the tuner may pick (`triton_gemm.v2_candidate_configs`) is compiled with
`triton.compile(..., target=GPUTarget("cuda", 90, 32))` for each asm decode (4-bit: e2m1, int and
table in fp16 and in bf16; 3-bit: table in fp16 and bf16; all but the fp16 4-bit ones on one config
per tile shape), the way a launch on an H100/H200 would compile it (16-byte-aligned pointers and strides,
which Triton's launcher detects and passes on). Per compile it records what the v2 design is
about: the `mma` wgmma's weight operand (registers `{%r..}` or a shared-memory descriptor), the
dot operand types in TTGIR, every kind of `st.shared` in the PTX, and ptxas's register and spill
counts (`-v`, a ptxas build bundled with Triton). tests/kernels/test_triton_v2_compile.py runs it
with `--json` and asserts on the records.

    python benchmarks/kernel_compile.py [--results DIR]   # a table; files kernels-v2-sm90a-triton<version>.*
    python benchmarks/kernel_compile.py --json             # the records, one JSON list on stdout
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # compiling, not interpreting (the tests' conftest sets 1)

sys.path.insert(0, str(Path(__file__).resolve().parent))

ARGS = {"x_ptr": "*ACT", "q_ptr": "*u8", "s_ptr": "*fp16", "b_ptr": "*fp16", "cb_ptr": "*fp32", "bias_ptr": "*ACT",
        "y_ptr": "*ACT", "M": "i32", "N": "i32", "K": "i32", "KP": "i32", "STEPS_PER_SPLIT": "i32",
        "stride_xm": "i32", "stride_qn": "i32", "stride_ym": "i32"}
ALIGNED = ("x_ptr", "q_ptr", "s_ptr", "b_ptr", "cb_ptr", "bias_ptr", "y_ptr", "N", "K", "KP", "stride_xm",
           "stride_qn", "stride_ym")  # what Triton's launcher marks divisible by 16 for Llama-sized layers
# (bits, activations, decode): every config for the fp16 4-bit decodes; one config per tile shape
# for the others (all compile the same loop around a different decode).
VARIANTS = [(4, "float16", "e2m1"), (4, "float16", "int"), (4, "float16", "table"), (4, "bfloat16", "e2m1"),
            (4, "bfloat16", "int"), (4, "bfloat16", "table"), (3, "float16", "table"), (3, "bfloat16", "table")]
FULL = 3
TYPES = {"float16": "fp16", "bfloat16": "bf16"}
M_BUCKETS = (1, 4, 16, 32, 64, 256)


def ptxas_report(ptx: str) -> str:
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


def compile_one(task: tuple[dict, int, str, str]) -> dict:
    """Compile one (config, bits, activation dtype, decode) for sm_90a; what the tests look at."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from daq_vllm.format.codebooks import get_codebook
    from daq_vllm.kernels import triton_v2
    from daq_vllm.kernels.triton_gemm import KernelConfig
    from daq_vllm.kernels.triton_v2_decode import decode_asm

    fields, bits, dtype, decode = task
    cfg = KernelConfig(**fields)
    kernel = triton_v2._mma_kernel if cfg.path == "mma" else triton_v2._gemv2_kernel
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
    report = ptxas_report(ptx)
    return {
        "config": " ".join([cfg.path, *([f"BM{cfg.block_m}"] if cfg.path == "mma" else []), f"BN{cfg.block_n}",
                            f"w{cfg.num_warps}", f"s{cfg.num_stages}", "split-K" if cfg.split_k != 1 else "one split"]),
        "path": cfg.path, "block_n": cfg.block_n, "block_m": cfg.block_m,
        "decode": f"{bits}-bit {decode} {dtype}",
        "wgmma_a": re.findall(r"wgmma\.mma_async\S*\s+\{[^}]*\},\s*(\S+)", ptx),
        "dot_a": re.findall(r"ttng\.warp_group_dot [^\n]*?\} : (tensor<[^*]*)\*", ttgir),
        "st_shared": sorted(set(re.findall(r"st\.shared\.[\w.]+", ptx))),
        "spill_stores": [int(v) for v in re.findall(r"(\d+) bytes spill stores", report)],
        "registers": [int(v) for v in re.findall(r"Used (\d+) registers", report)],
    }


def compile_all() -> list[dict]:
    """Every v2 candidate config for each decode, compiled on all cores (spawned workers: a fork would
    copy torch's thread pools)."""
    from dataclasses import asdict

    from daq_vllm.kernels.triton_gemm import v2_candidate_configs

    # split-K changes only the epilogue (atomic adds): one compile per tile with and without it
    configs = {(c.path, c.block_n, c.block_m, c.num_warps, c.num_stages, c.split_k != 1): c
               for m in M_BUCKETS for c in v2_candidate_configs(m)}
    shapes = list({(c.path, c.block_n, c.block_m, c.num_warps): c for c in configs.values()}.values())
    tasks = [(asdict(cfg), *variant) for cfg in configs.values()
             for variant in (VARIANTS if cfg in shapes else VARIANTS[:FULL])]
    with ProcessPoolExecutor(os.cpu_count() or 1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(compile_one, tasks))


def markdown(records: list[dict], triton_version: str) -> str:
    lines = [f"# v2 Triton kernels compiled for sm_90a (Triton {triton_version}, no GPU)", "",
             "From `benchmarks/kernel_compile.py`. wgmma A: `registers` when the decoded weights are the",
             "register operand of every wgmma (the v2 design), else `shared`. st.shared: the kinds of shared-memory",
             "stores in the PTX (the mma path's `.b16` ones carry the per-row scale/offset vectors).", "",
             "| config | decode | registers | spill bytes | wgmma A | st.shared |",
             "| --- | --- | ---: | ---: | --- | --- |"]
    for r in records:
        operand = ("registers" if all(a.startswith("{") for a in r["wgmma_a"]) else "shared") if r["wgmma_a"] else "-"
        lines.append(f"| {r['config']} | {r['decode']} | {max(r['registers'])} | {max(r['spill_stores'])} | "
                     f"{operand} | {', '.join(r['st_shared']) or '-'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print the records as one JSON list, nothing else")
    ap.add_argument("--results", type=Path, default=None, help="write kernels-v2-sm90a-triton<version>.md/json here")
    args = ap.parse_args()
    import triton

    records = compile_all()
    if args.json:
        print(json.dumps(records))
        return
    text = markdown(records, triton.__version__)
    print(text)
    if args.results is not None:
        from common import write_results

        write_results(f"kernels-v2-sm90a-triton{triton.__version__}", {"triton": triton.__version__,
                                                                        "records": records}, text, args.results)


if __name__ == "__main__":
    main()
