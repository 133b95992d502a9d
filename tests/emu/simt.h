// A small SIMT emulator: runs attnseg's CUDA kernel headers (csrc/cuda/*.cuh) on the CPU.
//
// Tests only; never shipped as a backend. Include this header before any kernel header.
//
// Model:
//   * Blocks run one after another. Every CUDA thread of a block is a fiber (ucontext) on one OS
//     thread; a fiber runs until it reaches a barrier, a warp collective or its end.
//   * __syncthreads() is a barrier over the block's fibers. Warp collectives (shuffles, votes,
//     __syncwarp, the WMMA *_sync calls) are barriers over the warp's 32 fibers; the last lane
//     to arrive performs the exchange for all of them.
//   * Between barriers the fibers run in the order the schedule picks: forward, reverse, or a
//     fresh random permutation at every scheduling round. A kernel that reads shared memory
//     written by another thread without a barrier in between sees different values under
//     different schedules, which the tests detect by comparing results bitwise.
//   * Static __shared__ variables are function statics (one block at a time makes them per
//     block; they keep the previous block's values). Dynamic shared memory is a per-block
//     buffer filled with 0xFF bytes (NaN for floating types) before each block, so reading it
//     before writing shows up.
//   * Launch limits are checked as on the device: <= 1024 threads per block, grid.y and
//     grid.z <= 65535, dynamic shared memory <= the configured limit (48 KiB by default).
//   * Barrier misuse is an error, not a hang: a block whose live fibers wait at different
//     barriers (or at a warp collective with a lane that has exited) throws simt::Error.
//   * WMMA: a fragment holds the whole tile in every lane (the real element layout is opaque
//     to kernels, so the emulator chooses the simplest); products accumulate in fp32.
//
// What this cannot verify: speed, occupancy, memory-model effects beyond barriers (fences,
// ordering of global writes between blocks), bank conflicts, real tensor-core rounding.
#pragma once

#define ATTNSEG_SIMT_EMULATOR 1

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace simt {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

enum class Schedule { Forward, Reverse, Random };

constexpr int kWarpSize = 32;

struct Options {
  Schedule schedule = Schedule::Forward;
  uint64_t seed = 0;
  size_t max_dynamic_smem = 48 * 1024;
  size_t stack_bytes = 256 * 1024;
};

namespace detail {

enum class State { Runnable, AtBlockBarrier, AtWarpCollective, Done };
enum class Collective { None, Sync, Shuffle, Ballot };

struct Fiber {
  ucontext_t ctx;
  dim3 tid;
  int linear = 0;
  State state = State::Runnable;
  // warp collective in flight
  Collective op = Collective::None;
  uint64_t in = 0, out = 0;
  int src_lane = 0;
  unsigned mask = 0;
};

struct Runtime {
  Options options;
  std::mt19937_64 rng;
  dim3 grid, block, block_idx;
  std::vector<Fiber> fibers;
  std::vector<std::vector<int>> warp_waiting;  // per warp: lanes waiting at a collective
  std::vector<unsigned char*> stacks;
  std::vector<unsigned char> dynamic_smem;
  ucontext_t scheduler;
  Fiber* current = nullptr;
  const std::function<void()>* body = nullptr;
  std::exception_ptr error;
  bool in_kernel = false;

  ~Runtime() {
    for (auto* s : stacks) munmap(s, options.stack_bytes);
  }
};

inline Runtime& runtime() {
  thread_local Runtime rt;
  return rt;
}

inline Fiber& this_fiber() {
  Runtime& rt = runtime();
  if (!rt.current) throw Error("simt: CUDA thread state used outside a kernel");
  return *rt.current;
}

inline void yield_to_scheduler() {
  Runtime& rt = runtime();
  Fiber& f = *rt.current;
  swapcontext(&f.ctx, &rt.scheduler);
}

inline void fiber_main() {
  Runtime& rt = runtime();
  try {
    (*rt.body)();
  } catch (...) {
    if (!rt.error) rt.error = std::current_exception();
  }
  rt.current->state = State::Done;
  // uc_link returns to the scheduler
}

inline int warp_size_of(const Runtime& rt, int warp) {
  const int n = static_cast<int>(rt.fibers.size());
  return std::min(kWarpSize, n - warp * kWarpSize);
}

// Completes a warp collective once every lane of the warp has arrived at it.
inline void complete_collective(Runtime& rt, int warp) {
  auto& waiting = rt.warp_waiting[warp];
  const int lanes = warp_size_of(rt, warp);
  Fiber* lane0 = &rt.fibers[warp * kWarpSize];
  const Collective op = lane0[waiting.front() % kWarpSize].op;
  for (int l = 0; l < lanes; ++l) {
    if (lane0[l].op != op) throw Error("simt: lanes of one warp met at different warp collectives");
  }
  if (op == Collective::Shuffle) {
    for (int l = 0; l < lanes; ++l) {
      const int src = lane0[l].src_lane;
      lane0[l].out = (src >= 0 && src < lanes) ? lane0[src].in : lane0[l].in;
    }
  } else if (op == Collective::Ballot) {
    uint64_t bits = 0;
    for (int l = 0; l < lanes; ++l) bits |= (lane0[l].in ? 1ull : 0ull) << l;
    for (int l = 0; l < lanes; ++l) lane0[l].out = bits;
  }
  for (int l = 0; l < lanes; ++l) {
    lane0[l].state = State::Runnable;
    lane0[l].op = Collective::None;
  }
  waiting.clear();
}

// Called by a fiber: arrive at a warp collective and wait until the whole warp has.
inline uint64_t warp_collective(Collective op, unsigned mask, uint64_t in, int src_lane) {
  Runtime& rt = runtime();
  Fiber& f = this_fiber();
  const int warp = f.linear / kWarpSize;
  const int lanes = warp_size_of(rt, warp);
  const unsigned full = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
  if ((mask & full) != full) {
    throw Error("simt: warp collectives with a partial lane mask are not supported (mask " + std::to_string(mask) +
                ")");
  }
  f.op = op;
  f.in = in;
  f.src_lane = src_lane;
  f.state = State::AtWarpCollective;
  rt.warp_waiting[warp].push_back(f.linear);
  if (static_cast<int>(rt.warp_waiting[warp].size()) == lanes) {
    complete_collective(rt, warp);
  } else {
    yield_to_scheduler();
  }
  return f.out;
}

inline std::vector<int> order_for_round(Runtime& rt, std::vector<int> runnable) {
  switch (rt.options.schedule) {
    case Schedule::Forward:
      break;
    case Schedule::Reverse:
      std::reverse(runnable.begin(), runnable.end());
      break;
    case Schedule::Random:
      std::shuffle(runnable.begin(), runnable.end(), rt.rng);
      break;
  }
  return runnable;
}

inline void run_block(Runtime& rt) {
  const int n = static_cast<int>(rt.fibers.size());
  for (int i = 0; i < n; ++i) {
    Fiber& f = rt.fibers[i];
    f = Fiber{};
    f.linear = i;
    f.tid = dim3(i % rt.block.x, (i / rt.block.x) % rt.block.y, i / (rt.block.x * rt.block.y));
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = rt.stacks[i];
    f.ctx.uc_stack.ss_size = rt.options.stack_bytes;
    f.ctx.uc_link = &rt.scheduler;
    makecontext(&f.ctx, fiber_main, 0);
  }
  for (auto& w : rt.warp_waiting) w.clear();
  std::fill(rt.dynamic_smem.begin(), rt.dynamic_smem.end(), static_cast<unsigned char>(0xFF));

  std::vector<int> runnable;
  while (true) {
    runnable.clear();
    int at_barrier = 0, done = 0;
    for (int i = 0; i < n; ++i) {
      switch (rt.fibers[i].state) {
        case State::Runnable: runnable.push_back(i); break;
        case State::AtBlockBarrier: ++at_barrier; break;
        case State::Done: ++done; break;
        case State::AtWarpCollective: break;
      }
    }
    if (rt.error) return;
    if (runnable.empty()) {
      if (done == n) return;
      if (at_barrier + done == n) {  // __syncthreads: every live thread has arrived
        for (auto& f : rt.fibers)
          if (f.state == State::AtBlockBarrier) f.state = State::Runnable;
        continue;
      }
      throw Error("simt: deadlock in block (" + std::to_string(rt.block_idx.x) + "," +
                  std::to_string(rt.block_idx.y) + "," + std::to_string(rt.block_idx.z) +
                  "): threads wait at different barriers or at a warp collective whose warp has exited lanes");
    }
    for (int i : order_for_round(rt, runnable)) {
      Fiber& f = rt.fibers[i];
      if (f.state != State::Runnable) continue;
      rt.current = &f;
      swapcontext(&rt.scheduler, &f.ctx);
      rt.current = nullptr;
      if (rt.error) return;
    }
  }
}

}  // namespace detail

inline Options& options() { return detail::runtime().options; }

inline void set_schedule(Schedule s, uint64_t seed = 0) {
  options().schedule = s;
  options().seed = seed;
}

// The <<<grid, block, smem>>> launch: runs every block of the grid to completion.
template <typename Kernel, typename... Args>
void launch(dim3 grid, dim3 block, size_t dynamic_smem, Kernel kernel, Args... args) {
  detail::Runtime& rt = detail::runtime();
  if (rt.in_kernel) throw Error("simt: nested launch");
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64)
    throw Error("simt: invalid block size " + std::to_string(block.x) + "x" + std::to_string(block.y) + "x" +
                std::to_string(block.z));
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 || grid.x > 2147483647u)
    throw Error("simt: invalid grid " + std::to_string(grid.x) + "x" + std::to_string(grid.y) + "x" +
                std::to_string(grid.z));
  if (dynamic_smem > rt.options.max_dynamic_smem)
    throw Error("simt: " + std::to_string(dynamic_smem) + " bytes of dynamic shared memory exceed the limit of " +
                std::to_string(rt.options.max_dynamic_smem));
  rt.rng.seed(rt.options.seed);
  rt.grid = grid;
  rt.block = block;
  rt.fibers.resize(threads);
  rt.warp_waiting.assign((threads + kWarpSize - 1) / kWarpSize, {});
  while (rt.stacks.size() < threads) {
    void* p = mmap(nullptr, rt.options.stack_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (p == MAP_FAILED) throw Error("simt: cannot allocate a fiber stack");
    rt.stacks.push_back(static_cast<unsigned char*>(p));
  }
  rt.dynamic_smem.assign(dynamic_smem + 128, 0);
  const std::function<void()> body = [&] { kernel(args...); };
  rt.body = &body;
  rt.error = nullptr;
  rt.in_kernel = true;
  try {
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          rt.block_idx = dim3(x, y, z);
          detail::run_block(rt);
          if (rt.error) std::rethrow_exception(rt.error);
        }
  } catch (...) {
    rt.in_kernel = false;
    rt.body = nullptr;
    throw;
  }
  rt.in_kernel = false;
  rt.body = nullptr;
}

// ---- the CUDA built-ins the kernels use --------------------------------------------------------

inline const dim3& thread_idx() { return detail::this_fiber().tid; }
inline const dim3& block_idx() { return detail::runtime().block_idx; }
inline const dim3& block_dim() { return detail::runtime().block; }
inline const dim3& grid_dim() { return detail::runtime().grid; }

inline unsigned char* dynamic_smem() {
  auto& buf = detail::runtime().dynamic_smem;
  // 128-byte aligned, as ATTNSEG_DYNAMIC_SMEM declares it on the device
  auto addr = reinterpret_cast<uintptr_t>(buf.data());
  return buf.data() + ((128 - addr % 128) % 128);
}

inline void syncthreads() {
  detail::Fiber& f = detail::this_fiber();
  f.state = detail::State::AtBlockBarrier;
  detail::yield_to_scheduler();
}

inline void syncwarp(unsigned mask = 0xffffffffu) { detail::warp_collective(detail::Collective::Sync, mask, 0, 0); }

template <typename T>
T shuffle_from(unsigned mask, T value, int src_lane) {
  static_assert(sizeof(T) <= 8, "simt: shuffles move at most 8 bytes");
  uint64_t in = 0;
  std::memcpy(&in, &value, sizeof(T));
  const uint64_t out = detail::warp_collective(detail::Collective::Shuffle, mask, in, src_lane);
  T result;
  std::memcpy(&result, &out, sizeof(T));
  return result;
}

inline int lane_id() { return detail::this_fiber().linear % kWarpSize; }

// Out-of-segment sources return the caller's own value, as on the device.
inline int segment_src(int lane, int src, int width) {
  const int base = lane & ~(width - 1);
  return (src >= base && src < base + width) ? src : lane;
}

}  // namespace simt

// ---- CUDA spellings ----------------------------------------------------------------------------

using simt::dim3;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)
#define threadIdx (::simt::thread_idx())
#define blockIdx (::simt::block_idx())
#define blockDim (::simt::block_dim())
#define gridDim (::simt::grid_dim())
#define warpSize 32

inline void __syncthreads() { simt::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { simt::syncwarp(mask); }
inline void __threadfence() {}
inline void __threadfence_block() {}

template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  const int lane = simt::lane_id();
  return simt::shuffle_from(mask, v, simt::segment_src(lane, (lane & ~(width - 1)) + (src % width), width));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = simt::lane_id();
  return simt::shuffle_from(mask, v, simt::segment_src(lane, lane ^ lane_mask, width));
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = simt::lane_id();
  return simt::shuffle_from(mask, v, simt::segment_src(lane, lane + static_cast<int>(delta), width));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = simt::lane_id();
  return simt::shuffle_from(mask, v, simt::segment_src(lane, lane - static_cast<int>(delta), width));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return static_cast<unsigned>(simt::detail::warp_collective(simt::detail::Collective::Ballot, mask, pred != 0, 0));
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) {
  const int lanes = simt::detail::warp_size_of(simt::detail::runtime(),
                                               simt::detail::this_fiber().linear / simt::kWarpSize);
  const unsigned full = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
  return __ballot_sync(mask, pred) == full;
}

// Fibers share one OS thread and switch only at barriers, so read-modify-write is atomic.
template <typename T>
T atomicAdd(T* address, T value) {
  T old = *address;
  *address = old + value;
  return old;
}
template <typename T>
T atomicMax(T* address, T value) {
  T old = *address;
  *address = std::max(old, value);
  return old;
}
template <typename T>
T atomicCAS(T* address, T compare, T value) {
  T old = *address;
  if (old == compare) *address = value;
  return old;
}

// ---- half and bfloat16 (bit-exact round-to-nearest-even conversions) --------------------------

namespace simt {

inline uint16_t float_to_half_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t a = x & 0x7fffffffu;
  if (a >= 0x7f800000u) return static_cast<uint16_t>(sign | (a > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to inf (>= 65520)
  if (a < 0x38800000u) {  // below 2^-14: a half subnormal (or zero), m * 2^-24
    float af;
    std::memcpy(&af, &a, 4);
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(af * 16777216.0f)));
  }
  uint32_t h = ((((a >> 23) - 127 + 15) << 10) | ((a & 0x7fffffu) >> 13));
  const uint32_t rem = a & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t(h) & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) {
    const float v = static_cast<float>(m) * (1.0f / 16777216.0f);
    return sign ? -v : v;
  }
  const uint32_t bits = sign | (e == 31 ? (0x7f800000u | (m << 13)) : (((e - 15 + 127) << 23) | (m << 13)));
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // quiet NaN
  x += 0x7fffu + ((x >> 16) & 1u);
  return static_cast<uint16_t>(x >> 16);
}

inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t x = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

}  // namespace simt

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
inline __half __float2half(float f) { return __half{simt::float_to_half_bits(f)}; }
inline float __half2float(__half h) { return simt::half_bits_to_float(h.bits); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16{simt::float_to_bf16_bits(f)}; }
inline float __bfloat162float(__nv_bfloat16 b) { return simt::bf16_bits_to_float(b.bits); }

// ---- WMMA (nvcuda::wmma): every lane holds the whole tile -------------------------------------

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

namespace detail {
inline float to_f(float x) { return x; }
inline float to_f(__half x) { return __half2float(x); }
inline float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
T from_f(float x);
template <>
inline float from_f<float>(float x) { return x; }
template <>
inline __half from_f<__half>(float x) { return __float2half(x); }
template <>
inline __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = rows * cols;
  T x[num_elements];
};

template <typename Use, int M, int N, int K, typename T, typename Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, T value) {
  for (auto& e : f.x) e = value;
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* ptr, unsigned ldm) {
  static_assert(!std::is_same_v<Layout, void>, "operand fragments carry their layout");
  if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0) throw simt::Error("wmma: load_matrix_sync pointer not 256-bit aligned");
  if (ldm % (16 / sizeof(T)) != 0) throw simt::Error("wmma: ldm not a multiple of 16 bytes");
  __syncwarp();
  using F = fragment<Use, M, N, K, T, Layout>;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c)
      f.x[r * F::cols + c] = std::is_same_v<Layout, row_major> ? ptr[r * ldm + c] : ptr[c * ldm + r];
}

template <int M, int N, int K, typename T>
void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const T* ptr, unsigned ldm, layout_t layout) {
  if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0) throw simt::Error("wmma: load_matrix_sync pointer not 256-bit aligned");
  __syncwarp();
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) f.x[r * N + c] = layout == mem_row_major ? ptr[r * ldm + c] : ptr[c * ldm + r];
}

template <int M, int N, int K, typename T>
void store_matrix_sync(T* ptr, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t layout) {
  if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0) throw simt::Error("wmma: store_matrix_sync pointer not 256-bit aligned");
  __syncwarp();
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) (layout == mem_row_major ? ptr[r * ldm + c] : ptr[c * ldm + r]) = f.x[r * N + c];
  __syncwarp();
}

template <int M, int N, int K, typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  __syncwarp();
  float fa[M * K], fb[K * N], result[M * N];
  for (int i = 0; i < M * K; ++i) fa[i] = detail::to_f(a.x[i]);
  for (int i = 0; i < K * N; ++i) fb[i] = detail::to_f(b.x[i]);
  std::copy(c.x, c.x + M * N, result);
  for (int i = 0; i < M; ++i)
    for (int k = 0; k < K; ++k)
      for (int j = 0; j < N; ++j) result[i * N + j] += fa[i * K + k] * fb[k * N + j];
  std::copy(result, result + M * N, d.x);
}

}  // namespace nvcuda::wmma
