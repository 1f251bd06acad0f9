// AVX2 body of the DAQ CPU kernel (see cpu_kernel.h for the layout).
// Lane-crossing permutes are slow on many AVX2 cores (one per cycle or worse), so a codebook
// lookup here is in-lane `vpshufb`: the 16 float32 codebook values are split into byte planes,
// one `vpshufb` per plane looks up 32 codes, and two rounds of unpacks reassemble the floats. When
// every value's low 16 bits are zero (E2M1, E2M0, the integer grids: exact in bfloat16) two planes
// suffice. The unpacks leave codes in a fixed order, which the repack (`kernels/cpu_linear.py`,
// `avx2` order) matches, so the four decoded vectors are outputs 0..7, 8..15, 16..23, 24..31.
// Everything here has internal linkage and is compiled for AVX2 only by the pragma below.
#include <immintrin.h>

#include "cpu_kernel.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace daq_cpu {
namespace {

constexpr int BN = kBlockN[kAvx2];  // 32 outputs per block: four vectors
constexpr int kVectors = BN / 8;
constexpr int kMaxRows = 2;         // activation rows sharing one decode (accumulators fill the registers)

struct Table {
  __m256i plane[4];  // byte i of codebook value c at byte c of both lanes
  bool full;         // false: the low two planes are zero and skipped
};

Table load_table(const float* lut) {
  Table t{};
  alignas(16) uint8_t bytes[4][16];
  t.full = false;
  for (int c = 0; c < 16; ++c) {
    uint32_t bits;
    __builtin_memcpy(&bits, lut + c, 4);
    for (int i = 0; i < 4; ++i) bytes[i][c] = static_cast<uint8_t>(bits >> (8 * i));
    t.full |= (bits & 0xFFFFu) != 0;
  }
  for (int i = 0; i < 4; ++i) {
    t.plane[i] = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(bytes[i])));
  }
  return t;
}

// The 32 codebook values of one block row. Lane 0 of the code vector holds the low nibbles of the
// row's 16 bytes, lane 1 the high nibbles; vector i then holds bytes 4i..4i+3 of both lanes.
template <bool kFull>
inline void decode_row(const Table& t, const uint8_t* row, __m256 (&w)[kVectors]) {
  const __m256i bytes = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row)));
  const __m256i codes = _mm256_and_si256(_mm256_srlv_epi64(bytes, _mm256_set_epi64x(4, 4, 0, 0)),
                                         _mm256_set1_epi8(15));
  const __m256i p2 = _mm256_shuffle_epi8(t.plane[2], codes);
  const __m256i p3 = _mm256_shuffle_epi8(t.plane[3], codes);
  const __m256i high_a = _mm256_unpacklo_epi8(p2, p3), high_b = _mm256_unpackhi_epi8(p2, p3);
  __m256i low_a = _mm256_setzero_si256(), low_b = _mm256_setzero_si256();
  if (kFull) {
    const __m256i p0 = _mm256_shuffle_epi8(t.plane[0], codes);
    const __m256i p1 = _mm256_shuffle_epi8(t.plane[1], codes);
    low_a = _mm256_unpacklo_epi8(p0, p1);
    low_b = _mm256_unpackhi_epi8(p0, p1);
  }
  w[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(low_a, high_a));
  w[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(low_a, high_a));
  w[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(low_b, high_b));
  w[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(low_b, high_b));
}

inline __m256 load_halves(const uint16_t* h) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h)));
}

inline void store_outputs(float* y, const __m256 (&v)[kVectors], int64_t valid) {
  if (valid >= BN) {
#pragma GCC unroll 4
    for (int i = 0; i < kVectors; ++i) _mm256_storeu_ps(y + 8 * i, v[i]);
    return;
  }
  alignas(32) float tmp[BN];
#pragma GCC unroll 4
  for (int i = 0; i < kVectors; ++i) _mm256_store_ps(tmp + 8 * i, v[i]);
  for (int64_t j = 0; j < valid; ++j) y[j] = tmp[j];
}

// Rows [m0, m0 + R) of one block: per group, sum x * codebook[code], then scale it and add the
// offset times the group's sum of x, so the inner loop is a lookup and R FMAs per vector. U
// independent accumulator sets per row hide the FMA latency when R is small.
template <bool kFull, int R, int U>
void block_rows(const Problem& p, const Table& t, int64_t block, int64_t m0) {
  const uint8_t* codes = p.codes + block * p.k * (BN / 2);
  const uint16_t* scale_offset = p.scale_offset + block * p.groups * 2 * BN;
  __m256 total[R][kVectors];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int i = 0; i < kVectors; ++i) total[r][i] = _mm256_setzero_ps();
  for (int64_t g = 0; g < p.groups; ++g) {
    const int64_t k0 = g * p.group_size;
    const int64_t k1 = k0 + p.group_size < p.k ? k0 + p.group_size : p.k;
    __m256 acc[U][R][kVectors];
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u)
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int i = 0; i < kVectors; ++i) acc[u][r][i] = _mm256_setzero_ps();
    int64_t kk = k0;
    for (; kk + U <= k1; kk += U) {
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) {
        __m256 w[kVectors];
        decode_row<kFull>(t, codes + (kk + u) * (BN / 2), w);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          const __m256 xv = _mm256_broadcast_ss(p.x + (m0 + r) * p.k + kk + u);
#pragma GCC unroll 4
          for (int i = 0; i < kVectors; ++i) acc[u][r][i] = _mm256_fmadd_ps(xv, w[i], acc[u][r][i]);
        }
      }
    }
    for (; kk < k1; ++kk) {  // a group length that U does not divide
      __m256 w[kVectors];
      decode_row<kFull>(t, codes + kk * (BN / 2), w);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m256 xv = _mm256_broadcast_ss(p.x + (m0 + r) * p.k + kk);
#pragma GCC unroll 4
        for (int i = 0; i < kVectors; ++i) acc[0][r][i] = _mm256_fmadd_ps(xv, w[i], acc[0][r][i]);
      }
    }
    const uint16_t* so = scale_offset + g * 2 * BN;
#pragma GCC unroll 4
    for (int i = 0; i < kVectors; ++i) {
      const __m256 s = load_halves(so + 8 * i), o = load_halves(so + BN + 8 * i);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        __m256 sum = acc[0][r][i];
#pragma GCC unroll 4
        for (int u = 1; u < U; ++u) sum = _mm256_add_ps(sum, acc[u][r][i]);
        const __m256 xs = _mm256_set1_ps(p.x_group_sums[(m0 + r) * p.groups + g]);
        total[r][i] = _mm256_fmadd_ps(xs, o, _mm256_fmadd_ps(sum, s, total[r][i]));
      }
    }
  }
  const int64_t valid = p.n - block * BN;
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) store_outputs(p.y + (m0 + r) * p.n + block * BN, total[r], valid);
}

template <bool kFull>
void gemm_blocks(const Problem& p, const Table& t, int64_t block_begin, int64_t block_end) {
  for (int64_t b = block_begin; b < block_end; ++b) {
    int64_t m0 = 0;
    for (; m0 + kMaxRows <= p.m; m0 += kMaxRows) block_rows<kFull, 2, 1>(p, t, b, m0);
    if (m0 < p.m) block_rows<kFull, 1, 2>(p, t, b, m0);
  }
}

template <bool kFull>
void dequant_blocks(const Problem& p, const Table& t, int64_t block_begin, int64_t block_end, float* w_t,
                    int64_t ld) {
  for (int64_t b = block_begin; b < block_end; ++b) {
    const uint8_t* codes = p.codes + b * p.k * (BN / 2);
    const uint16_t* scale_offset = p.scale_offset + b * p.groups * 2 * BN;
    float* column = w_t + (b - block_begin) * BN;
    for (int64_t g = 0; g < p.groups; ++g) {
      const uint16_t* so = scale_offset + g * 2 * BN;
      __m256 s[kVectors], o[kVectors];
#pragma GCC unroll 4
      for (int i = 0; i < kVectors; ++i) {
        s[i] = load_halves(so + 8 * i);
        o[i] = load_halves(so + BN + 8 * i);
      }
      const int64_t k0 = g * p.group_size;
      const int64_t k1 = k0 + p.group_size < p.k ? k0 + p.group_size : p.k;
      for (int64_t kk = k0; kk < k1; ++kk) {
        __m256 w[kVectors];
        decode_row<kFull>(t, codes + kk * (BN / 2), w);
#pragma GCC unroll 4
        for (int i = 0; i < kVectors; ++i) _mm256_storeu_ps(column + kk * ld + 8 * i, _mm256_fmadd_ps(w[i], s[i], o[i]));
      }
    }
  }
}

}  // namespace

void gemm_avx2(const Problem& p, int64_t block_begin, int64_t block_end) {
  const Table t = load_table(p.lut);
  if (t.full) {
    gemm_blocks<true>(p, t, block_begin, block_end);
  } else {
    gemm_blocks<false>(p, t, block_begin, block_end);
  }
}

void dequant_avx2(const Problem& p, int64_t block_begin, int64_t block_end, float* w_t, int64_t ld) {
  const Table t = load_table(p.lut);
  if (t.full) {
    dequant_blocks<true>(p, t, block_begin, block_end, w_t, ld);
  } else {
    dequant_blocks<false>(p, t, block_begin, block_end, w_t, ld);
  }
}

}  // namespace daq_cpu

#pragma GCC pop_options
