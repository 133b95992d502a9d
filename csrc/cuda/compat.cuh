// Portability layer of the CUDA kernel headers: the same .cuh files compile under nvcc (the
// extension) and under g++ with the SIMT emulator of tests/emu/simt.h (the tests), which must
// be included first there. Kernels use only what is spelled here or in both worlds.
#pragma once

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#define ATTNSEG_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#elif defined(ATTNSEG_SIMT_EMULATOR)
#define ATTNSEG_DYNAMIC_SMEM(name) unsigned char* name = ::simt::dynamic_smem()
#else
#error "csrc/cuda/*.cuh compile under nvcc, or under g++ after tests/emu/simt.h (the SIMT emulator)"
#endif

#include <cmath>
#include <cstdint>
#include <type_traits>

// Full unrolling keeps fragment and micro-tile arrays in registers; g++ (the emulator) needs no hint.
#if defined(__CUDACC__)
#define ATTNSEG_UNROLL _Pragma("unroll")
#define ATTNSEG_PRAGMA(x) _Pragma(#x)
#define ATTNSEG_UNROLL_N(n) ATTNSEG_PRAGMA(unroll n)
#else
#define ATTNSEG_UNROLL
#define ATTNSEG_UNROLL_N(n)
#endif

namespace attnseg::cuda {

constexpr unsigned kFullMask = 0xffffffffu;

// Arithmetic type of the accumulators for each storage type: fp32 for fp16/bf16/fp32 inputs,
// fp64 for fp64 (gradcheck) inputs.
template <typename T>
struct Num;
template <>
struct Num<float> {
  using acc = float;
  static constexpr bool kTensorCores = false;
  __device__ __forceinline__ static float to_acc(float x) { return x; }
  __device__ __forceinline__ static float from_acc(float x) { return x; }
};
template <>
struct Num<double> {
  using acc = double;
  static constexpr bool kTensorCores = false;
  __device__ __forceinline__ static double to_acc(double x) { return x; }
  __device__ __forceinline__ static double from_acc(double x) { return x; }
};
template <>
struct Num<__half> {
  using acc = float;
  static constexpr bool kTensorCores = true;
  __device__ __forceinline__ static float to_acc(__half x) { return __half2float(x); }
  __device__ __forceinline__ static __half from_acc(float x) { return __float2half(x); }
};
template <>
struct Num<__nv_bfloat16> {
  using acc = float;
  static constexpr bool kTensorCores = true;
  __device__ __forceinline__ static float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ __forceinline__ static __nv_bfloat16 from_acc(float x) { return __float2bfloat16(x); }
};

// Conversion between any two of the types above, through the accumulator type.
template <typename To, typename From>
__device__ __forceinline__ To convert(From x) {
  if constexpr (std::is_same_v<To, From>) {
    return x;
  } else {
    using acc = std::conditional_t<std::is_same_v<To, double> || std::is_same_v<From, double>, double, float>;
    return Num<To>::from_acc(static_cast<typename Num<To>::acc>(static_cast<acc>(Num<From>::to_acc(x))));
  }
}

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }
// NaN-propagating max (fmaxf drops NaN): a row with a NaN logit then gives NaN like the reference.
template <typename A>
__device__ __forceinline__ A max_acc(A a, A b) {
  return (a != a || a > b) ? a : b;
}

template <typename A>
__device__ __forceinline__ bool is_inf(A x) {
  return x == static_cast<A>(INFINITY) || x == -static_cast<A>(INFINITY);
}

template <typename A>
__device__ __forceinline__ A neg_inf() {
  return -static_cast<A>(INFINITY);
}

// Warp-wide reductions (all 32 lanes take part and all get the result).
template <typename A>
__device__ __forceinline__ A warp_max(A v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = max_acc(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}
template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ constexpr size_t round_up(size_t a, size_t b) { return (a + b - 1) / b * b; }

// A 2-D strided view of global memory, 64-bit offsets throughout.
template <typename T>
struct Mat {
  T* ptr;
  int64_t rows, cols;
  int64_t s_row, s_col;
  __device__ __forceinline__ T& at(int64_t r, int64_t c) const { return ptr[r * s_row + c * s_col]; }
};

}  // namespace attnseg::cuda
