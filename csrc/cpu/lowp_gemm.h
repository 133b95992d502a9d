// Low-precision GEMMs with fp32 accumulation and fp32 results for the CPU attention kernels:
// bf16 (and, on CPUs with AMX-FP16, fp16) operands, as flash-attention computes on GPUs.
//
// Why not at::mm: ATen exports no bf16 GEMM with an fp32 result on the CPU (at::mm of bf16 rounds
// its result to bf16, `mm.out_dtype` has no CPU kernel, cpublas::gemm(bf16 -> float) is not
// exported, and MKL's cblas_gemm_bf16bf16f32 runs at fp32 speed on AMD). The attention kernels
// need fp32 results (logits, dP, and the fp32 accumulators of O, dQ, dK, dV).
//
// Two engines (LowpEngine), chosen per call by lowp_engine():
//   kBrgemm      ATen's batch-reduce GEMM (at::native::cpublas::brgemm, oneDNN's ukernel), where
//                oneDNN has its AMX kernel for the type (cpublas::could_pack: AMX-BF16 for bf16,
//                AMX-FP16 for fp16; Intel Sapphire Rapids and later).
//   kAvx512Bf16  our 6 x 64 vdpbf16ps micro-kernel below (bf16 only), on CPUs with AVX512-BF16 and
//                no AMX (AMD Zen 4/5, Intel Cooper Lake).
//   kNone        neither: the attention kernels compute bf16/fp16 inputs in fp32.
// ATTNSEG_CPU_LOWP_GEMM overrides the choice (tests, comparisons): auto (the rule above), brgemm,
// avx512_bf16 or fp32 (kNone); an engine the CPU cannot run is an error, not a silent fallback.
//
//   C[M x N] (fp32, row-major, ldc) = A · B (+ C when accumulate)
//   A: M x K of T, row-major (lda elements), K even (callers zero-pad an odd K)
//   B: "pair-packed" (the VNNI layout of vdpbf16ps and of AMX's B tiles) in panels of W columns:
//      word (p, n) holds B[2p][n] in its low half and B[2p + 1][n] in its high half, and lies at
//      b[(n / W) · panel_stride + p · W + n % W]; columns past N in the last panel are zero.
//      W = 64 for kAvx512Bf16: a panel's rows are contiguous, so the micro-kernel streams it
//      without the cache-set conflicts of a power-of-two row stride. For kBrgemm a panel is the
//      VNNI matrix brgemm reads with ld_b = W: W = N rounded up to 16, at most 256 (one panel
//      per 256-key tile; brgemm ran at 133 GFLOP/s with 64-column panels and 214 with one
//      256-column panel at M = 256, K = 64 on one Sapphire Rapids core).
// vdpbf16ps and AMX multiply bf16 pairs exactly and add them in fp32 (round to nearest even;
// bf16 denormal inputs are treated as zero and denormal results flushed).
//
// Micro-kernel (kAvx512Bf16): a 6 x 64 block of C in 24 zmm accumulators, the K loop innermost;
// one k-pair is 4 loads of B, 6 broadcasts of A and 24 dot products. Blocks go n-major (a panel
// of B is reused by every row block). Ragged N: the last vector of a block is masked in the
// stores; ragged M: the row count is a template parameter (1..6).
#pragma once

#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <string>
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

// Whether this CPU executes vdpbf16ps (AVX512-BF16).
inline bool cpu_has_bf16_dot() {
#if ATTNSEG_HAVE_BF16_GEMM
  static const bool has = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  return has;
#else
  return false;
#endif
}

enum class LowpEngine { kNone, kAvx512Bf16, kBrgemm };

// The engine for inputs of `dtype` (see the top of this file); kNone for other types.
inline LowpEngine lowp_engine(at::ScalarType dtype) {
  if (dtype != at::kBFloat16 && dtype != at::kHalf) return LowpEngine::kNone;
  const char* env = std::getenv("ATTNSEG_CPU_LOWP_GEMM");
  const std::string choice = env != nullptr && *env != '\0' ? env : "auto";
  const bool bf16 = dtype == at::kBFloat16;
  const bool amx = at::native::cpublas::could_pack(dtype);
  if (choice == "auto") {
    if (amx) return LowpEngine::kBrgemm;
    return bf16 && cpu_has_bf16_dot() ? LowpEngine::kAvx512Bf16 : LowpEngine::kNone;
  }
  if (choice == "fp32") return LowpEngine::kNone;
  if (choice == "brgemm") {
    TORCH_CHECK(amx, "ATTNSEG_CPU_LOWP_GEMM=brgemm: oneDNN has no ", bf16 ? "AMX-BF16" : "AMX-FP16",
                " GEMM on this CPU for ", dtype, " inputs; use auto or fp32");
    return LowpEngine::kBrgemm;
  }
  if (choice == "avx512_bf16") {
    if (!bf16) return LowpEngine::kNone;  // the micro-kernel is bf16 only: fp16 is computed in fp32
    TORCH_CHECK(cpu_has_bf16_dot(), "ATTNSEG_CPU_LOWP_GEMM=avx512_bf16: this CPU has no AVX512-BF16; use auto or fp32");
    return LowpEngine::kAvx512Bf16;
  }
  TORCH_CHECK(false, "ATTNSEG_CPU_LOWP_GEMM must be auto, brgemm, avx512_bf16 or fp32, got '", choice, "'");
}

// The bits of float x rounded to the nearest bf16 (ties to even); NaN stays a (quiet) NaN.
inline uint32_t bf16_bits(float x) {
  const uint32_t u = __builtin_bit_cast(uint32_t, x);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return x != x ? ((u >> 16) | 0x40u) : rounded;
}

// The same for fp16 (round to nearest even, overflow to ±inf, NaN kept).
inline uint32_t half_bits(float x) { return c10::Half(x).x; }

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

// The same rounding to fp16 (F16C's vcvtps2ph through c10::Half where the compiler uses it).
inline void round_rows_to_half(const float* src, int64_t rows, int64_t cols, int64_t src_ld, uint16_t* dst,
                               int64_t dst_ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* s = src + r * src_ld;
    uint16_t* d = dst + r * dst_ld;
    for (int64_t c = 0; c < cols; ++c) d[c] = static_cast<uint16_t>(half_bits(s[c]));
    if (cols & 1) d[cols] = 0;
  }
}

constexpr int64_t kPanel = 64;          // columns per panel for kAvx512Bf16
constexpr int64_t kBrgemmPanel = 256;   // the widest panel for kBrgemm

// Panel width of a pair-packed B operand with n columns for `engine` (see the top of this file).
inline int64_t panel_width(LowpEngine engine, int64_t n) {
  if (engine != LowpEngine::kBrgemm) return kPanel;
  return std::min(kBrgemmPanel, std::max<int64_t>(16, (n + 15) / 16 * 16));
}

// Words of a pair-packed B operand with k_rows rows of K and n columns in panels of `width`.
inline int64_t pair_packed_words(int64_t k_rows, int64_t n, int64_t width) {
  return ((k_rows + 1) / 2) * ((n + width - 1) / width) * width;
}

// A pair-packed B operand (or its part from an even row of K and a panel boundary on).
struct PackedRef {
  const uint32_t* words;
  int64_t panel_stride;  // words between panels
  int64_t width;         // columns per panel
};

// Pair-packs an fp32 matrix (rows x cols, ld src_ld) as the B operand of a GEMM whose K runs over
// its rows, rounding each element with `bits` (bf16_bits or half_bits): word (p, c) =
// bits(src[2p][c]) | bits(src[2p + 1][c]) << 16, the missing row of an odd count and the columns
// past cols read as 0, in panels of `width` columns with panel stride ceil(rows / 2) · width.
template <uint32_t (*bits)(float)>
ATTNSEG_CLONES static void pack_row_pairs(const float* src, int64_t rows, int64_t cols, int64_t src_ld,
                                          int64_t width, uint32_t* dst) {
  const int64_t pairs = (rows + 1) / 2;
  for (int64_t c0 = 0; c0 < cols; c0 += width) {
    const int64_t w = std::min(width, cols - c0);
    uint32_t* panel = dst + (c0 / width) * pairs * width;
    for (int64_t p = 0; p < pairs; ++p) {
      const float* even = src + 2 * p * src_ld + c0;
      uint32_t* d = panel + p * width;
      if (2 * p + 1 < rows) {
        const float* odd = even + src_ld;
        for (int64_t c = 0; c < w; ++c) d[c] = bits(even[c]) | (bits(odd[c]) << 16);
      } else {
        for (int64_t c = 0; c < w; ++c) d[c] = bits(even[c]);
      }
      for (int64_t c = w; c < width; ++c) d[c] = 0;
    }
  }
}

#if ATTNSEG_HAVE_BF16_GEMM

constexpr int kGemmRows = 6;      // rows of C per micro-kernel block
constexpr int kGemmVectors = 4;   // 16-float vectors of C per block row: 64 columns

template <int ROWS, int VECTORS>
ATTNSEG_AVX512_BF16 void bf16_gemm_block(int64_t k_pairs, const uint32_t* a, int64_t lda_words, const uint32_t* b,
                                         float* c, int64_t ldc, __mmask16 last_mask, bool accumulate) {
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
  for (int r = 0; r < ROWS; ++r) {
    float* c_row = c + r * ldc;
    for (int v = 0; v < VECTORS; ++v) {
      const __mmask16 mask = v == VECTORS - 1 ? last_mask : __mmask16(0xFFFF);
      __m512 out = acc[r][v];
      if (accumulate) out = _mm512_add_ps(out, _mm512_maskz_loadu_ps(mask, c_row + 16 * v));
      _mm512_mask_storeu_ps(c_row + 16 * v, mask, out);
    }
  }
}

using Bf16GemmBlock = void (*)(int64_t, const uint32_t*, int64_t, const uint32_t*, float*, int64_t, __mmask16, bool);

template <int ROWS, int... V>
constexpr std::array<Bf16GemmBlock, sizeof...(V)> block_row(std::integer_sequence<int, V...>) {
  return {&bf16_gemm_block<ROWS, V + 1>...};
}
template <int... R>
constexpr std::array<std::array<Bf16GemmBlock, kGemmVectors>, sizeof...(R)> block_table(std::integer_sequence<int, R...>) {
  return {block_row<R + 1>(std::make_integer_sequence<int, kGemmVectors>())...};
}

// kAvx512Bf16: C = A · B (+ C), B in 64-column panels.
inline void avx512_bf16_gemm(int64_t m, int64_t n, int64_t k, const c10::BFloat16* a, int64_t lda, const PackedRef& b,
                             float* c, int64_t ldc, bool accumulate) {
  static constexpr auto blocks = block_table(std::make_integer_sequence<int, kGemmRows>());
  TORCH_INTERNAL_ASSERT(b.width == kPanel, "the AVX512-BF16 micro-kernel reads 64-column panels");
  const auto* a_words = reinterpret_cast<const uint32_t*>(a);
  const int64_t k_pairs = k / 2, lda_words = lda / 2;
  static_assert(16 * kGemmVectors == kPanel, "a block of C spans one panel of B");
  for (int64_t n0 = 0; n0 < n; n0 += kPanel) {
    const int64_t cols = std::min<int64_t>(kPanel, n - n0);
    const uint32_t* panel = b.words + (n0 / kPanel) * b.panel_stride;
    const int vectors = static_cast<int>((cols + 15) / 16);
    const int last_cols = static_cast<int>(cols - 16 * (vectors - 1));
    const auto last_mask = static_cast<__mmask16>((1u << last_cols) - 1u);
    for (int64_t m0 = 0; m0 < m; m0 += kGemmRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kGemmRows, m - m0));
      blocks[rows - 1][vectors - 1](k_pairs, a_words + m0 * lda_words, lda_words, panel, c + m0 * ldc + n0, ldc,
                                    last_mask, accumulate);
    }
  }
}

#endif  // ATTNSEG_HAVE_BF16_GEMM

// The GEMMs of one attention call for element type T (c10::BFloat16 or c10::Half), on one engine
// (kAvx512Bf16 or kBrgemm), and the rounding of fp32 tiles to T that feeds them.
template <typename T>
struct LowpGemm {
  static_assert(std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>);
  LowpEngine engine;

  int64_t panel_width(int64_t n) const { return cpu::panel_width(engine, n); }

  // C = A · B (+ C): see the top of this file for the layouts.
  void operator()(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const PackedRef& b, float* c, int64_t ldc,
                  bool accumulate) const {
    if (m == 0 || n == 0) return;
    if (engine == LowpEngine::kBrgemm) {
      if (k == 0) {  // an empty product (E or Ev = 0): brgemm refuses K = 0
        if (!accumulate)
          for (int64_t r = 0; r < m; ++r) std::fill(c + r * ldc, c + r * ldc + n, 0.0f);
        return;
      }
      for (int64_t n0 = 0; n0 < n; n0 += b.width) {
        const auto* panel = reinterpret_cast<const T*>(b.words + (n0 / b.width) * b.panel_stride);
        at::native::cpublas::brgemm(m, std::min(b.width, n - n0), k, lda, b.width, ldc, accumulate, a, panel, c + n0);
      }
      return;
    }
#if ATTNSEG_HAVE_BF16_GEMM
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (engine == LowpEngine::kAvx512Bf16) return avx512_bf16_gemm(m, n, k, a, lda, b, c, ldc, accumulate);
    }
#endif
    TORCH_INTERNAL_ASSERT(false, "no low-precision GEMM engine for this type");
  }

  // After a thread's last GEMM of a task: brgemm leaves AMX tiles configured until released.
  void release() const {
    if (engine == LowpEngine::kBrgemm) at::native::cpublas::brgemm_release();
  }

  // dst = src rounded to T row by row, K padded to even (round_rows_to_bf16).
  void round_rows(const float* src, int64_t rows, int64_t cols, int64_t src_ld, T* dst, int64_t dst_ld) const {
    auto* bits = reinterpret_cast<uint16_t*>(dst);
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      round_rows_to_bf16(src, rows, cols, src_ld, bits, dst_ld);
    } else {
      round_rows_to_half(src, rows, cols, src_ld, bits, dst_ld);
    }
  }

  // dst = src pair-packed over its rows in this engine's panels, rounded to T (pack_row_pairs).
  PackedRef pack_pairs(const float* src, int64_t rows, int64_t cols, int64_t src_ld, uint32_t* dst) const {
    const int64_t width = panel_width(cols);
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      pack_row_pairs<bf16_bits>(src, rows, cols, src_ld, width, dst);
    } else {
      pack_row_pairs<half_bits>(src, rows, cols, src_ld, width, dst);
    }
    return {dst, ((rows + 1) / 2) * width, width};
  }
};

}  // namespace attnseg::cpu
