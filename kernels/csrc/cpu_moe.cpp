// The DAQ CPU MoE op `torch.ops.daq_cpu.moe`: a mixture-of-experts layer's routed experts in one
// call, on every expert's codes repacked by `kernels/moe.py` (`CpuMoEKernel`) in the dense
// kernel's layout (cpu_kernel.h), stacked along a leading expert axis.
//
// Why one op: run expert by expert from Python, each expert costs a dozen torch calls (gather,
// two linears with their own activation copies, the gate, a scatter), which at decode cost as
// much as the experts' products (benchmarks/results/moe-kernels-cpu.md). Here the routed
// (token, expert) pairs are sorted by expert once; each projection is then one parallel loop over
// (expert, output block) items of every expert with tokens, through the dense op's bodies (fused
// decode-GEMM for few rows, AVX2 panel GEMM or tiled torch GEMM for many); the gate and the
// weighted sum over each token's experts run in place between them.
//
// Numerics follow `moe_reference` (kernels/moe.py): products in fp32, act(gate) * up rounded to
// x's dtype (the input of a linear), the routed sum in fp32, rounded once at the end.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "cpu_dispatch.h"

namespace daq_cpu {
namespace {

enum Activation : int64_t { kSilu = 0, kGelu = 1 };  // `ACTIVATION_IDS` in kernels/moe.py

// One projection (w13 or w2) of every local expert, repacked.
struct Experts {
  const uint8_t* codes;          // [E, NB, K, BN/2]
  const uint16_t* scale_offset;  // [E, NB, G, 2, BN] fp16 bits
  const float* lut;              // 16 codebook values shared by the experts
  int64_t blocks, k, groups;
};

Experts experts_of(const at::Tensor& codes, const at::Tensor& scale_offset, const at::Tensor& lut, int64_t block_n,
                   int64_t num_experts, int64_t k, int64_t group_size, const char* name) {
  const int64_t groups = (k + group_size - 1) / group_size;
  TORCH_CHECK(codes.dim() == 4 && codes.scalar_type() == at::kByte && codes.is_contiguous() &&
                  codes.size(0) == num_experts && codes.size(2) == k && codes.size(3) * 2 == block_n,
              "daq_cpu.moe: ", name, " codes must be contiguous uint8 [", num_experts, ", blocks, ", k, ", ",
              block_n / 2, "]");
  const int64_t blocks = codes.size(1);
  TORCH_CHECK(scale_offset.scalar_type() == at::kHalf && scale_offset.is_contiguous() &&
                  scale_offset.sizes() == at::IntArrayRef({num_experts, blocks, groups, 2, block_n}),
              "daq_cpu.moe: ", name, " scale_offset must be contiguous fp16 [", num_experts, ", ", blocks, ", ",
              groups, ", 2, ", block_n, "]");
  TORCH_CHECK(lut.scalar_type() == at::kFloat && lut.numel() == 16 && lut.is_contiguous(),
              "daq_cpu.moe: the ", name, " lut must hold 16 float32 values");
  return {codes.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(scale_offset.data_ptr<at::Half>()),
          lut.data_ptr<float>(), blocks, k, groups};
}

// The routed (token, slot) pairs of this rank, sorted by expert (stable, so by token within one):
// sorted rows [start[e], start[e + 1]) of every per-pair buffer belong to expert e.
struct Routing {
  std::vector<int64_t> start;     // [E + 1]
  std::vector<int64_t> token;     // [P]: the token of each sorted row
  std::vector<int64_t> row;       // [M * top_k]: the sorted row of pair (m, j); -1: not on this rank
  std::vector<int64_t> active;    // experts with at least one row
};

Routing sort_pairs(const at::Tensor& topk_ids, int64_t num_experts) {
  const at::Tensor ids = topk_ids.to(at::kLong).contiguous();
  const int64_t* id = ids.data_ptr<int64_t>();
  const int64_t pairs = ids.numel(), top_k = ids.size(1);
  Routing r{std::vector<int64_t>(num_experts + 1, 0), {}, std::vector<int64_t>(pairs, -1), {}};
  for (int64_t i = 0; i < pairs; ++i) {
    if (id[i] >= 0 && id[i] < num_experts) ++r.start[id[i] + 1];
  }
  for (int64_t e = 0; e < num_experts; ++e) {
    if (r.start[e + 1]) r.active.push_back(e);
    r.start[e + 1] += r.start[e];
  }
  r.token.resize(r.start[num_experts]);
  std::vector<int64_t> next(r.start.begin(), r.start.end() - 1);
  for (int64_t i = 0; i < pairs; ++i) {
    if (id[i] >= 0 && id[i] < num_experts) {
      r.row[i] = next[id[i]]++;
      r.token[r.row[i]] = i / top_k;
    }
  }
  return r;
}

// y (sorted rows, stride blocks * BN) = x (sorted rows [P, K]) @ W_e^T for the rows of each expert e.
// Experts with few rows (<= max_fused_m) or on AVX2 share one parallel loop over (expert, block)
// items; the rest (prefill on AVX-512 or the portable path) decode tiles for torch's GEMM, which
// threads itself, one expert after another.
void project(const Experts& w, const Routing& r, const at::Tensor& x, const at::Tensor& x_group_sums,
             const at::Tensor& y, int64_t group_size, int64_t isa, int64_t max_fused_m) {
  const auto [gemm, dequant] = bodies(isa);
  const int64_t block_n = kBlockN[isa], ld = w.blocks * block_n, bytes_per_expert = w.blocks * w.k * block_n / 2;
  const int64_t so_per_expert = w.blocks * w.groups * 2 * block_n;
  auto problem = [&](int64_t e) {
    const int64_t first = r.start[e];
    return Problem{x.data_ptr<float>() + first * w.k, x_group_sums.data_ptr<float>() + first * w.groups,
                   w.codes + e * bytes_per_expert, w.scale_offset + e * so_per_expert, w.lut,
                   y.data_ptr<float>() + first * ld, r.start[e + 1] - first, ld, w.k, w.groups, group_size};
  };
  std::vector<int64_t> looped, tiled;
  for (const int64_t e : r.active) (r.start[e + 1] - r.start[e] <= max_fused_m || isa == kAvx2 ? looped : tiled).push_back(e);
  const int64_t items = static_cast<int64_t>(looped.size()) * w.blocks;
  const int64_t grain = items * block_n * w.k < kParallelWeights ? std::max<int64_t>(items, 1) : 1;
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      const int64_t e = looped[i / w.blocks], b0 = i % w.blocks, b1 = std::min(w.blocks, b0 + end - i);
      const Problem p = problem(e);
      if (p.m <= max_fused_m) {
        gemm(p, b0, b1);
      } else {
        gemm_panels_avx2(p, b0, b1, p.y, ld);
      }
      i += b1 - b0;
    }
  });
  for (const int64_t e : tiled) {
    const Problem p = problem(e);
    run_tiled(p, dequant, w.blocks, block_n, x.narrow(0, r.start[e], p.m), y.narrow(0, r.start[e], p.m));
  }
}

// hidden[row, j] = act(h13[row, j]) * h13[row, I + j], rounded to `dtype` (the input of w2).
void gate(const at::Tensor& h13, int64_t inter, Activation activation, at::ScalarType dtype, const at::Tensor& hidden) {
  const int64_t ld = h13.size(1);
  const float* src = h13.data_ptr<float>();
  float* dst = hidden.data_ptr<float>();
  at::parallel_for(0, hidden.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const float* gate_row = src + row * ld;
      for (int64_t j = 0; j < inter; ++j) {
        const float g = gate_row[j];
        const float a = activation == kSilu ? g / (1.0f + std::exp(-g))
                                            : 0.5f * g * (1.0f + std::erf(g * static_cast<float>(M_SQRT1_2)));
        float v = a * gate_row[inter + j];
        if (dtype == at::kBFloat16) v = static_cast<float>(c10::BFloat16(v));
        if (dtype == at::kHalf) v = static_cast<float>(c10::Half(v));
        dst[row * inter + j] = v;
      }
    }
  });
}

void sums_of_groups(const at::Tensor& x, int64_t group_size, const at::Tensor& sums) {
  const int64_t k = x.size(1), groups = sums.size(1);
  at::parallel_for(0, x.size(0), 16, [&](int64_t begin, int64_t end) {
    group_sums(x.data_ptr<float>() + begin * k, end - begin, k, group_size, sums.data_ptr<float>() + begin * groups);
  });
}

at::Tensor moe(const at::Tensor& x, const at::Tensor& topk_weights, const at::Tensor& topk_ids,
               const at::Tensor& w13_codes, const at::Tensor& w13_scale_offset, const at::Tensor& w13_lut,
               const at::Tensor& w2_codes, const at::Tensor& w2_scale_offset, const at::Tensor& w2_lut,
               int64_t intermediate_size, int64_t group_size, int64_t isa, int64_t max_fused_m, int64_t activation) {
  TORCH_CHECK(isa >= kScalar && isa <= kAvx512, "daq_cpu.moe: unknown instruction set ", isa);
  TORCH_CHECK(activation == kSilu || activation == kGelu, "daq_cpu.moe: unknown activation ", activation);
  TORCH_CHECK(x.dim() == 2 && topk_ids.dim() == 2 && topk_ids.size(0) == x.size(0) &&
                  topk_weights.sizes() == topk_ids.sizes(),
              "daq_cpu.moe: x must be [M, H], topk_weights and topk_ids [M, top_k]");
  const int64_t block_n = kBlockN[isa], num_experts = w13_codes.size(0), hidden_size = x.size(1);
  const int64_t inter = intermediate_size;
  const Experts w13 = experts_of(w13_codes, w13_scale_offset, w13_lut, block_n, num_experts, hidden_size,
                                 group_size, "w13");
  const Experts w2 = experts_of(w2_codes, w2_scale_offset, w2_lut, block_n, num_experts, inter, group_size, "w2");
  TORCH_CHECK(w13.blocks * block_n >= 2 * inter && w2.blocks * block_n >= hidden_size,
              "daq_cpu.moe: w13 must have 2 * ", inter, " outputs and w2 ", hidden_size);

  const at::Tensor x2 = x.to(at::kFloat).contiguous();
  const at::Tensor weights = topk_weights.to(at::kFloat).contiguous();
  const Routing r = sort_pairs(topk_ids, num_experts);
  const int64_t rows = r.start[num_experts];
  const auto f32 = x2.options();
  at::Tensor out = at::zeros({x.size(0), hidden_size}, f32);
  if (rows > 0) {
    at::Tensor xs = at::empty({rows, hidden_size}, f32);  // x of each sorted row
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        std::copy_n(x2.data_ptr<float>() + r.token[row] * hidden_size, hidden_size,
                    xs.data_ptr<float>() + row * hidden_size);
      }
    });
    const at::Tensor xs_sums = at::empty({rows, w13.groups}, f32);
    sums_of_groups(xs, group_size, xs_sums);
    const at::Tensor h13 = at::empty({rows, w13.blocks * block_n}, f32);
    project(w13, r, xs, xs_sums, h13, group_size, isa, max_fused_m);

    const at::Tensor hidden = at::empty({rows, inter}, f32);
    gate(h13, inter, static_cast<Activation>(activation), x.scalar_type(), hidden);
    const at::Tensor hidden_sums = at::empty({rows, w2.groups}, f32);
    sums_of_groups(hidden, group_size, hidden_sums);
    const at::Tensor y2 = at::empty({rows, w2.blocks * block_n}, f32);
    project(w2, r, hidden, hidden_sums, y2, group_size, isa, max_fused_m);

    const int64_t top_k = topk_ids.size(1), ld2 = y2.size(1);
    at::parallel_for(0, x.size(0), 1, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        float* dst = out.data_ptr<float>() + m * hidden_size;
        for (int64_t j = 0; j < top_k; ++j) {
          const int64_t row = r.row[m * top_k + j];
          if (row < 0) continue;
          const float weight = weights.data_ptr<float>()[m * top_k + j];
          const float* src = y2.data_ptr<float>() + row * ld2;
          for (int64_t c = 0; c < hidden_size; ++c) dst[c] += weight * src[c];
        }
      }
    });
  }
  return out.to(x.scalar_type());
}

}  // namespace
}  // namespace daq_cpu

TORCH_LIBRARY_FRAGMENT(daq_cpu, m) {
  m.def("moe(Tensor x, Tensor topk_weights, Tensor topk_ids, Tensor w13_codes, Tensor w13_scale_offset, "
        "Tensor w13_lut, Tensor w2_codes, Tensor w2_scale_offset, Tensor w2_lut, int intermediate_size, "
        "int group_size, int isa, int max_fused_m, int activation) -> Tensor");
}

TORCH_LIBRARY_IMPL(daq_cpu, CPU, m) { m.impl("moe", &daq_cpu::moe); }
