// The DAQ CPU kernel's contract between the dispatcher (cpu_linear.cpp, built for baseline x86-64
// with torch headers) and the instruction-set bodies (cpu_avx2.cpp, cpu_avx512.cpp, each built
// under its own `#pragma GCC target`). Plain data only: the ISA files include no torch or std
// template headers, so no inline function compiled for AVX-512 can be merged into code that runs
// on a CPU without it.
#pragma once
#include <cstdint>

namespace daq_cpu {

enum Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// Outputs per block of the repacked layout, by instruction set.
constexpr int kBlockN[3] = {16, 32, 32};

// One call's data. `codes` is [NB, K, BN/2] bytes: each byte of row k of block b holds the 4-bit
// codes of two of the block's outputs, low nibble and high nibble. Which two is the body's
// decode order (`ORDERS` in kernels/cpu_linear.py): scalar and AVX-512 put output j and j + BN/2
// in byte j; AVX2 puts output 8i + 4h + e in nibble h of byte 4i + e, as its unpacks produce them.
// `scale_offset` is [NB, G, 2, BN] fp16 bits: each group's BN scales, then its BN offsets.
struct Problem {
  const float* x;              // [M, K] activations, fp32
  const float* x_group_sums;   // [M, G]: sum of x over each group (the offset's factor)
  const uint8_t* codes;
  const uint16_t* scale_offset;
  const float* lut;            // 16 codebook values (an 8-entry codebook padded with zeros)
  float* y;                    // [M, N] output, fp32
  int64_t m, n, k, groups, group_size;
};

// y[:, b*BN : (b+1)*BN] for blocks [block_begin, block_end), all M rows.
void gemm_avx2(const Problem& p, int64_t block_begin, int64_t block_end);
void gemm_avx512(const Problem& p, int64_t block_begin, int64_t block_end);

// Decoded weights of blocks [block_begin, block_end), transposed: w_t[k, (b - block_begin)*BN + j]
// with row stride `ld`: the tiles that the AVX-512 and portable prefill paths multiply with torch's
// GEMM.
void dequant_avx512(const Problem& p, int64_t block_begin, int64_t block_end, float* w_t, int64_t ld);

// AVX2 prefill: y[:, b*BN : (b+1)*BN] (row stride ldy, N padded to whole blocks) for blocks
// [block_begin, block_end), all M rows, decoding a panel of K rows at a time and multiplying it
// with a register-blocked kernel.
void gemm_panels_avx2(const Problem& p, int64_t block_begin, int64_t block_end, float* y, int64_t ldy);

// `torch.ops.daq_cpu.bf16_linear`'s data: y = x @ W^T for an unquantized bfloat16 weight W [N, K].
// `xp` holds the activations in fp32, each run of 16 reordered as its 8 even then its 8 odd
// elements (the order in which cpu_bf16_avx2.cpp widens a row of W), zero-padded to `kp` columns.
struct Bf16Problem {
  const float* xp;    // [M, kp]
  const uint16_t* w;  // [N, K] bfloat16 bits
  float* y;           // [M, N]
  int64_t m, n, k, kp;
};

// y[:, n_begin:n_end] for all M rows; AVX2 + FMA only.
void bf16_gemm_avx2(const Bf16Problem& p, int64_t n_begin, int64_t n_end);

bool cpu_has_avx2();
bool cpu_has_avx512();

}  // namespace daq_cpu
