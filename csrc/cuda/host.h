// Host side of the CUDA ops: argument checks, output and workspace allocation, launch geometry.
// Written once against a `Launch` policy so that the same code drives the device (launch.cuh:
// <<<grid, block, smem, stream>>> plus an error check) and the SIMT emulator in the tests
// (tests/emu/emu_ops.cpp), which therefore exercises these launchers too.
//
// A Launch policy provides:
//   void check_device(const at::Tensor& t, const char* op, const char* name);
//   template <class Kernel> void set_max_dynamic_smem(Kernel, size_t bytes);  // opt in above 48 KiB
//   size_t max_dynamic_smem_optin();  // the most set_max_dynamic_smem may ask for on this device
//   template <class Kernel, class... Args> void operator()(Kernel, dim3 grid, dim3 block, size_t smem, Args...);
//   at::Tensor gemm(const at::Tensor& a, const at::Tensor& b);  // batched a·b in the accumulation type (CAM)
//   int dq_counter_skew();  // 0; the emulator's tests plant an off-by-one in the dK/dQ kernel's counter wait
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>

#include "../common/checks.h"
#include "attention.cuh"
#include "channel_attention.cuh"
#include "flash_attention.cuh"
#include "flash_attention_bwd.cuh"
#include "ffma_attention.cuh"

namespace attnseg::cuda {

// ATen's element types -> the kernels' (bit-identical) element types.
template <typename S>
struct KernelType {
  using type = S;
};
template <>
struct KernelType<at::Half> {
  using type = __half;
};
template <>
struct KernelType<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename S>
auto kptr(const at::Tensor& t) {
  return reinterpret_cast<typename KernelType<S>::type*>(t.data_ptr<S>());
}

// `what` names the sizes behind the grid axis; the remedy follows from them: attention is
// independent per batch element, per query and per column of v (Ev), so those can be split and
// the results concatenated.
inline unsigned grid_dim_checked(int64_t blocks, int64_t limit, const char* op, const char* what) {
  const std::string_view axis(what);
  const char* remedy = axis == "E" ? "E this large is not supported by the CUDA kernels; use the CPU op"
                       : axis.find("Ev") != std::string_view::npos
                           ? "split v along its last dimension (Ev) and concatenate the outputs"
                           : "split the batch (or the queries) and concatenate the outputs";
  TORCH_CHECK(blocks <= limit, op, ": ", what, " needs ", blocks, " thread blocks along one grid axis, more than the ",
              limit, " CUDA allows; ", remedy);
  return static_cast<unsigned>(blocks);
}
constexpr int64_t kGridX = std::numeric_limits<int32_t>::max(), kGridYZ = 65535;

// The three strides of a [B, N, W] tensor into the kernels' params.
inline void strides3(const at::Tensor& t, int64_t& sb, int64_t& sn, int64_t& sw) {
  sb = t.stride(0), sn = t.stride(1), sw = t.stride(2);
}

// ---- attention ---------------------------------------------------------------------------------

template <typename scalar_t, typename T>
void set_inputs(AttnInputs<T>& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  p.q = kptr<scalar_t>(q);
  p.k = kptr<scalar_t>(k);
  p.v = kptr<scalar_t>(v);
  p.nq = q.size(1), p.nk = k.size(1), p.e = q.size(2), p.ev = v.size(2);
  strides3(q, p.q_sb, p.q_sn, p.q_se);
  strides3(k, p.k_sb, p.k_sn, p.k_se);
  strides3(v, p.v_sb, p.v_sn, p.v_se);
}

// ---- forward kernel choice -----------------------------------------------------------------------
//
// fp16/bf16 with 1 <= E <= 128 and Ev >= 1 run flash_attention_fwd_kernel (tensor cores,
// flash_attention.cuh), for every stride pattern: 16-byte cp.async per operand where its layout
// allows (unit stride along the smem row, the other strides multiples of 8 elements, 16-byte
// aligned base), element-wise loads otherwise. fp32 with the same E and Ev runs
// ffma_attention_fwd_kernel (CUDA cores, ffma_attention.cuh), loading along each operand's
// unit-stride axis. Only sizes whose offsets inside one tile overflow 32 bits go back to the old
// kernel. fp64, E > 128, E = 0 and Ev = 0 run attention_fwd_kernel (attention.cuh).

// The largest offset inside a rows x cols tile with these strides fits a 32-bit int.
inline bool tile_offsets_fit_int32(int64_t rows, int64_t row_stride, int64_t cols, int64_t col_stride) {
  const int64_t limit = std::numeric_limits<int32_t>::max();
  const int64_t rs = row_stride < 0 ? -row_stride : row_stride, cs = col_stride < 0 ? -col_stride : col_stride;
  return rs <= limit && cs <= limit && (rows - 1) * rs + (cols - 1) * cs <= limit;
}

// An operand whose smem tile rows run along `col_stride` can be copied in 16-byte chunks.
inline bool cp_async_ok(const void* base, int64_t batch_stride, int64_t row_stride, int64_t col_stride) {
  return reinterpret_cast<uintptr_t>(base) % 16 == 0 && col_stride == 1 && row_stride % 8 == 0 && batch_stride % 8 == 0;
}

// cp_async_ok for an [N, W] operand (batch, token and feature strides) whose smem tile is stored
// [W][N] when `w_major` (the tile's rows then run along N), [N][W] otherwise.
inline bool operand_cp_async_ok(const void* base, int64_t sb, int64_t sn, int64_t sw, bool w_major) {
  return w_major ? cp_async_ok(base, sb, sw, sn) : cp_async_ok(base, sb, sn, sw);
}

// An [N, W] operand is stored keys-major (smem [W][N]) when its N axis is the unit-stride one.
inline bool keys_major(int64_t n_stride, int64_t w_stride) { return n_stride == 1 && w_stride != 1; }

template <typename T, int kHeadDim, int kEvTile, bool kKeysMajor, class Launch>
void launch_flash_fwd(Launch& launch, FlashFwdParams<T> p, int64_t batch, const char* op) {
  using Tiles = FlashFwdTiles<kHeadDim, kEvTile, kKeysMajor>;
  p.q_blocks = ceil_div(p.nq, Tiles::kBlockM);
  p.q_async = operand_cp_async_ok(p.q, p.q_sb, p.q_sn, p.q_se, p.q_keys_major);
  p.k_async = operand_cp_async_ok(p.k, p.k_sb, p.k_sn, p.k_se, kKeysMajor);
  p.v_async = operand_cp_async_ok(p.v, p.v_sb, p.v_sn, p.v_se, kKeysMajor);
  const auto kernel = flash_attention_fwd_kernel<T, kHeadDim, kEvTile, kKeysMajor>;
  const dim3 grid(grid_dim_checked(batch * p.q_blocks, kGridX, op, "B x ceil(Nq / 64)"),
                  grid_dim_checked(ceil_div(p.ev, kEvTile), kGridYZ, op, "Ev"));
  launch.set_max_dynamic_smem(kernel, Tiles::kSmemBytes);
  launch(kernel, grid, dim3(Tiles::kThreads), Tiles::kSmemBytes, p);
}

// The rule above, for fp16 / bf16 / fp32: E and Ev in range, 32-bit offsets inside a tile (the
// largest tiles any instantiation loads) and row indices that fit an int.
template <typename T>
bool flash_fwd_applies(const AttnFwdParams<T>& p) {
  const int64_t int_limit = std::numeric_limits<int32_t>::max() - 256;
  return p.e >= 1 && p.e <= 128 && p.ev >= 1 && p.nq <= int_limit && p.nk <= int_limit && p.ev <= int_limit &&
         tile_offsets_fit_int32(64, p.q_sn, 128, p.q_se) && tile_offsets_fit_int32(64, p.k_sn, 128, p.k_se) &&
         tile_offsets_fit_int32(64, p.v_sn, 256, p.v_se) && tile_offsets_fit_int32(1, 0, 256, p.o_se);
}

// Calls fn(head_dim, ev_tile) with integral constants: E padded to 16 / 32 / 64 / 128, Ev in the
// narrowest tile of 64 / 128 that holds it, else 256-wide tiles (Ev = 512: two, S computed twice).
template <class Fn>
void with_flash_tile_sizes(int64_t e, int64_t ev, Fn&& fn) {
  auto with_head_dim = [&](auto head_dim) {
    if (ev <= 64) {
      fn(head_dim, std::integral_constant<int, 64>{});
    } else if (ev <= 128) {
      fn(head_dim, std::integral_constant<int, 128>{});
    } else {
      fn(head_dim, std::integral_constant<int, 256>{});
    }
  };
  if (e <= 16) {
    with_head_dim(std::integral_constant<int, 16>{});
  } else if (e <= 32) {
    with_head_dim(std::integral_constant<int, 32>{});
  } else if (e <= 64) {
    with_head_dim(std::integral_constant<int, 64>{});
  } else {
    with_head_dim(std::integral_constant<int, 128>{});
  }
}

// The flash tile sizes above; the K/V tile layout from K's strides.
template <typename T, class Launch>
void dispatch_flash_fwd(Launch& launch, const AttnFwdParams<T>& base, int64_t batch, const char* op) {
  FlashFwdParams<T> p{};
  static_cast<AttnFwdParams<T>&>(p) = base;
  p.q_keys_major = keys_major(p.q_sn, p.q_se);
  const bool kv_keys_major = keys_major(p.k_sn, p.k_se);
  with_flash_tile_sizes(p.e, p.ev, [&](auto head_dim, auto ev_tile) {
    constexpr int kHeadDim = decltype(head_dim)::value, kEvTile = decltype(ev_tile)::value;
    if (kv_keys_major) {
      launch_flash_fwd<T, kHeadDim, kEvTile, true>(launch, p, batch, op);
    } else {
      launch_flash_fwd<T, kHeadDim, kEvTile, false>(launch, p, batch, op);
    }
  });
}

// The FFMA kernel (ffma_attention.cuh) with E padded and Ev tiled as the flash forward, the
// streamed operands loaded along their unit-stride axes: the forward's K and V both along K's
// (as the flash forward), the dV kernel's Q and dO each along its own.
template <bool kDv, class Launch>
void launch_ffma(Launch& launch, FfmaParams p, int64_t batch, bool y_tokens_major, bool g_tokens_major,
                 const char* op) {
  p.x_tokens_major = keys_major(p.x.sn, p.x.sw);
  with_flash_tile_sizes(p.e, p.ev, [&](auto head_dim, auto ev_tile) {
    constexpr int kHeadDim = decltype(head_dim)::value, kEvTile = decltype(ev_tile)::value;
    using Tiles = FfmaTiles<kHeadDim, kEvTile>;
    p.x_blocks = ceil_div(p.x_rows, Tiles::kBlockM);
    auto with_layouts = [&](auto y_major, auto g_major) {
      const auto kernel = ffma_attention_kernel<kHeadDim, kEvTile, decltype(y_major)::value,
                                                decltype(g_major)::value, kDv>;
      const dim3 grid(grid_dim_checked(batch * p.x_blocks, kGridX, op, kDv ? "B x ceil(Nk / 64)" : "B x ceil(Nq / 64)"),
                      grid_dim_checked(ceil_div(p.ev, kEvTile), kGridYZ, op, "Ev"));
      launch.set_max_dynamic_smem(kernel, Tiles::kSmemBytes);
      launch(kernel, grid, dim3(Tiles::kThreads), Tiles::kSmemBytes, p);
    };
    using True = std::true_type;
    using False = std::false_type;
    if (y_tokens_major == g_tokens_major) {
      if (y_tokens_major) {
        with_layouts(True{}, True{});
      } else {
        with_layouts(False{}, False{});
      }
    } else if constexpr (kDv) {  // the forward loads V along K's axis: two layouts, not four
      if (y_tokens_major) {
        with_layouts(True{}, False{});
      } else {
        with_layouts(False{}, True{});
      }
    }
  });
}

template <class Launch>
void dispatch_ffma_fwd(Launch& launch, const AttnFwdParams<float>& a, int64_t batch, const char* op) {
  FfmaParams p{};
  p.x = {a.q, a.q_sb, a.q_sn, a.q_se}, p.y = {a.k, a.k_sb, a.k_sn, a.k_se}, p.g = {a.v, a.v_sb, a.v_sn, a.v_se};
  p.x_rows = a.nq, p.y_rows = a.nk, p.e = a.e, p.ev = a.ev;
  p.out = a.out, p.o_sb = a.o_sb, p.o_sn = a.o_sn, p.o_se = a.o_se;
  p.lse_out = a.lse;
  p.scale = a.scale;
  const bool kv_keys_major = keys_major(a.k_sn, a.k_se);
  launch_ffma<false>(launch, p, batch, kv_keys_major, kv_keys_major, op);
}

// Runs the flash forward (tensor cores) or, for fp32, the flash-structured FFMA forward if the
// rule above takes it; false: the caller runs the old kernel.
template <typename T, class Launch>
bool try_flash_fwd(Launch& launch, const AttnFwdParams<T>& p, int64_t batch, const char* op) {
  if constexpr (Num<T>::kTensorCores || std::is_same_v<T, float>) {
    if (flash_fwd_applies(p)) {
      if constexpr (std::is_same_v<T, float>) {
        dispatch_ffma_fwd(launch, p, batch, op);
      } else {
        dispatch_flash_fwd(launch, p, batch, op);
      }
      return true;
    }
  }
  return false;
}

template <class Launch>
std::tuple<at::Tensor, at::Tensor> attention_fwd_impl(Launch& launch, const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v, double scale) {
  const char* op = "attnseg::attention_fwd";
  check_attention_inputs(q, k, v, op);
  launch.check_device(q, op, "q");
  const int64_t batch = q.size(0), nq = q.size(1), nk = k.size(1), ev = v.size(2);
  at::Tensor out = at::empty({batch, nq, ev}, q.options());
  at::Tensor lse = at::empty({batch, nq}, q.options().dtype(stats_dtype(q.scalar_type())));
  if (nk == 0) {  // softmax over no keys: the reference gives zeros and lse = -inf
    out.zero_();
    lse.fill_(-std::numeric_limits<double>::infinity());
    return {out, lse};
  }
  if (batch == 0 || nq == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_fwd_cuda", [&] {
    using T = typename KernelType<scalar_t>::type;
    using Tiles = AttnTiles<T>;
    using acc_t = typename Tiles::acc_t;
    AttnFwdParams<T> p{};
    set_inputs<scalar_t>(p, q, k, v);
    p.out = kptr<scalar_t>(out);
    p.lse = lse.data_ptr<acc_t>();
    strides3(out, p.o_sb, p.o_sn, p.o_se);
    p.q_blocks = ceil_div(nq, Tiles::kRows);
    p.scale = static_cast<acc_t>(scale);
    if (try_flash_fwd(launch, p, batch, op)) return;
    // Ev = 0 still launches one slice: its blocks write lse.
    const dim3 grid(grid_dim_checked(batch * p.q_blocks, kGridX, op, "B x ceil(Nq / rows per block)"),
                    grid_dim_checked(std::max<int64_t>(1, ceil_div(ev, Tiles::kChunk)), kGridYZ, op, "Ev"));
    launch.set_max_dynamic_smem(attention_fwd_kernel<T>, Tiles::kSmemBytes);
    launch(attention_fwd_kernel<T>, grid, dim3(Tiles::kThreads), Tiles::kSmemBytes, p);
  });
  return {out, lse};
}

// ---- backward kernel choice ---------------------------------------------------------------------
//
// fp16/bf16 with 1 <= E <= 64 (padded to 64) and Ev >= 1 take dV from flash_attention_bwd_dv_kernel
// (tensor cores, flash_attention_bwd.cuh), for every stride pattern (cp.async per operand where its
// layout allows, as the forward). Where also Ev <= 512 and the kernel's shared memory (V resident:
// about 164 KiB at Ev = 512 channel-first, 148 KiB contiguous) fits the device's opt-in limit
// (sm_80 and sm_90, not sm_86 / sm_89 at Ev = 512), dK and dQ come from
// flash_attention_bwd_dkdq_kernel with its fp32 dQ accumulation (atomic by default, ordered under
// torch.use_deterministic_algorithms: ordered_dq_accumulation below), then
// flash_attention_bwd_dq_convert_kernel; otherwise from the old dQ kernel and the old dK/dV kernel
// launched for its dK slices only. fp32 with 1 <= E <= 128 and Ev >= 1 takes dV from
// ffma_attention_kernel (CUDA cores, ffma_attention.cuh); with 1 <= E <= 64 dK and dQ from
// ffma_attention_bwd_dkdq_kernel (the same dQ accumulation), else from the old kernels (the dK
// slices only). Everything else (fp64, E > 64 in fp16/bf16, E > 128 in fp32, offsets inside a tile
// past 32 bits) runs the old kernels of attention.cuh for all three gradients.

template <typename T>
bool flash_bwd_dv_applies(const AttnBwdParams<T>& p) {
  const int64_t int_limit = std::numeric_limits<int32_t>::max() - 256;
  return p.e >= 1 && p.e <= 64 && p.ev >= 1 && p.nq <= int_limit && p.nk <= int_limit && p.ev <= int_limit &&
         tile_offsets_fit_int32(64, p.k_sn, 64, p.k_se) && tile_offsets_fit_int32(32, p.q_sn, 64, p.q_se) &&
         tile_offsets_fit_int32(32, p.do_sn, 256, p.do_se);
}

template <typename T, int kEvTile, bool kQueriesMajor, class Launch>
void launch_flash_bwd_dv(Launch& launch, FlashBwdParams<T> p, int64_t batch, const char* op) {
  using Tiles = FlashBwdDvTiles<64, kEvTile, kQueriesMajor>;
  p.dv_k_blocks = ceil_div(p.nk, Tiles::kBlockN);
  p.k_async = operand_cp_async_ok(p.k, p.k_sb, p.k_sn, p.k_se, p.k_keys_major);
  p.q_async = operand_cp_async_ok(p.q, p.q_sb, p.q_sn, p.q_se, kQueriesMajor);
  p.do_async = operand_cp_async_ok(p.grad_out, p.do_sb, p.do_sn, p.do_se, kQueriesMajor);
  const auto kernel = flash_attention_bwd_dv_kernel<T, 64, kEvTile, kQueriesMajor>;
  const dim3 grid(grid_dim_checked(batch * p.dv_k_blocks, kGridX, op, "B x ceil(Nk / 64)"),
                  grid_dim_checked(ceil_div(p.ev, kEvTile), kGridYZ, op, "Ev"));
  launch.set_max_dynamic_smem(kernel, Tiles::kSmemBytes);
  launch(kernel, grid, dim3(Tiles::kThreads), Tiles::kSmemBytes, p);
}

// fp32 with 1 <= E <= 128 and Ev >= 1 takes dV from the FFMA kernel (ffma_attention.cuh); as the
// forward, only offsets inside a tile past 32 bits go back to the old kernel.
inline bool ffma_bwd_dv_applies(const AttnBwdParams<float>& p) {
  const int64_t int_limit = std::numeric_limits<int32_t>::max() - 256;
  return p.e >= 1 && p.e <= 128 && p.ev >= 1 && p.nq <= int_limit && p.nk <= int_limit && p.ev <= int_limit &&
         tile_offsets_fit_int32(64, p.k_sn, 128, p.k_se) && tile_offsets_fit_int32(32, p.q_sn, 128, p.q_se) &&
         tile_offsets_fit_int32(32, p.do_sn, 256, p.do_se) && tile_offsets_fit_int32(1, 0, 256, p.dv_se);
}

template <class Launch>
void dispatch_ffma_bwd_dv(Launch& launch, const AttnBwdParams<float>& a, int64_t batch, const char* op) {
  FfmaParams p{};
  p.x = {a.k, a.k_sb, a.k_sn, a.k_se}, p.y = {a.q, a.q_sb, a.q_sn, a.q_se};
  p.g = {a.grad_out, a.do_sb, a.do_sn, a.do_se};
  p.x_rows = a.nk, p.y_rows = a.nq, p.e = a.e, p.ev = a.ev;
  p.out = a.dv, p.o_sb = a.dv_sb, p.o_sn = a.dv_sn, p.o_se = a.dv_se;
  p.lse_in = a.lse;
  p.scale = a.scale;
  launch_ffma<true>(launch, p, batch, keys_major(a.q_sn, a.q_se), keys_major(a.do_sn, a.do_se), op);
}

// Runs the flash dV kernel (or, for fp32, the FFMA one) if the rules above take it; false: the
// old dK/dV kernel computes dV. Ev in one 128-wide slice when it fits, else 256-wide slices; the
// Q/dO tile layout from q's strides.
template <typename T, class Launch>
bool try_flash_bwd_dv(Launch& launch, const AttnBwdParams<T>& base, int64_t batch, const char* op) {
  if constexpr (std::is_same_v<T, float>) {
    if (!ffma_bwd_dv_applies(base)) return false;
    dispatch_ffma_bwd_dv(launch, base, batch, op);
    return true;
  } else if constexpr (Num<T>::kTensorCores) {
    if (!flash_bwd_dv_applies(base)) return false;
    FlashBwdParams<T> p{};
    static_cast<AttnBwdParams<T>&>(p) = base;
    p.k_keys_major = keys_major(p.k_sn, p.k_se);
    const bool q_keys_major = keys_major(p.q_sn, p.q_se);
    auto with_ev_tile = [&](auto ev_tile) {
      constexpr int kEvTile = decltype(ev_tile)::value;
      if (q_keys_major) {
        launch_flash_bwd_dv<T, kEvTile, true>(launch, p, batch, op);
      } else {
        launch_flash_bwd_dv<T, kEvTile, false>(launch, p, batch, op);
      }
    };
    if (p.ev <= 128) {
      with_ev_tile(std::integral_constant<int, 128>{});
    } else {
      with_ev_tile(std::integral_constant<int, 256>{});
    }
    return true;
  }
  return false;
}

// The dK/dQ kernels' dQ accumulation follows torch's determinism flag, as SDPA's backward does:
// by default fp32 atomic reductions (no block waits on another; dq not bitwise reproducible);
// under torch.use_deterministic_algorithms(True) in key-block order behind per-tile counters
// (bitwise reproducible; the key blocks of a query tile take turns).
inline bool ordered_dq_accumulation() { return at::globalContext().deterministicAlgorithms(); }

// Calls fn(std::bool_constant<p.ordered_dq>).
template <typename T, class Fn>
void with_dq_order(const FlashBwdParams<T>& p, Fn&& fn) {
  if (p.ordered_dq) {
    fn(std::true_type{});
  } else {
    fn(std::false_type{});
  }
}

// A dK/dQ kernel (grid B x ceil(Nk / 64), p.dv_k_blocks, p.dq_tiles and p.ordered_dq set) on a
// zeroed accumulator [B, dq_tiles · 32, 64] (and, when p.ordered_dq, zeroed counters [B,
// dq_tiles]), then flash_attention_bwd_dq_convert_kernel, which writes dq.
template <typename T, class Launch, class Kernel>
void run_dq_accumulation(Launch& launch, FlashBwdParams<T> p, int64_t batch, const at::TensorOptions& workspace,
                         Kernel kernel, int threads, size_t smem, const char* op) {
  const at::Tensor accum = at::zeros({batch, p.dq_tiles * 32, 64}, workspace.dtype(at::kFloat));
  at::Tensor counters;
  if (p.ordered_dq) counters = at::zeros({batch, p.dq_tiles}, workspace.dtype(at::kInt));
  p.dq_accum = accum.data_ptr<float>();
  p.dq_counters = p.ordered_dq ? counters.data_ptr<int>() : nullptr;
  p.dq_counter_skew = p.ordered_dq ? launch.dq_counter_skew() : 0;
  launch.set_max_dynamic_smem(kernel, smem);
  launch(kernel, dim3(grid_dim_checked(batch * p.dv_k_blocks, kGridX, op, "B x ceil(Nk / 64)")), dim3(threads), smem,
         p);
  launch(flash_attention_bwd_dq_convert_kernel<T>,
         dim3(grid_dim_checked(ceil_div(batch * p.nq * p.e, 256), kGridX, op, "B x Nq x E / 256")), dim3(256), 0, p);
}

// fp32, 1 <= E <= 64, Ev >= 1: ffma_attention_bwd_dkdq_kernel, each streamed operand loaded along
// its unit-stride axis.
inline bool ffma_bwd_dkdq_applies(const AttnBwdParams<float>& p) {
  const int64_t int_limit = std::numeric_limits<int32_t>::max() - 256;
  return p.e >= 1 && p.e <= 64 && p.ev >= 1 && p.nq <= int_limit && p.nk <= int_limit && p.ev <= int_limit &&
         tile_offsets_fit_int32(64, p.k_sn, 64, p.k_se) && tile_offsets_fit_int32(64, p.v_sn, 64, p.v_se) &&
         tile_offsets_fit_int32(32, p.q_sn, 64, p.q_se) && tile_offsets_fit_int32(32, p.do_sn, 64, p.do_se);
}

template <class Launch>
void launch_ffma_bwd_dkdq(Launch& launch, const AttnBwdParams<float>& base, int64_t batch,
                          const at::TensorOptions& workspace, const char* op) {
  FlashBwdParams<float> p{};
  static_cast<AttnBwdParams<float>&>(p) = base;
  p.k_keys_major = keys_major(p.k_sn, p.k_se);
  p.dv_k_blocks = ceil_div(p.nk, FfmaDkdqTiles::kBlockN);
  p.dq_tiles = ceil_div(p.nq, FfmaDkdqTiles::kBlockQ);
  p.ordered_dq = ordered_dq_accumulation();
  auto run = [&](auto q_major, auto do_major, auto v_major) {
    with_dq_order(p, [&](auto ordered) {
      run_dq_accumulation(launch, p, batch, workspace,
                          ffma_attention_bwd_dkdq_kernel<decltype(q_major)::value, decltype(do_major)::value,
                                                         decltype(v_major)::value, decltype(ordered)::value>,
                          FfmaDkdqTiles::kThreads, FfmaDkdqTiles::kSmemBytes, op);
    });
  };
  auto with_v = [&](auto q_major, auto do_major) {
    if (keys_major(p.v_sn, p.v_se)) {
      run(q_major, do_major, std::true_type{});
    } else {
      run(q_major, do_major, std::false_type{});
    }
  };
  auto with_do = [&](auto q_major) {
    if (keys_major(p.do_sn, p.do_se)) {
      with_v(q_major, std::true_type{});
    } else {
      with_v(q_major, std::false_type{});
    }
  };
  if (keys_major(p.q_sn, p.q_se)) {
    with_do(std::true_type{});
  } else {
    with_do(std::false_type{});
  }
}

template <typename T, int kEvTile, bool kQueriesMajor, class Launch>
void launch_flash_bwd_dkdq(Launch& launch, FlashBwdParams<T> p, int64_t batch, const at::TensorOptions& workspace,
                           const char* op) {
  using Tiles = FlashBwdDkdqTiles<64, kEvTile, kQueriesMajor>;
  p.dv_k_blocks = ceil_div(p.nk, Tiles::kBlockN);
  p.dq_tiles = ceil_div(p.nq, Tiles::kBlockQ);
  p.k_keys_major = false;  // K and V tiles are stored [keys][features] whatever their layout
  p.k_async = operand_cp_async_ok(p.k, p.k_sb, p.k_sn, p.k_se, false);
  p.v_async = operand_cp_async_ok(p.v, p.v_sb, p.v_sn, p.v_se, false);
  p.q_async = operand_cp_async_ok(p.q, p.q_sb, p.q_sn, p.q_se, kQueriesMajor);
  p.do_async = operand_cp_async_ok(p.grad_out, p.do_sb, p.do_sn, p.do_se, kQueriesMajor);
  p.ordered_dq = ordered_dq_accumulation();
  with_dq_order(p, [&](auto ordered) {
    run_dq_accumulation(launch, p, batch, workspace,
                        flash_attention_bwd_dkdq_kernel<T, 64, kEvTile, kQueriesMajor, decltype(ordered)::value>,
                        Tiles::kThreads, Tiles::kSmemBytes, op);
  });
}

// Runs the flash dK/dQ kernels if the rule above takes them; false: the old kernels compute dK and
// dQ. Ev padded to 128, 256 or 512; the Q/dO tile layout from q's strides.
template <typename T, class Launch>
bool try_flash_bwd_dkdq(Launch& launch, const AttnBwdParams<T>& base, int64_t batch,
                        const at::TensorOptions& workspace, const char* op) {
  if constexpr (std::is_same_v<T, float>) {
    if (!ffma_bwd_dkdq_applies(base)) return false;
    launch_ffma_bwd_dkdq(launch, base, batch, workspace, op);
    return true;
  } else if constexpr (Num<T>::kTensorCores) {
    if (!flash_bwd_dv_applies(base) || base.ev > 512 || !tile_offsets_fit_int32(64, base.v_sn, 512, base.v_se) ||
        !tile_offsets_fit_int32(32, base.do_sn, 512, base.do_se))
      return false;
    FlashBwdParams<T> p{};
    static_cast<AttnBwdParams<T>&>(p) = base;
    const bool q_keys_major = keys_major(p.q_sn, p.q_se);
    bool launched = false;
    auto with_ev_tile = [&](auto ev_tile) {
      constexpr int kEvTile = decltype(ev_tile)::value;
      auto with_layout = [&](auto queries_major) {
        constexpr bool kQueriesMajor = decltype(queries_major)::value;
        if (FlashBwdDkdqTiles<64, kEvTile, kQueriesMajor>::kSmemBytes > launch.max_dynamic_smem_optin()) return;
        launch_flash_bwd_dkdq<T, kEvTile, kQueriesMajor>(launch, p, batch, workspace, op);
        launched = true;
      };
      if (q_keys_major) {
        with_layout(std::true_type{});
      } else {
        with_layout(std::false_type{});
      }
    };
    if (p.ev <= 128) {
      with_ev_tile(std::integral_constant<int, 128>{});
    } else if (p.ev <= 256) {
      with_ev_tile(std::integral_constant<int, 256>{});
    } else {
      with_ev_tile(std::integral_constant<int, 512>{});
    }
    return launched;
  }
  return false;
}

// The flash backward kernels (fp16/bf16) stream Q and dO tiles in one layout, chosen from q's
// strides (kQueriesMajor): an operand laid out the other way goes element by element instead of
// by 16-byte cp.async, for every tile of every block (two 2-byte loads with index arithmetic per
// element against a few MMAs). So when one of q, dO has its tokens at unit stride and the other its
// features (q channel-first from PAM's convolutions, dO a plain contiguous [B, N, Ev] gradient),
// the narrower of the two is copied once into the other's layout, O(N · min(E, Ev)).
// Only for the flash kernels: the other kernels take each operand's strides as they are.
inline std::pair<at::Tensor, at::Tensor> queries_in_one_layout(const at::Tensor& q, const at::Tensor& grad_out) {
  const auto tokens_major = [](const at::Tensor& t) { return keys_major(t.stride(1), t.stride(2)); };
  const auto features_major = [](const at::Tensor& t) { return t.stride(2) == 1 && t.stride(1) != 1; };
  const bool differ = (tokens_major(q) && features_major(grad_out)) || (features_major(q) && tokens_major(grad_out));
  if (!differ) return {q, grad_out};
  const auto like = [](const at::Tensor& t, bool to_tokens_major) {
    return to_tokens_major ? t.transpose(1, 2).contiguous().transpose(1, 2) : t.contiguous();
  };
  if (q.size(2) <= grad_out.size(2)) return {like(q, tokens_major(grad_out)), grad_out};
  return {q, like(grad_out, tokens_major(q))};
}

template <class Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_impl(Launch& launch, const at::Tensor& grad_out,
                                                                  const std::optional<at::Tensor>& grad_lse,
                                                                  const at::Tensor& q, const at::Tensor& k,
                                                                  const at::Tensor& v, const at::Tensor& out,
                                                                  const at::Tensor& lse, double scale) {
  const char* op = "attnseg::attention_bwd";
  check_attention_bwd_inputs(grad_out, grad_lse, q, k, v, out, lse, op);
  launch.check_device(q, op, "q");
  const int64_t batch = q.size(0), nq = q.size(1), nk = k.size(1), e = q.size(2), ev = v.size(2);
  // Gradients in the inputs' layouts (empty_like's rules, as the fake kernel promises).
  at::Tensor dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  if (batch == 0 || nq == 0 || nk == 0) return {dq, dk, dv};
  const auto stats = stats_dtype(q.scalar_type());
  const at::Tensor grad_out_c = grad_out.to(q.scalar_type());
  const at::Tensor out_c = out.to(q.scalar_type());
  const at::Tensor lse_c = lse.contiguous();
  std::optional<at::Tensor> grad_lse_c;
  if (grad_lse.has_value() && grad_lse->defined()) grad_lse_c = grad_lse->to(stats).contiguous();
  at::Tensor delta = at::empty({batch, nq}, q.options().dtype(stats));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_bwd_cuda", [&] {
    using T = typename KernelType<scalar_t>::type;
    using Tiles = AttnTiles<T>;
    using acc_t = typename Tiles::acc_t;
    AttnBwdParams<T> p{};
    set_inputs<scalar_t>(p, q, k, v);
    p.out = kptr<scalar_t>(out_c);
    p.grad_out = kptr<scalar_t>(grad_out_c);
    p.lse = lse_c.data_ptr<acc_t>();
    p.grad_lse = grad_lse_c ? grad_lse_c->data_ptr<acc_t>() : nullptr;
    p.delta = delta.data_ptr<acc_t>();
    p.dq = kptr<scalar_t>(dq);
    p.dk = kptr<scalar_t>(dk);
    p.dv = kptr<scalar_t>(dv);
    p.batch = batch;
    strides3(out_c, p.o_sb, p.o_sn, p.o_se);
    strides3(grad_out_c, p.do_sb, p.do_sn, p.do_se);
    strides3(dq, p.dq_sb, p.dq_sn, p.dq_se);
    strides3(dk, p.dk_sb, p.dk_sn, p.dk_se);
    strides3(dv, p.dv_sb, p.dv_sn, p.dv_se);
    // Where the flash kernels run, Q and dO as they stream them (dq keeps q's own layout, above).
    std::pair<at::Tensor, at::Tensor> streamed;
    if constexpr (Num<T>::kTensorCores) {
      if (flash_bwd_dv_applies(p)) {
        streamed = queries_in_one_layout(q, grad_out_c);
        p.q = kptr<scalar_t>(streamed.first);
        p.grad_out = kptr<scalar_t>(streamed.second);
        strides3(streamed.first, p.q_sb, p.q_sn, p.q_se);
        strides3(streamed.second, p.do_sb, p.do_sn, p.do_se);
      }
    }
    p.q_blocks = ceil_div(nq, Tiles::kRows);
    p.k_blocks = ceil_div(nk, Tiles::kRows);
    p.e_chunks = ceil_div(e, Tiles::kChunk);
    p.scale = static_cast<acc_t>(scale);
    const dim3 block(Tiles::kThreads);
    launch(attention_bwd_delta_kernel<T>,
           dim3(grid_dim_checked(ceil_div(batch * nq, Tiles::kWarps), kGridX, op, "B x Nq / 4")), block, 0, p);
    const bool flash_dkdq = try_flash_bwd_dkdq(launch, p, batch, q.options(), op);
    if (e > 0 && !flash_dkdq) {
      launch.set_max_dynamic_smem(attention_bwd_dq_kernel<T>, Tiles::kSmemBytes);
      launch(attention_bwd_dq_kernel<T>,
             dim3(grid_dim_checked(batch * p.q_blocks, kGridX, op, "B x ceil(Nq / rows per block)"),
                  grid_dim_checked(p.e_chunks, kGridYZ, op, "E")),
             block, Tiles::kSmemBytes, p);
    }
    // dK: blockIdx.y < e_chunks of the old dK/dV kernel, or the flash dK/dQ kernel; dV: the old
    // kernel's other slices, or the flash dV kernel (which applies wherever the dK/dQ kernel does).
    const bool flash_dv = try_flash_bwd_dv(launch, p, batch, op);
    TORCH_INTERNAL_ASSERT(flash_dv || !flash_dkdq, op, ": the flash dK/dQ kernel ran without the flash dV kernel");
    const int64_t kv_chunks = (flash_dkdq ? 0 : p.e_chunks) + (flash_dv ? 0 : ceil_div(ev, Tiles::kChunk));
    if (kv_chunks > 0) {
      launch.set_max_dynamic_smem(attention_bwd_dkv_kernel<T>, Tiles::kSmemBytes);
      launch(attention_bwd_dkv_kernel<T>,
             dim3(grid_dim_checked(batch * p.k_blocks, kGridX, op, "B x ceil(Nk / rows per block)"),
                  grid_dim_checked(kv_chunks, kGridYZ, op, "E + Ev")),
             block, Tiles::kSmemBytes, p);
    }
  });
  return {dq, dk, dv};
}

// ---- channel attention -------------------------------------------------------------------------
//
// The three products of CAM (X Xᵀ, A X and, in the backward, dY Xᵀ, Aᵀ dY, S X) are batched GEMMs
// of a library: `launch.gemm(a, b)` returns a·b for [B, M, K] · [B, K, N], accumulated and written
// in the accumulation type (fp32 for fp16/bf16/fp32 inputs, fp64 for fp64). On the device that is
// cuBLAS through ATen (tensor cores for fp16/bf16, launch.cuh); under the emulator a CPU stand-in
// computes the same products in fp32 from the exactly converted inputs (tests/emu/emu_ops.cpp).
// The row kernels (softmax forward and backward, symmetrize) are ours.
//
// Numerics. The Gram matrices E = X Xᵀ and dA = dY Xᵀ: products of the inputs, fp32 accumulation,
// fp32 result, never rounded to fp16 (a post-ReLU Gram matrix overflows it). The products with a
// C×C fp32 matrix on the left (A X, Aᵀ dY, S X) feed the tensor cores, so that matrix is rounded to
// the input type first: A ∈ [0, 1] as it is; S = dE + dEᵀ, which can exceed fp16's range, scaled by
// a power of two per batch so that max |S| ≤ 1 (exact, undone exactly in fp32 after the product).
// Each such rounding adds at most u·Σ_j |M_ij| |x_jn| to an output (u = 2^-11 fp16, 2^-8 bf16),
// the error PyTorch's own fp16/bf16 bmm of a rounded softmax makes. The outputs y and dX are
// accumulated in fp32 (dX = Aᵀ dY + S X summed in fp32) and rounded to x's type once.

// m rounded to `dtype` for a tensor-core GEMM (a no-op for fp32 and fp64). With `scale_to_one`, m is
// first multiplied per batch by a power of two 2^-k (k = ceil(log2 max |m|), 1 where m is zero or
// not finite, so inf and NaN stay as they are) so that it fits fp16; returns (m', 2^k) [B, 1, 1].
inline std::pair<at::Tensor, at::Tensor> round_for_gemm(const at::Tensor& m, at::ScalarType dtype, bool scale_to_one) {
  if ((dtype != at::kHalf && dtype != at::kBFloat16) || !scale_to_one) return {m.to(dtype), at::Tensor()};
  const at::Tensor peak = m.abs().amax({1, 2}, /*keepdim=*/true);
  const at::Tensor usable = at::isfinite(peak).logical_and(peak > 0);
  const at::Tensor unscale = at::where(usable, at::exp2(at::ceil(at::log2(peak))), at::ones_like(peak));
  return {(m / unscale).to(dtype), unscale};
}

template <class Launch>
std::tuple<at::Tensor, at::Tensor> channel_attention_fwd_impl(Launch& launch, const at::Tensor& x, bool official) {
  const char* op = "attnseg::channel_attention_fwd";
  check_channel_inputs(x, op);
  launch.check_device(x, op, "x");
  const int64_t batch = x.size(0), c = x.size(1), n = x.size(2);
  const auto stats = stats_dtype(x.scalar_type());
  at::Tensor y = at::empty({batch, c, n}, x.options());
  at::Tensor attn = at::empty({batch, c, c}, x.options().dtype(stats));
  if (batch == 0 || c == 0) return {y, attn};
  // E = X Xᵀ [B, C, C] in the accumulation type (zeros when N = 0).
  const at::Tensor energy = launch.gemm(x, x.transpose(1, 2)).contiguous();
  TORCH_INTERNAL_ASSERT(energy.scalar_type() == stats, op, ": the GEMM returned ", energy.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_attention_fwd_cuda", [&] {
    using Acc = typename Num<typename KernelType<scalar_t>::type>::acc;
    CamRowParams<Acc> rows{energy.data_ptr<Acc>(), nullptr, attn.data_ptr<Acc>(), batch, c, /*splits=*/1, official};
    launch(cam_softmax_fwd_kernel<Acc>, dim3(grid_dim_checked(batch * c, kGridX, op, "B x C")), dim3(kRowThreads), 0,
           rows);
  });
  if (n > 0) y.copy_(launch.gemm(round_for_gemm(attn, x.scalar_type(), false).first, x));  // Y = A X, rounded once
  return {y, attn};
}

template <class Launch>
at::Tensor channel_attention_bwd_impl(Launch& launch, const at::Tensor& grad_y, const at::Tensor& x,
                                      const at::Tensor& attn, bool official) {
  const char* op = "attnseg::channel_attention_bwd";
  check_channel_bwd_inputs(grad_y, x, attn, op);
  launch.check_device(x, op, "x");
  const int64_t batch = x.size(0), c = x.size(1), n = x.size(2);
  at::Tensor grad_x = at::empty({batch, c, n}, x.options());
  if (grad_x.numel() == 0) return grad_x;
  const at::Tensor gy = grad_y.to(x.scalar_type());
  const at::Tensor a = attn.contiguous();
  // dA = dY Xᵀ [B, C, C] in the accumulation type.
  const at::Tensor grad_attn = launch.gemm(gy, x.transpose(1, 2)).contiguous();
  const at::TensorOptions acc_options = a.options();
  at::Tensor grad_energy = at::empty({batch, c, c}, acc_options);
  at::Tensor sym = at::empty({batch, c, c}, acc_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_attention_bwd_cuda", [&] {
    using Acc = typename Num<typename KernelType<scalar_t>::type>::acc;
    // dE (row softmax backward, sign of the variant), then S = dE + dEᵀ.
    CamRowParams<Acc> rows{grad_attn.data_ptr<Acc>(), a.data_ptr<Acc>(), grad_energy.data_ptr<Acc>(), batch, c,
                           /*splits=*/1, official};
    launch(cam_softmax_bwd_kernel<Acc>, dim3(grid_dim_checked(batch * c, kGridX, op, "B x C")), dim3(kRowThreads), 0,
           rows);
    launch(cam_symmetrize_kernel<Acc>,
           dim3(grid_dim_checked(ceil_div(batch * c * c, kRowThreads), kGridX, op, "B x C x C")), dim3(kRowThreads), 0,
           static_cast<const Acc*>(grad_energy.data_ptr<Acc>()), sym.data_ptr<Acc>(), batch, c);
  });
  // dX = Aᵀ dY + S X, summed in the accumulation type and rounded to x's type once.
  at::Tensor sum = launch.gemm(round_for_gemm(a.transpose(1, 2), x.scalar_type(), false).first, gy);
  const auto [sym_rounded, unscale] = round_for_gemm(sym, x.scalar_type(), true);
  const at::Tensor sym_x = launch.gemm(sym_rounded, x);
  if (unscale.defined()) {
    sum.addcmul_(sym_x, unscale);
  } else {
    sum.add_(sym_x);
  }
  grad_x.copy_(sum);
  return grad_x;
}

}  // namespace attnseg::cuda
