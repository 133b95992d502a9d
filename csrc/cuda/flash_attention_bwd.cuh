// Flash-attention-2 backward for fp16/bf16 on tensor cores (design: docs/flash_backward_design.md),
// compiled by nvcc for the extension and by g++ for the SIMT emulator (tests/emu). Launch logic and
// the dispatch rule: host.h. Built so far: the dV kernel; dK and dQ still come from the old kernels
// of attention.cuh.
//
//   dV = Pᵀ dO,  P = exp(S · scale − lse),  S = Q Kᵀ   (lse from the forward, as attention.cuh)
//
// flash_attention_bwd_dv_kernel is the forward (flash_attention.cuh) with the roles of queries and
// keys swapped. One block per (batch, 64 keys, kEvTile columns of Ev); 4 warps, each owns 16 keys.
//   * The K tile is loaded once; each warp keeps its 16 x E slice as mma A fragments in registers.
//   * Q, dO and lse tiles of kBlockQ queries stream through a two-stage shared-memory ring:
//     16-byte cp.async of tile i+1 is in flight while tile i is computed (element-wise loads when
//     the strides or alignment do not allow 16-byte copies; chosen per operand on the host).
//   * Sᵀ = K Qᵀ (mma.sync m16n8k16, fp32), Pᵀ = exp(scale · Sᵀ − lse) with lse per column, ragged
//     queries masked to p = 0, Pᵀ rounded to T, dV += Pᵀ dO: the Sᵀ accumulators of two n-tiles
//     are directly the A fragment of the second MMA, as P is in the forward. No online softmax,
//     no reduction across lanes: every query's lse is known.
//   * Ev is split across blockIdx.y in kEvTile slices (256 at DANet's Ev = 512: Sᵀ is computed
//     twice, 2E + Ev issued for E + Ev useful). A 16 x 256 fp32 accumulator is 128 registers per
//     lane, as in the forward.
//
// Shared-memory layouts (rows padded by 8 halves, as in the forward):
//   kQueriesMajor = false (contiguous [N, E] / [N, Ev] q and dO, feature axis unit-stride):
//     Q tile [queries][E]  -> Sᵀ's B fragments by plain ldmatrix; dO [queries][Ev] -> .trans
//   kQueriesMajor = true (DANet's channel-first views, N axis unit-stride):
//     Q tile [E][queries]  -> ldmatrix.trans;                      dO [Ev][queries] -> plain
//   K tile [keys][E] or [E][keys] by k's own layout (a runtime choice outside the main loop).
// Global loads always run along the smem row: consecutive threads read consecutive addresses on
// the unit-stride axis (16 bytes each with cp.async).
//
// NaN/inf semantics are the old kernel's (recompute_probability): p = exp(s · scale − lse), NaN
// where lse = +inf (the row held a +inf logit, so its softmax is NaN throughout); NaN in S, Q or
// dO propagates through the MMAs.
#pragma once

#include "flash_attention.cuh"

namespace attnseg::cuda {

template <int kHeadDim_, int kEvTile_, bool kQueriesMajor_>
struct FlashBwdDvTiles {
  static constexpr int kHeadDim = kHeadDim_;  // E rounded up to 64 (zero padding)
  static constexpr int kEvTile = kEvTile_;    // dV columns a block owns: 128 or 256
  static constexpr bool kQueriesMajor = kQueriesMajor_;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockN = 16 * kWarps;  // keys per block, 16 per warp
  static constexpr int kBlockQ = 32;           // queries per streamed tile
  static constexpr int kStages = 2;
  static constexpr int kPad = 8;
  // K tile: [kBlockN][kLdKRowMajor] or [kHeadDim][kLdKKeysMajor]; room for either.
  static constexpr int kLdKRowMajor = kHeadDim + kPad;
  static constexpr int kLdKKeysMajor = kBlockN + kPad;
  static constexpr int kKElems = std::max(kBlockN * kLdKRowMajor, kHeadDim * kLdKKeysMajor);
  static constexpr int kLdQ = kQueriesMajor ? kBlockQ + kPad : kHeadDim + kPad;
  static constexpr int kQElems = (kQueriesMajor ? kHeadDim : kBlockQ) * kLdQ;
  static constexpr int kLdDo = kQueriesMajor ? kBlockQ + kPad : kEvTile + kPad;
  static constexpr int kDoElems = (kQueriesMajor ? kEvTile : kBlockQ) * kLdDo;
  // Per stage, after the T tiles: kBlockQ floats of lse.
  static constexpr size_t kSmemBytes =
      2 * size_t(kKElems + kStages * (kQElems + kDoElems)) + sizeof(float) * kStages * kBlockQ;

  static_assert(kHeadDim % 16 == 0 && kHeadDim <= 64 && kEvTile % 16 == 0);
  static_assert(kKElems % 8 == 0 && kQElems % 8 == 0 && kDoElems % 8 == 0, "16-byte aligned tiles");
};

template <typename T>
struct FlashBwdParams : AttnBwdParams<T> {
  // Chosen on the host (host.h): k's tile is stored [E][keys] (k unit-stride along Nk), and which
  // streamed operands are copied by 16-byte cp.async rather than element by element.
  bool k_keys_major, k_async, q_async, do_async;
  int64_t dv_k_blocks;  // ceil(nk / 64)
};

// grid: (batch * ceil(nk / kBlockN), ceil(ev / kEvTile)), block: kThreads, dynamic smem: kSmemBytes.
template <typename T, int kHeadDim, int kEvTile, bool kQueriesMajor>
__global__ void __launch_bounds__(FlashBwdDvTiles<kHeadDim, kEvTile, kQueriesMajor>::kThreads)
    flash_attention_bwd_dv_kernel(const FlashBwdParams<T> p) {
  using Tiles = FlashBwdDvTiles<kHeadDim, kEvTile, kQueriesMajor>;
  constexpr int kBlockN = Tiles::kBlockN, kBlockQ = Tiles::kBlockQ, kThreads = Tiles::kThreads;
  constexpr int kKSteps = kHeadDim / 16;  // k-steps of Sᵀ = K Qᵀ
  constexpr int kSTiles = kBlockQ / 8;    // n-tiles of Sᵀ (8 queries each)
  constexpr int kDvTiles = kEvTile / 8;   // n-tiles of dV (8 columns each)
  constexpr int kLdQ = Tiles::kLdQ, kLdDo = Tiles::kLdDo;
  ATTNSEG_DYNAMIC_SMEM(smem_raw);
  T* const k_smem = reinterpret_cast<T*>(smem_raw);
  T* const q_smem = k_smem + Tiles::kKElems;                      // kStages tiles of kQElems
  T* const do_smem = q_smem + Tiles::kStages * Tiles::kQElems;    // kStages tiles of kDoElems
  float* const lse_smem = reinterpret_cast<float*>(do_smem + Tiles::kStages * Tiles::kDoElems);

  const int64_t b = blockIdx.x / unsigned(p.dv_k_blocks);
  const int64_t j0 = (blockIdx.x % unsigned(p.dv_k_blocks)) * kBlockN;
  const int ev0 = int(blockIdx.y) * kEvTile;
  const int nq = int(p.nq), e = int(p.e);
  const int ev_cols = std::min<int>(kEvTile, int(p.ev) - ev0);
  const int lane = threadIdx.x % 32, warp_id = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;  // mma fragment coordinates (warp.cuh)
  const T* const q_batch = p.q + b * p.q_sb;
  const T* const do_batch = p.grad_out + b * p.do_sb + ev0 * p.do_se;
  const float* const lse_batch = p.lse + b * p.nq;

  // Q, dO and lse of the queries i0 .. i0 + kBlockQ into ring stage `stage`; all_async (a
  // std::bool_constant) true: Q and dO both by cp.async, compiled without the element-wise path.
  // lse (kBlockQ floats, +inf past Nq: masked anyway) is stored element-wise by the first warp.
  auto load_q_do = [&](int i0, int stage, auto all_async) {
    const bool q_async = decltype(all_async)::value || p.q_async;
    const bool do_async = decltype(all_async)::value || p.do_async;
    const int queries = std::min(kBlockQ, nq - i0);
    const TileSrc<T> q_src = kQueriesMajor
                                 ? TileSrc<T>{q_batch + i0 * p.q_sn, int(p.q_se), int(p.q_sn), e, queries}
                                 : TileSrc<T>{q_batch + i0 * p.q_sn, int(p.q_sn), int(p.q_se), queries, e};
    const TileSrc<T> do_src = kQueriesMajor
                                  ? TileSrc<T>{do_batch + i0 * p.do_sn, int(p.do_se), int(p.do_sn), ev_cols, queries}
                                  : TileSrc<T>{do_batch + i0 * p.do_sn, int(p.do_sn), int(p.do_se), queries, ev_cols};
    T* const q_dst = q_smem + stage * Tiles::kQElems;
    T* const do_dst = do_smem + stage * Tiles::kDoElems;
    if constexpr (kQueriesMajor) {
      load_tile<kHeadDim, kBlockQ, kLdQ, kThreads>(q_dst, q_src, q_async);
      load_tile<kEvTile, kBlockQ, kLdDo, kThreads>(do_dst, do_src, do_async);
    } else {
      load_tile<kBlockQ, kHeadDim, kLdQ, kThreads>(q_dst, q_src, q_async);
      load_tile<kBlockQ, kEvTile, kLdDo, kThreads>(do_dst, do_src, do_async);
    }
    if (threadIdx.x < kBlockQ)
      lse_smem[stage * kBlockQ + threadIdx.x] = int(threadIdx.x) < queries ? lse_batch[i0 + threadIdx.x] : INFINITY;
    warp::cp_async_commit();
  };

  // ---- prologue: K tile and the first Q/dO tile in one cp.async group ----
  {
    const T* const k_tile = p.k + b * p.k_sb + j0 * p.k_sn;
    const int rows = int(std::min<int64_t>(kBlockN, p.nk - j0));
    if (p.k_keys_major) {
      load_tile<kHeadDim, kBlockN, Tiles::kLdKKeysMajor, kThreads>(
          k_smem, TileSrc<T>{k_tile, int(p.k_se), int(p.k_sn), e, rows}, p.k_async);
    } else {
      load_tile<kBlockN, kHeadDim, Tiles::kLdKRowMajor, kThreads>(
          k_smem, TileSrc<T>{k_tile, int(p.k_sn), int(p.k_se), rows, e}, p.k_async);
    }
  }
  load_q_do(0, 0, std::false_type{});
  warp::cp_async_wait<0>();
  __syncthreads();

  // Per-lane ldmatrix row offsets, as in the forward: matrix i = lane / 8 of an x4 covers the 8x8
  // block at (+8 · (i % 2), +8 · (i / 2)) in (k, n) of a B operand, or in (m, k) of the A operand.
  const int mat_row = lane % 8, mat_a = 8 * ((lane / 8) % 2), mat_b = 8 * (lane / 16);
  // K A fragments, resident for the whole query loop: keys 16 · warp_id .. + 15, all of E.
  uint32_t k_frag[kKSteps][4];
  {
    const int m0 = 16 * warp_id;
    if (p.k_keys_major) {  // smem [E][keys]: the A fragment is the transpose of the stored 8x8 blocks
      ATTNSEG_UNROLL
      for (int ks = 0; ks < kKSteps; ++ks)
        warp::ldmatrix_x4_trans(k_frag[ks], k_smem + (16 * ks + mat_b + mat_row) * Tiles::kLdKKeysMajor + m0 + mat_a);
    } else {
      ATTNSEG_UNROLL
      for (int ks = 0; ks < kKSteps; ++ks)
        warp::ldmatrix_x4(k_frag[ks], k_smem + (m0 + mat_a + mat_row) * Tiles::kLdKRowMajor + 16 * ks + mat_b);
    }
  }
  // Q: B operand of Sᵀ, (k, n) = (feature, query). dO: B operand of dV, (k, n) = (query, column).
  const int q_lane = kQueriesMajor ? (mat_a + mat_row) * kLdQ + mat_b : (mat_b + mat_row) * kLdQ + mat_a;
  const int do_lane = kQueriesMajor ? (mat_b + mat_row) * kLdDo + mat_a : (mat_a + mat_row) * kLdDo + mat_b;

  float dv_acc[kDvTiles][4];  // dV[16 x kEvTile] of this warp: [n][0..1] key g, [2..3] key g + 8
  ATTNSEG_UNROLL
  for (int n = 0; n < kDvTiles; ++n)
    for (int c = 0; c < 4; ++c) dv_acc[n][c] = 0.0f;
  const float scale = p.scale;
  const int n_tiles = int(ceil_div(nq, kBlockQ));

  // ---- main loop over query tiles ----
  // Instantiated twice, each copy called once (so inlined): Q and dO both by cp.async, or
  // element-wise loads where the host found them needed (chosen once, not per tile).
  auto query_loop = [&](auto all_async) {
    for (int it = 0; it < n_tiles; ++it) {
      const int stage = it % Tiles::kStages;
      if (it + 1 < n_tiles) load_q_do((it + 1) * kBlockQ, stage ^ 1, all_async);  // prefetch
      const T* const q_tile = q_smem + stage * Tiles::kQElems + q_lane;
      const T* const do_tile = do_smem + stage * Tiles::kDoElems + do_lane;
      const float* const lse_tile = lse_smem + stage * kBlockQ;

      // Sᵀ = K Qᵀ
      float s[kSTiles][4];
      ATTNSEG_UNROLL
      for (int n = 0; n < kSTiles; ++n)
        for (int c = 0; c < 4; ++c) s[n][c] = 0.0f;
      ATTNSEG_UNROLL
      for (int ks = 0; ks < kKSteps; ++ks) {
        ATTNSEG_UNROLL
        for (int np = 0; np < kSTiles / 2; ++np) {
          uint32_t qb[4];  // B fragments of n-tiles 2np ({0, 1}) and 2np + 1 ({2, 3})
          if constexpr (kQueriesMajor) {
            warp::ldmatrix_x4_trans(qb, q_tile + 16 * ks * kLdQ + 16 * np);
          } else {
            warp::ldmatrix_x4(qb, q_tile + 16 * np * kLdQ + 16 * ks);
          }
          warp::mma_m16n8k16<T>(s[2 * np], k_frag[ks], {qb[0], qb[1]}, s[2 * np]);
          warp::mma_m16n8k16<T>(s[2 * np + 1], k_frag[ks], {qb[2], qb[3]}, s[2 * np + 1]);
        }
      }

      // Pᵀ = exp(scale · Sᵀ − lse): this lane's columns are queries 8n + 2t + {0, 1} of the tile,
      // the same for both of its rows (keys g and g + 8). Queries past Nq (only in the last tile)
      // get p = 0; lse = +inf gives NaN (recompute_probability's rule).
      const int i0 = it * kBlockQ;
      ATTNSEG_UNROLL
      for (int n = 0; n < kSTiles; ++n) {
        ATTNSEG_UNROLL
        for (int c = 0; c < 2; ++c) {
          const int col = 8 * n + 2 * t + c;
          const float lse = lse_tile[col];
          const bool valid = i0 + col < nq;
          ATTNSEG_UNROLL
          for (int r = 0; r < 2; ++r) {
            const float prob = lse == INFINITY ? NAN : exp_fast(s[n][2 * r + c] * scale - lse);
            s[n][2 * r + c] = valid ? prob : 0.0f;
          }
        }
      }

      // dV += Pᵀ dO, Pᵀ rounded to T: the Sᵀ accumulators of n-tiles 2kk, 2kk + 1 are the A fragment.
      ATTNSEG_UNROLL
      for (int kk = 0; kk < kSTiles / 2; ++kk) {
        const uint32_t pa[4] = {warp::pack2<T>(s[2 * kk][0], s[2 * kk][1]), warp::pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                                warp::pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                warp::pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
        ATTNSEG_UNROLL
        for (int np = 0; np < kDvTiles / 2; ++np) {
          uint32_t db[4];  // B fragments of dV n-tiles 2np ({0, 1}) and 2np + 1 ({2, 3})
          if constexpr (kQueriesMajor) {
            warp::ldmatrix_x4(db, do_tile + 16 * np * kLdDo + 16 * kk);
          } else {
            warp::ldmatrix_x4_trans(db, do_tile + 16 * kk * kLdDo + 16 * np);
          }
          warp::mma_m16n8k16<T>(dv_acc[2 * np], pa, {db[0], db[1]}, dv_acc[2 * np]);
          warp::mma_m16n8k16<T>(dv_acc[2 * np + 1], pa, {db[2], db[3]}, dv_acc[2 * np + 1]);
        }
      }

      // Tile it + 1 has landed and is visible; every warp is done with this stage before the next
      // iteration's prefetch overwrites it.
      warp::cp_async_wait<0>();
      __syncthreads();
    }
  };
  if (p.q_async && p.do_async) {
    query_loop(std::true_type{});
  } else {
    query_loop(std::false_type{});
  }

  // ---- epilogue: dV in dv's layout (zeros_like(v): contiguous or channel-first) ----
  T* const dv_batch = p.dv + b * p.dv_sb;
  // Pairs (2t, 2t + 1) of a key's columns are adjacent and 4-byte aligned when dv has unit column
  // stride, even Ev and even row / batch strides.
  const bool pair_stores = p.dv_se == 1 && p.ev % 2 == 0 && p.dv_sn % 2 == 0 && p.dv_sb % 2 == 0 &&
                           reinterpret_cast<uintptr_t>(p.dv) % 4 == 0;
  ATTNSEG_UNROLL
  for (int r = 0; r < 2; ++r) {
    const int64_t key = j0 + 16 * warp_id + g + 8 * r;
    if (key >= p.nk) continue;
    T* const dv_row = dv_batch + key * p.dv_sn + int64_t(ev0) * p.dv_se;
    if (pair_stores) {
      ATTNSEG_UNROLL
      for (int n = 0; n < kDvTiles; ++n) {
        const int col = 8 * n + 2 * t;
        if (col < ev_cols)
          *reinterpret_cast<uint32_t*>(dv_row + col) = warp::pack2<T>(dv_acc[n][2 * r], dv_acc[n][2 * r + 1]);
      }
    } else {  // channel-first dv: the 8 lanes of a column (g = 0..7) write 8 consecutive keys
      ATTNSEG_UNROLL
      for (int n = 0; n < kDvTiles; ++n) {
        ATTNSEG_UNROLL
        for (int c = 0; c < 2; ++c) {
          const int col = 8 * n + 2 * t + c;
          if (col < ev_cols) dv_row[int64_t(col) * p.dv_se] = Num<T>::from_acc(dv_acc[n][2 * r + c]);
        }
      }
    }
  }
}

}  // namespace attnseg::cuda
