// The op `torch.ops.daq_cpu.bf16_linear`: y = x @ W^T (+ bias) for an unquantized bfloat16 weight
// W [N, K] (a DAQ checkpoint's full-precision lm_head), computed in fp32 and returned in x's dtype.
// Built for baseline x86-64: it checks the inputs, reorders x into the even/odd order of the AVX2
// body (cpu_bf16_avx2.cpp) and splits the weight rows over torch's intra-op thread pool.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "cpu_kernel.h"

namespace daq_cpu {
namespace {

constexpr int64_t kRowsPerTask = 64;  // weight rows per thread task: a multiple of the body's tile of 4

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(cpu_has_avx2(), "daq_cpu.bf16_linear: this CPU has no AVX2+FMA");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16 && weight.is_contiguous(),
              "daq_cpu.bf16_linear: the weight must be a contiguous bfloat16 [N, K] matrix");
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(x.size(-1) == k, "daq_cpu.bf16_linear: x has ", x.size(-1), " inputs, the weight ", k);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  const at::Tensor x2 = x.reshape({-1, k}).to(at::kFloat);
  const int64_t m = x2.size(0), kp = (k + 15) / 16 * 16;
  // Each run of 16 inputs as its 8 even then its 8 odd elements, zero past K.
  const at::Tensor xp = at::constant_pad_nd(x2, {0, kp - k}).view({m, kp / 16, 8, 2}).transpose(2, 3).contiguous();
  at::Tensor y = at::empty({m, n}, x2.options());
  if (m > 0) {
    const Bf16Problem p{xp.data_ptr<float>(), reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>()),
                        y.data_ptr<float>(), m, n, k, kp};
    at::parallel_for(0, (n + kRowsPerTask - 1) / kRowsPerTask, 1, [&](int64_t begin, int64_t end) {
      bf16_gemm_avx2(p, begin * kRowsPerTask, std::min(n, end * kRowsPerTask));
    });
  }
  if (bias.has_value()) y.add_(bias->to(at::kFloat));
  return y.to(x.scalar_type()).view(out_shape);
}

}  // namespace
}  // namespace daq_cpu

TORCH_LIBRARY_FRAGMENT(daq_cpu, m) { m.def("bf16_linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor"); }

TORCH_LIBRARY_IMPL(daq_cpu, CPU, m) { m.impl("bf16_linear", &daq_cpu::bf16_linear); }
