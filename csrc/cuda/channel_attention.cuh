// Channel attention (DANet CAM) kernels, compiled by nvcc for the extension and by g++ for the
// SIMT emulator (tests/emu). Launch logic: channel_attention_host.h.
//
//   E = X Xᵀ (C x C per batch, fp32 accumulation: a post-ReLU Gram matrix overflows fp16),
//   A = softmax(−E) ("official", = softmax(rowmax(E) − E)) or softmax(E) ("paper"), Y = A X.
//   Backward: dA = dY Xᵀ, dE = ±A ∘ (dA − rowsum(dA ∘ A)), dX = Aᵀ dY + (dE + dEᵀ) X.
//
// Two passes, as the softmax needs whole rows of E: a batched GEMM with the reduction over N
// split across blocks (fixed-order partial sums, so results are deterministic; no atomics), then
// a row kernel that sums the partials and applies the softmax. The C x C map is small and is
// kept for the backward. All products are one strided GEMM kernel, so transposes are strides.
#pragma once

#include "compat.cuh"

namespace attnseg::cuda {

struct GemmTiles {
  static constexpr int kThreads = 256;
  static constexpr int kBlockM = 64, kBlockN = 64, kBlockK = 16;
  static constexpr int kPerThread = 4;  // 4 x 4 outputs per thread, at stride 16
};

// C[z][m][n] = Σ_{k in split z} A[m][k] B[k][n] (+ bias[m][n]) for z = batch * splits + split,
// accumulated in Acc. Every operand is strided; the split index offsets C by c_ss.
template <typename TA, typename TB, typename TC, typename Acc>
struct GemmParams {
  const TA* a;
  const TB* b;
  TC* c;
  const Acc* bias;  // may be null; indexed like C of split 0
  int64_t m, n, k;
  int64_t a_sb, a_sm, a_sk;
  int64_t b_sb, b_sk, b_sn;
  int64_t c_sb, c_sm, c_sn, c_ss;
  int64_t bias_sb, bias_sm, bias_sn;
  int64_t splits, split_len;  // split_len: a multiple of kBlockK
};

// grid: (ceil(n / 64), ceil(m / 64), batch * splits), block: 256.
template <typename TA, typename TB, typename TC, typename Acc>
__global__ void __launch_bounds__(GemmTiles::kThreads) gemm_kernel(const GemmParams<TA, TB, TC, Acc> p) {
  constexpr int BM = GemmTiles::kBlockM, BN = GemmTiles::kBlockN, BK = GemmTiles::kBlockK;
  constexpr int R = GemmTiles::kPerThread;
  __shared__ Acc sa[BK][BM + 1];  // A tile, k-major
  __shared__ Acc sb[BK][BN + 1];
  const int64_t batch = blockIdx.z / p.splits, split = blockIdx.z % p.splits;
  const int64_t m0 = int64_t(blockIdx.y) * BM, n0 = int64_t(blockIdx.x) * BN;
  const int64_t k_begin = split * p.split_len;
  const int64_t k_end = k_begin + p.split_len < p.k ? k_begin + p.split_len : p.k;
  const TA* a = p.a + batch * p.a_sb;
  const TB* b = p.b + batch * p.b_sb;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  Acc sum[R][R];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < R; ++j) sum[i][j] = 0;

  for (int64_t k0 = k_begin; k0 < k_end; k0 += BK) {
    for (int idx = threadIdx.x; idx < BM * BK; idx += GemmTiles::kThreads) {
      const int r = idx % BM, kk = idx / BM;  // consecutive threads: consecutive rows of A
      const int64_t gm = m0 + r, gk = k0 + kk;
      sa[kk][r] = (gm < p.m && gk < k_end) ? convert<Acc>(a[gm * p.a_sm + gk * p.a_sk]) : Acc(0);
    }
    for (int idx = threadIdx.x; idx < BN * BK; idx += GemmTiles::kThreads) {
      const int c = idx % BN, kk = idx / BN;
      const int64_t gn = n0 + c, gk = k0 + kk;
      sb[kk][c] = (gn < p.n && gk < k_end) ? convert<Acc>(b[gk * p.b_sk + gn * p.b_sn]) : Acc(0);
    }
    __syncthreads();
    for (int kk = 0; kk < BK; ++kk) {
      Acc av[R], bv[R];
      for (int i = 0; i < R; ++i) av[i] = sa[kk][ty + 16 * i];
      for (int j = 0; j < R; ++j) bv[j] = sb[kk][tx + 16 * j];
      for (int i = 0; i < R; ++i)
        for (int j = 0; j < R; ++j) sum[i][j] += av[i] * bv[j];
    }
    __syncthreads();
  }
  TC* c = p.c + batch * p.c_sb + split * p.c_ss;
  for (int i = 0; i < R; ++i) {
    const int64_t gm = m0 + ty + 16 * i;
    for (int j = 0; j < R; ++j) {
      const int64_t gn = n0 + tx + 16 * j;
      if (gm < p.m && gn < p.n) {
        Acc value = sum[i][j];
        if (p.bias) value += p.bias[batch * p.bias_sb + gm * p.bias_sm + gn * p.bias_sn];
        c[gm * p.c_sm + gn * p.c_sn] = convert<TC>(value);
      }
    }
  }
}

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
