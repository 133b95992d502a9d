// Fused attention kernels (flash-attention-2 structure), compiled by nvcc for the extension and
// by g++ for the SIMT emulator (tests/emu). Launch logic: attention_host.h.
//
//   out = softmax(Q Kᵀ · scale) V,  lse = rowwise logsumexp(Q Kᵀ · scale)
//   Q: Nq x E, K: Nk x E, V: Nk x Ev per batch, any strides (64-bit offsets).
//
// Forward, one block per (batch, 32 query rows, 64-wide slice of Ev): stream 32-key tiles,
// S = Q Kᵀ (E in 64-wide chunks through shared memory), online softmax in fp32 (running max m,
// running sum l, rescale of the accumulator by exp(m_old − m_new)), O += P V. Ev is split across
// blocks (blockIdx.y), so any Ev runs in bounded shared memory; each slice recomputes S.
//
// Backward recomputes P = exp(S·scale − lse) tile by tile, with delta = rowsum(dO ∘ O) − dlse:
//   dS = P ∘ (dP − delta), dP = dO Vᵀ;  dQ = scale · dS K;  dK = scale · dSᵀ Q;  dV = Pᵀ dO.
// dQ blocks own query rows, dK/dV blocks own key rows and compute the transposed tiles
// (Sᵀ = K Qᵀ, dPᵀ = V dOᵀ) directly, so no atomics are needed and results are deterministic.
//
// Both products go through two building blocks on shared-memory tiles: dot_nt (C = X Yᵀ over a
// long depth) and accumulate (Acc += P G). fp16/bf16 use tensor cores through WMMA (16x16x16,
// fp32 accumulation; P and dS are rounded to the input type for the second product, as in
// flash-attention); fp32 and fp64 use FMA on CUDA cores.
#pragma once

#include "compat.cuh"

namespace attnseg::cuda {

template <typename T>
struct AttnTiles {
  using acc_t = typename Num<T>::acc;
  static constexpr bool kTensorCores = Num<T>::kTensorCores;
  // operand type of P / dS in the second product: the input type on tensor cores
  using op_t = std::conditional_t<kTensorCores, T, acc_t>;
  static constexpr int kThreads = 128;
  static constexpr int kWarps = kThreads / 32;
  // Rows a block owns (queries, or keys in dK/dV): 32 on tensor cores (one 16x16 WMMA fragment per
  // warp in dot_nt), 64 on CUDA cores, so that each thread's FFMA micro-tiles are 4 x 4 (scores)
  // and 8 x 4 (accumulator) and shared-memory loads per FFMA halve.
  static constexpr int kRows = kTensorCores ? 32 : 64;
  static constexpr int kCols = 32;  // columns of a score tile: one per lane
  static constexpr int kChunk = std::is_same_v<T, double> ? 32 : 64;  // depth chunk; output slice width
  // Padding: +1 staggers banks on CUDA cores; WMMA needs rows that are multiples of 16 bytes and
  // fragment origins on 32-byte boundaries, which +8 (16-bit types) and +4 (fp32) keep.
  static constexpr int kLdIn = kChunk + (kTensorCores ? 8 : 1);
  static constexpr int kLdS = kCols + (kTensorCores ? 4 : 1);
  static constexpr int kLdOp = kTensorCores ? kCols + 8 : kLdS;
  static constexpr int kLdAcc = kChunk + (kTensorCores ? 4 : 1);

  static constexpr size_t kBytesA = round_up(sizeof(T) * kRows * kLdIn, 128);
  static constexpr size_t kBytesB = round_up(sizeof(T) * kCols * kLdIn, 128);
  static constexpr size_t kBytesS = round_up(sizeof(acc_t) * kRows * kLdS, 128);
  static constexpr size_t kBytesOp = kTensorCores ? round_up(sizeof(T) * kRows * kLdOp, 128) : 0;
  static constexpr size_t kBytesAcc = round_up(sizeof(acc_t) * kRows * kLdAcc, 128);
  static constexpr size_t kBytesStats = round_up(sizeof(acc_t) * 3 * kRows, 128);
  static constexpr size_t kSmemBytes = kBytesA + kBytesB + 2 * kBytesS + kBytesOp + kBytesAcc + kBytesStats;
  static_assert(kCols == 32, "a score tile row is one warp wide");
  // fp16/bf16: 29 KiB, within the default 48 KiB; fp32 59 KiB and fp64 78 KiB, opted in by the
  // launchers (host.h), within the 99 KiB every targeted GPU (sm_80, sm_86, sm_89, sm_90) offers.
  static_assert(kSmemBytes <= 99 * 1024, "within the smallest opt-in shared memory of the targeted GPUs");
};

// Carves the dynamic shared memory of one block.
template <typename T>
struct AttnSmem {
  using Tiles = AttnTiles<T>;
  using acc_t = typename Tiles::acc_t;
  using op_t = typename Tiles::op_t;
  T* a;         // kRows x kLdIn: chunk of the row operand X
  T* b;         // kCols x kLdIn: chunk of Y, or the G tile of accumulate()
  acc_t* s;     // kRows x kLdS: scores S (or Sᵀ)
  acc_t* s2;    // kRows x kLdS: dP (or dPᵀ) in the backward
  op_t* op;     // kRows x kLdOp: P or dS as the left operand of accumulate(); aliases s on CUDA cores
  acc_t* acc;   // kRows x kLdAcc: output accumulator (O, dQ, dK or dV slice)
  acc_t* stat0; // kRows: running max m (forward) or lse (backward)
  acc_t* stat1; // kRows: running sum l (forward) or delta (backward)
  acc_t* stat2; // kRows: rescale factor alpha (forward)

  __device__ explicit AttnSmem(unsigned char* base) {
    unsigned char* p = base;
    a = reinterpret_cast<T*>(p);
    p += Tiles::kBytesA;
    b = reinterpret_cast<T*>(p);
    p += Tiles::kBytesB;
    s = reinterpret_cast<acc_t*>(p);
    p += Tiles::kBytesS;
    s2 = reinterpret_cast<acc_t*>(p);
    p += Tiles::kBytesS;
    if constexpr (Tiles::kTensorCores) {
      op = reinterpret_cast<op_t*>(p);
      p += Tiles::kBytesOp;
    } else {
      op = s;
    }
    acc = reinterpret_cast<acc_t*>(p);
    p += Tiles::kBytesAcc;
    stat0 = reinterpret_cast<acc_t*>(p);
    stat1 = stat0 + Tiles::kRows;
    stat2 = stat1 + Tiles::kRows;
  }
};

// dst[r][c] = src[row0 + r][col0 + c] for r < kNRows, c < kNCols, zero outside src. Thread t
// copies column t % kNCols of rows t / kNCols + k · (kThreads / kNCols): one 64-bit address and
// one column test per thread, then a pointer step per row (consecutive threads read consecutive
// columns, as an element-by-element loop would, but without its per-element index arithmetic).
template <typename T, int kThreads, int kNRows, int kNCols>
__device__ __forceinline__ void load_tile(T* dst, int ld, const Mat<const T>& src, int64_t row0, int64_t col0) {
  static_assert(kThreads % kNCols == 0 && kNRows % (kThreads / kNCols) == 0, "whole rows per pass");
  constexpr int kStep = kThreads / kNCols;
  const T zero = Num<T>::from_acc(0);
  const int c = threadIdx.x % kNCols, r0 = threadIdx.x / kNCols;
  const bool col_ok = col0 + c < src.cols;
  const int64_t rows_left = src.rows - row0 - r0;  // rows r0 + k·kStep < rows_left are inside src
  const T* p = src.ptr + (row0 + r0) * src.s_row + (col0 + c) * src.s_col;
  const int64_t step = int64_t(kStep) * src.s_row;
  ATTNSEG_UNROLL
  for (int k = 0; k < kNRows / kStep; ++k) {
    dst[(r0 + k * kStep) * ld + c] = (col_ok && k * kStep < rows_left) ? *p : zero;
    p += step;
  }
}

// One k step of an FFMA micro-tile: sum[i][j] += x[i · x_stride] · y[j · y_stride].
template <int kMi, int kMj, typename A>
__device__ __forceinline__ void fma_micro_tile(A (&sum)[kMi][kMj], const A* x, int x_stride, const A* y, int y_stride) {
  A xs[kMi], ys[kMj];
  ATTNSEG_UNROLL
  for (int i = 0; i < kMi; ++i) xs[i] = x[i * x_stride];
  ATTNSEG_UNROLL
  for (int j = 0; j < kMj; ++j) ys[j] = y[j * y_stride];
  ATTNSEG_UNROLL
  for (int i = 0; i < kMi; ++i)
    ATTNSEG_UNROLL
    for (int j = 0; j < kMj; ++j) sum[i][j] += xs[i] * ys[j];
}

template <int kMi, int kMj, typename A>
__device__ __forceinline__ void zero_micro_tile(A (&sum)[kMi][kMj]) {
  ATTNSEG_UNROLL
  for (int i = 0; i < kMi; ++i)
    ATTNSEG_UNROLL
    for (int j = 0; j < kMj; ++j) sum[i][j] = 0;
}

// dst (kRows x kCols, fp32/fp64) = X[x0 : x0+kRows, :] · Y[y0 : y0+kCols, :]ᵀ over the full
// depth X.cols (== Y.cols), in kChunk-wide steps through shared memory. Ends with a barrier.
template <typename T>
__device__ __forceinline__ void dot_nt(const AttnSmem<T>& sm, typename AttnTiles<T>::acc_t* dst, const Mat<const T>& X, int64_t x0,
                       const Mat<const T>& Y, int64_t y0) {
  using Tiles = AttnTiles<T>;
  using acc_t = typename Tiles::acc_t;
  if constexpr (Tiles::kTensorCores) {
    namespace wmma = nvcuda::wmma;
    static_assert(Tiles::kRows * Tiles::kCols == 256 * Tiles::kWarps, "one 16x16 fragment per warp");
    const int warp = threadIdx.x / 32;
    const int fr = warp / 2, fc = warp % 2;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
    wmma::fill_fragment(c, 0.0f);
    for (int64_t d0 = 0; d0 < X.cols; d0 += Tiles::kChunk) {
      load_tile<T, Tiles::kThreads, Tiles::kRows, Tiles::kChunk>(sm.a, Tiles::kLdIn, X, x0, d0);
      load_tile<T, Tiles::kThreads, Tiles::kCols, Tiles::kChunk>(sm.b, Tiles::kLdIn, Y, y0, d0);
      __syncthreads();
      for (int kk = 0; kk < Tiles::kChunk; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
        wmma::load_matrix_sync(fa, sm.a + fr * 16 * Tiles::kLdIn + kk, Tiles::kLdIn);
        wmma::load_matrix_sync(fb, sm.b + fc * 16 * Tiles::kLdIn + kk, Tiles::kLdIn);
        wmma::mma_sync(c, fa, fb, c);
      }
      __syncthreads();
    }
    wmma::store_matrix_sync(dst + fr * 16 * Tiles::kLdS + fc * 16, c, Tiles::kLdS, wmma::mem_row_major);
  } else {
    // Register-blocked FFMA: thread (ty, tx) owns rows ty + 16i (i < kRows / 16) and columns
    // tx + 8j (j < 4) of the kRows x 32 tile, so each k step is 8 shared-memory loads for 16 FFMA
    // (the rows are broadcasts within a warp, the columns fall in distinct banks: kLdIn = kChunk + 1).
    constexpr int kMi = Tiles::kRows / 16, kMj = 4, kTx = Tiles::kCols / kMj;
    static_assert(Tiles::kRows == 16 * kMi && kTx * (Tiles::kRows / kMi) == Tiles::kThreads);
    const int tx = threadIdx.x % kTx, ty = threadIdx.x / kTx;
    acc_t sum[kMi][kMj];
    zero_micro_tile(sum);
    for (int64_t d0 = 0; d0 < X.cols; d0 += Tiles::kChunk) {
      load_tile<T, Tiles::kThreads, Tiles::kRows, Tiles::kChunk>(sm.a, Tiles::kLdIn, X, x0, d0);
      load_tile<T, Tiles::kThreads, Tiles::kCols, Tiles::kChunk>(sm.b, Tiles::kLdIn, Y, y0, d0);
      __syncthreads();
      ATTNSEG_UNROLL_N(16)
      for (int kk = 0; kk < Tiles::kChunk; ++kk)
        fma_micro_tile(sum, sm.a + ty * Tiles::kLdIn + kk, 16 * Tiles::kLdIn, sm.b + tx * Tiles::kLdIn + kk,
                       kTx * Tiles::kLdIn);
      __syncthreads();
    }
    ATTNSEG_UNROLL
    for (int i = 0; i < kMi; ++i)
      ATTNSEG_UNROLL
      for (int j = 0; j < kMj; ++j) dst[(ty + 16 * i) * Tiles::kLdS + tx + kTx * j] = sum[i][j];
  }
  __syncthreads();
}

// sm.acc (kRows x kChunk) += sm.op (kRows x kCols) · G[g0 : g0+kCols, gc0 : gc0+kChunk].
// Starts by staging G in sm.b (so sm.b must be free) and ends with a barrier.
template <typename T>
__device__ __forceinline__ void accumulate(const AttnSmem<T>& sm, const Mat<const T>& G, int64_t g0, int64_t gc0) {
  using Tiles = AttnTiles<T>;
  using acc_t = typename Tiles::acc_t;
  load_tile<T, Tiles::kThreads, Tiles::kCols, Tiles::kChunk>(sm.b, Tiles::kLdIn, G, g0, gc0);
  __syncthreads();
  if constexpr (Tiles::kTensorCores) {
    namespace wmma = nvcuda::wmma;
    constexpr int kFragCols = Tiles::kChunk / 16;
    constexpr int kFrags = (Tiles::kRows / 16) * kFragCols;
    const int warp = threadIdx.x / 32;
    for (int f = warp; f < kFrags; f += Tiles::kWarps) {
      const int fr = f / kFragCols, fc = f % kFragCols;
      acc_t* out = sm.acc + fr * 16 * Tiles::kLdAcc + fc * 16;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
      wmma::load_matrix_sync(c, out, Tiles::kLdAcc, wmma::mem_row_major);
      for (int kk = 0; kk < Tiles::kCols; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
        wmma::load_matrix_sync(fa, sm.op + fr * 16 * Tiles::kLdOp + kk, Tiles::kLdOp);
        wmma::load_matrix_sync(fb, sm.b + kk * Tiles::kLdIn + fc * 16, Tiles::kLdIn);
        wmma::mma_sync(c, fa, fb, c);
      }
      wmma::store_matrix_sync(out, c, Tiles::kLdAcc, wmma::mem_row_major);
    }
  } else {
    // Register-blocked FFMA: thread (ty, tx) owns rows ty + 8i (i < kRows / 8) and columns
    // tx + 16j (j < kChunk / 16) of the kRows x kChunk accumulator: per k step kRows / 8 +
    // kChunk / 16 loads for (kRows / 8) · (kChunk / 16) FFMA (rows broadcast within a warp, columns
    // consecutive). Each output sums its kCols products in order and is then added to sm.acc, as
    // a per-element loop would.
    constexpr int kTx = 16, kTy = Tiles::kThreads / kTx, kMi = Tiles::kRows / kTy, kMj = Tiles::kChunk / kTx;
    static_assert(Tiles::kRows == kTy * kMi && Tiles::kChunk % kTx == 0);
    const int tx = threadIdx.x % kTx, ty = threadIdx.x / kTx;
    acc_t sum[kMi][kMj];
    zero_micro_tile(sum);
    ATTNSEG_UNROLL_N(8)
    for (int c = 0; c < Tiles::kCols; ++c)
      fma_micro_tile(sum, sm.op + ty * Tiles::kLdOp + c, kTy * Tiles::kLdOp, sm.b + c * Tiles::kLdIn + tx, kTx);
    ATTNSEG_UNROLL
    for (int i = 0; i < kMi; ++i)
      ATTNSEG_UNROLL
      for (int j = 0; j < kMj; ++j) sm.acc[(ty + kTy * i) * Tiles::kLdAcc + tx + kTx * j] += sum[i][j];
  }
  __syncthreads();
}

template <typename T>
__device__ __forceinline__ void zero_accumulator(const AttnSmem<T>& sm) {
  using Tiles = AttnTiles<T>;
  for (int idx = threadIdx.x; idx < Tiles::kRows * Tiles::kLdAcc; idx += Tiles::kThreads) sm.acc[idx] = 0;
}

// Stores scale · acc[r][d] (· row_factor[r] when given) to out[row0 + r][col0 + d] where that is
// inside out.
template <typename T>
__device__ __forceinline__ void store_accumulator(const AttnSmem<T>& sm, const Mat<T>& out, int64_t row0,
                                                  int64_t col0, typename AttnTiles<T>::acc_t scale,
                                                  const typename AttnTiles<T>::acc_t* row_factor) {
  using Tiles = AttnTiles<T>;
  for (int idx = threadIdx.x; idx < Tiles::kRows * Tiles::kChunk; idx += Tiles::kThreads) {
    const int r = idx / Tiles::kChunk, d = idx % Tiles::kChunk;
    const int64_t gr = row0 + r, gc = col0 + d;
    if (gr < out.rows && gc < out.cols) {
      typename AttnTiles<T>::acc_t value = sm.acc[r * Tiles::kLdAcc + d] * scale;
      if (row_factor) value *= row_factor[r];
      out.at(gr, gc) = Num<T>::from_acc(value);
    }
  }
}

// ---- forward ----------------------------------------------------------------------------------

// q: batch x nq x e, k: batch x nk x e, v: batch x nk x ev, with their strides.
template <typename T>
struct AttnInputs {
  const T *q, *k, *v;
  int64_t nq, nk, e, ev;
  int64_t q_sb, q_sn, q_se, k_sb, k_sn, k_se, v_sb, v_sn, v_se;

  // batch b of each input as a strided matrix
  __device__ Mat<const T> Q(int64_t b) const { return {q + b * q_sb, nq, e, q_sn, q_se}; }
  __device__ Mat<const T> K(int64_t b) const { return {k + b * k_sb, nk, e, k_sn, k_se}; }
  __device__ Mat<const T> V(int64_t b) const { return {v + b * v_sb, nk, ev, v_sn, v_se}; }
};

template <typename T>
struct AttnFwdParams : AttnInputs<T> {
  using acc_t = typename Num<T>::acc;
  T* out;
  acc_t* lse;  // batch x nq, contiguous
  int64_t o_sb, o_sn, o_se;
  int64_t q_blocks;  // ceil(nq / kRows)
  acc_t scale;
};

// grid: (batch * q_blocks, ceil(ev / kChunk)), block: kThreads, dynamic smem: kSmemBytes.
template <typename T>
__global__ void __launch_bounds__(AttnTiles<T>::kThreads) attention_fwd_kernel(const AttnFwdParams<T> p) {
  using Tiles = AttnTiles<T>;
  using acc_t = typename Tiles::acc_t;
  using op_t = typename Tiles::op_t;
  ATTNSEG_DYNAMIC_SMEM(smem_raw);
  const AttnSmem<T> sm(smem_raw);
  // 32-bit division: q_blocks <= gridDim.x (a 64-bit one is a subroutine call)
  const int64_t b = blockIdx.x / unsigned(p.q_blocks);
  const int64_t i0 = (blockIdx.x % unsigned(p.q_blocks)) * Tiles::kRows;
  const int64_t d0 = int64_t(blockIdx.y) * Tiles::kChunk;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const Mat<const T> Q = p.Q(b), K = p.K(b), V = p.V(b);

  zero_accumulator(sm);
  for (int r = threadIdx.x; r < Tiles::kRows; r += Tiles::kThreads) {
    sm.stat0[r] = neg_inf<acc_t>();  // m
    sm.stat1[r] = 0;                 // l
  }
  for (int64_t j0 = 0; j0 < p.nk; j0 += Tiles::kCols) {
    dot_nt(sm, sm.s, Q, i0, K, j0);  // S = Q Kᵀ (unscaled)
    // Online softmax: a warp per row, a lane per key.
    for (int r = warp; r < Tiles::kRows; r += Tiles::kWarps) {
      const acc_t s = j0 + lane < p.nk ? sm.s[r * Tiles::kLdS + lane] * p.scale : neg_inf<acc_t>();
      const acc_t m_old = sm.stat0[r];
      const acc_t m_new = max_acc(m_old, warp_max(s));
      // m_new = -inf only when every logit so far is -inf: keep l = 0 and O = 0 (no NaN from -inf - -inf)
      const bool empty = m_new == neg_inf<acc_t>();
      const acc_t prob = empty ? acc_t(0) : exp_acc(s - m_new);
      const acc_t alpha = empty ? acc_t(1) : exp_acc(m_old - m_new);
      const acc_t row_sum = warp_sum(prob);
      sm.op[r * Tiles::kLdOp + lane] = convert<op_t>(prob);
      if (lane == 0) {
        sm.stat1[r] = sm.stat1[r] * alpha + row_sum;
        sm.stat0[r] = m_new;
        sm.stat2[r] = alpha;
      }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < Tiles::kRows * Tiles::kChunk; idx += Tiles::kThreads) {
      const int r = idx / Tiles::kChunk;
      sm.acc[r * Tiles::kLdAcc + idx % Tiles::kChunk] *= sm.stat2[r];
    }
    accumulate(sm, V, j0, d0);  // O += P V[:, d0 : d0 + kChunk]
  }
  const Mat<T> out{p.out + b * p.o_sb, p.nq, p.ev, p.o_sn, p.o_se};
  // out = O / l as O · (1 / l): one division per row, not one per element (each IEEE division is a
  // call whose saved registers made a stack frame); l = 0 gives 0 · inf = NaN, as 0 / 0 would.
  for (int r = threadIdx.x; r < Tiles::kRows; r += Tiles::kThreads) sm.stat2[r] = acc_t(1) / sm.stat1[r];
  __syncthreads();
  store_accumulator(sm, out, i0, d0, acc_t(1), sm.stat2);
  if (blockIdx.y == 0) {
    for (int r = threadIdx.x; r < Tiles::kRows; r += Tiles::kThreads) {
      // logsumexp of a row holding +inf is +inf (as torch.logsumexp), not inf + log(NaN)
      const acc_t m = sm.stat0[r];
      if (i0 + r < p.nq) p.lse[b * p.nq + i0 + r] = is_inf(m) ? m : m + log_acc(sm.stat1[r]);
    }
  }
}

// ---- backward ---------------------------------------------------------------------------------

template <typename T>
struct AttnBwdParams : AttnInputs<T> {
  using acc_t = typename Num<T>::acc;
  const T *out, *grad_out;
  const acc_t* lse;       // batch x nq, contiguous
  const acc_t* grad_lse;  // batch x nq, contiguous, or null
  acc_t* delta;           // batch x nq, contiguous: rowsum(dO ∘ O) − dlse
  T *dq, *dk, *dv;
  int64_t batch;
  int64_t o_sb, o_sn, o_se, do_sb, do_sn, do_se;
  int64_t dq_sb, dq_sn, dq_se, dk_sb, dk_sn, dk_se, dv_sb, dv_sn, dv_se;
  int64_t q_blocks, k_blocks, e_chunks;
  acc_t scale;

  __device__ Mat<const T> dO(int64_t b) const {
    return {grad_out + b * do_sb, this->nq, this->ev, do_sn, do_se};
  }
};

// delta = rowsum(dO ∘ O) − dlse: a warp per row. grid: ceil(batch * nq / kWarps).
template <typename T>
__global__ void __launch_bounds__(AttnTiles<T>::kThreads) attention_bwd_delta_kernel(const AttnBwdParams<T> p) {
  using acc_t = typename Num<T>::acc;
  constexpr int kWarps = AttnTiles<T>::kWarps;
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const bool valid = row < p.batch * p.nq;  // every lane of a warp agrees: the shuffles stay converged
  const int64_t b = valid ? row / p.nq : 0, i = valid ? row % p.nq : 0;
  acc_t sum = 0;
  if (valid) {
    for (int64_t d = lane; d < p.ev; d += 32) {
      sum += Num<T>::to_acc(p.grad_out[b * p.do_sb + i * p.do_sn + d * p.do_se]) *
             Num<T>::to_acc(p.out[b * p.o_sb + i * p.o_sn + d * p.o_se]);
    }
  }
  sum = warp_sum(sum);
  if (valid && lane == 0) p.delta[row] = sum - (p.grad_lse ? p.grad_lse[row] : acc_t(0));
}

// The backward's P = exp(S·scale − lse). A row whose lse is +inf held a +inf logit: its softmax
// is NaN throughout (as torch.softmax gives it), not exp(−inf − inf) = 0 off the inf.
template <typename A>
__device__ __forceinline__ A recompute_probability(A s, A scale, A lse) {
  return lse == static_cast<A>(INFINITY) ? static_cast<A>(NAN) : exp_acc(s * scale - lse);
}

// Loads lse and delta of rows (or columns) idx0 .. idx0 + kRows into stat0 / stat1. Outside the
// valid range lse = +inf and delta = 0; those rows are masked (dK/dV) or not stored (dQ).
template <typename T>
__device__ __forceinline__ void load_row_stats(const AttnSmem<T>& sm, const AttnBwdParams<T>& p, int64_t b,
                                               int64_t idx0) {
  using acc_t = typename Num<T>::acc;
  for (int r = threadIdx.x; r < AttnTiles<T>::kRows; r += AttnTiles<T>::kThreads) {
    const bool ok = idx0 + r < p.nq;
    sm.stat0[r] = ok ? p.lse[b * p.nq + idx0 + r] : static_cast<acc_t>(INFINITY);
    sm.stat1[r] = ok ? p.delta[b * p.nq + idx0 + r] : acc_t(0);
  }
}

// dQ[rows i0.., cols e0..] = scale · Σ_j dS_ij K_j. grid: (batch * q_blocks, e_chunks).
template <typename T>
__global__ void __launch_bounds__(AttnTiles<T>::kThreads) attention_bwd_dq_kernel(const AttnBwdParams<T> p) {
  using Tiles = AttnTiles<T>;
  using acc_t = typename Tiles::acc_t;
  using op_t = typename Tiles::op_t;
  ATTNSEG_DYNAMIC_SMEM(smem_raw);
  const AttnSmem<T> sm(smem_raw);
  const int64_t b = blockIdx.x / p.q_blocks;
  const int64_t i0 = (blockIdx.x % p.q_blocks) * Tiles::kRows;
  const int64_t e0 = int64_t(blockIdx.y) * Tiles::kChunk;
  const Mat<const T> Q = p.Q(b), K = p.K(b), V = p.V(b), dO = p.dO(b);

  zero_accumulator(sm);
  load_row_stats(sm, p, b, i0);
  for (int64_t j0 = 0; j0 < p.nk; j0 += Tiles::kCols) {
    dot_nt(sm, sm.s, Q, i0, K, j0);    // S
    dot_nt(sm, sm.s2, dO, i0, V, j0);  // dP
    for (int idx = threadIdx.x; idx < Tiles::kRows * Tiles::kCols; idx += Tiles::kThreads) {
      const int r = idx / Tiles::kCols, c = idx % Tiles::kCols;
      const acc_t prob = j0 + c < p.nk ? recompute_probability(sm.s[r * Tiles::kLdS + c], p.scale, sm.stat0[r])
                                       : acc_t(0);
      sm.op[r * Tiles::kLdOp + c] = convert<op_t>(prob * (sm.s2[r * Tiles::kLdS + c] - sm.stat1[r]));
    }
    accumulate(sm, K, j0, e0);  // dQ += dS K
  }
  store_accumulator(sm, Mat<T>{p.dq + b * p.dq_sb, p.nq, p.e, p.dq_sn, p.dq_se}, i0, e0, p.scale,
                    static_cast<const acc_t*>(nullptr));
}

// dK (blockIdx.y < e_chunks) or dV (the rest) for key rows c0 .. c0 + kRows:
//   dK = scale · Σ_i dSᵀ_ci Q_i,  dV = Σ_i Pᵀ_ci dO_i.  grid: (batch * k_blocks, e_chunks + ev_chunks).
template <typename T>
__global__ void __launch_bounds__(AttnTiles<T>::kThreads) attention_bwd_dkv_kernel(const AttnBwdParams<T> p) {
  using Tiles = AttnTiles<T>;
  using acc_t = typename Tiles::acc_t;
  using op_t = typename Tiles::op_t;
  ATTNSEG_DYNAMIC_SMEM(smem_raw);
  const AttnSmem<T> sm(smem_raw);
  // 32-bit division: k_blocks <= gridDim.x (a 64-bit one is a subroutine call)
  const int64_t b = blockIdx.x / unsigned(p.k_blocks);
  const int64_t c0 = (blockIdx.x % unsigned(p.k_blocks)) * Tiles::kRows;
  const bool is_dk = blockIdx.y < p.e_chunks;
  const int64_t col0 = (is_dk ? int64_t(blockIdx.y) : int64_t(blockIdx.y) - p.e_chunks) * Tiles::kChunk;
  const Mat<const T> Q = p.Q(b), K = p.K(b), V = p.V(b), dO = p.dO(b);

  zero_accumulator(sm);
  for (int64_t i0 = 0; i0 < p.nq; i0 += Tiles::kCols) {
    load_row_stats(sm, p, b, i0);  // per query column here
    dot_nt(sm, sm.s, K, c0, Q, i0);                 // Sᵀ
    if (is_dk) dot_nt(sm, sm.s2, V, c0, dO, i0);    // dPᵀ
    for (int idx = threadIdx.x; idx < Tiles::kRows * Tiles::kCols; idx += Tiles::kThreads) {
      const int r = idx / Tiles::kCols, c = idx % Tiles::kCols;
      const acc_t prob =
          i0 + c < p.nq ? recompute_probability(sm.s[r * Tiles::kLdS + c], p.scale, sm.stat0[c]) : acc_t(0);
      const acc_t value = is_dk ? prob * (sm.s2[r * Tiles::kLdS + c] - sm.stat1[c]) : prob;
      sm.op[r * Tiles::kLdOp + c] = convert<op_t>(value);
    }
    // G = Q or dO, chosen field by field: a select of the whole Mat would live in a stack frame.
    const Mat<const T> G{is_dk ? Q.ptr : dO.ptr, is_dk ? Q.rows : dO.rows, is_dk ? Q.cols : dO.cols,
                         is_dk ? Q.s_row : dO.s_row, is_dk ? Q.s_col : dO.s_col};
    accumulate(sm, G, i0, col0);
  }
  if (is_dk) {
    store_accumulator(sm, Mat<T>{p.dk + b * p.dk_sb, p.nk, p.e, p.dk_sn, p.dk_se}, c0, col0, p.scale,
                      static_cast<const acc_t*>(nullptr));
  } else {
    store_accumulator(sm, Mat<T>{p.dv + b * p.dv_sb, p.nk, p.ev, p.dv_sn, p.dv_se}, c0, col0, acc_t(1),
                      static_cast<const acc_t*>(nullptr));
  }
}

}  // namespace attnseg::cuda
