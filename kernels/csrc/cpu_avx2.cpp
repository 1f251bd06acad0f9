// AVX2 body of the DAQ CPU kernel (see cpu_kernel.h for the layout).
// Lane-crossing permutes are slow on many AVX2 cores (one per cycle or worse), so a codebook
// lookup here is in-lane `vpshufb`: the 16 float32 codebook values are split into byte planes,
// one `vpshufb` per plane looks up 32 codes, and two rounds of unpacks reassemble the floats. When
// every value's low 16 bits are zero (E2M1, E2M0, the integer grids: exact in bfloat16) two planes
// suffice. The unpacks leave codes in a fixed order, which the repack (`kernels/cpu_linear.py`,
// `avx2` order) matches, so the four decoded vectors are outputs 0..7, 8..15, 16..23, 24..31.
// Two bodies: the fused decode-GEMM for small M (gemm_avx2) and, for prefill, a register-blocked
// GEMM on decoded panels (gemm_panels_avx2). Everything here has internal linkage, except those
// two, and is compiled for AVX2 only by the pragma below.
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

// Rows [k_begin, k_end) of one block's decoded weights (scale and offset applied) into `panel`,
// row-major with BN floats a row: the operand of the prefill GEMM below.
template <bool kFull>
void decode_panel(const Problem& p, const Table& t, int64_t block, int64_t k_begin, int64_t k_end, float* panel) {
  const uint8_t* codes = p.codes + block * p.k * (BN / 2);
  const uint16_t* scale_offset = p.scale_offset + block * p.groups * 2 * BN;
  for (int64_t g = k_begin / p.group_size; g * p.group_size < k_end; ++g) {
    const uint16_t* so = scale_offset + g * 2 * BN;
    __m256 s[kVectors], o[kVectors];
#pragma GCC unroll 4
    for (int i = 0; i < kVectors; ++i) {
      s[i] = load_halves(so + 8 * i);
      o[i] = load_halves(so + BN + 8 * i);
    }
    const int64_t k0 = g * p.group_size > k_begin ? g * p.group_size : k_begin;
    const int64_t k1 = g * p.group_size + p.group_size < k_end ? g * p.group_size + p.group_size : k_end;
    for (int64_t kk = k0; kk < k1; ++kk) {
      __m256 w[kVectors];
      decode_row<kFull>(t, codes + kk * (BN / 2), w);
#pragma GCC unroll 4
      for (int i = 0; i < kVectors; ++i) {
        _mm256_storeu_ps(panel + (kk - k_begin) * BN + 8 * i, _mm256_fmadd_ps(w[i], s[i], o[i]));
      }
    }
  }
}

// Prefill GEMM on decoded panels, BLIS-style: a panel of kPanelK decoded rows of one block (32 KiB,
// L1-sized) is multiplied with kTileM activation rows at a time by a register-blocked kernel:
// per k, two panel vectors, kTileM broadcasts of x and 2 * kTileM FMAs, so it runs at the FMA rate.
// (Packing x k-major first, as BLIS packs A, measured slower here: the packing pass costs more.)
// Measured on SmolLM2's shapes at M = 2048 against torch's GEMM: 128-row panels 0.94-0.96x, 256-row
// panels with the k loop unrolled 4 times 0.97-1.0x (chunks of 60 or 240-480 rows: slower).
constexpr int64_t kPanelK = 256;
constexpr int64_t kChunkM = 120;                       // rows per chunk: 120 KiB of activations per panel
constexpr int64_t kOutputBytes = int64_t{64} << 10;  // output tiles of a group of blocks (L2 is 512 KiB+)
constexpr int kTileM = 6;   // 12 accumulators + 2 panel vectors + 1 broadcast: 15 of 16 registers
constexpr int kTileN = 16;  // two vectors; a block is two such column halves

// y[r, 0:16] (+)= x[r, 0:kc] @ panel[0:kc, 0:16] for r < R; panel rows are BN floats apart.
template <int R>
inline void tile_kernel(const float* x, int64_t ldx, const float* panel, int64_t kc, float* y, int64_t ldy,
                        bool accumulate) {
  __m256 c[R][2];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) c[r][0] = c[r][1] = _mm256_setzero_ps();
#pragma GCC unroll 4
  for (int64_t kk = 0; kk < kc; ++kk) {
    const __m256 b0 = _mm256_load_ps(panel + kk * BN), b1 = _mm256_load_ps(panel + kk * BN + 8);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_broadcast_ss(x + r * ldx + kk);
      c[r][0] = _mm256_fmadd_ps(a, b0, c[r][0]);
      c[r][1] = _mm256_fmadd_ps(a, b1, c[r][1]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    if (accumulate) {
      c[r][0] = _mm256_add_ps(c[r][0], _mm256_loadu_ps(y + r * ldy));
      c[r][1] = _mm256_add_ps(c[r][1], _mm256_loadu_ps(y + r * ldy + 8));
    }
    _mm256_storeu_ps(y + r * ldy, c[r][0]);
    _mm256_storeu_ps(y + r * ldy + 8, c[r][1]);
  }
}

// Rows [0, R) of x times one block's panel, both column halves.
template <int R>
void tile_rows(const float* x, int64_t ldx, const float* panel, int64_t kc, float* y, int64_t ldy, bool accumulate) {
  for (int h = 0; h < BN / kTileN; ++h) tile_kernel<R>(x, ldx, panel + h * kTileN, kc, y + h * kTileN, ldy, accumulate);
}

using TileRows = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, bool);
constexpr TileRows kTileRows[kTileM + 1] = {nullptr,         tile_rows<1>, tile_rows<2>, tile_rows<3>,
                                            tile_rows<4>,    tile_rows<5>, tile_rows<6>};

template <bool kFull>
void panel_blocks(const Problem& p, const Table& t, int64_t block_begin, int64_t block_end, float* y, int64_t ldy) {
  alignas(64) float panel[kPanelK * BN];
  // Rows go in chunks and blocks in groups so that one chunk's activations for a panel of K rows
  // and the group's output tiles, which every panel adds to, stay in L2. Without the chunks and
  // groups, long prompts and wide layers stream them to memory and back once per panel (Llama-2
  // qkv at M = 256: 0.82x torch's GEMM; SmolLM2 at M = 2048: 0.8x).
  for (int64_t r0 = 0; r0 < p.m; r0 += kChunkM) {
    const int64_t r1 = r0 + kChunkM < p.m ? r0 + kChunkM : p.m;
    const int64_t group = (r1 - r0) * BN * 4 < kOutputBytes ? kOutputBytes / ((r1 - r0) * BN * 4) : 1;
    for (int64_t g0 = block_begin; g0 < block_end; g0 += group) {
      const int64_t g1 = g0 + group < block_end ? g0 + group : block_end;
      for (int64_t k0 = 0; k0 < p.k; k0 += kPanelK) {
        const int64_t kc = p.k - k0 < kPanelK ? p.k - k0 : kPanelK;
        for (int64_t b = g0; b < g1; ++b) {
          decode_panel<kFull>(p, t, b, k0, k0 + kc, panel);
          for (int64_t m0 = r0; m0 < r1; m0 += kTileM) {
            const int64_t rows = r1 - m0 < kTileM ? r1 - m0 : kTileM;
            kTileRows[rows](p.x + m0 * p.k + k0, p.k, panel, kc, y + m0 * ldy + b * BN, ldy, k0 > 0);
          }
        }
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

void gemm_panels_avx2(const Problem& p, int64_t block_begin, int64_t block_end, float* y, int64_t ldy) {
  const Table t = load_table(p.lut);
  if (t.full) {
    panel_blocks<true>(p, t, block_begin, block_end, y, ldy);
  } else {
    panel_blocks<false>(p, t, block_begin, block_end, y, ldy);
  }
}

}  // namespace daq_cpu

#pragma GCC pop_options
