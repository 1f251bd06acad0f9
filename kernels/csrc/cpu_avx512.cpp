// AVX-512F body of the DAQ CPU kernel (see cpu_kernel.h for the layout).
// A 16-entry codebook lookup of 16 codes is one `vpermps` (it reads code bits 3..0), so a block
// row of 32 outputs (16 bytes) decodes with a widen, a shift and two permutes. Everything here has
// internal linkage and is compiled for AVX-512 only by the pragma below.
#include <immintrin.h>

#include "cpu_kernel.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c")

namespace daq_cpu {
namespace {

constexpr int BN = kBlockN[kAvx512];  // 32 outputs per block: two vectors
constexpr int kMaxRows = 4;           // activation rows sharing one decode

// The codebook values of one block row: outputs 0..15 from the low nibbles, 16..31 from the high.
inline void decode_row(__m512 table, const uint8_t* row, __m512& w0, __m512& w1) {
  const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row)));
  w0 = _mm512_permutexvar_ps(bytes, table);  // reads bits 3..0: the high nibble is ignored
  w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);
}

inline __m512 load_halves(const uint16_t* h) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h)));
}

inline void store_outputs(float* y, __m512 v0, __m512 v1, int64_t valid) {
  if (valid >= BN) {
    _mm512_storeu_ps(y, v0);
    _mm512_storeu_ps(y + 16, v1);
    return;
  }
  const int64_t low = valid < 16 ? valid : 16;
  const int64_t high = valid - low;
  _mm512_mask_storeu_ps(y, static_cast<__mmask16>((1u << low) - 1u), v0);
  if (high > 0) _mm512_mask_storeu_ps(y + 16, static_cast<__mmask16>((1u << high) - 1u), v1);
}

// Rows [m0, m0 + R) of one block; the same arithmetic as cpu_avx2.cpp's block_rows.
template <int R, int U>
void block_rows(const Problem& p, __m512 table, int64_t block, int64_t m0) {
  const uint8_t* codes = p.codes + block * p.k * (BN / 2);
  const uint16_t* scale_offset = p.scale_offset + block * p.groups * 2 * BN;
  __m512 total[R][2];
  for (int r = 0; r < R; ++r) total[r][0] = total[r][1] = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.groups; ++g) {
    const int64_t k0 = g * p.group_size;
    const int64_t k1 = k0 + p.group_size < p.k ? k0 + p.group_size : p.k;
    // U independent accumulator sets per row hide the FMA latency when R is small.
    __m512 acc[U][R][2];
#pragma GCC unroll 16
    for (int u = 0; u < U; ++u)
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[u][r][0] = acc[u][r][1] = _mm512_setzero_ps();
    int64_t kk = k0;
    for (; kk + U <= k1; kk += U) {
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) {
        __m512 w0, w1;
        decode_row(table, codes + (kk + u) * (BN / 2), w0, w1);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          const __m512 xv = _mm512_set1_ps(p.x[(m0 + r) * p.k + kk + u]);
          acc[u][r][0] = _mm512_fmadd_ps(xv, w0, acc[u][r][0]);
          acc[u][r][1] = _mm512_fmadd_ps(xv, w1, acc[u][r][1]);
        }
      }
    }
    for (; kk < k1; ++kk) {
      __m512 w0, w1;
      decode_row(table, codes + kk * (BN / 2), w0, w1);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m512 xv = _mm512_set1_ps(p.x[(m0 + r) * p.k + kk]);
        acc[0][r][0] = _mm512_fmadd_ps(xv, w0, acc[0][r][0]);
        acc[0][r][1] = _mm512_fmadd_ps(xv, w1, acc[0][r][1]);
      }
    }
#pragma GCC unroll 4
    for (int u = 1; u < U; ++u)
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        acc[0][r][0] = _mm512_add_ps(acc[0][r][0], acc[u][r][0]);
        acc[0][r][1] = _mm512_add_ps(acc[0][r][1], acc[u][r][1]);
      }
    const uint16_t* so = scale_offset + g * 2 * BN;
    const __m512 s0 = load_halves(so), s1 = load_halves(so + 16);
    const __m512 o0 = load_halves(so + BN), o1 = load_halves(so + BN + 16);
    for (int r = 0; r < R; ++r) {
      const __m512 xs = _mm512_set1_ps(p.x_group_sums[(m0 + r) * p.groups + g]);
      total[r][0] = _mm512_fmadd_ps(xs, o0, _mm512_fmadd_ps(acc[0][r][0], s0, total[r][0]));
      total[r][1] = _mm512_fmadd_ps(xs, o1, _mm512_fmadd_ps(acc[0][r][1], s1, total[r][1]));
    }
  }
  const int64_t valid = p.n - block * BN;
  for (int r = 0; r < R; ++r) store_outputs(p.y + (m0 + r) * p.n + block * BN, total[r][0], total[r][1], valid);
}

}  // namespace

void gemm_avx512(const Problem& p, int64_t block_begin, int64_t block_end) {
  const __m512 table = _mm512_loadu_ps(p.lut);
  for (int64_t b = block_begin; b < block_end; ++b) {
    for (int64_t m0 = 0; m0 < p.m; m0 += kMaxRows) {
      switch (p.m - m0 < kMaxRows ? p.m - m0 : kMaxRows) {
        case 1: block_rows<1, 4>(p, table, b, m0); break;
        case 2: block_rows<2, 2>(p, table, b, m0); break;
        case 3: block_rows<3, 1>(p, table, b, m0); break;
        default: block_rows<4, 1>(p, table, b, m0); break;
      }
    }
  }
}

void dequant_avx512(const Problem& p, int64_t block_begin, int64_t block_end, float* w_t, int64_t ld) {
  const __m512 table = _mm512_loadu_ps(p.lut);
  for (int64_t b = block_begin; b < block_end; ++b) {
    const uint8_t* codes = p.codes + b * p.k * (BN / 2);
    const uint16_t* scale_offset = p.scale_offset + b * p.groups * 2 * BN;
    float* column = w_t + (b - block_begin) * BN;
    for (int64_t g = 0; g < p.groups; ++g) {
      const uint16_t* so = scale_offset + g * 2 * BN;
      const __m512 s0 = load_halves(so), s1 = load_halves(so + 16);
      const __m512 o0 = load_halves(so + BN), o1 = load_halves(so + BN + 16);
      const int64_t k0 = g * p.group_size;
      const int64_t k1 = k0 + p.group_size < p.k ? k0 + p.group_size : p.k;
      for (int64_t kk = k0; kk < k1; ++kk) {
        __m512 w0, w1;
        decode_row(table, codes + kk * (BN / 2), w0, w1);
        _mm512_storeu_ps(column + kk * ld, _mm512_fmadd_ps(w0, s0, o0));
        _mm512_storeu_ps(column + kk * ld + 16, _mm512_fmadd_ps(w1, s1, o1));
      }
    }
  }
}

}  // namespace daq_cpu

#pragma GCC pop_options
