// fp32 GEMMs and the softmax passes of the CPU attention kernels, on AVX-512 (FMA) or on AVX2 + FMA
// (the same layouts and block order; F32Ops picks the set once per op call).
//
// Why not ATen's GEMM per tile (the fp32 kernel before this one): MKL's sgemm packs its operands
// on every call, and the attention tiles are small and oddly shaped (K = E = 64 for S, a
// transposed V for O += P V), so the tile GEMMs ran at 0.86-0.88 of torch.mm's 2048³ rate. A
// 6 x 64 micro-kernel that reads the operands where they already lie ran as fast as torch.mm on
// the same shapes (one thread of an Intel Xeon with AMX: 176-187 GFLOP/s against torch.mm's
// 167-181 in the same runs; 2 KiB-strided B rows 0.95 of that, 36 KiB-strided 0.37: hence panels).
//
//   C[M x N] (fp32) = A · B (+ C when accumulate), K the reduction
//   A(m, k) = a[m · row_stride + k · k_stride]: any strides (broadcast one element at a time);
//            unit k_stride with rows of a channel-first tensor is the fast case. With a
//            panel_stride, A is itself laid out in 64-column panels (a C written for the next
//            product): A(m, k) = a[(k / 64) · panel_stride + m · row_stride + k % 64].
//   B(k, n) = b[(n / 64) · panel_stride + k · 64 + n % 64]: panels of 64 columns whose rows are
//            contiguous (the micro-kernel streams a panel without cache-set conflicts); columns
//            past N in the last panel must be readable: they only feed lanes of C that are masked
//            off (packed operands are zero-padded; a C written as panels leaves them stale).
//   C(m, n) = c[(n / 64) · panel_stride + m · ld + n % 64]: a row-major C is panel_stride = 64;
//            a C written as the B panels of the next product is panel_stride = rows · 64, ld = 64.
// Micro-kernel: a 6 x 64 block of C in 24 zmm accumulators, the K loop innermost; one k is 4
// loads of B, 6 broadcasts of A and 24 FMAs (the order of the blocks: see f32_gemm). Ragged N:
// masked loads and stores of C; ragged M: the row count is a template parameter (1..6).
// AVX2 (16 ymm registers): the same 6 x 64 block as four 6 x 16 strips, one after the other, each
// in 12 ymm accumulators (one k: 2 loads of B, 6 broadcasts, 12 FMAs); the block's 6 rows of A
// are read once per strip, from L1 after the first. Strips wholly past N are skipped.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <utility>

#include "row_ops.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define ATTNSEG_HAVE_F32_GEMM 1
#define ATTNSEG_AVX512F __attribute__((target("avx512f,avx512dq,fma")))
#define ATTNSEG_AVX2_FMA __attribute__((target("avx2,fma")))
#else
#define ATTNSEG_HAVE_F32_GEMM 0
#endif

namespace attnseg::cpu {

// Whether this CPU runs the AVX-512 kernels below.
inline bool cpu_has_avx512f() {
#if ATTNSEG_HAVE_F32_GEMM
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
  return has;
#else
  return false;
#endif
}

// Whether this CPU runs the AVX2 kernels below (AVX2 and FMA: Intel since Haswell, AMD since Zen).
inline bool cpu_has_avx2_fma() {
#if ATTNSEG_HAVE_F32_GEMM
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

enum class F32Kernel { kAten, kAvx512, kAvx2 };

// Which fp32 kernels run (forward and backward): ours (this file) when v is channel-first
// (v.stride(1) == 1, or Nk = 1: its transpose is the A operand of Oᵀ += Vᵀ Pᵀ without a copy), on
// AVX-512F where the CPU has it, else on AVX2 + FMA; else kAten (ATen's GEMM per tile).
// ATTNSEG_CPU_F32_KERNEL overrides it: auto, avx512 or avx2 (any layout; what the kernels need is
// copied) or aten. A kernel this CPU cannot run is an error, not a silent fallback.
inline F32Kernel f32_kernel(bool v_channel_first) {
  const char* env = std::getenv("ATTNSEG_CPU_F32_KERNEL");
  const std::string choice = env != nullptr && *env != '\0' ? env : "auto";
  if (choice == "auto") {
    if (!v_channel_first) return F32Kernel::kAten;
    return cpu_has_avx512f() ? F32Kernel::kAvx512 : cpu_has_avx2_fma() ? F32Kernel::kAvx2 : F32Kernel::kAten;
  }
  if (choice == "aten") return F32Kernel::kAten;
  if (choice == "avx512") {
    TORCH_CHECK(cpu_has_avx512f(), "ATTNSEG_CPU_F32_KERNEL=avx512: this CPU has no AVX-512F; use auto, avx2 or aten");
    return F32Kernel::kAvx512;
  }
  if (choice == "avx2") {
    TORCH_CHECK(cpu_has_avx2_fma(), "ATTNSEG_CPU_F32_KERNEL=avx2: this CPU has no AVX2 with FMA; use auto or aten");
    return F32Kernel::kAvx2;
  }
  TORCH_CHECK(false, "ATTNSEG_CPU_F32_KERNEL must be auto, avx512, avx2 or aten, got '", choice, "'");
}

constexpr int64_t kF32Panel = 64;  // columns per B (and panel-laid C) panel
constexpr int kF32Rows = 6;        // rows of C per micro-kernel block

struct F32A {
  const float* ptr;
  int64_t row_stride, k_stride;
  int64_t panel_stride = 0;  // 0: A is not in panels
};
struct F32B {
  const float* ptr;
  int64_t panel_stride;
};
struct F32C {
  float* ptr;
  int64_t panel_stride, ld;
};


// dst (row-major, ld dst_ld) = the rows x cols matrix src(r, c) = src[r · rs + c · cs], in 16 x 16
// blocks so that a transposing copy reads and writes whole cache lines.
template <typename T>
inline void copy_2d(const T* src, int64_t rs, int64_t cs, int64_t rows, int64_t cols, T* dst, int64_t dst_ld) {
  constexpr int64_t kTile = 16;
  if (cs == 1) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) dst[r * dst_ld + c] = src[r * rs + c];
    return;
  }
  // A transposing copy, in 16 x 16 tiles, with its inner loop along whichever side has the farther
  // lines (src's columns, cs apart, or dst's rows, dst_ld apart), so that each of those lines is
  // read or written whole at once, and the tiles in an order that walks 16 of them at a time from
  // end to end: 16 sequential streams. The strides here are often multiples of 4 KiB (a
  // channel-first tensor with N a multiple of 1,024), so lines touched a few at a time across many
  // such rows alias in the caches and outrun the prefetchers: the backward's chunk layouts ran at
  // ~1 GB/s in row-tile order, and a channel-first dQ written an element at a time at ~15 ns each.
  if (cs >= dst_ld) {
    for (int64_t c0 = 0; c0 < cols; c0 += kTile)
      for (int64_t r0 = 0; r0 < rows; r0 += kTile)
        for (int64_t c = c0; c < std::min(cols, c0 + kTile); ++c)
          for (int64_t r = r0; r < std::min(rows, r0 + kTile); ++r) dst[r * dst_ld + c] = src[r * rs + c * cs];
  } else {
    for (int64_t r0 = 0; r0 < rows; r0 += kTile)
      for (int64_t c0 = 0; c0 < cols; c0 += kTile)
        for (int64_t r = r0; r < std::min(rows, r0 + kTile); ++r)
          for (int64_t c = c0; c < std::min(cols, c0 + kTile); ++c) dst[r * dst_ld + c] = src[r * rs + c * cs];
  }
}

// The B-operand panels of the rows x cols matrix src(r, c) = src[r · rs + c · cs] (K = rows):
// dst[(c / 64) · panel_stride + r · 64 + c % 64], columns past cols zero; panel_stride defaults to
// rows · 64 (a slice of rows can be packed into a larger operand with that operand's stride).
inline void pack_panels(const float* src, int64_t rs, int64_t cs, int64_t rows, int64_t cols, float* dst,
                        int64_t panel_stride = -1) {
  if (panel_stride < 0) panel_stride = rows * kF32Panel;
  for (int64_t c0 = 0; c0 < cols; c0 += kF32Panel) {
    const int64_t w = std::min(kF32Panel, cols - c0);
    float* panel = dst + (c0 / kF32Panel) * panel_stride;
    copy_2d(src + c0 * cs, rs, cs, rows, w, panel, kF32Panel);
    if (w < kF32Panel)
      for (int64_t r = 0; r < rows; ++r) std::fill(panel + r * kF32Panel + w, panel + (r + 1) * kF32Panel, 0.0f);
  }
}

#if ATTNSEG_HAVE_F32_GEMM
// GCC 12 warns inside its own avx512fintrin.h that _mm512_undefined_ps() (`__m512 __Y = __Y;`,
// the ignored pass-through of unmasked max/min/roundscale) "may be used uninitialized".
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

template <int ROWS>
ATTNSEG_AVX512F void f32_gemm_block(int64_t k, const float* a, int64_t a_row, int64_t a_k, int64_t a_panel,
                                    const float* b, float* c, int64_t ldc, uint64_t cols_mask, bool accumulate,
                                    const float* c_scale) {
  __m512 acc[ROWS][4];
  for (int r = 0; r < ROWS; ++r) {
    for (int v = 0; v < 4; ++v) {
      const auto mask = static_cast<__mmask16>(cols_mask >> (16 * v));
      acc[r][v] = accumulate ? _mm512_maskz_loadu_ps(mask, c + r * ldc + 16 * v) : _mm512_setzero_ps();
      if (c_scale != nullptr) acc[r][v] = _mm512_mul_ps(acc[r][v], _mm512_maskz_loadu_ps(mask, c_scale + 16 * v));
    }
  }
  // A in panels: the K loop runs one 64-wide panel of A at a time.
  const int64_t k_chunk = a_panel != 0 ? kF32Panel : k;
  for (int64_t k0 = 0; k0 < k; k0 += k_chunk) {
    const float* a_chunk = a_panel != 0 ? a + (k0 / kF32Panel) * a_panel : a;
    const float* b_chunk = b + k0 * kF32Panel;
    const int64_t kk = std::min(k_chunk, k - k0);
    for (int64_t p = 0; p < kk; ++p) {
      const float* b_row = b_chunk + p * kF32Panel;
      const __m512 b0 = _mm512_loadu_ps(b_row), b1 = _mm512_loadu_ps(b_row + 16), b2 = _mm512_loadu_ps(b_row + 32),
                   b3 = _mm512_loadu_ps(b_row + 48);
      const float* a_col = a_chunk + p * a_k;
      for (int r = 0; r < ROWS; ++r) {
        const __m512 av = _mm512_set1_ps(a_col[r * a_row]);
        acc[r][0] = _mm512_fmadd_ps(av, b0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(av, b1, acc[r][1]);
        acc[r][2] = _mm512_fmadd_ps(av, b2, acc[r][2]);
        acc[r][3] = _mm512_fmadd_ps(av, b3, acc[r][3]);
      }
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < 4; ++v)
      _mm512_mask_storeu_ps(c + r * ldc + 16 * v, static_cast<__mmask16>(cols_mask >> (16 * v)), acc[r][v]);
}

// exp(x) for 16 floats: the same contract as exp_poly (row_ops.h): Cody-Waite reduction
// x = n·ln2 + r, exp(r) by its degree-6 polynomial, 2^n applied by vscalefps. exp(-inf) = 0, NaN
// stays NaN, x < -87.3 gives 0 (no denormals), x > 88.37 gives +inf.
ATTNSEG_AVX512F inline __m512 exp16(__m512 x) {
  const __m512 hi = _mm512_set1_ps(ExpPoly::kHi), lo = _mm512_set1_ps(ExpPoly::kLo);
  // min/max return their second operand when either is NaN: a NaN x passes through.
  const __m512 xc = _mm512_max_ps(lo, _mm512_min_ps(hi, x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(ExpPoly::kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(ExpPoly::kLn2Hi), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(ExpPoly::kLn2Lo), r);
  __m512 p = _mm512_set1_ps(ExpPoly::kQ[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(ExpPoly::kQ[i]));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  __m512 y = _mm512_scalef_ps(p, n);
  y = _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ), _mm512_setzero_ps());
  return _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask(x, hi, _CMP_GT_OQ), _mm512_set1_ps(std::numeric_limits<float>::infinity()));
}

// The online-softmax step of the forward on a score tile laid out as Sᵀ panels (keys x 64 queries
// per panel, panel stride keys · 64, `panels` of them), in place: scores in, exp(s·scale − m_new)
// out, column by column (one query per column), with the running column max and sum; alpha[c] =
// e^(m_old − m_new) is the factor the output column must be multiplied by. The semantics of
// online_softmax_rows (attention.cpp): a NaN logit poisons its query for good, an all -inf column
// keeps shift 0 so that exp never sees (-inf) - (-inf).
ATTNSEG_AVX512F inline void column_online_softmax(float* tile, int64_t keys, int64_t panels, float scale_f,
                                                  float* col_max, float* col_sum, float* alpha) {
  const __m512 scale = _mm512_set1_ps(scale_f), neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t p = 0; p < panels; ++p) {
    float* panel = tile + p * keys * kF32Panel;
    __m512 mx[4] = {neg_inf, neg_inf, neg_inf, neg_inf};
    __mmask16 nan[4] = {0, 0, 0, 0};
    for (int64_t r = 0; r < keys; ++r) {
      for (int v = 0; v < 4; ++v) {
        const __m512 s = _mm512_mul_ps(_mm512_loadu_ps(panel + r * kF32Panel + 16 * v), scale);
        nan[v] |= _mm512_cmp_ps_mask(s, s, _CMP_UNORD_Q);
        mx[v] = _mm512_max_ps(mx[v], s);
      }
    }
    __m512 shift[4], sum[4];
    for (int v = 0; v < 4; ++v) {
      const int64_t c = p * kF32Panel + 16 * v;
      const __m512 m_old = _mm512_loadu_ps(col_max + c);
      // m_new = NaN where the block holds one, else std::max(m_old, block max), which keeps a NaN m_old
      __m512 m_new = _mm512_mask_mov_ps(m_old, _mm512_cmp_ps_mask(m_old, mx[v], _CMP_LT_OQ), mx[v]);
      m_new = _mm512_mask_mov_ps(m_new, nan[v], _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN()));
      shift[v] = _mm512_mask_mov_ps(m_new, _mm512_cmp_ps_mask(m_new, neg_inf, _CMP_EQ_OQ), _mm512_setzero_ps());
      _mm512_storeu_ps(alpha + c, exp16(_mm512_sub_ps(m_old, shift[v])));
      _mm512_storeu_ps(col_max + c, m_new);
      sum[v] = _mm512_setzero_ps();
    }
    for (int64_t r = 0; r < keys; ++r) {
      for (int v = 0; v < 4; ++v) {
        float* s = panel + r * kF32Panel + 16 * v;
        const __m512 e = exp16(_mm512_fmsub_ps(_mm512_loadu_ps(s), scale, shift[v]));
        _mm512_storeu_ps(s, e);
        sum[v] = _mm512_add_ps(sum[v], e);
      }
    }
    for (int v = 0; v < 4; ++v) {
      const int64_t c = p * kF32Panel + 16 * v;
      _mm512_storeu_ps(col_sum + c, _mm512_fmadd_ps(_mm512_loadu_ps(col_sum + c), _mm512_loadu_ps(alpha + c), sum[v]));
    }
  }
}

// The backward's P = exp(S·scale − lse) in place on a tile of `panels` 64-key panels of `rows`
// query rows each (panel stride rows · 64), whole panels: the pad columns past the keys hold stale
// values, any of them inf or NaN, which only masked-off lanes of the next products read. A row whose lse is +inf held a +inf logit: NaN throughout, as
// recompute_probabilities (row_ops.h).
ATTNSEG_AVX512F inline void recompute_probabilities_panels(float* tile, int64_t rows, int64_t panels, float scale_f,
                                                           const float* lse) {
  const __m512 scale = _mm512_set1_ps(scale_f);
  for (int64_t p = 0; p < panels; ++p) {
    for (int64_t r = 0; r < rows; ++r) {
      float* row = tile + (p * rows + r) * kF32Panel;
      if (lse[r] == std::numeric_limits<float>::infinity()) {
        std::fill(row, row + kF32Panel, std::numeric_limits<float>::quiet_NaN());
        continue;
      }
      const __m512 shift = _mm512_set1_ps(lse[r]);
      for (int v = 0; v < 4; ++v)
        _mm512_storeu_ps(row + 16 * v, exp16(_mm512_fmsub_ps(_mm512_loadu_ps(row + 16 * v), scale, shift)));
    }
  }
}

// dS = P ∘ (dP − delta) · scale, in place over dP, on tiles laid out as above.
ATTNSEG_AVX512F inline void softmax_grad_panels(const float* p_tile, float* dp_tile, int64_t rows, int64_t panels,
                                                const float* delta, float scale_f) {
  const __m512 scale = _mm512_set1_ps(scale_f);
  for (int64_t p = 0; p < panels; ++p) {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t at = (p * rows + r) * kF32Panel;
      const __m512 d = _mm512_set1_ps(delta[r]);
      for (int v = 0; v < 4; ++v) {
        const __m512 pv = _mm512_mul_ps(_mm512_loadu_ps(p_tile + at + 16 * v), scale);
        _mm512_storeu_ps(dp_tile + at + 16 * v, _mm512_mul_ps(pv, _mm512_sub_ps(_mm512_loadu_ps(dp_tile + at + 16 * v), d)));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// AVX2 + FMA: the micro-kernel in 6 x 16 strips (see the top of this file) and the same passes
// with the semantics of the AVX-512 ones above.

// The lanes of 8 columns whose bits are set in `bits` (bit i: column i), as a maskload/maskstore mask.
ATTNSEG_AVX2_FMA inline __m256i lanes8(uint32_t bits) {
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits)), bit), bit);
}

// 8 floats at p, or only the lanes of `mask` (the others 0) unless `full`.
ATTNSEG_AVX2_FMA inline __m256 load8(const float* p, bool full, __m256i mask) {
  return full ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, mask);
}

template <int ROWS>
ATTNSEG_AVX2_FMA void f32_gemm_block_avx2(int64_t k, const float* a, int64_t a_row, int64_t a_k, int64_t a_panel,
                                          const float* b, float* c, int64_t ldc, uint64_t cols_mask, bool accumulate,
                                          const float* c_scale) {
  const int64_t k_chunk = a_panel != 0 ? kF32Panel : k;
  for (int s = 0; s < 4; ++s) {
    const auto strip = static_cast<uint32_t>((cols_mask >> (16 * s)) & 0xffff);
    if (strip == 0) break;  // cols_mask is a prefix: the strips after this one are past N too
    const bool full = strip == 0xffff;
    const __m256i mask[2] = {lanes8(strip & 0xff), lanes8(strip >> 8)};
    float* c_strip = c + 16 * s;
    __m256 acc[ROWS][2];
    for (int r = 0; r < ROWS; ++r) {
      for (int h = 0; h < 2; ++h) {
        acc[r][h] = accumulate ? load8(c_strip + r * ldc + 8 * h, full, mask[h]) : _mm256_setzero_ps();
        if (c_scale != nullptr) acc[r][h] = _mm256_mul_ps(acc[r][h], load8(c_scale + 16 * s + 8 * h, full, mask[h]));
      }
    }
    for (int64_t k0 = 0; k0 < k; k0 += k_chunk) {
      const float* a_chunk = a_panel != 0 ? a + (k0 / kF32Panel) * a_panel : a;
      const float* b_chunk = b + k0 * kF32Panel + 16 * s;
      const int64_t kk = std::min(k_chunk, k - k0);
      for (int64_t p = 0; p < kk; ++p) {
        const float* b_row = b_chunk + p * kF32Panel;
        const __m256 b0 = _mm256_loadu_ps(b_row), b1 = _mm256_loadu_ps(b_row + 8);
        const float* a_col = a_chunk + p * a_k;
        for (int r = 0; r < ROWS; ++r) {
          const __m256 av = _mm256_broadcast_ss(a_col + r * a_row);
          acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
          acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
        }
      }
    }
    for (int r = 0; r < ROWS; ++r) {
      for (int h = 0; h < 2; ++h) {
        float* out = c_strip + r * ldc + 8 * h;
        if (full) {
          _mm256_storeu_ps(out, acc[r][h]);
        } else {
          _mm256_maskstore_ps(out, mask[h], acc[r][h]);
        }
      }
    }
  }
}

// exp(x) for V vectors of 8 floats, in place: exp16's computation (and exp_poly's contract) in
// AVX2, 2^n put into the exponent bits. Each step is applied to all V vectors before the next, so
// that the out-of-order core sees V independent chains: one exp8's chain is ~60 cycles long, and on
// an AMD EPYC of the first generation (Zen) a single chain at a time ran the backward's P pass at
// 1.8 ns an element on one core, four at a time at 1.6 (GCC's vectorisation of exp_poly: 2.0;
// Estrin's order for the polynomial, one at a time: 1.7). Bitwise the same results for any V.
template <int V>
ATTNSEG_AVX2_FMA inline void exp8(__m256 (&x)[V]) {
  const __m256 hi = _mm256_set1_ps(ExpPoly::kHi), lo = _mm256_set1_ps(ExpPoly::kLo);
  __m256 n[V], r[V], p[V];
  // min/max return their second operand when either is NaN: a NaN x passes through (and, as n,
  // converts to the integer 0x80000000, whose exponent bits make 2^n = 1: NaN · 1).
  for (int v = 0; v < V; ++v) r[v] = _mm256_max_ps(lo, _mm256_min_ps(hi, x[v]));
  for (int v = 0; v < V; ++v)
    n[v] = _mm256_round_ps(_mm256_mul_ps(r[v], _mm256_set1_ps(ExpPoly::kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  for (int v = 0; v < V; ++v) r[v] = _mm256_fnmadd_ps(n[v], _mm256_set1_ps(ExpPoly::kLn2Hi), r[v]);
  for (int v = 0; v < V; ++v) r[v] = _mm256_fnmadd_ps(n[v], _mm256_set1_ps(ExpPoly::kLn2Lo), r[v]);
  for (int v = 0; v < V; ++v) p[v] = _mm256_set1_ps(ExpPoly::kQ[0]);
  for (int i = 1; i < 6; ++i)
    for (int v = 0; v < V; ++v) p[v] = _mm256_fmadd_ps(p[v], r[v], _mm256_set1_ps(ExpPoly::kQ[i]));
  for (int v = 0; v < V; ++v)
    p[v] = _mm256_fmadd_ps(p[v], _mm256_mul_ps(r[v], r[v]), _mm256_add_ps(r[v], _mm256_set1_ps(1.0f)));
  for (int v = 0; v < V; ++v) {
    const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n[v]), _mm256_set1_epi32(127)), 23);
    p[v] = _mm256_mul_ps(p[v], _mm256_castsi256_ps(two_n));
  }
  for (int v = 0; v < V; ++v) {
    p[v] = _mm256_andnot_ps(_mm256_cmp_ps(x[v], lo, _CMP_LT_OQ), p[v]);
    x[v] = _mm256_blendv_ps(p[v], _mm256_set1_ps(std::numeric_limits<float>::infinity()),
                            _mm256_cmp_ps(x[v], hi, _CMP_GT_OQ));
  }
}

// column_online_softmax on AVX2, in two halves of 32 columns per panel (4 ymm of maxima and 4 of
// NaN flags stay in registers).
ATTNSEG_AVX2_FMA inline void column_online_softmax_avx2(float* tile, int64_t keys, int64_t panels, float scale_f,
                                                        float* col_max, float* col_sum, float* alpha) {
  const __m256 scale = _mm256_set1_ps(scale_f), neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  constexpr int kHalf = 32;
  for (int64_t p = 0; p < panels; ++p) {
    for (int h = 0; h < kF32Panel / kHalf; ++h) {
      float* cols = tile + p * keys * kF32Panel + h * kHalf;
      __m256 mx[4] = {neg_inf, neg_inf, neg_inf, neg_inf};
      __m256 nan[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (int64_t r = 0; r < keys; ++r) {
        for (int v = 0; v < 4; ++v) {
          const __m256 s = _mm256_mul_ps(_mm256_loadu_ps(cols + r * kF32Panel + 8 * v), scale);
          nan[v] = _mm256_or_ps(nan[v], _mm256_cmp_ps(s, s, _CMP_UNORD_Q));
          mx[v] = _mm256_max_ps(mx[v], s);
        }
      }
      __m256 shift[4], sum[4];
      for (int v = 0; v < 4; ++v) {
        const int64_t c = p * kF32Panel + h * kHalf + 8 * v;
        const __m256 m_old = _mm256_loadu_ps(col_max + c);
        // m_new = NaN where the block holds one, else std::max(m_old, block max), which keeps a NaN m_old
        __m256 m_new = _mm256_blendv_ps(m_old, mx[v], _mm256_cmp_ps(m_old, mx[v], _CMP_LT_OQ));
        m_new = _mm256_blendv_ps(m_new, _mm256_set1_ps(std::numeric_limits<float>::quiet_NaN()), nan[v]);
        shift[v] = _mm256_andnot_ps(_mm256_cmp_ps(m_new, neg_inf, _CMP_EQ_OQ), m_new);
        __m256 a[1] = {_mm256_sub_ps(m_old, shift[v])};
        exp8(a);
        _mm256_storeu_ps(alpha + c, a[0]);
        _mm256_storeu_ps(col_max + c, m_new);
        sum[v] = _mm256_setzero_ps();
      }
      for (int64_t r = 0; r < keys; ++r) {
        float* s = cols + r * kF32Panel;
        __m256 e[4];
        for (int v = 0; v < 4; ++v) e[v] = _mm256_fmsub_ps(_mm256_loadu_ps(s + 8 * v), scale, shift[v]);
        exp8(e);
        for (int v = 0; v < 4; ++v) {
          _mm256_storeu_ps(s + 8 * v, e[v]);
          sum[v] = _mm256_add_ps(sum[v], e[v]);
        }
      }
      for (int v = 0; v < 4; ++v) {
        const int64_t c = p * kF32Panel + h * kHalf + 8 * v;
        _mm256_storeu_ps(col_sum + c, _mm256_fmadd_ps(_mm256_loadu_ps(col_sum + c), _mm256_loadu_ps(alpha + c), sum[v]));
      }
    }
  }
}

// recompute_probabilities_panels on AVX2.
ATTNSEG_AVX2_FMA inline void recompute_probabilities_panels_avx2(float* tile, int64_t rows, int64_t panels,
                                                                 float scale_f, const float* lse) {
  const __m256 scale = _mm256_set1_ps(scale_f);
  for (int64_t p = 0; p < panels; ++p) {
    for (int64_t r = 0; r < rows; ++r) {
      float* row = tile + (p * rows + r) * kF32Panel;
      if (lse[r] == std::numeric_limits<float>::infinity()) {
        std::fill(row, row + kF32Panel, std::numeric_limits<float>::quiet_NaN());
        continue;
      }
      const __m256 shift = _mm256_set1_ps(lse[r]);
      for (int g = 0; g < kF32Panel / 8; g += 4) {
        __m256 x[4];
        for (int v = 0; v < 4; ++v) x[v] = _mm256_fmsub_ps(_mm256_loadu_ps(row + 8 * (g + v)), scale, shift);
        exp8(x);
        for (int v = 0; v < 4; ++v) _mm256_storeu_ps(row + 8 * (g + v), x[v]);
      }
    }
  }
}

// softmax_grad_panels on AVX2.
ATTNSEG_AVX2_FMA inline void softmax_grad_panels_avx2(const float* p_tile, float* dp_tile, int64_t rows, int64_t panels,
                                                      const float* delta, float scale_f) {
  const __m256 scale = _mm256_set1_ps(scale_f);
  for (int64_t p = 0; p < panels; ++p) {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t at = (p * rows + r) * kF32Panel;
      const __m256 d = _mm256_set1_ps(delta[r]);
      for (int v = 0; v < kF32Panel / 8; ++v) {
        const __m256 pv = _mm256_mul_ps(_mm256_loadu_ps(p_tile + at + 8 * v), scale);
        _mm256_storeu_ps(dp_tile + at + 8 * v, _mm256_mul_ps(pv, _mm256_sub_ps(_mm256_loadu_ps(dp_tile + at + 8 * v), d)));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// One ISA's micro-kernel (by row count 1..6) and passes, picked once per op call (f32_ops).
using F32GemmBlock = void (*)(int64_t, const float*, int64_t, int64_t, int64_t, const float*, float*, int64_t, uint64_t,
                              bool, const float*);
struct F32Ops {
  std::array<F32GemmBlock, kF32Rows> blocks;
  void (*column_online_softmax)(float* tile, int64_t keys, int64_t panels, float scale, float* col_max,
                                float* col_sum, float* alpha);
  void (*recompute_probabilities_panels)(float* tile, int64_t rows, int64_t panels, float scale, const float* lse);
  void (*softmax_grad_panels)(const float* p_tile, float* dp_tile, int64_t rows, int64_t panels, const float* delta,
                              float scale);
  // Queries per block of the fp32 backward (its P and dS tiles are bwd_rows x 512 keys). AVX-512:
  // 256 (the two tiles, 512 KiB each, stay in the 2 MiB L2 of the Xeons it was tuned on). AVX2: 512,
  // for the small L2 of AVX2-only CPUs (256-512 KiB, where neither size fits): half the passes over
  // dVᵀ's and dKᵀ's accumulators; on a first-generation EPYC (Zen, 512 KiB L2) the backward ran
  // 2 % faster than with 256 (1 and 2 threads) and 7 % faster than with 128.
  int64_t bwd_rows;
  // The backward's dP = dO_i V_jᵀ with B's panels outer (f32_gemm's panels_outer). Its B, V_jᵀ's
  // panels (1 MiB at Ev = 512), stays in a 2 MiB L2 (AVX-512: false, f32_gemm's order by K); in a
  // 512 KiB one it streamed from L3 once per 6 rows of A, so AVX2 (true) keeps each 128 KiB panel
  // in L2 while dO's rows (contiguous) stream past it: on a first-generation EPYC the backward ran
  // 3 % faster on 2 threads (2 % on one).
  bool dp_panels_outer;
};

template <int... R>
constexpr std::array<F32GemmBlock, sizeof...(R)> avx512_blocks(std::integer_sequence<int, R...>) {
  return {&f32_gemm_block<R + 1>...};
}
template <int... R>
constexpr std::array<F32GemmBlock, sizeof...(R)> avx2_blocks(std::integer_sequence<int, R...>) {
  return {&f32_gemm_block_avx2<R + 1>...};
}

// kernel: kAvx512 or kAvx2 (what f32_kernel() chose).
inline const F32Ops& f32_ops(F32Kernel kernel) {
  TORCH_INTERNAL_ASSERT(kernel == F32Kernel::kAvx512 || kernel == F32Kernel::kAvx2);
  static const F32Ops avx512{avx512_blocks(std::make_integer_sequence<int, kF32Rows>()), &column_online_softmax,
                             &recompute_probabilities_panels, &softmax_grad_panels, /*bwd_rows=*/256,
                             /*dp_panels_outer=*/false};
  static const F32Ops avx2{avx2_blocks(std::make_integer_sequence<int, kF32Rows>()), &column_online_softmax_avx2,
                           &recompute_probabilities_panels_avx2, &softmax_grad_panels_avx2, /*bwd_rows=*/512,
                           /*dp_panels_outer=*/true};
  return kernel == F32Kernel::kAvx512 ? avx512 : avx2;
}

// C = A · B (+ C), the layouts at the top of this file. With c_scale (N floats), accumulating
// computes C(m, n) = C(m, n) · c_scale[n] + (A · B)(m, n): the online softmax's rescale of the
// output columns, folded into the loads of C.
// Block order. K ≤ 128: panels outer, so that a panel of B (≤ 32 KiB) stays in L1 while every row
// block of A passes (S = Q Kᵀ at K = E = 64: 157 GFLOP/s against 149 the other way). Longer K:
// row blocks outer, so that a block's 6 rows of A (6·K floats) stay in L1 while B streams from L2;
// panels outer would re-read all of A once per panel, which, when A is the rows of a
// channel-first tensor (512 rows of dOᵀ 36 KiB apart for N = 9,216), crowds the L2 sets those rows
// map to: dVᵀ += dOᵀ P ran at 135 GFLOP/s that way and 156 this way (one thread of an Intel Xeon,
// torch.mm 157-179 in the same runs). panels_outer: panels outer whatever K is (for a B too large for
// the L2 and an A whose rows are contiguous: F32Ops::dp_panels_outer).
inline void f32_gemm(const F32Ops& ops, int64_t m, int64_t n, int64_t k, const F32A& a, const F32B& b, const F32C& c,
                     bool accumulate, const float* c_scale = nullptr, bool panels_outer = false) {
  const auto& blocks = ops.blocks;
  const int64_t last_cols = n - (n - 1) / kF32Panel * kF32Panel;
  const uint64_t last_mask = last_cols == 64 ? ~uint64_t(0) : (uint64_t(1) << last_cols) - 1;
  const auto block = [&](int64_t m0, int64_t n0) {
    const int rows = static_cast<int>(std::min<int64_t>(kF32Rows, m - m0));
    blocks[rows - 1](k, a.ptr + m0 * a.row_stride, a.row_stride, a.k_stride, a.panel_stride,
                     b.ptr + (n0 / kF32Panel) * b.panel_stride, c.ptr + (n0 / kF32Panel) * c.panel_stride + m0 * c.ld,
                     c.ld, n0 + kF32Panel >= n ? last_mask : ~uint64_t(0), accumulate,
                     c_scale == nullptr ? nullptr : c_scale + n0);
  };
  if (k <= 2 * kF32Panel || panels_outer) {
    for (int64_t n0 = 0; n0 < n; n0 += kF32Panel)
      for (int64_t m0 = 0; m0 < m; m0 += kF32Rows) block(m0, n0);
  } else {
    for (int64_t m0 = 0; m0 < m; m0 += kF32Rows)
      for (int64_t n0 = 0; n0 < n; n0 += kF32Panel) block(m0, n0);
  }
}

#pragma GCC diagnostic pop
#endif  // ATTNSEG_HAVE_F32_GEMM

}  // namespace attnseg::cpu
