// fp32 attention on CUDA cores with the flash-attention-2 structure (IEEE fp32, no TF32): the
// forward, and the backward's dV, which has the same shape with the roles of queries and keys
// swapped. One block per (batch, 64 resident rows, Ev tile of up to 256 columns) streams 32-row
// tiles of the other operands once, so S is computed once per (row block, tile) for the whole Ev
// tile (twice at Ev = 512, in two 256-wide tiles: 1.11 x the useful FLOPs, against 1.78 for the
// old forward's 64-wide slices).
//   forward: rows = 64 queries (Q resident), tiles of 32 keys (K, V): S = Q Kᵀ, online softmax,
//            O += P V, then out = O / l and lse.
//   dV:      rows = 64 keys (K resident), tiles of 32 queries (Q, dO, lse): Sᵀ = K Qᵀ,
//            Pᵀ = exp(Sᵀ · scale − lse), dV += Pᵀ dO.
//
// Per tile, 256 threads (8 warps):
//   S (64 x 32): thread (sy, sx) = (t / 16, t % 16) owns rows sy + 16 i (i < 4) and columns
//     sx + 16 j (j < 2), a 4 x 2 FFMA micro-tile fed from shared memory (rows padded to E + 1 so
//     both operands read without bank conflicts: the resident one as broadcasts, the streamed
//     one as 16 consecutive banks).
//   Forward softmax in registers: a row's 16 threads are one half-warp, reduced by xor shuffles;
//     running max and sum stay in registers. P goes to shared memory stored [column][row], and
//     the forward's rescale factor exp(m_old − m_new) per row beside it.
//   Out (64 x kEvTile) += P G: thread (ty, tx) = (warp, lane) owns rows 8 ty + i (i < 8) and
//     columns tx + 32 j (j < kEvTile / 32), an 8 x 8 FFMA micro-tile (at kEvTile = 256) resident
//     in registers for the whole loop; per streamed row 8 broadcast loads of P and 8
//     conflict-free loads of G feed 64 FFMA.
// The next tile is fetched into registers while the current one is computed and written to
// shared memory after it (a software pipeline; fp32 has no tensor-core operand to feed from a
// cp.async ring, and one staging buffer keeps the block within 99 KiB). Loads run with
// consecutive threads along each operand's unit-stride axis (tokens for DANet's channel-first
// views, features for contiguous tensors); offsets inside a tile are 32-bit.
//
// Softmax arithmetic as the old kernels (attention.cuh): exp with full precision, NaN-propagating
// maximum, rows whose logits are all −inf give l = 0 (so O / l = NaN as the reference), lse = m +
// log l, or m when m is ±inf; the backward's recompute_probability. fp64 stays on the old kernels
// (it exists for gradcheck).
#pragma once

#include "attention.cuh"
#include "flash_attention_bwd.cuh"  // FlashBwdParams (dK/dQ); through it TileSrc, max_nan

namespace attnseg::cuda {

template <int kHeadDim, int kEvTile>
struct FfmaTiles {
  static constexpr int kThreads = 256;
  static constexpr int kBlockM = 64;  // resident rows per block (queries, or keys in dV)
  static constexpr int kBlockN = 32;  // streamed rows per tile (keys, or queries in dV)
  static constexpr int kLdX = kHeadDim + 1;  // X and Y stored [token][feature]
  static constexpr int kLdG = kEvTile + 1;   // G stored [token][column]
  static constexpr int kLdP = kBlockM + 4;   // P stored [streamed][resident]; 16-byte rows
  static constexpr int kMj = kEvTile / 32;   // Out columns per thread
  static constexpr int kXElems = kBlockM * kLdX, kYElems = kBlockN * kLdX, kGElems = kBlockN * kLdG;
  static constexpr int kPElems = kBlockN * kLdP;
  static constexpr size_t kSmemBytes = sizeof(float) * (kXElems + kYElems + kGElems + kPElems + kBlockM);
  static_assert(kHeadDim % 16 == 0 && kHeadDim <= 128 && kEvTile % 32 == 0 && kEvTile <= 256, "tile sizes");
  static_assert(kThreads == 16 * (kBlockM / 4) && kThreads == 32 * (kBlockM / 8), "micro-tile grids");
  // 65 KiB at (64, 256), 90 KiB at (128, 256): opted in by the launcher, within 99 KiB.
  static_assert(kSmemBytes <= 99 * 1024, "within the smallest opt-in shared memory of the targeted GPUs");
};

// The operands of one FFMA kernel: X (kBlockM rows, resident), Y (streamed 32 rows at a time,
// scored against X: S = X Yᵀ) and G (streamed with Y, weighted by P: Out = P G).
//   forward: X = Q, Y = K, G = V, Out = O (softmax online, lse written)
//   dV:      X = K, Y = Q, G = dO, Out = dV (Pᵀ = exp(Sᵀ · scale − lse) from the forward's lse)
struct FfmaParams {
  struct Operand {  // a [B, N, W] input: base and batch / token / feature strides
    const float* ptr;
    int64_t sb, sn, sw;
  };
  Operand x, y, g;
  int64_t x_rows, y_rows, e, ev;
  float* out;
  int64_t o_sb, o_sn, o_se;
  float* lse_out;       // forward: batch x x_rows, contiguous
  const float* lse_in;  // dV: the forward's lse, batch x y_rows, contiguous
  int64_t x_blocks;     // ceil(x_rows / kBlockM)
  float scale;
  bool x_tokens_major;  // X's unit-stride axis is its token axis (DANet's channel-first views)
};

// A kRows x kCols tile (TileSrc: zeros outside its valid rows / cols) fetched into registers by
// fetch() and written to shared memory [row][col], row stride ld, by store(): the register half of
// a software pipeline. Consecutive threads take consecutive elements along rows (kRowsFast: the
// source's unit-stride axis is the row index) or along columns.
template <int kRows, int kCols, int kThreads, bool kRowsFast>
struct TileRegs {
  static constexpr int kFast = kRowsFast ? kRows : kCols;  // threads along the fast axis
  static_assert(kThreads % kFast == 0 && (kRows * kCols) % kThreads == 0, "whole passes over the tile");
  static constexpr int kSlowStep = kThreads / kFast;      // slow-axis distance of a thread's elements
  static constexpr int kCount = kRows * kCols / kThreads;
  float v[kCount];

  __device__ __forceinline__ void fetch(const TileSrc<float>& src) {
    const int f = threadIdx.x % kFast, s0 = threadIdx.x / kFast;
    const int fast_stride = kRowsFast ? src.row_stride : src.col_stride;
    const int slow_stride = kRowsFast ? src.col_stride : src.row_stride;
    const bool fast_ok = f < (kRowsFast ? src.rows : src.cols);
    const int slow_left = (kRowsFast ? src.cols : src.rows) - s0;
    const float* const g = src.origin + (f * fast_stride + s0 * slow_stride);
    ATTNSEG_UNROLL
    for (int i = 0; i < kCount; ++i) v[i] = (fast_ok && i * kSlowStep < slow_left) ? g[i * kSlowStep * slow_stride] : 0.0f;
  }

  __device__ __forceinline__ void store(float* smem, int ld) const {
    const int f = threadIdx.x % kFast, s0 = threadIdx.x / kFast;
    float* const s = smem + (kRowsFast ? f * ld + s0 : s0 * ld + f);
    ATTNSEG_UNROLL
    for (int i = 0; i < kCount; ++i) s[i * kSlowStep * (kRowsFast ? 1 : ld)] = v[i];
  }
};

// A tile loaded once (the block's resident operand): fetched and stored through TileRegs, along
// rows when `rows_fast` (the source's unit-stride axis is its token axis), else along columns.
template <int kRows, int kCols, int kThreads>
__device__ __forceinline__ void load_resident_tile(float* smem, int ld, const TileSrc<float>& src, bool rows_fast) {
  if (rows_fast) {
    TileRegs<kRows, kCols, kThreads, true> regs;
    regs.fetch(src);
    regs.store(smem, ld);
  } else {
    TileRegs<kRows, kCols, kThreads, false> regs;
    regs.fetch(src);
    regs.store(smem, ld);
  }
}

// grid: (batch * ceil(x_rows / 64), ceil(ev / kEvTile)), block: 256, dynamic smem: kSmemBytes.
// kYTokensMajor / kGTokensMajor: the streamed operands' unit-stride axis is their token axis.
template <int kHeadDim, int kEvTile, bool kYTokensMajor, bool kGTokensMajor, bool kDv>
__global__ void __launch_bounds__(FfmaTiles<kHeadDim, kEvTile>::kThreads) ffma_attention_kernel(const FfmaParams p) {
  using Tiles = FfmaTiles<kHeadDim, kEvTile>;
  constexpr int kBlockM = Tiles::kBlockM, kBlockN = Tiles::kBlockN, kThreads = Tiles::kThreads;
  constexpr int kLdX = Tiles::kLdX, kLdG = Tiles::kLdG, kLdP = Tiles::kLdP, kMj = Tiles::kMj;
  ATTNSEG_DYNAMIC_SMEM(smem_raw);
  float* const x_smem = reinterpret_cast<float*>(smem_raw);
  float* const y_smem = x_smem + Tiles::kXElems;
  float* const g_smem = y_smem + Tiles::kYElems;
  float* const p_smem = g_smem + Tiles::kGElems;
  float* const alpha_smem = p_smem + Tiles::kPElems;  // forward, per X row: exp(m_old − m_new), then 1 / l

  const int64_t b = blockIdx.x / unsigned(p.x_blocks);
  const int64_t i0 = (blockIdx.x % unsigned(p.x_blocks)) * kBlockM;
  const int ev0 = int(blockIdx.y) * kEvTile;
  const int ny = int(p.y_rows), e = int(p.e);
  const int ev_cols = std::min<int>(kEvTile, int(p.ev) - ev0);
  const int sy = threadIdx.x / 16, sx = threadIdx.x % 16;  // S micro-tile grid
  const int ty = threadIdx.x / 32, tx = threadIdx.x % 32;  // Out micro-tile grid
  const float* const y_batch = p.y.ptr + b * p.y.sb;
  const float* const g_batch = p.g.ptr + b * p.g.sb + ev0 * p.g.sw;
  [[maybe_unused]] const float* const lse_batch = kDv ? p.lse_in + b * p.y_rows : nullptr;

  auto y_src = [&](int j0) {
    return TileSrc<float>{y_batch + j0 * p.y.sn, int(p.y.sn), int(p.y.sw), std::min(kBlockN, ny - j0), e};
  };
  auto g_src = [&](int j0) {
    return TileSrc<float>{g_batch + j0 * p.g.sn, int(p.g.sn), int(p.g.sw), std::min(kBlockN, ny - j0), ev_cols};
  };
  TileRegs<kBlockN, kHeadDim, kThreads, kYTokensMajor> y_next;
  TileRegs<kBlockN, kEvTile, kThreads, kGTokensMajor> g_next;
  [[maybe_unused]] float lse_next[2];  // dV: lse of this thread's Y rows sx + 16 j of the next tile (+inf past Nq)
  auto fetch = [&](int j0) {
    y_next.fetch(y_src(j0));
    g_next.fetch(g_src(j0));
    if constexpr (kDv) {
      ATTNSEG_UNROLL
      for (int j = 0; j < 2; ++j) lse_next[j] = j0 + sx + 16 * j < ny ? lse_batch[j0 + sx + 16 * j] : INFINITY;
    }
  };

  // ---- prologue: X (resident) and the first Y/G tile ----
  {
    const TileSrc<float> x_src{p.x.ptr + b * p.x.sb + i0 * p.x.sn, int(p.x.sn), int(p.x.sw),
                               int(std::min<int64_t>(kBlockM, p.x_rows - i0)), e};
    load_resident_tile<kBlockM, kHeadDim, kThreads>(x_smem, kLdX, x_src, p.x_tokens_major);
  }
  fetch(0);
  y_next.store(y_smem, kLdX);
  g_next.store(g_smem, kLdG);
  __syncthreads();

  float o_acc[8][kMj];  // Out rows 8 ty + i, columns tx + 32 j
  zero_micro_tile(o_acc);
  float row_max[4], row_sum[4];  // forward: rows sy + 16 i (the same in all 16 threads of the half-warp)
  ATTNSEG_UNROLL
  for (int i = 0; i < 4; ++i) row_max[i] = neg_inf<float>(), row_sum[i] = 0.0f;
  const float scale = p.scale;
  const float* const x_row = x_smem + sy * kLdX;
  const float* const y_row = y_smem + sx * kLdX;
  const float* const p_col = p_smem + 8 * ty;
  const float* const g_col = g_smem + tx;

  // ---- main loop over tiles of Y and G ----
  for (int j0 = 0; j0 < ny; j0 += kBlockN) {
    [[maybe_unused]] float lse[2];
    if constexpr (kDv) lse[0] = lse_next[0], lse[1] = lse_next[1];
    const bool more = j0 + kBlockN < ny;
    if (more) fetch(j0 + kBlockN);  // in flight while this tile is computed

    // S = X Yᵀ for rows sy + 16 i, columns sx + 16 j
    float s[4][2];
    zero_micro_tile(s);
    ATTNSEG_UNROLL
    for (int d = 0; d < kHeadDim; ++d) fma_micro_tile(s, x_row + d, 16 * kLdX, y_row + d, 16 * kLdX);

    ATTNSEG_UNROLL
    for (int i = 0; i < 4; ++i) {
      float prob[2];
      if constexpr (kDv) {
        // Pᵀ = exp(Sᵀ · scale − lse); queries past Nq contribute nothing
        ATTNSEG_UNROLL
        for (int j = 0; j < 2; ++j)
          prob[j] = j0 + sx + 16 * j < ny ? recompute_probability(s[i][j], scale, lse[j]) : 0.0f;
      } else {
        // Online softmax; keys past Nk (only in the last tile) get logit −inf.
        float x[2];
        ATTNSEG_UNROLL
        for (int j = 0; j < 2; ++j) x[j] = j0 + sx + 16 * j < ny ? s[i][j] * scale : neg_inf<float>();
        float tile_max = max_nan(x[0], x[1]);
        ATTNSEG_UNROLL
        for (int offset = 8; offset > 0; offset >>= 1)
          tile_max = max_nan(tile_max, __shfl_xor_sync(kFullMask, tile_max, offset));
        const float m_new = max_nan(row_max[i], tile_max);
        // m_new = −inf only when every logit so far is −inf: keep l = 0 and O = 0 (no −inf − −inf)
        const bool empty = m_new == neg_inf<float>();
        float tile_sum = 0.0f;
        ATTNSEG_UNROLL
        for (int j = 0; j < 2; ++j) {
          prob[j] = empty ? 0.0f : exp_acc(x[j] - m_new);
          tile_sum += prob[j];
        }
        ATTNSEG_UNROLL
        for (int offset = 8; offset > 0; offset >>= 1) tile_sum += __shfl_xor_sync(kFullMask, tile_sum, offset);
        const float alpha = empty ? 1.0f : exp_acc(row_max[i] - m_new);
        row_sum[i] = row_sum[i] * alpha + tile_sum;
        row_max[i] = m_new;
        if (sx == 0) alpha_smem[sy + 16 * i] = alpha;
      }
      ATTNSEG_UNROLL
      for (int j = 0; j < 2; ++j) p_smem[(sx + 16 * j) * kLdP + sy + 16 * i] = prob[j];
    }
    __syncthreads();  // P (and alpha) visible

    // Out = alpha · Out + P G (forward), Out += Pᵀ dO (dV)
    if constexpr (!kDv) {
      ATTNSEG_UNROLL
      for (int i = 0; i < 8; ++i) {
        const float a = alpha_smem[8 * ty + i];
        ATTNSEG_UNROLL
        for (int j = 0; j < kMj; ++j) o_acc[i][j] *= a;
      }
    }
    ATTNSEG_UNROLL
    for (int c = 0; c < kBlockN; ++c) fma_micro_tile(o_acc, p_col + c * kLdP, 1, g_col + c * kLdG, 32);
    __syncthreads();  // every thread is done with this tile's Y, G, P and alpha

    if (more) {
      y_next.store(y_smem, kLdX);
      g_next.store(g_smem, kLdG);
      __syncthreads();
    }
  }

  // ---- epilogue: forward out = O · (1 / l) (l = 0 gives 0 · inf = NaN, as 0 / 0 would) and lse;
  // dV as accumulated ----
  if constexpr (!kDv) {
    if (sx == 0) {
      ATTNSEG_UNROLL
      for (int i = 0; i < 4; ++i) {
        const int r = sy + 16 * i;
        alpha_smem[r] = 1.0f / row_sum[i];
        // logsumexp of a row holding +inf is +inf (as torch.logsumexp), not inf + log(NaN)
        const float m = row_max[i];
        if (blockIdx.y == 0 && i0 + r < p.x_rows)
          p.lse_out[b * p.x_rows + i0 + r] = is_inf(m) ? m : m + log_acc(row_sum[i]);
      }
    }
    __syncthreads();
  }
  float* const out = p.out + b * p.o_sb + ev0 * p.o_se;
  ATTNSEG_UNROLL
  for (int i = 0; i < 8; ++i) {
    const int r = 8 * ty + i;
    if (i0 + r >= p.x_rows) break;
    const float factor = kDv ? 1.0f : alpha_smem[r];
    float* const out_row = out + (i0 + r) * p.o_sn;
    ATTNSEG_UNROLL
    for (int j = 0; j < kMj; ++j)
      if (tx + 32 * j < ev_cols) out_row[(tx + 32 * j) * p.o_se] = o_acc[i][j] * factor;
  }
}

// ---- backward: dK and dQ ---------------------------------------------------------------------
//
// fp32, E <= 64 (padded to 64), any Ev: one block per (batch, 64 keys) holds K (shared memory) and
// streams 32-query tiles once. Per tile: Sᵀ = K Qᵀ and dPᵀ = V dOᵀ (V and dO in 64-wide Ev chunks
// through shared memory, so any Ev fits 58 KiB), both as 4 x 2 micro-tiles in the S layout above;
// Pᵀ = exp(Sᵀ · scale − lse), dSᵀ = Pᵀ ∘ (dPᵀ − delta) to shared memory stored [query][key];
// dK += dSᵀ Q (8 x 2 per thread, registers for the whole loop) and the tile's dQ partial dS K
// (4 x 2 per thread), which is added to the fp32 accumulator of flash_attention_bwd.cuh as the
// fp16/bf16 dK/dQ kernel does (kOrderedDq: by fp32 atomic reductions, the default, or in key-block
// order behind the counters under torch.use_deterministic_algorithms, bitwise reproducible, no
// atomics). dP is computed once per (query tile, key block): with the dV kernel
// above the backward issues (4E + 2Ev) / (3E + 2Ev) of the useful FLOPs, 1.05 at E = 64, Ev = 512.
// The next stage (V/dO chunk, or the next tile's Q, lse and delta) is fetched into registers
// while the current one is computed. kQMajor / kDoMajor / kVMajor: that operand's unit-stride axis
// is its token axis.
struct FfmaDkdqTiles {
  static constexpr int kThreads = 256;
  static constexpr int kBlockN = 64;   // keys per block
  static constexpr int kBlockQ = 32;   // queries per tile
  static constexpr int kHeadDim = 64;  // E padded to 64: the dQ accumulator's row width
  static constexpr int kChunk = 64;    // Ev chunk of dPᵀ
  static constexpr int kLd = 65;       // K, Q, V chunk, dO chunk stored [token][feature]
  static constexpr int kLdDs = kBlockN + 4;  // dS stored [query][key]; 16-byte rows
  static constexpr int kKElems = kBlockN * kLd, kQElems = kBlockQ * kLd, kVElems = kBlockN * kLd;
  static constexpr int kDoElems = kBlockQ * kLd, kDsElems = kBlockQ * kLdDs;
  static constexpr size_t kSmemBytes = sizeof(float) * (kKElems + kQElems + kVElems + kDoElems + kDsElems);
  static_assert(kSmemBytes <= 99 * 1024, "within the smallest opt-in shared memory of the targeted GPUs");
};

// grid: batch * ceil(nk / 64), block: 256, dynamic smem: kSmemBytes. Needs delta (the delta kernel),
// a zeroed dq_accum and, when kOrderedDq, zeroed dq_counters; flash_attention_bwd_dq_convert_kernel
// then writes dq.
template <bool kQMajor, bool kDoMajor, bool kVMajor, bool kOrderedDq>
__global__ void __launch_bounds__(FfmaDkdqTiles::kThreads) ffma_attention_bwd_dkdq_kernel(const FlashBwdParams<float> p) {
  using Tiles = FfmaDkdqTiles;
  constexpr int kBlockN = Tiles::kBlockN, kBlockQ = Tiles::kBlockQ, kThreads = Tiles::kThreads;
  constexpr int kHeadDim = Tiles::kHeadDim, kChunk = Tiles::kChunk, kLd = Tiles::kLd, kLdDs = Tiles::kLdDs;
  ATTNSEG_DYNAMIC_SMEM(smem_raw);
  float* const k_smem = reinterpret_cast<float*>(smem_raw);
  float* const q_smem = k_smem + Tiles::kKElems;
  float* const v_smem = q_smem + Tiles::kQElems;
  float* const do_smem = v_smem + Tiles::kVElems;
  float* const ds_smem = do_smem + Tiles::kDoElems;

  const int64_t b = blockIdx.x / unsigned(p.dv_k_blocks);
  const int key_block = int(blockIdx.x % unsigned(p.dv_k_blocks));
  const int64_t j0 = int64_t(key_block) * kBlockN;
  const int nq = int(p.nq), e = int(p.e), ev = int(p.ev);
  const int keys = int(std::min<int64_t>(kBlockN, p.nk - j0));
  const int chunks = int(ceil_div(ev, kChunk));
  const int sy = threadIdx.x / 16, sx = threadIdx.x % 16;  // Sᵀ / dPᵀ: keys sy + 16 i, queries sx + 16 j
  const int ty = threadIdx.x / 32, tx = threadIdx.x % 32;  // dK: keys 8 ty + i; dQ: queries 4 ty + i
  const float* const q_batch = p.q + b * p.q_sb;
  const float* const do_batch = p.grad_out + b * p.do_sb;
  const float* const v_block = p.v + b * p.v_sb + j0 * p.v_sn;
  const float* const lse_batch = p.lse + b * p.nq;
  const float* const delta_batch = p.delta + b * p.nq;

  TileRegs<kBlockQ, kHeadDim, kThreads, kQMajor> q_next;
  TileRegs<kBlockQ, kChunk, kThreads, kDoMajor> do_next;
  TileRegs<kBlockN, kChunk, kThreads, kVMajor> v_next;
  float lse_next[2], delta_next[2];  // of this thread's queries sx + 16 j of the next tile
  // Stage (tile i0, chunk c): the dO and V chunk, and at c = 0 the tile's Q, lse and delta.
  auto fetch = [&](int i0, int c) {
    const int rows = std::min(kBlockQ, nq - i0), cols = std::min(kChunk, ev - c * kChunk);
    do_next.fetch(TileSrc<float>{do_batch + i0 * p.do_sn + c * kChunk * p.do_se, int(p.do_sn), int(p.do_se), rows,
                                 cols});
    v_next.fetch(TileSrc<float>{v_block + c * kChunk * p.v_se, int(p.v_sn), int(p.v_se), keys, cols});
    if (c == 0) {
      q_next.fetch(TileSrc<float>{q_batch + i0 * p.q_sn, int(p.q_sn), int(p.q_se), rows, e});
      ATTNSEG_UNROLL
      for (int j = 0; j < 2; ++j) {
        const bool ok = i0 + sx + 16 * j < nq;
        lse_next[j] = ok ? lse_batch[i0 + sx + 16 * j] : 0.0f;
        delta_next[j] = ok ? delta_batch[i0 + sx + 16 * j] : 0.0f;
      }
    }
  };

  // ---- prologue: K (resident) and the first stage ----
  {
    const TileSrc<float> k_src{p.k + b * p.k_sb + j0 * p.k_sn, int(p.k_sn), int(p.k_se), keys, e};
    load_resident_tile<kBlockN, kHeadDim, kThreads>(k_smem, kLd, k_src, p.k_keys_major);
  }
  fetch(0, 0);

  float dk_acc[8][2];  // dK rows 8 ty + i, features tx + 32 j
  zero_micro_tile(dk_acc);
  const float scale = p.scale;
  bool key_ok[4];
  ATTNSEG_UNROLL
  for (int i = 0; i < 4; ++i) key_ok[i] = sy + 16 * i < keys;
  const float* const k_row = k_smem + sy * kLd;    // Sᵀ's rows
  const float* const q_row = q_smem + sx * kLd;    // Sᵀ's columns
  const float* const v_row = v_smem + sy * kLd;    // dPᵀ's rows
  const float* const do_row = do_smem + sx * kLd;  // dPᵀ's columns

  // ---- main loop over query tiles ----
  for (int it = 0, i0 = 0; i0 < nq; ++it, i0 += kBlockQ) {
    float lse[2], delta[2];
    ATTNSEG_UNROLL
    for (int j = 0; j < 2; ++j) lse[j] = lse_next[j], delta[j] = delta_next[j];
    // Q of this tile (fetched during the previous tile) and its first chunk to shared memory
    __syncthreads();  // the previous tile is done with Q, dO, V and dS
    q_next.store(q_smem, kLd);
    do_next.store(do_smem, kLd);
    v_next.store(v_smem, kLd);
    __syncthreads();

    // dPᵀ = V dOᵀ over Ev, chunk by chunk; the stage after each is fetched meanwhile
    float dp[4][2];
    zero_micro_tile(dp);
    for (int c = 0; c < chunks; ++c) {
      if (c + 1 < chunks) {
        fetch(i0, c + 1);
      } else if (i0 + kBlockQ < nq) {
        fetch(i0 + kBlockQ, 0);
      }
      ATTNSEG_UNROLL_N(16)
      for (int d = 0; d < kChunk; ++d) fma_micro_tile(dp, v_row + d, 16 * kLd, do_row + d, 16 * kLd);
      if (c + 1 < chunks) {
        __syncthreads();
        do_next.store(do_smem, kLd);
        v_next.store(v_smem, kLd);
        __syncthreads();
      }
    }

    // Sᵀ = K Qᵀ, Pᵀ, dSᵀ = Pᵀ ∘ (dPᵀ − delta) (0 for keys past Nk and queries past Nq)
    float s[4][2];
    zero_micro_tile(s);
    ATTNSEG_UNROLL
    for (int d = 0; d < kHeadDim; ++d) fma_micro_tile(s, k_row + d, 16 * kLd, q_row + d, 16 * kLd);
    ATTNSEG_UNROLL
    for (int i = 0; i < 4; ++i)
      ATTNSEG_UNROLL
      for (int j = 0; j < 2; ++j) {
        const bool ok = key_ok[i] && i0 + sx + 16 * j < nq;
        const float ds = ok ? recompute_probability(s[i][j], scale, lse[j]) * (dp[i][j] - delta[j]) : 0.0f;
        ds_smem[(sx + 16 * j) * kLdDs + sy + 16 * i] = ds;
      }
    __syncthreads();  // dS visible

    // dK += dSᵀ Q
    ATTNSEG_UNROLL
    for (int c = 0; c < kBlockQ; ++c) fma_micro_tile(dk_acc, ds_smem + c * kLdDs + 8 * ty, 1, q_smem + c * kLd + tx, 32);
    // the dQ partial dS K: queries 4 ty + i, features tx + 32 j
    float dq[4][2];
    zero_micro_tile(dq);
    ATTNSEG_UNROLL
    for (int c = 0; c < kBlockN; ++c) fma_micro_tile(dq, ds_smem + 4 * ty * kLdDs + c, kLdDs, k_smem + c * kLd + tx, 32);

    float* const acc = p.dq_accum + ((b * p.dq_tiles + it) * kBlockQ + 4 * ty) * kHeadDim + tx;
    if constexpr (kOrderedDq) {
      // Ordered (docs/flash_backward_design.md): key block j adds its partial after key blocks
      // 0 .. j − 1 have, so the sum runs in the same order on every run.
      int* const counter = p.dq_counters + b * p.dq_tiles + it;
      if (threadIdx.x == 0) warp::wait_until_equal(counter, key_block + p.dq_counter_skew);
      __syncthreads();
      ATTNSEG_UNROLL
      for (int i = 0; i < 4; ++i)
        ATTNSEG_UNROLL
        for (int j = 0; j < 2; ++j) acc[i * kHeadDim + 32 * j] += dq[i][j];
      __threadfence();
      __syncthreads();
      if (threadIdx.x == 0) warp::st_release_gpu(counter, key_block + 1);
    } else {
      // Atomic (FlashAttention-2's): no block waits on another (the barrier at the top of the
      // loop ends this tile's use of dS). A thread's cells tx and tx + 32 are not adjacent:
      // scalar reductions.
      ATTNSEG_UNROLL
      for (int i = 0; i < 4; ++i)
        ATTNSEG_UNROLL
        for (int j = 0; j < 2; ++j) warp::red_add_f32(acc + i * kHeadDim + 32 * j, dq[i][j]);
    }
  }

  // ---- epilogue: dK = scale · Σ dSᵀ Q in dk's layout ----
  float* const dk = p.dk + b * p.dk_sb;
  ATTNSEG_UNROLL
  for (int i = 0; i < 8; ++i) {
    const int r = 8 * ty + i;
    if (r >= keys) break;
    ATTNSEG_UNROLL
    for (int j = 0; j < 2; ++j)
      if (tx + 32 * j < e) dk[(j0 + r) * p.dk_sn + (tx + 32 * j) * p.dk_se] = dk_acc[i][j] * scale;
  }
}

}  // namespace attnseg::cuda
