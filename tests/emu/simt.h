// A small SIMT emulator: runs attnseg's CUDA kernel headers (csrc/cuda/*.cuh) on the CPU.
//
// Tests only; never shipped as a backend. Include this header before any kernel header.
//
// Model:
//   * Blocks run one after another, in an order drawn afresh for every launch: a random permutation
//     of the grid (from a generator seeded by set_launch_order_seed and advanced by every launch),
//     or linear order (x fastest) when options().linear_blocks is set, which the launcher of a kernel
//     whose cross-block protocol needs the device's in-order dispatch sets for that launch (see
//     csrc/cuda/warp.cuh). Every CUDA thread of a block is a fiber (ucontext) on one OS thread; a
//     fiber runs until it reaches a barrier, a warp collective or its end.
//   * Atomic reductions without a return value (red_add_f32, behind warp::red_add_f32x2) are queued
//     and applied when the launch ends, in an order shuffled by the same per-launch generator: a sum
//     of three or more partials then takes different fp32 roundings on different launches, as on the
//     device, and a kernel that reads back what it reduced within the launch sees the old value.
//   * __syncthreads() is a barrier over the block's fibers. Warp collectives (shuffles, votes,
//     __syncwarp, the WMMA *_sync calls, mma and ldmatrix) are barriers over the warp's 32 fibers; the last lane
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
//   * Fragment-level primitives (simt::warp, behind csrc/cuda/warp.cuh): mma.sync m16n8k16 and
//     ldmatrix are warp collectives with the PTX ISA's per-lane register layout (written in
//     warp.cuh). Each lane posts a pointer to its own operands (registers, row address); the
//     last lane to arrive assembles the matrices from the 32 posts, computes, and writes every
//     lane's result registers, so a wrong register or lane assignment gives a wrong product.
//     Like .aligned on the device they need the full warp: a partial warp or an exited lane is
//     an error. ldmatrix rows must be 16-byte aligned and inside the block's dynamic shared
//     memory (static __shared__ arrays are function statics, indistinguishable from global
//     memory here, so they are refused). mma: the exact products of the fp16/bf16 inputs are
//     added to C in fp32 one k at a time (k = 0..15), each addition rounded to nearest even;
//     tensor cores round differently inside one instruction, so compare with hardware by
//     tolerance. -DSIMT_PLANT_FRAGMENT_BUG=1 swaps A's registers a[1] and a[2] (for the test that
//     shows the self-tests catch a layout bug).
//   * cp.async is per thread: cp_async_16 queues a copy (16-byte aligned dynamic shared
//     destination, src-size 0..16, the rest zero-filled), commit closes the queued copies into a
//     group, wait(n) performs all but the n most recent groups. The copy is done at that wait,
//     not before: until then the destination keeps its old (for a fresh block, NaN) contents,
//     for the issuing thread too, so a missing or too-weak wait reads wrong data under every
//     schedule. Copies still pending when a thread exits are dropped (the device allows exiting
//     with copies whose data is never read).
//
// What this cannot verify: speed, occupancy, memory-model effects beyond barriers (fences,
// ordering of global writes between blocks), races between blocks that run at the same time on the
// device (here one block runs at a time, so a read-modify-write by plain loads and stores that
// needed an atomic goes unnoticed), bank conflicts, real tensor-core rounding, and
// writes racing an in-flight cp.async: the emulator reads the source and writes the destination
// at the wait, so a store to either between the issue and the wait goes unnoticed.
#pragma once

#define ATTNSEG_SIMT_EMULATOR 1

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
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
  bool linear_blocks = false;  // run blocks in linear order (else a fresh random order per launch)
  size_t max_dynamic_smem = 48 * 1024;
  size_t stack_bytes = 256 * 1024;
};

namespace detail {

enum class State { Runnable, AtBlockBarrier, AtWarpCollective, Done };
enum class Collective { None, Sync, Shuffle, Ballot, Fragment };

// A fragment-level warp collective (mma, ldmatrix): each lane posts a pointer to its operands,
// and the lane that completes the warp runs the operation once over all 32 posts.
using FragmentOp = void (*)(void* const (&posts)[kWarpSize]);

// One cp.async copy, performed when the wait that retires its group runs.
struct AsyncCopy {
  void* dst;
  const void* src;
  int src_bytes;
};

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
  FragmentOp fragment_op = nullptr;
  void* post = nullptr;
  // cp.async: copies issued since the last commit, and the committed groups not yet waited for
  // (oldest first). Whatever is left when the thread exits is dropped.
  std::vector<AsyncCopy> open_copies;
  std::vector<std::vector<AsyncCopy>> copy_groups;
};

// A queued atomic reduction: *target += value when the launch ends.
struct PendingRed {
  float* target;
  float value;
};

struct Runtime {
  Options options;
  std::mt19937_64 rng;
  std::mt19937_64 launch_rng;  // block order and reduction order, advanced by every launch
  std::vector<PendingRed> pending_reds;
  dim3 grid, block, block_idx;
  std::vector<Fiber> fibers;
  std::vector<std::vector<int>> warp_waiting;  // per warp: lanes waiting at a collective
  std::vector<unsigned char*> stacks;
  std::vector<unsigned char> dynamic_smem;
  size_t dynamic_smem_bytes = 0;  // the launch's request (the buffer has 128 bytes of slack)
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
  } else if (op == Collective::Fragment) {
    void* posts[kWarpSize];
    for (int l = 0; l < kWarpSize; ++l) {
      if (lane0[l].fragment_op != lane0[0].fragment_op)
        throw Error("simt: lanes of one warp met at different fragment instructions (mma / ldmatrix)");
      posts[l] = lane0[l].post;
    }
    lane0[0].fragment_op(posts);
  }
  for (int l = 0; l < lanes; ++l) {
    lane0[l].state = State::Runnable;
    lane0[l].op = Collective::None;
  }
  waiting.clear();
}

// The calling fiber arrives at the collective its fields describe and waits until the whole
// warp has; the last lane to arrive completes it for all.
inline void arrive_at_collective(Runtime& rt, Fiber& f) {
  const int warp = f.linear / kWarpSize;
  f.state = State::AtWarpCollective;
  rt.warp_waiting[warp].push_back(f.linear);
  if (static_cast<int>(rt.warp_waiting[warp].size()) == warp_size_of(rt, warp)) {
    complete_collective(rt, warp);
  } else {
    yield_to_scheduler();
  }
}

// Called by a fiber: arrive at a warp collective and wait until the whole warp has.
inline uint64_t warp_collective(Collective op, unsigned mask, uint64_t in, int src_lane) {
  Runtime& rt = runtime();
  Fiber& f = this_fiber();
  const int lanes = warp_size_of(rt, f.linear / kWarpSize);
  const unsigned full = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
  if ((mask & full) != full) {
    throw Error("simt: warp collectives with a partial lane mask are not supported (mask " + std::to_string(mask) +
                ")");
  }
  f.op = op;
  f.in = in;
  f.src_lane = src_lane;
  arrive_at_collective(rt, f);
  return f.out;
}

// A fragment-level collective (mma.sync.aligned, ldmatrix.sync.aligned): as on the device, all
// 32 lanes of a full warp must execute it together; `post` points to this lane's operands.
inline void fragment_collective(FragmentOp op, void* post, const char* what) {
  Runtime& rt = runtime();
  Fiber& f = this_fiber();
  const int warp = f.linear / kWarpSize;
  if (warp_size_of(rt, warp) != kWarpSize)
    throw Error(std::string("simt: ") + what + " needs a full warp of 32 threads (.aligned); block size " +
                std::to_string(rt.fibers.size()) + " leaves a partial warp");
  for (int l = 0; l < kWarpSize; ++l)
    if (rt.fibers[warp * kWarpSize + l].state == State::Done)
      throw Error(std::string("simt: ") + what + " with an exited lane (" + std::to_string(l) +
                  "): every lane of the warp must execute it (.aligned)");
  f.op = Collective::Fragment;
  f.fragment_op = op;
  f.post = post;
  arrive_at_collective(rt, f);
  f.fragment_op = nullptr;
  f.post = nullptr;
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

// Restarts the generator that orders blocks and reductions: the launches after this call draw
// their orders from `seed` (the default state is seed 0), each launch a fresh one.
inline void set_launch_order_seed(uint64_t seed) { detail::runtime().launch_rng.seed(seed); }

namespace detail {

// fp32 with subnormals flushed to (signed) zero, as red.global.add.f32 treats inputs and results.
inline float flush_subnormal(float x) {
  return std::fpclassify(x) == FP_SUBNORMAL ? std::copysign(0.0f, x) : x;
}

inline void apply_pending_reds(Runtime& rt) {
  std::shuffle(rt.pending_reds.begin(), rt.pending_reds.end(), rt.launch_rng);
  for (const PendingRed& r : rt.pending_reds)
    *r.target = flush_subnormal(flush_subnormal(*r.target) + flush_subnormal(r.value));
  rt.pending_reds.clear();
}

}  // namespace detail

// red.global.add.f32 (no return value): queued, applied at the end of the launch in shuffled order.
inline void red_add_f32(float* target, float value) {
  detail::Runtime& rt = detail::runtime();
  if (!rt.in_kernel) throw Error("simt: red_add_f32 outside a kernel");
  rt.pending_reds.push_back({target, value});
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
  rt.dynamic_smem_bytes = dynamic_smem;
  const std::function<void()> body = [&] { kernel(args...); };
  rt.body = &body;
  rt.error = nullptr;
  rt.in_kernel = true;
  rt.pending_reds.clear();
  try {
    const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
    if (blocks > (uint64_t(1) << 26)) throw Error("simt: grid of " + std::to_string(blocks) + " blocks too large");
    std::vector<uint32_t> order(blocks);
    std::iota(order.begin(), order.end(), 0u);
    if (!rt.options.linear_blocks) std::shuffle(order.begin(), order.end(), rt.launch_rng);
    for (const uint32_t linear : order) {
      rt.block_idx = dim3(linear % grid.x, (linear / grid.x) % grid.y, linear / (grid.x * grid.y));
      detail::run_block(rt);
      if (rt.error) std::rethrow_exception(rt.error);
    }
    detail::apply_pending_reds(rt);
  } catch (...) {
    rt.pending_reds.clear();
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
#define __align__(n) __attribute__((aligned(n)))  // alignas may not follow `static`
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

// ---- fragment-level warp primitives (csrc/cuda/warp.cuh: mma.sync, ldmatrix, cp.async) --------
//
// These follow the per-lane layouts written in csrc/cuda/warp.cuh (from the PTX ISA): mma and
// ldmatrix are collectives over a full warp in which every lane posts its own registers or row
// address and the last lane to arrive assembles the matrices from the 32 posts, computes, and
// gives each lane its own result registers. cp.async is per thread, with its group semantics.

namespace simt::warp {

namespace detail {

inline float unpack16(uint32_t reg, int high, bool bf16) {
  const auto bits = static_cast<uint16_t>(high ? reg >> 16 : reg & 0xffffu);
  return bf16 ? bf16_bits_to_float(bits) : half_bits_to_float(bits);
}

// True when [p, p + bytes) lies inside this block's dynamic shared memory. Static __shared__
// variables are function statics the emulator cannot tell from global memory, so the
// fragment-level primitives accept dynamic shared memory only.
inline bool in_dynamic_smem(const void* p, size_t bytes) {
  const auto* begin = dynamic_smem();
  const auto* q = static_cast<const unsigned char*>(p);
  return q >= begin && q + bytes <= begin + simt::detail::runtime().dynamic_smem_bytes;
}

inline std::string address(const void* p) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%p", p);
  return buf;
}

struct MmaPost {
  bool bf16;
  const uint32_t* a;
  const uint32_t* b;
  const float* c;
  float* d;
};

// m16n8k16, row.col, fp32 accumulators. The A registers a[0..3] hold, for g = lane / 4 and
// t = lane % 4: A[g][2t..], A[g+8][2t..], A[g][2t+8..], A[g+8][2t+8..]; B b[0], b[1] hold
// B[2t.., g], B[2t+8.., g]; C and D hold [g][2t..] (regs 0, 1) and [g+8][2t..] (regs 2, 3).
//
// Arithmetic: each product of two fp16 (or bf16) inputs is exact in fp32, and the products are
// added to C in fp32 one k at a time, k = 0..15, each addition rounded to nearest even. Tensor
// cores add the products of one instruction with their own internal order and precision (not
// IEEE-sequential), so results agree with hardware to a few fp32 ulps, not bitwise.
inline void mma_complete(void* const (&posts)[kWarpSize]) {
  const bool bf16 = static_cast<const MmaPost*>(posts[0])->bf16;
  float A[16][16], B[16][8], C[16][8];
#if SIMT_PLANT_FRAGMENT_BUG
  constexpr int a1 = 2, a2 = 1;  // planted: a[1] and a[2] swap roles (tests/emu/selftest.cpp must fail)
#else
  constexpr int a1 = 1, a2 = 2;
#endif
  for (int lane = 0; lane < kWarpSize; ++lane) {
    const auto& p = *static_cast<const MmaPost*>(posts[lane]);
    if (p.bf16 != bf16) throw Error("simt: lanes of one warp ran mma with different element types");
    const int g = lane / 4, t = lane % 4;
    for (int h = 0; h < 2; ++h) {
      A[g][2 * t + h] = unpack16(p.a[0], h, bf16);
      A[g + 8][2 * t + h] = unpack16(p.a[a1], h, bf16);
      A[g][2 * t + 8 + h] = unpack16(p.a[a2], h, bf16);
      A[g + 8][2 * t + 8 + h] = unpack16(p.a[3], h, bf16);
      B[2 * t + h][g] = unpack16(p.b[0], h, bf16);
      B[2 * t + 8 + h][g] = unpack16(p.b[1], h, bf16);
      C[g][2 * t + h] = p.c[h];
      C[g + 8][2 * t + h] = p.c[2 + h];
    }
  }
  float D[16][8];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 8; ++j) {
      float acc = C[i][j];
      for (int k = 0; k < 16; ++k) acc += A[i][k] * B[k][j];  // exact product: a fused add rounds the same
      D[i][j] = acc;
    }
  for (int lane = 0; lane < kWarpSize; ++lane) {  // every lane's inputs were read above: d may alias c
    float* d = static_cast<const MmaPost*>(posts[lane])->d;
    const int g = lane / 4, t = lane % 4;
    for (int h = 0; h < 2; ++h) {
      d[h] = D[g][2 * t + h];
      d[2 + h] = D[g + 8][2 * t + h];
    }
  }
}

struct LdmatrixPost {
  int count;
  bool trans;
  const void* row;
  uint32_t* r;
};

// ldmatrix.m8n8.x{count}[.trans].b16: lanes 8i..8i+7 give the 16-byte rows 0..7 of matrix i.
// Lane (g, t) receives r[i] = M_i[g][2t, 2t+1] (plain) or M_i[2t][g], M_i[2t+1][g] (.trans).
inline void ldmatrix_complete(void* const (&posts)[kWarpSize]) {
  const auto& p0 = *static_cast<const LdmatrixPost*>(posts[0]);
  const int count = p0.count;
  const bool trans = p0.trans;
  if (count != 1 && count != 2 && count != 4) throw Error("simt: ldmatrix loads 1, 2 or 4 matrices");
  uint16_t M[4][8][8];
  for (int lane = 0; lane < kWarpSize; ++lane) {
    const auto& p = *static_cast<const LdmatrixPost*>(posts[lane]);
    if (p.count != count || p.trans != trans)
      throw Error("simt: lanes of one warp ran different ldmatrix shapes (.x1/.x2/.x4, .trans)");
    if (lane >= 8 * count) continue;  // its address is not used
    if (reinterpret_cast<uintptr_t>(p.row) % 16 != 0)
      throw Error("simt: ldmatrix row address " + address(p.row) + " of lane " + std::to_string(lane) +
                  " is not 16-byte aligned");
    if (!in_dynamic_smem(p.row, 16))
      throw Error("simt: ldmatrix row address " + address(p.row) + " of lane " + std::to_string(lane) +
                  " is not inside the block's dynamic shared memory");
    std::memcpy(M[lane / 8][lane % 8], p.row, 16);
  }
  for (int lane = 0; lane < kWarpSize; ++lane) {
    uint32_t* r = static_cast<const LdmatrixPost*>(posts[lane])->r;
    const int g = lane / 4, t = lane % 4;
    for (int i = 0; i < count; ++i) {
      const uint16_t lo = trans ? M[i][2 * t][g] : M[i][g][2 * t];
      const uint16_t hi = trans ? M[i][2 * t + 1][g] : M[i][g][2 * t + 1];
      r[i] = uint32_t(lo) | (uint32_t(hi) << 16);
    }
  }
}

inline simt::detail::Fiber& async_thread(const char* what) {
  if (!simt::detail::runtime().current) throw Error(std::string("simt: ") + what + " outside a kernel");
  return simt::detail::this_fiber();
}

inline void perform(const simt::detail::AsyncCopy& c) {
  std::memcpy(c.dst, c.src, static_cast<size_t>(c.src_bytes));
  std::memset(static_cast<unsigned char*>(c.dst) + c.src_bytes, 0, static_cast<size_t>(16 - c.src_bytes));
}

}  // namespace detail

inline void mma_m16n8k16(bool bf16, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                         const float (&c)[4]) {
  detail::MmaPost post{bf16, a, b, c, d};
  simt::detail::fragment_collective(detail::mma_complete, &post, "mma.sync");
}

// r has `count` registers; row_ptr is this lane's row address (used for lanes < 8 * count).
inline void ldmatrix(uint32_t* r, int count, bool trans, const void* row_ptr) {
  detail::LdmatrixPost post{count, trans, row_ptr, r};
  simt::detail::fragment_collective(detail::ldmatrix_complete, &post, "ldmatrix");
}

// cp.async.cg.shared.global 16 bytes with src-size src_bytes. The copy happens when a
// cp_async_wait retires its group: until then the destination keeps its old contents (for the
// issuing thread too), so a missing or too-weak wait reads stale data, as it may on the device.
inline void cp_async_16(void* dst, const void* src, int src_bytes) {
  auto& f = detail::async_thread("cp.async");
  if (src_bytes < 0 || src_bytes > 16)
    throw Error("simt: cp.async src-size " + std::to_string(src_bytes) + " outside 0..16");
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0)
    throw Error("simt: cp.async destination " + detail::address(dst) + " is not 16-byte aligned");
  if (!detail::in_dynamic_smem(dst, 16))
    throw Error("simt: cp.async destination " + detail::address(dst) +
                " is not inside the block's dynamic shared memory");
  if (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % 16 != 0)
    throw Error("simt: cp.async source " + detail::address(src) + " is not 16-byte aligned");
  f.open_copies.push_back({dst, src, src_bytes});
}

// cp.async.commit_group: this thread's copies since the last commit become one group (possibly
// empty, as on the device).
inline void cp_async_commit() {
  auto& f = detail::async_thread("cp.async.commit_group");
  f.copy_groups.push_back(std::move(f.open_copies));
  f.open_copies.clear();
}

// cp.async.wait_group n: completes this thread's committed groups except the n most recent.
// Copies not yet committed are not waited for.
inline void cp_async_wait(int n) {
  auto& f = detail::async_thread("cp.async.wait_group");
  if (n < 0) throw Error("simt: cp.async.wait_group needs n >= 0");
  const int retire = static_cast<int>(f.copy_groups.size()) - n;
  if (retire <= 0) return;
  for (int g = 0; g < retire; ++g)
    for (const auto& c : f.copy_groups[g]) detail::perform(c);
  f.copy_groups.erase(f.copy_groups.begin(), f.copy_groups.begin() + retire);
}

}  // namespace simt::warp
