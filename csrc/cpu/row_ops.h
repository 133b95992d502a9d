// Row operations of the CPU kernels' online softmax. The float versions are written as plain
// loops that GCC vectorises, cloned for AVX-512, AVX2 and the x86-64 baseline and picked at
// load time (target_clones), so one binary runs everywhere and uses the widest unit it finds.
// The reductions carry `omp simd` so they vectorise (compiled with -fopenmp-simd); their
// summation order is fixed for a given binary and machine, so results are repeatable.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(ATTNSEG_NO_CLONES)
#define ATTNSEG_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ATTNSEG_CLONES
#endif

namespace attnseg::cpu {

// The constants of exp_poly below, shared with its AVX-512 and AVX2 twins (exp16, exp8 in
// f32_gemm.h): the clamp, log2(e), ln 2 split in two for the reduction, and the coefficients of
// exp(r) = 1 + r + r²·q(r), q's highest first (Horner).
struct ExpPoly {
  static constexpr float kHi = 88.37626f, kLo = -87.33654f;
  static constexpr float kLog2e = 1.44269504088896341f;
  static constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  static constexpr float kQ[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                                  4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
};

// exp(x) for float, Cody-Waite range reduction (x = n·ln2 + r, |r| <= ln2/2) and a degree-6
// polynomial for exp(r): relative error about 2e-7 (two float ulps). exp(-inf) = 0, NaN stays
// NaN, x < -87.3 gives 0 (the float denormal range is flushed), x > 88.37 gives +inf.
__attribute__((always_inline)) inline float exp_poly(float x) {
  const float hi = ExpPoly::kHi, lo = ExpPoly::kLo;
  float xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  // round to nearest by adding and removing 1.5·2^23 (no libm call, so the loop vectorises)
  const float round_magic = 12582912.0f;
  const float fn = (xc * ExpPoly::kLog2e + round_magic) - round_magic;
  float r = xc - fn * ExpPoly::kLn2Hi;
  r = r - fn * ExpPoly::kLn2Lo;
  const float r2 = r * r;
  float p = ExpPoly::kQ[0];
  for (int i = 1; i < 6; ++i) p = p * r + ExpPoly::kQ[i];
  p = p * r2 + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(fn) + 127) << 23;
  const float two_n = __builtin_bit_cast(float, bits);
  float y = p * two_n;
  y = x < lo ? 0.0f : y;
  y = x > hi ? std::numeric_limits<float>::infinity() : y;
  return x != x ? x : y;
}

// row[i] = exp(row[i] * scale - shift); returns the sum of the new row.
ATTNSEG_CLONES static float scaled_exp_sum(float* row, int64_t n, float scale, float shift) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    const float p = exp_poly(row[i] * scale - shift);
    row[i] = p;
    sum += p;
  }
  return sum;
}

static double scaled_exp_sum(double* row, int64_t n, double scale, double shift) {
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double p = std::exp(row[i] * scale - shift);
    row[i] = p;
    sum += p;
  }
  return sum;
}

// The backward's P = exp(S·scale − lse), in place. A row whose lse is +inf held a +inf logit:
// its softmax is NaN throughout (as torch.softmax gives it), not exp(−inf − inf) = 0 off the inf.
template <typename scalar_t>
inline void recompute_probabilities(scalar_t* row, int64_t n, scalar_t scale, scalar_t lse) {
  if (lse == std::numeric_limits<scalar_t>::infinity()) {
    std::fill(row, row + n, std::numeric_limits<scalar_t>::quiet_NaN());
  } else {
    scaled_exp_sum(row, n, scale, lse);
  }
}

// max_i(row[i] * scale); NaN anywhere gives NaN (as torch.softmax propagates it).
template <typename scalar_t>
__attribute__((always_inline)) inline scalar_t scaled_row_max_impl(const scalar_t* row, int64_t n, scalar_t scale) {
  scalar_t m = -std::numeric_limits<scalar_t>::infinity();
  int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t s = row[i] * scale;
    m = s > m ? s : m;
    nan |= s != s;
  }
  return nan ? std::numeric_limits<scalar_t>::quiet_NaN() : m;
}
ATTNSEG_CLONES static float scaled_row_max(const float* row, int64_t n, float scale) {
  return scaled_row_max_impl(row, n, scale);
}
static double scaled_row_max(const double* row, int64_t n, double scale) { return scaled_row_max_impl(row, n, scale); }

// row[i] *= alpha
template <typename scalar_t>
__attribute__((always_inline)) inline void scale_row_impl(scalar_t* row, int64_t n, scalar_t alpha) {
  for (int64_t i = 0; i < n; ++i) row[i] *= alpha;
}
ATTNSEG_CLONES static void scale_row(float* row, int64_t n, float alpha) { scale_row_impl(row, n, alpha); }
static void scale_row(double* row, int64_t n, double alpha) { scale_row_impl(row, n, alpha); }

// dp[i] = p[i] * (dp[i] - delta): the softmax backward dS = P ∘ (dP − delta), in place over dP
template <typename scalar_t>
__attribute__((always_inline)) inline void softmax_grad_row_impl(const scalar_t* p, scalar_t* dp, int64_t n,
                                                                 scalar_t delta) {
  for (int64_t i = 0; i < n; ++i) dp[i] = p[i] * (dp[i] - delta);
}
ATTNSEG_CLONES static void softmax_grad_row(const float* p, float* dp, int64_t n, float delta) {
  softmax_grad_row_impl(p, dp, n, delta);
}
static void softmax_grad_row(const double* p, double* dp, int64_t n, double delta) {
  softmax_grad_row_impl(p, dp, n, delta);
}

}  // namespace attnseg::cpu
