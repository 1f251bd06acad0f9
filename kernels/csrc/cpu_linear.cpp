// The DAQ CPU kernel's op `torch.ops.daq_cpu.linear`: y = x @ W_hat^T (+ bias) from codes repacked
// by `kernels/cpu_linear.py` (layout in cpu_kernel.h), W_hat[n, k] = codebook[q] * s + o.
//
// This file is built for baseline x86-64: it checks inputs, prepares the activations once per
// call (fp32 copy, per-group sums of x for the offset term), splits the output blocks over torch's
// intra-op thread pool and runs the instruction-set body chosen by the caller. Small M (decode)
// runs the fused kernel; above `max_fused_m` AVX2 runs its panel GEMM, the others decode a tile of
// columns at a time for torch's GEMM. The scalar body below is the portable path and the oracle
// for the SIMD ones.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "cpu_dispatch.h"

namespace daq_cpu {

bool cpu_has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
bool cpu_has_avx512() { return cpu_has_avx2() && __builtin_cpu_supports("avx512f"); }

namespace {

constexpr int kScalarBN = kBlockN[kScalar];
// Decoded weights per prefill tile (fp32, 4 MiB): small layers decode whole, and the GEMM keeps its width.
constexpr int64_t kTileWeights = int64_t{1} << 20;

float half_to_float(uint16_t bits) { return static_cast<float>(c10::Half(bits, c10::Half::from_bits())); }

int64_t group_end(const Problem& p, int64_t g) {
  return std::min(g * p.group_size + p.group_size, p.k);
}

void gemm_scalar(const Problem& p, int64_t block_begin, int64_t block_end) {
  constexpr int half = kScalarBN / 2;
  for (int64_t b = block_begin; b < block_end; ++b) {
    const uint8_t* codes = p.codes + b * p.k * half;
    const uint16_t* scale_offset = p.scale_offset + b * p.groups * 2 * kScalarBN;
    const int64_t valid = std::min<int64_t>(kScalarBN, p.n - b * kScalarBN);
    for (int64_t m = 0; m < p.m; ++m) {
      float total[kScalarBN] = {};
      for (int64_t g = 0; g < p.groups; ++g) {
        float acc[kScalarBN] = {};
        for (int64_t kk = g * p.group_size; kk < group_end(p, g); ++kk) {
          const float xv = p.x[m * p.k + kk];
          const uint8_t* row = codes + kk * half;
          for (int j = 0; j < half; ++j) {
            acc[j] += xv * p.lut[row[j] & 15];
            acc[j + half] += xv * p.lut[row[j] >> 4];
          }
        }
        const uint16_t* so = scale_offset + g * 2 * kScalarBN;
        const float xs = p.x_group_sums[m * p.groups + g];
        for (int j = 0; j < kScalarBN; ++j) {
          total[j] += acc[j] * half_to_float(so[j]) + xs * half_to_float(so[kScalarBN + j]);
        }
      }
      for (int64_t j = 0; j < valid; ++j) p.y[m * p.n + b * kScalarBN + j] = total[j];
    }
  }
}

void dequant_scalar(const Problem& p, int64_t block_begin, int64_t block_end, float* w_t, int64_t ld) {
  constexpr int half = kScalarBN / 2;
  for (int64_t b = block_begin; b < block_end; ++b) {
    const uint8_t* codes = p.codes + b * p.k * half;
    const uint16_t* scale_offset = p.scale_offset + b * p.groups * 2 * kScalarBN;
    float* column = w_t + (b - block_begin) * kScalarBN;
    for (int64_t g = 0; g < p.groups; ++g) {
      const uint16_t* so = scale_offset + g * 2 * kScalarBN;
      for (int64_t kk = g * p.group_size; kk < group_end(p, g); ++kk) {
        const uint8_t* row = codes + kk * half;
        for (int j = 0; j < kScalarBN; ++j) {
          const int code = j < half ? row[j] & 15 : row[j - half] >> 4;
          column[kk * ld + j] = p.lut[code] * half_to_float(so[j]) + half_to_float(so[kScalarBN + j]);
        }
      }
    }
  }
}

// Fused decode-GEMM over all blocks, threads over blocks.
void run_fused(const Problem& p, GemmBody body, int64_t blocks) {
  const int64_t grain = p.n * p.k < kParallelWeights ? blocks : 1;
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) { body(p, begin, end); });
}

// AVX2 prefill: decoded panels through our register-blocked GEMM, threads over blocks, into y
// padded to whole blocks. On this AMD Zen 3, decode included, it runs 1.45-2.0x torch's fp32 GEMM
// (MKL) at M = 64 and 1.14-1.34x at M = 256 (benchmarks/results/kernels-cpu.md), 0.97-1.0x on
// SmolLM2's shapes at M = 2048. AVX-512 CPUs keep torch's GEMM, which is twice as wide as this kernel there.
void run_panels(const Problem& p, int64_t blocks, float* y, int64_t ldy) {
  const int64_t grain = p.n * p.k < kParallelWeights ? blocks : 1;
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) { gemm_panels_avx2(p, begin, end, y, ldy); });
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale_offset,
                  const at::Tensor& lut, int64_t out_features, int64_t group_size, int64_t isa,
                  int64_t max_fused_m, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(isa >= kScalar && isa <= kAvx512, "daq_cpu: unknown instruction set ", isa);
  const int64_t block_n = kBlockN[isa];
  TORCH_CHECK(codes.dim() == 3 && codes.scalar_type() == at::kByte && codes.size(2) * 2 == block_n &&
                  codes.is_contiguous(),
              "daq_cpu: codes must be contiguous uint8 [blocks, K, ", block_n / 2, "] for this instruction set");
  const int64_t blocks = codes.size(0), k = codes.size(1);
  TORCH_CHECK(x.size(-1) == k, "daq_cpu: x has ", x.size(-1), " inputs, the weight ", k);
  TORCH_CHECK(out_features > (blocks - 1) * block_n && out_features <= blocks * block_n,
              "daq_cpu: ", out_features, " outputs do not fit ", blocks, " blocks");
  const int64_t groups = (k + group_size - 1) / group_size;
  TORCH_CHECK(scale_offset.scalar_type() == at::kHalf && scale_offset.is_contiguous() &&
                  scale_offset.sizes() == at::IntArrayRef({blocks, groups, 2, block_n}),
              "daq_cpu: scale_offset must be contiguous fp16 [blocks, groups, 2, ", block_n, "]");
  TORCH_CHECK(lut.scalar_type() == at::kFloat && lut.numel() == 16 && lut.is_contiguous(),
              "daq_cpu: lut must hold 16 float32 values");
  auto [gemm_body, dequant_body] = bodies(isa);

  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = out_features;
  const at::Tensor x2 = x.reshape({-1, k}).to(at::kFloat).contiguous();
  const int64_t m = x2.size(0);
  const bool fused = m <= max_fused_m, panels = !fused && isa == kAvx2;
  // The panel GEMM writes whole blocks: its output is padded, then narrowed.
  at::Tensor y = at::empty({m, panels ? blocks * block_n : out_features}, x2.options());
  if (m > 0) {
    // Only the fused kernel folds the offsets into sums of x; the prefill paths decode them.
    std::vector<float> x_group_sums(fused ? m * groups : 0);
    if (fused) group_sums(x2.data_ptr<float>(), m, k, group_size, x_group_sums.data());
    const Problem p{x2.data_ptr<float>(),
                    x_group_sums.data(),
                    codes.data_ptr<uint8_t>(),
                    reinterpret_cast<const uint16_t*>(scale_offset.data_ptr<at::Half>()),
                    lut.data_ptr<float>(),
                    y.data_ptr<float>(),
                    m, out_features, k, groups, group_size};
    if (fused) {
      run_fused(p, gemm_body, blocks);
    } else if (panels) {
      run_panels(p, blocks, y.data_ptr<float>(), y.size(1));
    } else {
      run_tiled(p, dequant_body, blocks, block_n, x2, y);
    }
  }
  if (y.size(1) != out_features) y = y.narrow(1, 0, out_features);
  if (bias.has_value()) y.add_(bias->to(at::kFloat));
  return y.to(x.scalar_type()).contiguous().view(out_shape);
}

int64_t best_isa() { return cpu_has_avx512() ? kAvx512 : cpu_has_avx2() ? kAvx2 : kScalar; }

}  // namespace

std::pair<GemmBody, DequantBody> bodies(int64_t isa) {
  switch (isa) {
    case kScalar: return {gemm_scalar, dequant_scalar};
    case kAvx2:  // its prefill is gemm_panels_avx2, which decodes as it goes
      TORCH_CHECK(cpu_has_avx2(), "daq_cpu: this CPU has no AVX2+FMA");
      return {gemm_avx2, nullptr};
    case kAvx512:
      TORCH_CHECK(cpu_has_avx512(), "daq_cpu: this CPU has no AVX-512F");
      return {gemm_avx512, dequant_avx512};
    default: TORCH_CHECK(false, "daq_cpu: unknown instruction set ", isa);
  }
}

void group_sums(const float* x, int64_t m, int64_t k, int64_t group_size, float* sums) {
  const int64_t groups = (k + group_size - 1) / group_size;
  for (int64_t row = 0; row < m; ++row) {
    for (int64_t g = 0; g < groups; ++g) {
      float sum = 0.0f;
      for (int64_t kk = g * group_size; kk < std::min(k, (g + 1) * group_size); ++kk) sum += x[row * k + kk];
      sums[row * groups + g] = sum;
    }
  }
}

void run_tiled(const Problem& p, DequantBody body, int64_t blocks, int64_t block_n, const at::Tensor& x,
               const at::Tensor& y) {
  const int64_t tile_blocks = std::max<int64_t>(1, std::min(blocks, kTileWeights / (p.k * block_n)));
  const int64_t ld = tile_blocks * block_n;
  // Reused across calls: a fresh multi-MiB buffer per call would page-fault on every first touch.
  thread_local at::Tensor buffer;
  if (!buffer.defined() || buffer.numel() < p.k * ld) buffer = at::empty({p.k * ld}, x.options());
  const at::Tensor w_t = buffer.narrow(0, 0, p.k * ld).view({p.k, ld});
  float* w_ptr = w_t.data_ptr<float>();
  for (int64_t b0 = 0; b0 < blocks; b0 += tile_blocks) {
    const int64_t b1 = std::min(blocks, b0 + tile_blocks);
    at::parallel_for(b0, b1, 1, [&](int64_t begin, int64_t end) {
      body(p, begin, end, w_ptr + (begin - b0) * block_n, ld);
    });
    const int64_t n0 = b0 * block_n;
    const int64_t cols = std::min(p.n, b1 * block_n) - n0;
    if (cols == p.n) {
      at::Tensor out = y;  // a handle to the same storage
      at::mm_out(out, x, w_t.narrow(1, 0, cols));  // one tile holds the whole layer: no copy
    } else {
      y.narrow(1, n0, cols).copy_(at::mm(x, w_t.narrow(1, 0, cols)));
    }
  }
}

}  // namespace daq_cpu

TORCH_LIBRARY(daq_cpu, m) {
  m.def("linear(Tensor x, Tensor codes, Tensor scale_offset, Tensor lut, int out_features, int group_size, "
        "int isa, int max_fused_m, Tensor? bias=None) -> Tensor");
  m.def("best_isa() -> int", &daq_cpu::best_isa);
}

TORCH_LIBRARY_IMPL(daq_cpu, CPU, m) { m.impl("linear", &daq_cpu::linear); }
