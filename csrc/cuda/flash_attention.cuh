// Flash-attention-2 forward for fp16/bf16 on tensor cores, compiled by nvcc for the extension
// and by g++ for the SIMT emulator (tests/emu). Launch logic and the dispatch rule: host.h.
//
//   out = softmax(Q Kᵀ · scale) V,  lse = rowwise logsumexp(Q Kᵀ · scale)   (as attention.cuh)
//
// One block per (batch, 64 queries, kEvTile columns of Ev); 4 warps, each owns 16 query rows.
//   * The Q tile is loaded once; each warp keeps its 16 x E slice as mma A fragments in registers.
//   * K and V tiles of kBlockN keys stream through a two-stage shared-memory ring: 16-byte cp.async
//     of tile j+1 is in flight while tile j is computed (element-wise loads when the strides or
//     alignment do not allow 16-byte copies; chosen per operand on the host).
//   * S = Q Kᵀ (mma.sync m16n8k16, fp32), scale, ragged-key mask, online softmax (running max m,
//     running sum l, rescale of O by exp(m_old − m_new)), P rounded to T, O += P V: S, P and the
//     O accumulator never leave registers. Row statistics need only quad shuffles: the 4 lanes
//     of a quad hold one row's columns.
//   * Ev is split across blockIdx.y in kEvTile slices (256 at DANet's Ev = 512: S is computed
//     twice, issued/useful FLOPs (2E + Ev)/(E + Ev) = 1.11 at E = 64); a 16 x 256 fp32
//     accumulator is 128 registers per lane, the most that fits beside Q, S and addresses.
//
// Shared-memory layouts (all rows padded by 8 halves: 8 consecutive rows of an ldmatrix fall in
// 8 different 16-byte bank groups):
//   kKeysMajor = false (contiguous [N, E] / [N, Ev] inputs, feature axis unit-stride):
//     K tile [keys][E]  -> S's B fragments by plain ldmatrix;  V tile [keys][Ev] -> ldmatrix.trans
//   kKeysMajor = true (DANet's channel-first views, N axis unit-stride):
//     K tile [E][keys]  -> ldmatrix.trans;                      V tile [Ev][keys] -> plain ldmatrix
//   Q tile [queries][E] or [E][queries] by q's own layout (a runtime choice outside the main loop).
// Global loads always run along the smem row, so consecutive threads read consecutive addresses
// on the unit-stride axis (16 bytes each with cp.async).
//
// NaN/inf semantics are the old kernel's (attention_fwd_kernel): NaN-propagating max, a row whose
// running max is −inf keeps p = 0 (and O = l = 0), lse = m for m = ±inf, out = O / l (0/0 = NaN for a
// row of −inf logits, as the reference's softmax gives).
#pragma once

#include <algorithm>

#include "attention.cuh"
#include "warp.cuh"

namespace attnseg::cuda {

template <int kHeadDim_, int kEvTile_, bool kKeysMajor_>
struct FlashFwdTiles {
  static constexpr int kHeadDim = kHeadDim_;  // E rounded up to 16, 32, 64 or 128 (zero padding)
  static constexpr int kEvTile = kEvTile_;    // output columns a block owns: 64, 128 or 256
  static constexpr bool kKeysMajor = kKeysMajor_;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockM = 16 * kWarps;  // queries per block, 16 per warp
  // Keys per tile. 64 halves the per-tile overhead (O rescale, cp.async issue, barrier) per MMA,
  // but at kEvTile = 256 it needs 252 registers and 99 KiB of shared memory at E = 64: one block
  // per A100 SM instead of two; the wide tiles keep 32 (240 registers, 59 KiB).
  static constexpr int kBlockN = kHeadDim + kEvTile <= 192 ? 64 : 32;
  static constexpr int kStages = 2;
  static constexpr int kPad = 8;
  // Q tile: [kBlockM][kLdQRowMajor] or [kHeadDim][kLdQKeysMajor]; room for either.
  static constexpr int kLdQRowMajor = kHeadDim + kPad;
  static constexpr int kLdQKeysMajor = kBlockM + kPad;
  static constexpr int kQElems = std::max(kBlockM * kLdQRowMajor, kHeadDim * kLdQKeysMajor);
  static constexpr int kLdK = kKeysMajor ? kBlockN + kPad : kHeadDim + kPad;
  static constexpr int kKElems = (kKeysMajor ? kHeadDim : kBlockN) * kLdK;
  static constexpr int kLdV = kKeysMajor ? kBlockN + kPad : kEvTile + kPad;
  static constexpr int kVElems = (kKeysMajor ? kEvTile : kBlockN) * kLdV;
  static constexpr size_t kSmemBytes = 2 * size_t(kQElems + kStages * (kKElems + kVElems));

  static_assert(kHeadDim % 16 == 0 && kHeadDim <= 128 && kEvTile % 16 == 0 && kBlockN % 16 == 0);
  static_assert(kQElems % 8 == 0 && kKElems % 8 == 0 && kVElems % 8 == 0, "16-byte aligned tiles");
};

template <typename T>
struct FlashFwdParams : AttnFwdParams<T> {
  // Chosen on the host (host.h): q's tile is stored [E][queries] (q unit-stride along Nq), and
  // which operands are copied by 16-byte cp.async (unit stride along the smem row, other strides
  // multiples of 8 elements, 16-byte aligned base) rather than element by element.
  bool q_keys_major, q_async, k_async, v_async;
};

// The global source of one smem tile: element (r, c) of the tile (r < rows, c < cols; zero
// outside) is origin[r * row_stride + c * col_stride]. Offsets inside a tile are 32-bit (the host
// checks they fit); origin carries the 64-bit batch and tile offsets.
template <typename T>
struct TileSrc {
  const T* origin;
  int row_stride, col_stride;
  int rows, cols;
};

// smem[r * kLd + c] = tile element (r, c) for r < kRows, c < kCols (zeros outside the source).
// async: 16-byte cp.async along the row (the caller commits the group); else element loads,
// consecutive threads on whichever axis is unit-stride.
template <int kRows, int kCols, int kLd, int kThreads, typename T>
__device__ __forceinline__ void load_tile(T* smem, const TileSrc<T>& src, bool async) {
  static_assert(kCols % 8 == 0 && kLd % 8 == 0, "rows of whole 16-byte chunks");
  if (async) {
    // Thread x copies chunk x % kChunksPerRow of rows x / kChunksPerRow + i · kRowsPerPass: a static
    // trip count and per-thread column, so the issue loop is a straight line of LDGSTS.
    constexpr int kChunksPerRow = kCols / 8;
    static_assert(kThreads % kChunksPerRow == 0, "a pass covers whole rows");
    constexpr int kRowsPerPass = kThreads / kChunksPerRow;
    constexpr int kPasses = (kRows + kRowsPerPass - 1) / kRowsPerPass;
    const int r0 = threadIdx.x / kChunksPerRow, c = (threadIdx.x % kChunksPerRow) * 8;
    const int col_bytes = std::max(0, std::min(8, src.cols - c)) * int(sizeof(T));
    // With src-size 0 the source is not read (cp.async zero-fills), so a row past the tile's
    // valid extent still gets its (unused) pointer and no select.
    const T* g = src.origin + (r0 * src.row_stride + c);
    const int pass_stride = kRowsPerPass * src.row_stride;
    T* const s0 = smem + r0 * kLd + c;
    ATTNSEG_UNROLL
    for (int i = 0; i < kPasses; ++i) {
      const int r = r0 + i * kRowsPerPass;
      if (kRows % kRowsPerPass != 0 && r >= kRows) break;
      warp::cp_async_16(s0 + i * kRowsPerPass * kLd, g, r < src.rows ? col_bytes : 0);
      g += pass_stride;
    }
  } else {
    const T zero = Num<T>::from_acc(0.0f);
    const bool rows_unit = src.row_stride == 1 && src.col_stride != 1;
    ATTNSEG_UNROLL_N(1)
    for (int idx = threadIdx.x; idx < kRows * kCols; idx += kThreads) {
      const int r = rows_unit ? idx % kRows : idx / kCols;
      const int c = rows_unit ? idx / kRows : idx % kCols;
      smem[r * kLd + c] = (r < src.rows && c < src.cols) ? src.origin[r * src.row_stride + c * src.col_stride] : zero;
    }
  }
}

// An [N, W] operand tile of kN tokens x kW features (n < rows, w < cols valid; zeros outside), token
// stride sn and feature stride sw from origin, into smem stored [token][feature] (row stride
// kLdTokens) or, with `w_major`, [feature][token] (row stride kLdFeatures).
template <int kN, int kW, int kLdTokens, int kLdFeatures, int kThreads, typename T>
__device__ __forceinline__ void load_operand_tile(T* smem, const T* origin, int sn, int sw, int rows, int cols,
                                                  bool w_major, bool async) {
  if (w_major) {
    load_tile<kW, kN, kLdFeatures, kThreads>(smem, TileSrc<T>{origin, sw, sn, cols, rows}, async);
  } else {
    load_tile<kN, kW, kLdTokens, kThreads>(smem, TileSrc<T>{origin, sn, sw, rows, cols}, async);
  }
}

// The per-lane element offset of an x4 ldmatrix that loads one k-step's A fragment (16 rows x 16
// k) from a smem tile stored [m][k] (plain ldmatrix) or, with `transposed`, [k][m]
// (ldmatrix.trans: the fragment is the transpose of the stored 8x8 blocks). Matrix i = lane / 8
// covers the 8x8 block at (+8 · (i % 2), +8 · (i / 2)) in (m, k).
__device__ __forceinline__ int a_lane_offset(bool transposed, int ld, int lane) {
  const int mat_row = lane % 8, mat_a = 8 * ((lane / 8) % 2), mat_b = 8 * (lane / 16);
  return transposed ? (mat_b + mat_row) * ld + mat_a : (mat_a + mat_row) * ld + mat_b;
}

// The A fragments of one warp's 16 rows m0 .. m0 + 15 over all kKSteps k-steps of 16, from a smem
// tile stored [rows][k] (row stride kLdRowMajor) or, with `transposed`, [k][rows] (kLdTransposed).
template <int kKSteps, int kLdRowMajor, int kLdTransposed, typename T>
__device__ __forceinline__ void load_a_fragments(uint32_t (&frag)[kKSteps][4], const T* smem, bool transposed,
                                                 int m0, int lane) {
  if (transposed) {
    const T* const base = smem + a_lane_offset(true, kLdTransposed, lane) + m0;
    ATTNSEG_UNROLL
    for (int ks = 0; ks < kKSteps; ++ks) warp::ldmatrix_x4_trans(frag[ks], base + 16 * ks * kLdTransposed);
  } else {
    const T* const base = smem + a_lane_offset(false, kLdRowMajor, lane) + m0 * kLdRowMajor;
    ATTNSEG_UNROLL
    for (int ks = 0; ks < kKSteps; ++ks) warp::ldmatrix_x4(frag[ks], base + 16 * ks);
  }
}

// The per-lane element offset of an x4 ldmatrix that loads the B fragments of two adjacent n-tiles
// (registers {0, 1}: n-tile 0, {2, 3}: n-tile 1) of a k-step, from a smem tile stored [k][n]
// (`stored_kn`: ldmatrix.trans) or [n][k] (plain ldmatrix), row stride ld. Matrix i = lane / 8
// covers the 8x8 block at (+8 · (i % 2), +8 · (i / 2)) in (k, n).
__device__ __forceinline__ int b_lane_offset(bool stored_kn, int ld, int lane) {
  const int mat_row = lane % 8, mat_a = 8 * ((lane / 8) % 2), mat_b = 8 * (lane / 16);
  return stored_kn ? (mat_a + mat_row) * ld + mat_b : (mat_b + mat_row) * ld + mat_a;
}

// Zeroes mma accumulator fragments.
template <int kTiles>
__device__ __forceinline__ void zero_fragments(float (&acc)[kTiles][4]) {
  ATTNSEG_UNROLL
  for (int n = 0; n < kTiles; ++n)
    for (int c = 0; c < 4; ++c) acc[n][c] = 0.0f;
}

// acc[2np], acc[2np + 1] += a · B for the n-tile pairs np < kTiles / 2 of k-step ks: each pair's B
// fragments by one x4 ldmatrix from a tile stored [k][n] (kStoredKn: ldmatrix.trans) or [n][k]
// (plain), row stride kLd; `tile` already carries the lane's b_lane_offset.
template <typename T, bool kStoredKn, int kLd, int kTiles, typename S>
__device__ __forceinline__ void mma_b_tiles(float (&acc)[kTiles][4], const uint32_t (&a)[4], const S* tile, int ks) {
  ATTNSEG_UNROLL
  for (int np = 0; np < kTiles / 2; ++np) {
    uint32_t b[4];  // B fragments of n-tiles 2np ({0, 1}) and 2np + 1 ({2, 3})
    if constexpr (kStoredKn) {
      warp::ldmatrix_x4_trans(b, tile + 16 * ks * kLd + 16 * np);
    } else {
      warp::ldmatrix_x4(b, tile + 16 * np * kLd + 16 * ks);
    }
    warp::mma_m16n8k16<T>(acc[2 * np], a, {b[0], b[1]}, acc[2 * np]);
    warp::mma_m16n8k16<T>(acc[2 * np + 1], a, {b[2], b[3]}, acc[2 * np + 1]);
  }
}

// e^x as 2^(x · log2 e) on the MUFU unit, flushing subnormal results to zero (ex2.approx.ftz:
// a probability below 2^-126 next to a row maximum's 1 changes nothing); the emulator flushes the
// same way. x is a difference of logits, exact for the dominant terms, so the log2 e factor costs
// no accuracy where it matters (folding it into the scale, as FA2 does, would round large logits).
__device__ __forceinline__ float exp_fast(float x) {
  const float y = x * 1.4426950408889634f;
#if defined(__CUDACC__)
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(y));
  return r;
#else
  const float r = std::exp2(y);
  return r < 1.17549435e-38f ? 0.0f : r;
#endif
}

// max_acc (NaN-propagating max) in one instruction: max.NaN.f32 (sm_80+).
__device__ __forceinline__ float max_nan(float a, float b) {
#if defined(__CUDACC__)
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return max_acc(a, b);
#endif
}

// grid: (batch * ceil(nq / kBlockM), ceil(ev / kEvTile)), block: kThreads, dynamic smem: kSmemBytes.
template <typename T, int kHeadDim, int kEvTile, bool kKeysMajor>
__global__ void __launch_bounds__(FlashFwdTiles<kHeadDim, kEvTile, kKeysMajor>::kThreads)
    flash_attention_fwd_kernel(const FlashFwdParams<T> p) {
  using Tiles = FlashFwdTiles<kHeadDim, kEvTile, kKeysMajor>;
  constexpr int kBlockM = Tiles::kBlockM, kBlockN = Tiles::kBlockN, kThreads = Tiles::kThreads;
  constexpr int kKSteps = kHeadDim / 16;   // k-steps of S = Q Kᵀ
  constexpr int kSTiles = kBlockN / 8;     // n-tiles of S (8 keys each)
  constexpr int kOTiles = kEvTile / 8;     // n-tiles of O (8 columns each)
  constexpr int kLdK = Tiles::kLdK, kLdV = Tiles::kLdV;
  ATTNSEG_DYNAMIC_SMEM(smem_raw);
  T* const q_smem = reinterpret_cast<T*>(smem_raw);
  T* const k_smem = q_smem + Tiles::kQElems;               // kStages tiles of kKElems
  T* const v_smem = k_smem + Tiles::kStages * Tiles::kKElems;  // kStages tiles of kVElems

  const int64_t b = blockIdx.x / p.q_blocks;
  const int64_t i0 = (blockIdx.x % p.q_blocks) * kBlockM;
  const int ev0 = int(blockIdx.y) * kEvTile;
  const int nk = int(p.nk), e = int(p.e);
  const int ev_cols = std::min<int>(kEvTile, int(p.ev) - ev0);
  const int lane = threadIdx.x % 32, warp_id = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;  // mma fragment coordinates (warp.cuh)
  const T* const k_batch = p.k + b * p.k_sb;
  const T* const v_batch = p.v + b * p.v_sb + ev0 * p.v_se;

  // K and V tiles of the keys j0 .. j0 + kBlockN into ring stage `stage`; all_async (a
  // std::bool_constant) true: both by cp.async, compiled without the element-wise path.
  auto load_kv = [&](int j0, int stage, auto all_async) {
    const bool k_async = decltype(all_async)::value || p.k_async;
    const bool v_async = decltype(all_async)::value || p.v_async;
    const int keys = std::min(kBlockN, nk - j0);
    const TileSrc<T> k_src = kKeysMajor ? TileSrc<T>{k_batch + j0 * p.k_sn, int(p.k_se), int(p.k_sn), e, keys}
                                        : TileSrc<T>{k_batch + j0 * p.k_sn, int(p.k_sn), int(p.k_se), keys, e};
    const TileSrc<T> v_src = kKeysMajor
                                 ? TileSrc<T>{v_batch + j0 * p.v_sn, int(p.v_se), int(p.v_sn), ev_cols, keys}
                                 : TileSrc<T>{v_batch + j0 * p.v_sn, int(p.v_sn), int(p.v_se), keys, ev_cols};
    T* const k_dst = k_smem + stage * Tiles::kKElems;
    T* const v_dst = v_smem + stage * Tiles::kVElems;
    if constexpr (kKeysMajor) {
      load_tile<kHeadDim, kBlockN, kLdK, kThreads>(k_dst, k_src, k_async);
      load_tile<kEvTile, kBlockN, kLdV, kThreads>(v_dst, v_src, v_async);
    } else {
      load_tile<kBlockN, kHeadDim, kLdK, kThreads>(k_dst, k_src, k_async);
      load_tile<kBlockN, kEvTile, kLdV, kThreads>(v_dst, v_src, v_async);
    }
    warp::cp_async_commit();
  };

  // ---- prologue: Q tile and the first K/V tile in one cp.async group ----
  {
    const T* const q_tile = p.q + b * p.q_sb + i0 * p.q_sn;
    const int rows = int(std::min<int64_t>(kBlockM, p.nq - i0));
    load_operand_tile<kBlockM, kHeadDim, Tiles::kLdQRowMajor, Tiles::kLdQKeysMajor, kThreads>(
        q_smem, q_tile, int(p.q_sn), int(p.q_se), rows, e, p.q_keys_major, p.q_async);
  }
  load_kv(0, 0, std::false_type{});
  warp::cp_async_wait<0>();
  __syncthreads();

  // Q A fragments, resident for the whole key loop: rows 16 · warp_id .. + 15, all of E.
  uint32_t q_frag[kKSteps][4];
  load_a_fragments<kKSteps, Tiles::kLdQRowMajor, Tiles::kLdQKeysMajor>(q_frag, q_smem, p.q_keys_major, 16 * warp_id,
                                                                        lane);
  // K: B operand of S, (k, n) = (feature, key). V: B operand of O, (k, n) = (key, column).
  const int k_lane = b_lane_offset(kKeysMajor, kLdK, lane);
  const int v_lane = b_lane_offset(!kKeysMajor, kLdV, lane);

  float o_acc[kOTiles][4];  // O[16 x kEvTile] of this warp: o_acc[n][0..1] row g, [2..3] row g + 8
  zero_fragments(o_acc);
  float row_max[2] = {neg_inf<float>(), neg_inf<float>()};  // rows g and g + 8
  float row_sum[2] = {0.0f, 0.0f};                           // this lane's partial sums of those rows
  const float scale = p.scale;
  const int n_tiles = int(ceil_div(nk, kBlockN));

  // ---- main loop over key tiles ----
  // Instantiated twice, each copy called once (so inlined): K and V both by cp.async (the DANet
  // layouts at N a multiple of 8), or element-wise loads where the host found them needed. The
  // choice is made here, once, not per tile.
  auto key_loop = [&](auto all_async) {
    for (int jt = 0; jt < n_tiles; ++jt) {
      const int stage = jt % Tiles::kStages;
      if (jt + 1 < n_tiles) load_kv((jt + 1) * kBlockN, stage ^ 1, all_async);  // prefetch: in flight during this tile
      const T* const k_tile = k_smem + stage * Tiles::kKElems + k_lane;
      const T* const v_tile = v_smem + stage * Tiles::kVElems + v_lane;

      // S = Q Kᵀ
      float s[kSTiles][4];
      zero_fragments(s);
      ATTNSEG_UNROLL
      for (int ks = 0; ks < kKSteps; ++ks) mma_b_tiles<T, kKeysMajor, kLdK>(s, q_frag[ks], k_tile, ks);

      // Scale; keys past Nk (only in the last tile) get logit −inf.
      const int j0 = jt * kBlockN;
      ATTNSEG_UNROLL
      for (int n = 0; n < kSTiles; ++n)
        for (int c = 0; c < 4; ++c) s[n][c] *= scale;
      if (j0 + kBlockN > nk) {
        ATTNSEG_UNROLL
        for (int n = 0; n < kSTiles; ++n)
          for (int c = 0; c < 4; ++c)
            if (j0 + 8 * n + 2 * t + (c & 1) >= nk) s[n][c] = neg_inf<float>();
      }

      // Online softmax on rows g (c = 0, 1) and g + 8 (c = 2, 3); a row's 4 lanes form a quad.
      ATTNSEG_UNROLL
      for (int r = 0; r < 2; ++r) {
        float tile_max = neg_inf<float>();
        ATTNSEG_UNROLL
        for (int n = 0; n < kSTiles; ++n) tile_max = max_nan(max_nan(tile_max, s[n][2 * r]), s[n][2 * r + 1]);
        tile_max = max_nan(tile_max, __shfl_xor_sync(kFullMask, tile_max, 1));
        tile_max = max_nan(tile_max, __shfl_xor_sync(kFullMask, tile_max, 2));
        const float m_new = max_nan(row_max[r], tile_max);
        // m_new = −inf only when every logit so far is −inf: subtracting 0 instead keeps p = 0 (no
        // −inf − −inf = NaN); alpha = 0 then multiplies an O and l that are still 0.
        const float m_sub = m_new == neg_inf<float>() ? 0.0f : m_new;
        const float alpha = exp_fast(row_max[r] - m_sub);
        float sum = 0.0f;
        ATTNSEG_UNROLL
        for (int n = 0; n < kSTiles; ++n) {
          ATTNSEG_UNROLL
          for (int c = 2 * r; c < 2 * r + 2; ++c) {
            s[n][c] = exp_fast(s[n][c] - m_sub);
            sum += s[n][c];
          }
        }
        row_sum[r] = row_sum[r] * alpha + sum;
        row_max[r] = m_new;
        ATTNSEG_UNROLL
        for (int n = 0; n < kOTiles; ++n) {
          o_acc[n][2 * r] *= alpha;
          o_acc[n][2 * r + 1] *= alpha;
        }
      }

      // O += P V, P rounded to T: the S accumulators of n-tiles 2kk, 2kk + 1 are the A fragment.
      ATTNSEG_UNROLL
      for (int kk = 0; kk < kSTiles / 2; ++kk) {
        const uint32_t pa[4] = {warp::pack2<T>(s[2 * kk][0], s[2 * kk][1]), warp::pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                                warp::pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                warp::pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
        mma_b_tiles<T, !kKeysMajor, kLdV>(o_acc, pa, v_tile, kk);
      }

      // Tile jt + 1 has landed and is visible; every warp is done with this stage before the next
      // iteration's prefetch overwrites it.
      warp::cp_async_wait<0>();
      __syncthreads();
    }
  };
  if (p.k_async && p.v_async) {
    key_loop(std::true_type{});
  } else {
    key_loop(std::false_type{});
  }

  // ---- epilogue: out = O / l, lse = m + log l ----
  T* const out_batch = p.out + b * p.o_sb;
  // Column pairs (2t, 2t + 1) of a row are adjacent and 4-byte aligned when out has unit column
  // stride, even Ev and even row / batch strides (the contiguous output host.h allocates).
  const bool pair_stores = p.o_se == 1 && p.ev % 2 == 0 && p.o_sn % 2 == 0 && p.o_sb % 2 == 0 &&
                           reinterpret_cast<uintptr_t>(p.out) % 4 == 0;
  ATTNSEG_UNROLL
  for (int r = 0; r < 2; ++r) {
    float l = row_sum[r];
    l += __shfl_xor_sync(kFullMask, l, 1);
    l += __shfl_xor_sync(kFullMask, l, 2);
    const int64_t row = i0 + 16 * warp_id + g + 8 * r;
    if (row < p.nq) {
      const float inv_l = 1.0f / l;  // l = 0 (a row of −inf logits): 0 · inf = NaN, as 0 / 0 in the reference
      T* const out_row = out_batch + row * p.o_sn + int64_t(ev0) * p.o_se;
      if (pair_stores) {  // a lane's two columns as one 32-bit store: a quad writes 16 contiguous bytes
        ATTNSEG_UNROLL
        for (int n = 0; n < kOTiles; ++n) {
          const int col = 8 * n + 2 * t;
          if (col < ev_cols)
            *reinterpret_cast<uint32_t*>(out_row + col) =
                warp::pack2<T>(o_acc[n][2 * r] * inv_l, o_acc[n][2 * r + 1] * inv_l);
        }
      } else {
        ATTNSEG_UNROLL
        for (int n = 0; n < kOTiles; ++n) {
          ATTNSEG_UNROLL
          for (int c = 0; c < 2; ++c) {
            const int col = 8 * n + 2 * t + c;
            if (col < ev_cols) out_row[col * int(p.o_se)] = Num<T>::from_acc(o_acc[n][2 * r + c] * inv_l);
          }
        }
      }
      if (blockIdx.y == 0 && t == 0) {
        // logsumexp of a row holding +inf is +inf (as torch.logsumexp), not inf + log(NaN)
        const float m = row_max[r];
        p.lse[b * p.nq + row] = is_inf(m) ? m : m + log_acc(l);
      }
    }
  }
}

}  // namespace attnseg::cuda
