// What the baseline-x86-64 dispatchers share (cpu_linear.cpp's dense op, cpu_moe.cpp's MoE op):
// the chosen instruction set's bodies, the activations' group sums and the tiled prefill. Unlike
// cpu_kernel.h this header includes torch, so the instruction-set files never include it.
#pragma once
#include <ATen/ATen.h>

#include <utility>

#include "cpu_kernel.h"

namespace daq_cpu {

// Below this many weights a layer runs on one thread: waking the pool costs more than it saves.
constexpr int64_t kParallelWeights = int64_t{1} << 16;

using GemmBody = void (*)(const Problem&, int64_t, int64_t);
using DequantBody = void (*)(const Problem&, int64_t, int64_t, float*, int64_t);

// The fused decode-GEMM and the prefill decode of `isa` (AVX2 has none: it runs gemm_panels_avx2);
// an error if this CPU lacks the instruction set.
std::pair<GemmBody, DequantBody> bodies(int64_t isa);

// sums[row * G + g]: row's sum of x [M, K] over group g, the factor of the group's offset.
void group_sums(const float* x, int64_t m, int64_t k, int64_t group_size, float* sums);

// Portable prefill: decode a tile of output columns at a time into one reused buffer and multiply
// it with torch's GEMM into the tile's columns of y (x [M, K] and y [M, p.n] fp32, contiguous).
void run_tiled(const Problem& p, DequantBody body, int64_t blocks, int64_t block_n, const at::Tensor& x,
               const at::Tensor& y);

}  // namespace daq_cpu
