// Channel attention (DANet CAM) kernels, compiled by nvcc for the extension and by g++ for the
// SIMT emulator (tests/emu). Launch logic and the GEMMs: host.h (channel attention).
//
//   E = X Xᵀ (C x C per batch, fp32 accumulation: a post-ReLU Gram matrix overflows fp16),
//   A = softmax(−E) ("official", = softmax(rowmax(E) − E)) or softmax(E) ("paper"), Y = A X.
//   Backward: dA = dY Xᵀ, dE = ±A ∘ (dA − rowsum(dA ∘ A)), dX = Aᵀ dY + (dE + dEᵀ) X.
//
// Two passes, as the softmax needs whole rows of E: a batched GEMM (a library call, cuBLAS through
// ATen on tensor cores: host.h), then a row kernel here that applies the softmax (it can also sum
// fixed-order partial sums of E, `splits`, should a caller split the reduction over N). The C x C
// map is small and is kept for the backward.
#pragma once

#include "compat.cuh"

namespace attnseg::cuda {

// Block-wide reduction over kThreads threads (a multiple of 32); every thread gets the result.
// `scratch` holds kThreads / 32 values. Starts and ends with a barrier, so it can be reused.
template <typename Acc, int kThreads, bool kMax>
__device__ __forceinline__ Acc block_reduce(Acc v, Acc* scratch) {
  v = kMax ? warp_max(v) : warp_sum(v);
  __syncthreads();
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  Acc r = scratch[0];
  for (int w = 1; w < kThreads / 32; ++w) r = kMax ? max_acc(r, scratch[w]) : r + scratch[w];
  __syncthreads();
  return r;
}

template <typename Acc>
struct CamRowParams {
  const Acc* partial;  // splits x batch x C x C, contiguous: split partial sums of E (or dA)
  const Acc* attn;     // batch x C x C (backward)
  Acc* out;            // batch x C x C: A (forward) or dE (backward)
  int64_t batch, c, splits;
  bool official;
};

constexpr int kRowThreads = 256;

// Forward softmax, one block per row (b, i): E_ij = Σ_s partial_s,ij; A_i = softmax(∓E_i).
// Each thread only re-reads the elements it wrote, so the output row doubles as scratch.
template <typename Acc>
__global__ void __launch_bounds__(kRowThreads) cam_softmax_fwd_kernel(const CamRowParams<Acc> p) {
  __shared__ Acc scratch[kRowThreads / 32];
  const int64_t row = blockIdx.x;  // b * C + i
  const int64_t plane = p.batch * p.c * p.c;
  Acc* out = p.out + row * p.c;
  const Acc sign = p.official ? Acc(-1) : Acc(1);
  Acc local_max = neg_inf<Acc>();
  for (int64_t j = threadIdx.x; j < p.c; j += kRowThreads) {
    Acc e = 0;
    for (int64_t s = 0; s < p.splits; ++s) e += p.partial[s * plane + row * p.c + j];
    out[j] = sign * e;
    local_max = max_acc(local_max, sign * e);
  }
  const Acc row_max = block_reduce<Acc, kRowThreads, true>(local_max, scratch);
  Acc local_sum = 0;
  for (int64_t j = threadIdx.x; j < p.c; j += kRowThreads) {
    const Acc x = exp_acc(out[j] - row_max);
    out[j] = x;
    local_sum += x;
  }
  const Acc row_sum = block_reduce<Acc, kRowThreads, false>(local_sum, scratch);
  for (int64_t j = threadIdx.x; j < p.c; j += kRowThreads) out[j] /= row_sum;
}

// Softmax backward, one block per row: dA_ij = Σ_s partial_s,ij; dE_i = ±A_i ∘ (dA_i − A_i·dA_i).
template <typename Acc>
__global__ void __launch_bounds__(kRowThreads) cam_softmax_bwd_kernel(const CamRowParams<Acc> p) {
  __shared__ Acc scratch[kRowThreads / 32];
  const int64_t row = blockIdx.x;
  const int64_t plane = p.batch * p.c * p.c;
  const Acc* attn = p.attn + row * p.c;
  Acc* out = p.out + row * p.c;
  Acc local_dot = 0;
  for (int64_t j = threadIdx.x; j < p.c; j += kRowThreads) {
    Acc g = 0;
    for (int64_t s = 0; s < p.splits; ++s) g += p.partial[s * plane + row * p.c + j];
    out[j] = g;
    local_dot += g * attn[j];
  }
  const Acc dot = block_reduce<Acc, kRowThreads, false>(local_dot, scratch);
  const Acc sign = p.official ? Acc(-1) : Acc(1);
  for (int64_t j = threadIdx.x; j < p.c; j += kRowThreads) out[j] = sign * attn[j] * (out[j] - dot);
}

// sym = dE + dEᵀ per batch (C x C, contiguous). grid: ceil(batch * C * C / 256).
template <typename Acc>
__global__ void __launch_bounds__(kRowThreads) cam_symmetrize_kernel(const Acc* de, Acc* sym, int64_t batch,
                                                                       int64_t c) {
  const int64_t idx = int64_t(blockIdx.x) * kRowThreads + threadIdx.x;
  if (idx >= batch * c * c) return;
  const int64_t b = idx / (c * c), i = (idx / c) % c, j = idx % c;
  sym[idx] = de[idx] + de[b * c * c + j * c + i];
}

}  // namespace attnseg::cuda
