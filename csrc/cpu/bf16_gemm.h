// bf16 x bf16 -> fp32 GEMM for the CPU attention kernels, on AVX512-BF16 dot products.
//
// Why our own: ATen exports no bf16 GEMM with an fp32 result on the CPU (at::mm of bf16 rounds
// its result to bf16, `mm.out_dtype` has no CPU kernel, cpublas::gemm(bf16 -> float) is not
// exported, cpublas::brgemm needs AMX, and MKL's cblas_gemm_bf16bf16f32 runs at fp32 speed on
// AMD). The attention kernels need fp32 results (logits, dP, and the fp32 accumulators of O, dQ,
// dK, dV), as flash-attention keeps them.
//
//   C[M x N] (fp32, row-major, ldc) = alpha · A · B (+ C when accumulate)
//   A: M x K bf16, row-major (lda elements), K even (callers zero-pad an odd K)
//   B: "pair-packed" (the VNNI layout of vdpbf16ps) in panels of 64 columns: word (p, n) holds
//      B[2p][n] in its low half and B[2p + 1][n] in its high half, and lies at
//      b[(n / 64) · panel_stride + p · 64 + n % 64]. A panel's rows are contiguous, so the
//      micro-kernel streams it without the cache-set conflicts of a power-of-two row stride;
//      columns past N in the last panel are zero.
// vdpbf16ps multiplies bf16 pairs exactly and adds them in fp32 (round to nearest even; the
// instruction treats bf16 denormal inputs as zero and flushes denormal results).
//
// Micro-kernel: a 6 x 64 block of C in 24 zmm accumulators, the K loop innermost; one k-pair is
// 4 loads of B, 6 broadcasts of A and 24 dot products. Blocks go n-major (a panel of B is reused
// by every row block). Ragged N: the last vector of a block is masked in the stores; ragged M:
// the row count is a template parameter (1..6).
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define ATTNSEG_HAVE_BF16_GEMM 1
#define ATTNSEG_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#else
#define ATTNSEG_HAVE_BF16_GEMM 0
#endif

#include "row_ops.h"

namespace attnseg::cpu {

// Whether this CPU executes vdpbf16ps (AVX512-BF16); without it the bf16 inputs take the fp32 path.
inline bool cpu_has_bf16_dot() {
#if ATTNSEG_HAVE_BF16_GEMM
  static const bool has = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  return has;
#else
  return false;
#endif
}

// The bits of float x rounded to the nearest bf16 (ties to even); NaN stays a (quiet) NaN.
inline uint32_t bf16_bits(float x) {
  const uint32_t u = __builtin_bit_cast(uint32_t, x);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return x != x ? ((u >> 16) | 0x40u) : rounded;
}

// dst[r][c] = bf16(src[r][c]) for c < cols, and dst[r][cols] = 0 when cols is odd (the zero
// pad of an even K). src: rows x cols fp32 (ld src_ld); dst: rows x round_up(cols, 2) bf16.
ATTNSEG_CLONES static void round_rows_to_bf16(const float* src, int64_t rows, int64_t cols, int64_t src_ld,
                                              uint16_t* dst, int64_t dst_ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* s = src + r * src_ld;
    uint16_t* d = dst + r * dst_ld;
    for (int64_t c = 0; c < cols; ++c) d[c] = static_cast<uint16_t>(bf16_bits(s[c]));
    if (cols & 1) d[cols] = 0;
  }
}

constexpr int64_t kPanel = 64;  // columns per panel of a pair-packed B operand

// Words of a pair-packed B operand with k_rows rows of K and n columns (panels zero-padded).
inline int64_t pair_packed_words(int64_t k_rows, int64_t n) {
  return ((k_rows + 1) / 2) * ((n + kPanel - 1) / kPanel) * kPanel;
}

// Pair-packs an fp32 matrix (rows x cols, ld src_ld) as the B operand of a GEMM whose K runs over
// its rows: word (p, c) = bf16(src[2p][c]) | bf16(src[2p + 1][c]) << 16, the missing row of an odd
// count and the columns past cols read as 0; panel stride ceil(rows / 2) · 64 words.
ATTNSEG_CLONES static void pack_row_pairs_bf16(const float* src, int64_t rows, int64_t cols, int64_t src_ld,
                                               uint32_t* dst) {
  const int64_t pairs = (rows + 1) / 2;
  for (int64_t c0 = 0; c0 < cols; c0 += kPanel) {
    const int64_t width = std::min(kPanel, cols - c0);
    uint32_t* panel = dst + (c0 / kPanel) * pairs * kPanel;
    for (int64_t p = 0; p < pairs; ++p) {
      const float* even = src + 2 * p * src_ld + c0;
      uint32_t* d = panel + p * kPanel;
      if (2 * p + 1 < rows) {
        const float* odd = even + src_ld;
        for (int64_t c = 0; c < width; ++c) d[c] = bf16_bits(even[c]) | (bf16_bits(odd[c]) << 16);
      } else {
        for (int64_t c = 0; c < width; ++c) d[c] = bf16_bits(even[c]);
      }
      for (int64_t c = width; c < kPanel; ++c) d[c] = 0;
    }
  }
}

#if ATTNSEG_HAVE_BF16_GEMM

constexpr int kGemmRows = 6;      // rows of C per micro-kernel block
constexpr int kGemmVectors = 4;   // 16-float vectors of C per block row: 64 columns

template <int ROWS, int VECTORS>
ATTNSEG_AVX512_BF16 void bf16_gemm_block(int64_t k_pairs, const uint32_t* a, int64_t lda_words, const uint32_t* b,
                                         float* c, int64_t ldc, __mmask16 last_mask, float alpha, bool accumulate) {
  __m512 acc[ROWS][VECTORS];
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < VECTORS; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < k_pairs; ++p) {
    const uint32_t* b_row = b + p * kPanel;
    __m512i bv[VECTORS];
    for (int v = 0; v < VECTORS; ++v) bv[v] = _mm512_loadu_si512(b_row + 16 * v);
    for (int r = 0; r < ROWS; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[r * lda_words + p]));
      for (int v = 0; v < VECTORS; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, (__m512bh)bv[v]);
    }
  }
  const __m512 alpha_v = _mm512_set1_ps(alpha);
  for (int r = 0; r < ROWS; ++r) {
    float* c_row = c + r * ldc;
    for (int v = 0; v < VECTORS; ++v) {
      const __mmask16 mask = v == VECTORS - 1 ? last_mask : __mmask16(0xFFFF);
      __m512 out = _mm512_mul_ps(acc[r][v], alpha_v);
      if (accumulate) out = _mm512_add_ps(out, _mm512_maskz_loadu_ps(mask, c_row + 16 * v));
      _mm512_mask_storeu_ps(c_row + 16 * v, mask, out);
    }
  }
}

using Bf16GemmBlock = void (*)(int64_t, const uint32_t*, int64_t, const uint32_t*, float*, int64_t, __mmask16, float,
                               bool);

template <int ROWS, int... V>
constexpr std::array<Bf16GemmBlock, sizeof...(V)> block_row(std::integer_sequence<int, V...>) {
  return {&bf16_gemm_block<ROWS, V + 1>...};
}
template <int... R>
constexpr std::array<std::array<Bf16GemmBlock, kGemmVectors>, sizeof...(R)> block_table(std::integer_sequence<int, R...>) {
  return {block_row<R + 1>(std::make_integer_sequence<int, kGemmVectors>())...};
}

// C = alpha · A · B (+ C): see the top of this file for the layouts. k is even.
// b_panel_stride: words between the panels of B.
inline void bf16_gemm(int64_t m, int64_t n, int64_t k, const c10::BFloat16* a, int64_t lda, const uint32_t* b,
                      int64_t b_panel_stride, float* c, int64_t ldc, float alpha, bool accumulate) {
  static constexpr auto blocks = block_table(std::make_integer_sequence<int, kGemmRows>());
  const auto* a_words = reinterpret_cast<const uint32_t*>(a);
  const int64_t k_pairs = k / 2, lda_words = lda / 2;
  static_assert(16 * kGemmVectors == kPanel, "a block of C spans one panel of B");
  for (int64_t n0 = 0; n0 < n; n0 += kPanel) {
    const int64_t cols = std::min<int64_t>(kPanel, n - n0);
    const uint32_t* panel = b + (n0 / kPanel) * b_panel_stride;
    const int vectors = static_cast<int>((cols + 15) / 16);
    const int last_cols = static_cast<int>(cols - 16 * (vectors - 1));
    const auto last_mask = static_cast<__mmask16>((1u << last_cols) - 1u);
    for (int64_t m0 = 0; m0 < m; m0 += kGemmRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kGemmRows, m - m0));
      blocks[rows - 1][vectors - 1](k_pairs, a_words + m0 * lda_words, lda_words, panel, c + m0 * ldc + n0, ldc,
                                    last_mask, alpha, accumulate);
    }
  }
}

#endif  // ATTNSEG_HAVE_BF16_GEMM

}  // namespace attnseg::cpu
