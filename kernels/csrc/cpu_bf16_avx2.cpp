// AVX2 body of `torch.ops.daq_cpu.bf16_linear` (cpu_kernel.h): y = x @ W^T for an unquantized
// bfloat16 weight, on CPUs without bfloat16 instructions, where oneDNN refuses bf16 and torch's
// F.linear falls back to a slow path (benchmarks/results/lm-head-cpu.md: SmolLM2's 49152 x 576 head
// at 16 rows, 94 ms; this body 19.5 ms; oneDNN's fp32 product 17 ms, on an AMD Zen 3).
// A bfloat16 is the high half of a float32, so one 32-byte load of 16 weights gives the 8 even ones
// as floats by a 16-bit left shift and the 8 odd ones by masking the low half. The caller
// reorders x once per call into the same even/odd order, so 16 weights cost one load, two integer
// ops and two FMAs per activation row, and the sum over k is the same sum.
#include <immintrin.h>

#include <cstring>

#include "cpu_kernel.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace daq_cpu {
namespace {

constexpr int kTileW = 4;  // weight rows per tile
constexpr int kTileX = 3;  // activation rows per tile: 12 accumulators, 2 weight vectors
// Activation rows per chunk, kept in L2 while every weight tile of the range passes over them once.
// (Blocking K as well, for an L1-sized chunk, measured slower: 23 against 19 ms at M = 16 on SmolLM2's
// head, and M = 1 streams the weight in strided pieces.)
constexpr int64_t kChunkBytes = int64_t{256} << 10;

inline float horizontal_sum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// y[m0 + r, n0 + w] for r < RX, w < RW: full runs of 16 inputs from W itself, a partial last run
// from a zero-padded copy (xp is zero past K, so the padding adds nothing).
template <int RW, int RX>
void tile(const Bf16Problem& p, int64_t n0, int64_t m0) {
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m256 acc[RW][RX];
#pragma GCC unroll 4
  for (int w = 0; w < RW; ++w)
#pragma GCC unroll 3
    for (int r = 0; r < RX; ++r) acc[w][r] = _mm256_setzero_ps();
  auto run = [&](const uint16_t* const (&rows)[RW], int64_t c) {
#pragma GCC unroll 4
    for (int w = 0; w < RW; ++w) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[w]));
      const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
      const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(v, high));
#pragma GCC unroll 3
      for (int r = 0; r < RX; ++r) {
        const float* x = p.xp + (m0 + r) * p.kp + 16 * c;
        acc[w][r] = _mm256_fmadd_ps(odd, _mm256_loadu_ps(x + 8), _mm256_fmadd_ps(even, _mm256_loadu_ps(x), acc[w][r]));
      }
    }
  };
  const int64_t full = p.k / 16;
  for (int64_t c = 0; c < full; ++c) {
    const uint16_t* rows[RW];
#pragma GCC unroll 4
    for (int w = 0; w < RW; ++w) rows[w] = p.w + (n0 + w) * p.k + 16 * c;
    run(rows, c);
  }
  if (p.k % 16) {
    alignas(32) uint16_t padded[RW][16] = {};
    const uint16_t* rows[RW];
    for (int w = 0; w < RW; ++w) {
      std::memcpy(padded[w], p.w + (n0 + w) * p.k + 16 * full, (p.k % 16) * sizeof(uint16_t));
      rows[w] = padded[w];
    }
    run(rows, full);
  }
#pragma GCC unroll 3
  for (int r = 0; r < RX; ++r)
#pragma GCC unroll 4
    for (int w = 0; w < RW; ++w) p.y[(m0 + r) * p.n + n0 + w] = horizontal_sum(acc[w][r]);
}

template <int RW>
void weight_rows(const Bf16Problem& p, int64_t n0, int64_t m0, int64_t m1) {
  for (; m0 + kTileX <= m1; m0 += kTileX) tile<RW, kTileX>(p, n0, m0);
  if (m1 - m0 == 2) tile<RW, 2>(p, n0, m0);
  if (m1 - m0 == 1) tile<RW, 1>(p, n0, m0);
}

}  // namespace

void bf16_gemm_avx2(const Bf16Problem& p, int64_t n_begin, int64_t n_end) {
  // A weight tile (4 rows) stays in L1 across a chunk's row tiles.
  const int64_t rows = kChunkBytes / (p.kp * 4) / kTileX * kTileX;
  const int64_t chunk = rows > kTileX ? rows : kTileX;
  for (int64_t m0 = 0; m0 < p.m; m0 += chunk) {
    const int64_t m1 = m0 + chunk < p.m ? m0 + chunk : p.m;
    int64_t n0 = n_begin;
    for (; n0 + kTileW <= n_end; n0 += kTileW) weight_rows<kTileW>(p, n0, m0, m1);
    for (; n0 < n_end; ++n0) weight_rows<1>(p, n0, m0, m1);
  }
}

}  // namespace daq_cpu

#pragma GCC pop_options
