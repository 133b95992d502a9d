// Flash-attention-2 backward for fp16/bf16 on tensor cores (design: docs/flash_backward_design.md),
// compiled by nvcc for the extension and by g++ for the SIMT emulator (tests/emu). Launch logic and
// the dispatch rule: host.h. Two key-block-outer kernels split the work so that no block holds
// more than the forward's registers: the dV kernel, and the dK/dQ kernel with V_j resident in
// shared memory and an fp32 dQ accumulator that every key block adds its partial to (fp32 atomic
// reductions by default, in key-block order under torch.use_deterministic_algorithms); a small
// kernel then writes dq.
//
//   S = Q Kᵀ,  P = exp(S · scale − lse)  (lse from the forward),  delta = rowsum(dO ∘ O) − dlse
//   dV = Pᵀ dO,  dP = dO Vᵀ,  dS = P ∘ (dP − delta),  dK = scale · dSᵀ Q,  dQ = scale · dS K
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
// flash_attention_bwd_dkdq_kernel: one block per (batch, 64 keys); 4 warps, each owns 16 keys.
//   * K's A fragments (Sᵀ) and its B fragments for the dQ partial stay in registers; the 64 x Ev
//     V tile stays in shared memory ([keys][Ev] whatever v's layout: loaded once per block, so a
//     channel-first V takes the coalesced element-wise path rather than a second tile layout).
//   * Q, dO (all of Ev), lse and delta stream through the same two-stage cp.async ring as above.
//   * Per query tile, each warp: Sᵀ = K Qᵀ, Pᵀ, dPᵀ = V dOᵀ (Ev deep, V's A fragments by ldmatrix
//     from the resident tile), dSᵀ = Pᵀ ∘ (dPᵀ − delta) rounded to T, dK += dSᵀ Q (the dSᵀ
//     accumulators are the A fragment; dK stays in registers). dSᵀ also goes to shared memory;
//     after a barrier each warp computes a 16 x 32 quarter of the tile's dQ partial dS K_j.
//   * The partials are added to an fp32 accumulator [B][Nq][64], O(N·E) memory, in one of two
//     ways (kOrderedDq, chosen on the host from torch.are_deterministic_algorithms_enabled()):
//     - default (FlashAttention-2's): fp32 atomic reductions (warp::red_add_f32x2: one vector RED
//       per pair of cells on sm_90, two scalar REDs elsewhere); no block waits on another. The
//       order in which the ceil(Nk / 64) partials of a cell land varies between runs, so dq is not
//       bitwise reproducible (it differs by fp32 rounding, far below fp16/bf16's).
//     - ordered (deterministic): block j waits until the tile's counter reads j (ld.acquire,
//       nanosleep back-off), adds with plain loads and stores, fences, and releases j + 1. Bitwise
//       reproducible, no atomics, but the key blocks of a query tile take their turns one after
//       another. Progress needs block j − 1 dispatched before block j (the lower linear index;
//       GPUs dispatch in that order, as FlashAttention-3's deterministic mode assumes).
//   * Issued FLOPs 2·Nq·Nk·(3E + Ev); with the dV kernel's 2E + Ev the backward issues 5E + 2Ev
//     for the useful 3E + 2Ev (1.11 at E = 64, Ev = 512). Shared memory at E = 64, Ev = 512: 148
//     KiB (contiguous) / 164 KiB (channel-first): sm_80 and sm_90; the host falls back to the old
//     dQ and dK kernels where the device's opt-in limit is smaller (sm_86 / sm_89) or Ev > 512.
//
// NaN/inf semantics are the old kernel's (recompute_probability): p = exp(s · scale − lse), NaN
// where lse = +inf (the row held a +inf logit, so its softmax is NaN throughout); NaN in S, Q or
// dO propagates through the MMAs.
#pragma once

#include "flash_attention.cuh"

namespace attnseg::cuda {

// The streamed query tiles both backward kernels share: 4 warps of 16 keys per block, Q, dO (the
// kEvTile columns a block reads) and lse of kBlockQ queries per ring stage, rows padded by 8
// halves, stored [queries][features] or, when kQueriesMajor, [features][queries].
template <int kHeadDim_, int kEvTile_, bool kQueriesMajor_>
struct FlashBwdQueryTiles {
  static constexpr int kHeadDim = kHeadDim_;  // E rounded up to 64 (zero padding)
  static constexpr int kEvTile = kEvTile_;
  static constexpr bool kQueriesMajor = kQueriesMajor_;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockN = 16 * kWarps;  // keys per block, 16 per warp
  static constexpr int kBlockQ = 32;           // queries per streamed tile
  static constexpr int kStages = 2;
  static constexpr int kPad = 8;
  static constexpr int kLdQ = kQueriesMajor ? kBlockQ + kPad : kHeadDim + kPad;
  static constexpr int kQElems = (kQueriesMajor ? kHeadDim : kBlockQ) * kLdQ;
  static constexpr int kLdDo = kQueriesMajor ? kBlockQ + kPad : kEvTile + kPad;
  static constexpr int kDoElems = (kQueriesMajor ? kEvTile : kBlockQ) * kLdDo;

  static_assert(kHeadDim % 16 == 0 && kHeadDim <= 64 && kEvTile % 16 == 0);
  static_assert(kQElems % 8 == 0 && kDoElems % 8 == 0, "16-byte aligned tiles");
};

// flash_attention_bwd_dv_kernel's tiles. kEvTile: the dV columns a block owns, 128 or 256.
template <int kHeadDim_, int kEvTile_, bool kQueriesMajor_>
struct FlashBwdDvTiles : FlashBwdQueryTiles<kHeadDim_, kEvTile_, kQueriesMajor_> {
  using Base = FlashBwdQueryTiles<kHeadDim_, kEvTile_, kQueriesMajor_>;
  // K tile: [kBlockN][kLdKRowMajor] or [kHeadDim][kLdKKeysMajor]; room for either.
  static constexpr int kLdKRowMajor = Base::kHeadDim + Base::kPad;
  static constexpr int kLdKKeysMajor = Base::kBlockN + Base::kPad;
  static constexpr int kKElems = std::max(Base::kBlockN * kLdKRowMajor, Base::kHeadDim * kLdKKeysMajor);
  // Per stage, after the T tiles: kBlockQ floats of lse.
  static constexpr size_t kSmemBytes = 2 * size_t(kKElems + Base::kStages * (Base::kQElems + Base::kDoElems)) +
                                       sizeof(float) * Base::kStages * Base::kBlockQ;

  static_assert(kKElems % 8 == 0, "16-byte aligned tiles");
};

// flash_attention_bwd_dkdq_kernel's tiles. kEvTile is all of Ev (128, 256 or 512, zero padding):
// V_j stays resident, since dPᵀ = V dOᵀ is Ev deep.
template <int kHeadDim_, int kEvTile_, bool kQueriesMajor_>
struct FlashBwdDkdqTiles : FlashBwdQueryTiles<kHeadDim_, kEvTile_, kQueriesMajor_> {
  using Base = FlashBwdQueryTiles<kHeadDim_, kEvTile_, kQueriesMajor_>;
  static constexpr int kLdV = Base::kEvTile + Base::kPad;  // V tile [keys][Ev], resident
  static constexpr int kVElems = Base::kBlockN * kLdV;
  static constexpr int kStageElems = Base::kQElems + Base::kDoElems;  // a ring stage: Q tile, then dO tile
  // K tile [keys][E]: read into registers in the prologue, staged in ring stage 1 until then.
  static constexpr int kLdK = Base::kHeadDim + Base::kPad;
  static constexpr int kKElems = Base::kBlockN * kLdK;
  static constexpr int kLdDs = Base::kBlockQ + Base::kPad;  // dSᵀ [keys][queries], rounded to T
  static constexpr int kDsElems = Base::kBlockN * kLdDs;
  // After the T tiles: per stage, kBlockQ floats of lse, then kBlockQ of delta.
  static constexpr size_t kSmemBytes = 2 * size_t(kVElems + Base::kStages * kStageElems + kDsElems) +
                                       sizeof(float) * Base::kStages * 2 * Base::kBlockQ;

  static_assert(Base::kHeadDim == 64 && Base::kEvTile <= 512);
  static_assert(kKElems <= kStageElems, "the K tile is staged in ring stage 1");
  static_assert(kVElems % 8 == 0 && kDsElems % 8 == 0, "16-byte aligned tiles");
};

template <typename T>
struct FlashBwdParams : AttnBwdParams<T> {
  // Chosen on the host (host.h): k's tile is stored [E][keys] (k unit-stride along Nk; the dV
  // kernel only), and which operands are copied by 16-byte cp.async rather than element by element.
  bool k_keys_major, k_async, q_async, do_async, v_async;
  int64_t dv_k_blocks;  // ceil(nk / 64)
  // dK/dQ kernels: the dQ accumulation. ordered_dq: in key-block order behind per-tile counters
  // (set when torch.are_deterministic_algorithms_enabled(); the host then launches the kOrderedDq
  // instantiation), else by fp32 atomic reductions. dq_accum [batch][ceil(nq / 32) · 32][64] fp32,
  // zero-initialised; dq_counters [batch][ceil(nq / 32)] int32, zero-initialised, only when
  // ordered_dq (nullptr otherwise).
  bool ordered_dq;
  float* dq_accum;
  int* dq_counters;
  int64_t dq_tiles;     // ceil(nq / 32)
  int dq_counter_skew;  // 0; not 0 only in the emulator's planted-bug test
};

// Q, dO, lse (and delta, when `delta_dst`) of the queries i0 .. i0 + Tiles::kBlockQ into smem, for
// both backward kernels: Q [queries][E] / dO [queries][Ev cols] (or [E][queries] / [Ev][queries]
// when Tiles::kQueriesMajor), zeros past Nq, E and ev_cols. all_async (a std::bool_constant) true:
// Q and dO both by cp.async, compiled without the element-wise path. lse (+inf past Nq) and delta
// (0 past Nq) are stored element-wise by the first two warps. Commits the cp.async group.
template <class Tiles, typename T, class AllAsync>
__device__ __forceinline__ void load_query_tile(const FlashBwdParams<T>& p, const T* q_batch, const T* do_batch,
                                                int64_t b, int i0, int ev_cols, T* q_dst, T* do_dst, float* lse_dst,
                                                float* delta_dst, AllAsync) {
  constexpr int kBlockQ = Tiles::kBlockQ, kThreads = Tiles::kThreads;
  const int queries = std::min<int>(kBlockQ, int(p.nq) - i0);
  const bool q_async = AllAsync::value || p.q_async, do_async = AllAsync::value || p.do_async;
  load_operand_tile<kBlockQ, Tiles::kHeadDim, Tiles::kLdQ, Tiles::kLdQ, kThreads>(
      q_dst, q_batch + i0 * p.q_sn, int(p.q_sn), int(p.q_se), queries, int(p.e), Tiles::kQueriesMajor, q_async);
  load_operand_tile<kBlockQ, Tiles::kEvTile, Tiles::kLdDo, Tiles::kLdDo, kThreads>(
      do_dst, do_batch + i0 * p.do_sn, int(p.do_sn), int(p.do_se), queries, ev_cols, Tiles::kQueriesMajor, do_async);
  const int r = threadIdx.x % kBlockQ;
  const int64_t row = b * p.nq + i0 + r;
  if (threadIdx.x < kBlockQ) {
    lse_dst[r] = r < queries ? p.lse[row] : INFINITY;
  } else if (delta_dst != nullptr && threadIdx.x < 2 * kBlockQ) {
    delta_dst[r] = r < queries ? p.delta[row] : 0.0f;
  }
  warp::cp_async_commit();
}

// Stores a warp's mma accumulator rows row0 + g and row0 + g + 8 (kTiles n-tiles of 8 columns)
// times `scale` to dst[row · sn + col · sw] for row < rows, col < cols. Pairs of adjacent columns
// go as one 32-bit store when sw = 1 and the strides and base keep them 4-byte aligned; otherwise
// element by element (channel-first gradients: the 8 lanes g = 0..7 of a column write 8
// consecutive rows).
template <int kTiles, typename T>
__device__ __forceinline__ void store_warp_rows(T* dst, int64_t sb, int64_t sn, int64_t sw, int64_t row0,
                                                int64_t rows, int cols, const float (&acc)[kTiles][4], float scale,
                                                int lane) {
  const int g = lane / 4, t = lane % 4;
  const bool pair_stores =
      sw == 1 && cols % 2 == 0 && sn % 2 == 0 && sb % 2 == 0 && reinterpret_cast<uintptr_t>(dst) % 4 == 0;
  ATTNSEG_UNROLL
  for (int r = 0; r < 2; ++r) {
    const int64_t row = row0 + g + 8 * r;
    if (row >= rows) continue;
    T* const out = dst + row * sn;
    if (pair_stores) {
      ATTNSEG_UNROLL
      for (int n = 0; n < kTiles; ++n) {
        const int col = 8 * n + 2 * t;
        if (col < cols)
          *reinterpret_cast<uint32_t*>(out + col) = warp::pack2<T>(acc[n][2 * r] * scale, acc[n][2 * r + 1] * scale);
      }
    } else {
      ATTNSEG_UNROLL
      for (int n = 0; n < kTiles; ++n) {
        ATTNSEG_UNROLL
        for (int c = 0; c < 2; ++c) {
          const int col = 8 * n + 2 * t + c;
          if (col < cols) out[int64_t(col) * sw] = Num<T>::from_acc(acc[n][2 * r + c] * scale);
        }
      }
    }
  }
}

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
  const int t = lane % 4;  // mma fragment column coordinate (warp.cuh)
  const T* const q_batch = p.q + b * p.q_sb;
  const T* const do_batch = p.grad_out + b * p.do_sb + ev0 * p.do_se;
  auto load_q_do = [&](int i0, int stage, auto all_async) {
    load_query_tile<Tiles>(p, q_batch, do_batch, b, i0, ev_cols, q_smem + stage * Tiles::kQElems,
                           do_smem + stage * Tiles::kDoElems, lse_smem + stage * kBlockQ, nullptr, all_async);
  };

  // ---- prologue: K tile and the first Q/dO tile in one cp.async group ----
  {
    const T* const k_tile = p.k + b * p.k_sb + j0 * p.k_sn;
    const int rows = int(std::min<int64_t>(kBlockN, p.nk - j0));
    load_operand_tile<kBlockN, kHeadDim, Tiles::kLdKRowMajor, Tiles::kLdKKeysMajor, kThreads>(
        k_smem, k_tile, int(p.k_sn), int(p.k_se), rows, e, p.k_keys_major, p.k_async);
  }
  load_q_do(0, 0, std::false_type{});
  warp::cp_async_wait<0>();
  __syncthreads();

  // K A fragments, resident for the whole query loop: keys 16 · warp_id .. + 15, all of E.
  uint32_t k_frag[kKSteps][4];
  load_a_fragments<kKSteps, Tiles::kLdKRowMajor, Tiles::kLdKKeysMajor>(k_frag, k_smem, p.k_keys_major, 16 * warp_id,
                                                                        lane);
  // Q: B operand of Sᵀ, (k, n) = (feature, query). dO: B operand of dV, (k, n) = (query, column).
  const int q_lane = b_lane_offset(kQueriesMajor, kLdQ, lane);
  const int do_lane = b_lane_offset(!kQueriesMajor, kLdDo, lane);

  float dv_acc[kDvTiles][4];  // dV[16 x kEvTile] of this warp: [n][0..1] key g, [2..3] key g + 8
  zero_fragments(dv_acc);
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
      zero_fragments(s);
      ATTNSEG_UNROLL
      for (int ks = 0; ks < kKSteps; ++ks) mma_b_tiles<T, kQueriesMajor, kLdQ>(s, k_frag[ks], q_tile, ks);

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
        mma_b_tiles<T, !kQueriesMajor, kLdDo>(dv_acc, pa, do_tile, kk);
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
  store_warp_rows(p.dv + b * p.dv_sb + int64_t(ev0) * p.dv_se, p.dv_sb, p.dv_sn, p.dv_se, j0 + 16 * warp_id, p.nk,
                  ev_cols, dv_acc, 1.0f, lane);
}

// Two adjacent fp32 accumulator cells, loaded and stored as one 8-byte access.
struct alignas(8) FloatPair {
  float x, y;
};

// grid: batch * ceil(nk / kBlockN), block: kThreads, dynamic smem: kSmemBytes. Needs delta (the
// delta kernel), a zeroed dq_accum and, when kOrderedDq (p.ordered_dq), zeroed dq_counters;
// flash_attention_bwd_dq_convert_kernel then writes dq from dq_accum.
template <typename T, int kHeadDim, int kEvTile, bool kQueriesMajor, bool kOrderedDq>
__global__ void __launch_bounds__(FlashBwdDkdqTiles<kHeadDim, kEvTile, kQueriesMajor>::kThreads)
    flash_attention_bwd_dkdq_kernel(const FlashBwdParams<T> p) {
  using Tiles = FlashBwdDkdqTiles<kHeadDim, kEvTile, kQueriesMajor>;
  constexpr int kBlockN = Tiles::kBlockN, kBlockQ = Tiles::kBlockQ, kThreads = Tiles::kThreads;
  constexpr int kKSteps = kHeadDim / 16;  // k-steps of Sᵀ = K Qᵀ
  constexpr int kVSteps = kEvTile / 16;   // k-steps of dPᵀ = V dOᵀ
  constexpr int kSTiles = kBlockQ / 8;    // n-tiles of Sᵀ and dPᵀ (8 queries each)
  constexpr int kDkTiles = kHeadDim / 8;  // n-tiles of dK (8 features each)
  constexpr int kDqTiles = kHeadDim / 16; // n-tiles of a warp's dQ partial: half of the features
  constexpr int kKeySteps = kBlockN / 16; // k-steps of dQ = dS K (16 keys each)
  constexpr int kLdQ = Tiles::kLdQ, kLdDo = Tiles::kLdDo, kLdV = Tiles::kLdV, kLdDs = Tiles::kLdDs;
  ATTNSEG_DYNAMIC_SMEM(smem_raw);
  T* const v_smem = reinterpret_cast<T*>(smem_raw);
  T* const ring = v_smem + Tiles::kVElems;  // stage s: Q at ring + s · kStageElems, dO after it
  T* const ds_smem = ring + Tiles::kStages * Tiles::kStageElems;
  float* const stats = reinterpret_cast<float*>(ds_smem + Tiles::kDsElems);  // stage s: lse, delta
  T* const k_smem = ring + Tiles::kStageElems;  // prologue only

  const int64_t b = blockIdx.x / unsigned(p.dv_k_blocks);
  const int key_block = int(blockIdx.x % unsigned(p.dv_k_blocks));
  const int64_t j0 = int64_t(key_block) * kBlockN;
  const int e = int(p.e), ev = int(p.ev);
  const int lane = threadIdx.x % 32, warp_id = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;  // mma fragment coordinates (warp.cuh)
  const T* const q_batch = p.q + b * p.q_sb;
  const T* const do_batch = p.grad_out + b * p.do_sb;
  const int n_tiles = int(p.dq_tiles);

  auto load_q_do = [&](int i0, int stage, auto all_async) {
    T* const base = ring + stage * Tiles::kStageElems;
    float* const st = stats + stage * 2 * kBlockQ;
    load_query_tile<Tiles>(p, q_batch, do_batch, b, i0, ev, base, base + Tiles::kQElems, st, st + kBlockQ, all_async);
  };

  // ---- prologue: V (resident), K (staged in ring stage 1) and the first Q/dO tile, one group ----
  // Both are stored [keys][features] whatever their layout: read once per block, so a channel-first
  // K or V takes the element-wise path (coalesced along N) rather than a second smem layout.
  const int keys = int(std::min<int64_t>(kBlockN, p.nk - j0));
  load_tile<kBlockN, kHeadDim, Tiles::kLdK, kThreads>(
      k_smem, TileSrc<T>{p.k + b * p.k_sb + j0 * p.k_sn, int(p.k_sn), int(p.k_se), keys, e}, p.k_async);
  load_tile<kBlockN, kEvTile, kLdV, kThreads>(
      v_smem, TileSrc<T>{p.v + b * p.v_sb + j0 * p.v_sn, int(p.v_sn), int(p.v_se), keys, ev}, p.v_async);
  load_q_do(0, 0, std::false_type{});
  warp::cp_async_wait<0>();
  __syncthreads();

  // K A fragments of this warp's 16 keys (Sᵀ = K Qᵀ) and K B fragments of the dQ partial
  // (dQ = dS K: (k, n) = (key, feature), all 64 keys x this warp's half of the features).
  const int m0 = 16 * warp_id;
  uint32_t k_frag[kKSteps][4];
  load_a_fragments<kKSteps, Tiles::kLdK, Tiles::kLdK>(k_frag, k_smem, false, m0, lane);
  const int dq_m0 = 16 * (warp_id % 2), dq_n0 = (kHeadDim / 2) * (warp_id / 2);  // queries, features
  uint32_t kq_frag[kKeySteps][kDqTiles / 2][4];
  {
    const T* const base = k_smem + b_lane_offset(true, Tiles::kLdK, lane) + dq_n0;
    ATTNSEG_UNROLL
    for (int kk = 0; kk < kKeySteps; ++kk)
      ATTNSEG_UNROLL
      for (int np = 0; np < kDqTiles / 2; ++np)
        warp::ldmatrix_x4_trans(kq_frag[kk][np], base + 16 * kk * Tiles::kLdK + 16 * np);
  }
  __syncthreads();  // ring stage 1 (the K tile) is free for the first prefetch

  // Q: B operand of Sᵀ ((k, n) = (feature, query)) and of dK ((query, feature)). dO: B operand of
  // dPᵀ ((Ev column, query)). V: A operand of dPᵀ ((key, Ev column)). dSᵀ: A operand of dQ, stored
  // [keys][queries] = [k][m].
  const int q_s_lane = b_lane_offset(kQueriesMajor, kLdQ, lane);
  const int q_dk_lane = b_lane_offset(!kQueriesMajor, kLdQ, lane);
  const int do_lane = b_lane_offset(kQueriesMajor, kLdDo, lane);
  const T* const v_warp = v_smem + a_lane_offset(false, kLdV, lane) + m0 * kLdV;
  const T* const ds_warp = ds_smem + a_lane_offset(true, kLdDs, lane) + dq_m0;

  float dk_acc[kDkTiles][4];  // dK[16 x E] of this warp (unscaled): [n][0..1] key g, [2..3] key g + 8
  zero_fragments(dk_acc);
  const float scale = p.scale;
  bool key_valid[2];
  ATTNSEG_UNROLL
  for (int r = 0; r < 2; ++r) key_valid[r] = j0 + m0 + g + 8 * r < p.nk;

  // ---- main loop over query tiles ----
  auto query_loop = [&](auto all_async) {
    for (int it = 0; it < n_tiles; ++it) {
      const int stage = it % Tiles::kStages;
      if (it + 1 < n_tiles) load_q_do((it + 1) * kBlockQ, stage ^ 1, all_async);  // prefetch
      const T* const q_tile = ring + stage * Tiles::kStageElems;
      const T* const do_tile = q_tile + Tiles::kQElems + do_lane;
      const float* const lse_tile = stats + stage * 2 * kBlockQ;
      const float* const delta_tile = lse_tile + kBlockQ;

      // Sᵀ = K Qᵀ
      float s[kSTiles][4];
      zero_fragments(s);
      ATTNSEG_UNROLL
      for (int ks = 0; ks < kKSteps; ++ks)
        mma_b_tiles<T, kQueriesMajor, kLdQ>(s, k_frag[ks], q_tile + q_s_lane, ks);

      // dPᵀ = V dOᵀ, Ev deep: V's A fragments from the resident tile, dO's B fragments from the ring.
      float dp[kSTiles][4];
      zero_fragments(dp);
      ATTNSEG_UNROLL
      for (int vs = 0; vs < kVSteps; ++vs) {
        uint32_t va[4];
        warp::ldmatrix_x4(va, v_warp + 16 * vs);
        mma_b_tiles<T, kQueriesMajor, kLdDo>(dp, va, do_tile, vs);
      }

      // dSᵀ = Pᵀ ∘ (dPᵀ − delta), Pᵀ = exp(scale · Sᵀ − lse) (recompute_probability's rule: NaN
      // where lse = +inf); 0 for queries past Nq and keys past Nk. Rounded to T once, for both dK
      // and dQ, and stored to smem for the dQ partial (32-bit pair stores, conflict-free with the
      // padded rows).
      const int i0 = it * kBlockQ;
      ATTNSEG_UNROLL
      for (int n = 0; n < kSTiles; ++n) {
        ATTNSEG_UNROLL
        for (int c = 0; c < 2; ++c) {
          const int col = 8 * n + 2 * t + c;
          const float lse = lse_tile[col], delta = delta_tile[col];
          const bool query_valid = i0 + col < p.nq;
          ATTNSEG_UNROLL
          for (int r = 0; r < 2; ++r) {
            const float prob = lse == INFINITY ? NAN : exp_fast(s[n][2 * r + c] * scale - lse);
            s[n][2 * r + c] = query_valid && key_valid[r] ? prob * (dp[n][2 * r + c] - delta) : 0.0f;
          }
        }
      }
      uint32_t ds_frag[kSTiles][2];  // dSᵀ rounded to T: [n][0] key g, [n][1] key g + 8
      ATTNSEG_UNROLL
      for (int n = 0; n < kSTiles; ++n) {
        ATTNSEG_UNROLL
        for (int r = 0; r < 2; ++r) {
          ds_frag[n][r] = warp::pack2<T>(s[n][2 * r], s[n][2 * r + 1]);
          *reinterpret_cast<uint32_t*>(ds_smem + (m0 + g + 8 * r) * kLdDs + 8 * n + 2 * t) = ds_frag[n][r];
        }
      }

      // dK += dSᵀ Q: the dSᵀ fragments of n-tiles 2kk, 2kk + 1 are the A fragment.
      ATTNSEG_UNROLL
      for (int kk = 0; kk < kSTiles / 2; ++kk) {
        const uint32_t da[4] = {ds_frag[2 * kk][0], ds_frag[2 * kk][1], ds_frag[2 * kk + 1][0],
                                ds_frag[2 * kk + 1][1]};
        mma_b_tiles<T, !kQueriesMajor, kLdQ>(dk_acc, da, q_tile + q_dk_lane, kk);
      }
      __syncthreads();  // dSᵀ of all four warps is in smem

      // dQ partial of this key block = dS K_j: warp w owns queries 16 (w % 2) .. + 15 and features
      // (E / 2)(w / 2) .. + E / 2 - 1, over all 64 keys.
      float dq[kDqTiles][4];
      zero_fragments(dq);
      ATTNSEG_UNROLL
      for (int kk = 0; kk < kKeySteps; ++kk) {
        uint32_t dsa[4];
        warp::ldmatrix_x4_trans(dsa, ds_warp + 16 * kk * kLdDs);
        ATTNSEG_UNROLL
        for (int np = 0; np < kDqTiles / 2; ++np) {
          warp::mma_m16n8k16<T>(dq[2 * np], dsa, {kq_frag[kk][np][0], kq_frag[kk][np][1]}, dq[2 * np]);
          warp::mma_m16n8k16<T>(dq[2 * np + 1], dsa, {kq_frag[kk][np][2], kq_frag[kk][np][3]}, dq[2 * np + 1]);
        }
      }

      // Add the partial to this query tile's fp32 accumulator: per n-tile, the cell pairs (row
      // g or g + 8, features 8n + 2t, + 1). The barrier after the adds also ends this iteration's
      // use of the ring stage and of dSᵀ in smem, and makes tile it + 1 visible.
      float* const acc = p.dq_accum + ((b * p.dq_tiles + it) * kBlockQ + dq_m0) * kHeadDim + dq_n0;
      if constexpr (kOrderedDq) {
        // Ordered (docs/flash_backward_design.md): key block j adds after key blocks 0 .. j − 1
        // have, so the sum runs in the same order on every run.
        int* const counter = p.dq_counters + b * p.dq_tiles + it;
        if (threadIdx.x == 0) warp::wait_until_equal(counter, key_block + p.dq_counter_skew);
        __syncthreads();
        ATTNSEG_UNROLL
        for (int n = 0; n < kDqTiles; ++n) {
          ATTNSEG_UNROLL
          for (int r = 0; r < 2; ++r) {
            FloatPair* const cell = reinterpret_cast<FloatPair*>(acc + (g + 8 * r) * kHeadDim + 8 * n + 2 * t);
            FloatPair sum = *cell;
            sum.x += dq[n][2 * r];
            sum.y += dq[n][2 * r + 1];
            *cell = sum;
          }
        }
        __threadfence();
        warp::cp_async_wait<0>();
        __syncthreads();
        if (threadIdx.x == 0) warp::st_release_gpu(counter, key_block + 1);
      } else {
        // Atomic (FlashAttention-2's): no block waits on another; the partials land in any order.
        ATTNSEG_UNROLL
        for (int n = 0; n < kDqTiles; ++n) {
          ATTNSEG_UNROLL
          for (int r = 0; r < 2; ++r)
            warp::red_add_f32x2(acc + (g + 8 * r) * kHeadDim + 8 * n + 2 * t, dq[n][2 * r], dq[n][2 * r + 1]);
        }
        warp::cp_async_wait<0>();
        __syncthreads();
      }
    }
  };
  if (p.q_async && p.do_async) {
    query_loop(std::true_type{});
  } else {
    query_loop(std::false_type{});
  }

  // ---- epilogue: dK = scale · Σ dSᵀ Q in dk's layout ----
  store_warp_rows(p.dk + b * p.dk_sb, p.dk_sb, p.dk_sn, p.dk_se, j0 + m0, p.nk, e, dk_acc, scale, lane);
}

// dq = scale · dq_accum (the valid rows and features), in dq's layout. grid: ceil(batch · nq · e /
// 256), block: 256. Consecutive threads take consecutive features (or, for a channel-first dq,
// consecutive queries), so the stores are coalesced along dq's unit-stride axis.
template <typename T>
__global__ void __launch_bounds__(256) flash_attention_bwd_dq_convert_kernel(const FlashBwdParams<T> p) {
  const int64_t idx = int64_t(blockIdx.x) * 256 + threadIdx.x;
  if (idx >= p.batch * p.nq * p.e) return;
  const bool queries_fast = p.dq_sn == 1 && p.dq_se != 1;
  const int64_t per_batch = p.nq * p.e, b = idx / per_batch, rem = idx % per_batch;
  const int64_t i = queries_fast ? rem % p.nq : rem / p.e, f = queries_fast ? rem / p.nq : rem % p.e;
  const float value = p.dq_accum[(b * p.dq_tiles * 32 + i) * 64 + f] * p.scale;
  p.dq[b * p.dq_sb + i * p.dq_sn + f * p.dq_se] = Num<T>::from_acc(value);
}

}  // namespace attnseg::cuda
