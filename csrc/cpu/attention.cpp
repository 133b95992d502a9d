// Fused attention on the CPU: tiled, online softmax, never an Nq x Nk buffer.
//
// Forward, per (batch, block of queries), one task:
//   for each block of keys:          S = Q_i K_jᵀ                 (ATen GEMM into a tile)
//                                    m' = max(m, rowmax(S·scale)); P = exp(S·scale − m')
//                                    l = l·e^(m−m') + rowsum(P);   O_i = O_i·e^(m−m') + P V_j
//   O_i /= l,  lse_i = m + log l.
// (fp32 on a CPU with AVX-512 or AVX2 and a channel-first v: attention_fwd_f32, the same algorithm
// computed transposed on our own GEMMs, f32_gemm.h.)
// Backward (flash-attention-2 order), per chunk of queries, per (batch, group of key blocks):
//   for each key block j in the group, for each query block i in the chunk:
//     P = exp(Q_i K_jᵀ·scale − lse_i); dV_j += Pᵀ dO_i; dP = dO_i V_jᵀ; dS = P ∘ (dP − delta_i)
//     dK_j += scale · dSᵀ Q_i;  dQ_i(group) += scale · dS K_j
//   then the chunk's dQ = Σ_group dQ(group), summed in group order. With few key blocks (few
//   keys), the fp32 kernel also splits each chunk's rows into parts, tasks of their own, each
//   with its own dK and dV, summed in part order at the end. The groups depend on the shape only;
//   the parts on the shape and, for many threads, on the thread count (schedule.h: so the bits
//   are repeatable for a given thread count, and under deterministic algorithms for any). The
//   chunks are pipelined (no barrier between them: backward_schedule).
//
// Threads: independent tasks handed out dynamically (parallel_tasks); each task's GEMMs run
// single-threaded. Tile-sized GEMMs gain little from MKL's own threads, and MKL threads nested
// inside our tasks oversubscribe the cores (8x slower on 2 cores: docs/performance.md); so each
// task sets MKL's thread-local thread count to 1 (when the BLAS is MKL; an OpenMP BLAS
// also sees the enclosing parallel region). This library must be built with -fopenmp: the
// `omp parallel` of at::parallel_for is a header template compiled here, serial without it.
// Memory beyond inputs and outputs: per-thread tiles (below: 512 KiB, or two, in fp32), and for the
// backward 2 x (groups − 1) x B x kBackwardChunk x E partial dQ buffers (two chunks' worth: the
// chunks are pipelined), independent of N. (The fp32 kernels on our own GEMMs below also keep
// O(N·E) operand copies; see them.)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <limits>
#include <thread>
#include <tuple>
#include <vector>

#include "../common/checks.h"
#include "f32_gemm.h"
#include "lowp_gemm.h"
#include "row_ops.h"
#include "schedule.h"

extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace attnseg::cpu {
namespace {

// While alive, this thread's MKL calls run on this thread only (see "Threads" above).
struct SingleThreadedBlas {
  int previous = 0;
  SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local) previous = MKL_Set_Num_Threads_Local(1);
  }
  ~SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous);
  }
};

// Tile sizes. The low-precision kernels (bf16/fp16 GEMMs) use kBlockM x kBlockN: 256 x 256 was
// the best of {64..512} x {128..512} measured at N = 4,096, E = 64, Ev = 512 on one thread (the
// forward's accumulator, 256 x Ev, and the score tile stay in L2). The fp32/fp64 kernels take
// ATen's (MKL's) GEMM per tile, whose throughput grows with the tile: on an Intel Xeon (AMX,
// AVX-512, 2 MiB L2 a core), one thread, N = 9,216 channel-first, O += P V ran at 123 GFLOP/s
// with 256 x 256 tiles, 135 with 512 x 256 and 139 with 512 x 512 (torch.mm 2048^3: 154). The
// fp32 forward takes 512 queries x 256 keys: on 2 threads as fast as 512 x 512 (367-379 against
// 366-370 ms; 256 x 256: 393-414) with half its score tile, which kept the op's forward+backward
// peak within 5 % of the reference's (512 x 512: 52.6 MiB against 1,008). The fp32 backward
// keeps 256 query rows (two tiles and the partial dQ buffers) and takes 512 keys a block:
// 1.14-1.18 s forward + backward against 1.24-1.39 s with 256.
constexpr int64_t kBlockM = 256;  // queries per tile (low precision; the fp32/fp64 backward)
constexpr int64_t kBlockN = 256;  // keys per tile (low precision)
constexpr int64_t kFwdBlockM = 512, kFwdBlockN = 256;  // fp32/fp64 forward
constexpr int64_t kBwdBlockN = 512;                    // keys per tile of the fp32/fp64 backward
// Target number of parallel tasks of the backward, B x key-block groups. Fixed, not the thread
// count, so that dQ's summation order (and so its bits) does not depend on the machine. 64: at
// B = 1 every key block of a DANet crop (up to 64 of them) is a task of its own, so the tasks are
// equal and many (8 groups of 4-5 blocks left a 2-thread machine 11 % idle at N = 9,216).
constexpr int64_t kBackwardTasks = 64;
// The backward visits the queries in chunks of this many rows, so that the per-group partial
// dQ buffers are 2 x (groups − 1) x B x kBackwardChunk x E, whatever Nq is (two chunks in flight).
constexpr int64_t kBackwardChunk = kBlockM;
// The fp32 backward on our GEMMs (attention_bwd_f32): keys per block, queries per chunk.
constexpr int64_t kF32BwdBlockN = 512, kF32BwdChunk = 1024;

constexpr int64_t kRowPanel = 64;  // the backward splits a chunk's rows into parts of whole 64-row panels

// Runs body(state, task) for task = 0 .. n_tasks − 1 on torch's threads, each thread taking the
// next task from a shared counter (dynamic scheduling: a thread slowed by another process on
// its core does fewer tasks instead of holding the others up, as a static split would).
// make_state() builds each thread's scratch (tiles). Tasks must be independent; which thread
// runs a task never changes its result.
template <typename MakeState, typename Body>
void parallel_tasks(int64_t n_tasks, const MakeState& make_state, const Body& body) {
  std::atomic<int64_t> next_task{0};
  const int64_t workers = std::min<int64_t>(n_tasks, at::get_num_threads());
  // The workers run the caller's dispatch state (below autograd), not their threads' own.
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    at::ThreadLocalStateGuard state_guard(caller_state);
    SingleThreadedBlas single_threaded_blas;
    auto state = make_state();
    for (int64_t task = next_task++; task < n_tasks; task = next_task++) body(state, task);
  });
}

// How the tasks' dQ shares reach dq (backward_schedule). By default group 0 adds into dq's own rows
// and the other groups into partial buffers zeroed before each chunk. first_writes: each task's
// first key block writes its share (C = dS K, no add), so that neither dq nor the partials need
// zeroing. row_buffer: group 0 works in a contiguous chunk of rows instead of dq's rows, and the
// chunk's sum is written into dq's layout: for a body that needs row-major dQ rows when dq is not
// contiguous (no B x Nq x E copy of dq).
struct DqPlan {
  bool first_writes = false;
  bool row_buffer = false;
};

// Groups of key blocks the backward splits the keys into: a task each per chunk of queries (and batch).
int64_t backward_groups(int64_t batch, int64_t nk, int64_t block_n) {
  return std::min(ceil_div(nk, block_n), std::max<int64_t>(1, ceil_div(kBackwardTasks, batch)));
}

// The rows of one backward task: part `part` of its chunk's rows, [i_begin, i_end).
struct RowPart {
  int64_t part, i_begin, i_end;
};

// Parts each chunk's rows are split into, for shapes whose key blocks are too few to keep the
// threads busy (few keys: HRNet-OCR's K object regions): B x groups x parts tasks per chunk instead
// of B x groups. Each part other than the first accumulates its own dKᵀ and dVᵀ (B x Nk x (E + Ev)
// floats), added in part order at the end, so the parts are at most the tasks kBackwardTasks asks
// for, parts of at least kMinPartRows rows, and (parts − 1)·Nk ≤ the chunk's rows: those buffers
// never outgrow the chunk's own (O(chunk · (E + Ev))). Shapes only, like the groups (more parts for
// many threads: backward_split). 1 for DANet's crops (Nk > 1,024, the chunk). On 2 threads of a first-generation EPYC
// (Zen), the fp32 backward at N = 9,216, E = Ev = 256 took 0.76 of the single part's time at
// K = 19 and 0.62 at K = 150 (4 parts each; paired medians); at N = 576-1,024 (2 parts) the same
// as with one. 128-row parts were slower (each part packs its key block's V_jᵀ again: 1.11 at
// N = 256), 512-row parts no faster.
constexpr int64_t kMinPartRows = 256;
int64_t backward_row_parts(int64_t batch, int64_t nq, int64_t nk, int64_t block_n, int64_t chunk) {
  const int64_t chunk_rows = std::min(nq, chunk);
  const int64_t by_tasks = ceil_div(kBackwardTasks, batch * backward_groups(batch, nk, block_n));
  return std::max<int64_t>(1, std::min({by_tasks, chunk_rows / kMinPartRows, 1 + chunk_rows / nk}));
}

// The row parts of the fp32 backward for `threads`: the shape's own (backward_row_parts) or more,
// up to whole kMinPartRows-row parts, where the model (schedule.h: model_backward) makes the call
// at least 3 % faster. With more threads than a chunk's B x groups tasks, the chain of each group's
// tasks over the chunks (each adds into the group's dKᵀ and dVᵀ after the previous chunk's) leaves
// the other threads idle: 18 chains at N = 9,216, B = 1. Each part beyond the first keeps a dKᵀ and
// dVᵀ of its own, B x Nk x (E + Ev) floats (20 MiB at N = 9,216, E = 64, Ev = 512), for the call.
BackwardSplit backward_split(int64_t batch, int64_t nq, int64_t nk, int64_t e, int64_t ev, int64_t block_n,
                             int64_t chunk, bool lay_out, bool row_buffer, int64_t threads) {
  const int64_t chunk_rows = std::min(nq, chunk), groups = backward_groups(batch, nk, block_n);
  const bool reduces = groups > 1 || row_buffer;
  const auto model = [&](int64_t parts) {
    return model_backward(batch, nq, nk, e, ev, block_n, chunk_rows, groups, parts, lay_out, reduces, threads);
  };
  BackwardSplit best;
  best.row_parts = backward_row_parts(batch, nq, nk, block_n, chunk);
  best.run = model(best.row_parts);
  if (threads <= 1) return best;
  for (int64_t parts = best.row_parts * 2; parts <= std::max<int64_t>(1, chunk_rows / kMinPartRows); parts *= 2) {
    const ModelledRun run = model(parts);
    if (run.makespan < 0.97 * best.run.makespan) best = BackwardSplit{parts, run};
  }
  return best;
}

// Lays out piece (b, rows r0 .. r0 + rows of the chunk) of the chunk starting at query c0:
// backward_schedule's per-chunk preparation (our fp32 kernel: q's and dO's missing forms), into
// slot (c0 / chunk) % chunk_slots(nq, chunk).
using ChunkLayout = std::function<void(int64_t c0, int64_t b, int64_t r0, int64_t rows)>;

// The chunks of queries whose buffers (layouts, partial dQ) the pipelined backward_schedule keeps
// at once: the chunk its tasks work on and the next one.
int64_t chunk_slots(int64_t nq, int64_t chunk_rows) { return std::min<int64_t>(2, ceil_div(nq, chunk_rows)); }

// The backward's schedule, shared by the fp32/fp64 and the low-precision kernels. The queries go
// in chunks of `chunk` rows; per chunk, B x groups x row_parts tasks: task (b, g, r) runs the key
// blocks [g·k_blocks/groups, (g + 1)·k_blocks/groups) of batch b over part r of the chunk's rows
// (whole 64-row panels, as even as they go; a part past a short last chunk's rows does nothing),
// calling body(state, b, kb_begin, kb_end, c0, c_rows, dq_chunk, RowPart) with dq_chunk the
// group's c_rows x E share of the chunk's dQ: rows c0.. of dq itself (or the row buffer, see
// DqPlan) for g = 0, a partial buffer otherwise (the parts write disjoint rows of it). After a
// chunk's tasks, its reduction adds the partials into dq in group order, so dQ's bits do not
// depend on the thread count. A body that takes row_parts > 1 keeps each part's dKᵀ and dVᵀ apart
// (backward_row_parts). dq: [B, Nq, E] of acc_t, any strides (the low-precision and our fp32
// bodies need dq_chunk contiguous, c_rows x E: a contiguous dq, or the row buffer). lay_out, when
// given, prepares each chunk before its tasks, in pieces of (batch, 64 rows) (our fp32 kernel
// lays out the chunk's q and dO there, once for all of the chunk's tasks), into one of two slots,
// chunk index % 2 (ChunkRows).
//
// Pipelined, with no barrier between chunks: the pieces of work (layout pieces, tasks, reduction
// pieces) are taken by the threads in one fixed order, L(0) C(0) L(1) C(1) R(0) L(2) C(2) R(1) ...
// C(last) R(last − 1) R(last), and each waits only for what it reads or overwrites: task (c, t)
// for L(c), for task (c − 1, t) (the same dKᵀ and dVᵀ columns, so they add up in chunk order) and
// for R(c − 2) (its partials' slot); L(c) for C(c − 2) (its slot); R(c) for C(c). Every wait is
// on an earlier piece, so the threads always progress, and a lone thread runs them in order. A
// thread that finishes its last task of chunk c goes on with chunk c + 1 instead of waiting for
// the others: with a per-chunk barrier, 2.5-3 % of the thread time on 2 threads waited there at
// N = 9,216, and with more threads than a chunk's tasks (18 at N = 9,216) most of them would. The
// cost: two chunks' partials, row buffer and layouts instead of one.
template <typename acc_t, typename MakeState, typename Body>
void backward_schedule(int64_t batch, int64_t nq, int64_t nk, int64_t block_n, at::Tensor& dq,
                       const MakeState& make_state, const Body& body, const ChunkLayout& lay_out = {},
                       int64_t chunk = kBackwardChunk, DqPlan plan = {}, int64_t row_parts = 1) {
  const int64_t e = dq.size(2);
  const int64_t k_blocks = ceil_div(nk, block_n);
  const int64_t groups = backward_groups(batch, nk, block_n);
  const int64_t chunk_rows = std::min(nq, chunk), chunks = ceil_div(nq, chunk_rows);
  const int64_t slots = chunk_slots(nq, chunk_rows);
  // A body that adds into its dQ share (no DqPlan::first_writes) finds the buffers zeroed: here
  // first, then by the reduction that has read them.
  const auto buffer = [&](std::initializer_list<int64_t> size) {
    return plan.first_writes ? at::empty(size, dq.options()) : at::zeros(size, dq.options());
  };
  at::Tensor partial = groups > 1 ? buffer({slots, groups - 1, batch, chunk_rows, e}) : at::Tensor();
  at::Tensor group0_rows = plan.row_buffer ? buffer({slots, batch, chunk_rows, e}) : at::Tensor();
  const bool reduces = groups > 1 || plan.row_buffer;
  const int64_t tasks = batch * groups * row_parts;
  constexpr int64_t kPieceRows = kRowPanel;  // rows of a layout or a reduction piece
  const auto rows_of = [&](int64_t c) { return std::min(chunk_rows, nq - c * chunk_rows); };
  const auto pieces = [&](int64_t c) { return batch * ceil_div(rows_of(c), kPieceRows); };

  const std::vector<Step> steps = backward_steps(chunks, tasks, static_cast<bool>(lay_out), reduces, pieces);

  std::vector<std::atomic<int64_t>> laid_out(chunks), tasks_done(chunks), reduced(chunks);
  std::vector<std::atomic<bool>> task_done(chunks * tasks);
  std::atomic<bool> failed{false};
  // Waits until ready(); false if another step threw (the exception ends the call; this step is dropped).
  const auto wait_for = [&](const auto& ready) {
    while (!ready()) {
      if (failed.load(std::memory_order_relaxed)) return false;
      std::this_thread::yield();
    }
    return true;
  };
  const auto all = [](const std::atomic<int64_t>& done, int64_t count) {
    return [&done, count] { return done.load(std::memory_order_acquire) == count; };
  };

  const auto run_task = [&](auto& state, int64_t c, int64_t task) {
    const int64_t c0 = c * chunk_rows, c_rows = rows_of(c), slot = c % slots, panels = ceil_div(c_rows, kRowPanel);
    const int64_t b = task / (groups * row_parts), g = task / row_parts % groups, r = task % row_parts;
    const RowPart part{r, c0 + r * panels / row_parts * kRowPanel,
                       std::min(c0 + c_rows, c0 + (r + 1) * panels / row_parts * kRowPanel)};
    if (part.i_begin >= part.i_end) return;
    at::Tensor dq_chunk = g > 0                   ? partial[slot][g - 1][b].narrow(0, 0, c_rows)
                          : group0_rows.defined() ? group0_rows[slot][b].narrow(0, 0, c_rows)
                                                  : dq[b].narrow(0, c0, c_rows);
    body(state, b, g * k_blocks / groups, (g + 1) * k_blocks / groups, c0, c_rows, dq_chunk, part);
  };

  // Reduction piece (b, rows r0..): dq[b, c0 + r] = group0_rows[b][r] (or itself) + partial[0][b][r]
  // + partial[1][b][r] + ... in that order. The sums are made in contiguous rows (the row buffer;
  // dq's own when its rows are; else a copy) and reach a strided dq by copy_2d: a channel-first dq
  // (the modules') written an element at a time, E lines N floats apart per row, took ~130 ms of a
  // 330 ms backward at HRNet-OCR's N = 32,768, K = 19, E = 256.
  acc_t* const dq_ptr = dq.data_ptr<acc_t>();
  const int64_t sb = dq.stride(0), sn = dq.stride(1), se = dq.stride(2);
  const auto run_reduce = [&](int64_t c, int64_t piece) {
    const int64_t c0 = c * chunk_rows, slot = c % slots, blocks = ceil_div(rows_of(c), kPieceRows);
    const int64_t b = piece / blocks, r0 = piece % blocks * kPieceRows, rows = std::min(kPieceRows, rows_of(c) - r0);
    acc_t* const out = dq_ptr + b * sb + (c0 + r0) * sn;
    std::vector<acc_t> copy;
    acc_t* acc = nullptr;
    int64_t ld = e;
    if (group0_rows.defined()) {
      acc = group0_rows[slot][b].data_ptr<acc_t>() + r0 * e;
    } else if (se == 1) {
      acc = out, ld = sn;
    } else {
      copy.resize(rows * e);
      acc = copy.data();
      copy_2d<acc_t>(out, sn, se, rows, e, acc, e);
    }
    for (int64_t g = 1; g < groups; ++g) {
      acc_t* const in = partial[slot][g - 1][b].data_ptr<acc_t>() + r0 * e;
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t d = 0; d < e; ++d) acc[r * ld + d] += in[r * e + d];
      if (!plan.first_writes) std::fill(in, in + rows * e, acc_t(0));
    }
    if (acc == out) return;
    if (sn == 1) {  // a channel-first dq: out(r, d) = out[d · se + r], the transpose of acc
      copy_2d<acc_t>(acc, 1, ld, e, rows, out, se);
    } else {
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t d = 0; d < e; ++d) out[r * sn + d * se] = acc[r * ld + d];
    }
    if (group0_rows.defined() && !plan.first_writes) std::fill(acc, acc + rows * e, acc_t(0));
  };

  parallel_tasks(static_cast<int64_t>(steps.size()), make_state, [&](auto& state, int64_t s) {
    const Step step = steps[s];
    const int64_t c = step.chunk;
    try {
      switch (step.kind) {
        case StepKind::kLayout: {
          if (c >= 2 && !wait_for(all(tasks_done[c - 2], tasks))) return;
          const int64_t blocks = ceil_div(rows_of(c), kPieceRows), r0 = step.index % blocks * kPieceRows;
          lay_out(c * chunk_rows, step.index / blocks, r0, std::min(kPieceRows, rows_of(c) - r0));
          laid_out[c].fetch_add(1, std::memory_order_acq_rel);
          break;
        }
        case StepKind::kTask: {
          if (lay_out && !wait_for(all(laid_out[c], pieces(c)))) return;
          if (c >= 1 && !wait_for([&] { return task_done[(c - 1) * tasks + step.index].load(std::memory_order_acquire); }))
            return;
          if (c >= 2 && reduces && !wait_for(all(reduced[c - 2], pieces(c - 2)))) return;
          run_task(state, c, step.index);
          task_done[c * tasks + step.index].store(true, std::memory_order_release);
          tasks_done[c].fetch_add(1, std::memory_order_acq_rel);
          break;
        }
        case StepKind::kReduce: {
          if (!wait_for(all(tasks_done[c], tasks))) return;
          run_reduce(c, step.index);
          reduced[c].fetch_add(1, std::memory_order_acq_rel);
          break;
        }
      }
    } catch (...) {
      failed.store(true);
      throw;
    }
  });
}

// A view ATen's GEMM reads without a copy: one of the two inner strides is 1 and the other a
// valid leading dimension. Anything else (e.g. the expanded grad of out.sum()) is copied once.
at::Tensor gemm_ready(const at::Tensor& t) {
  const int64_t rows = t.size(-2), cols = t.size(-1);
  const int64_t rs = t.stride(-2), cs = t.stride(-1);
  const bool row_major = (cs == 1 || cols == 1) && rs >= std::max<int64_t>(1, cols);
  const bool col_major = (rs == 1 || rows == 1) && cs >= std::max<int64_t>(1, rows);
  return (row_major || col_major) ? t : t.contiguous();
}

// The online-softmax step of the forward on one score tile s (bm x bn, in place: scores in,
// exp(s·scale − m_new) out), with the running row max / sum and the bm x ev output accumulator.
template <typename scalar_t>
void online_softmax_rows(scalar_t* s_ptr, int64_t bm, int64_t bn, scalar_t scale, scalar_t* row_max,
                         scalar_t* row_sum, scalar_t* o_ptr, int64_t ev) {
  constexpr scalar_t kNegInf = -std::numeric_limits<scalar_t>::infinity();
  for (int64_t r = 0; r < bm; ++r) {
    scalar_t* row = s_ptr + r * bn;
    const scalar_t m_old = row_max[r];
    const scalar_t block_max = scaled_row_max(row, bn, scale);
    // std::max drops a NaN second argument; a NaN logit must poison the row as in torch.softmax.
    const scalar_t m_new = block_max != block_max ? block_max : std::max(m_old, block_max);
    // All logits so far -inf: keep exp() away from (-inf) - (-inf).
    const scalar_t shift = m_new == kNegInf ? scalar_t(0) : m_new;
    const scalar_t rescale = std::exp(m_old - shift);
    row_sum[r] = row_sum[r] * rescale + scaled_exp_sum(row, bn, scale, shift);
    // The accumulator is still zero while m_old is -inf: no rescale needed then.
    if (m_old != kNegInf && rescale != scalar_t(1)) scale_row(o_ptr + r * ev, ev, rescale);
    row_max[r] = m_new;
  }
}

// The end of the forward for a block of rows: O /= l, lse = m + log l.
template <typename scalar_t>
void normalize_rows(scalar_t* o_ptr, int64_t bm, int64_t ev, const scalar_t* row_max, const scalar_t* row_sum,
                    scalar_t* lse) {
  for (int64_t r = 0; r < bm; ++r) {
    scale_row(o_ptr + r * ev, ev, scalar_t(1) / row_sum[r]);
    // logsumexp of a row holding +inf is +inf (as torch.logsumexp), not inf + log(NaN)
    lse[r] = std::isinf(row_max[r]) ? row_max[r] : row_max[r] + std::log(row_sum[r]);
  }
}

template <typename scalar_t>
void attention_fwd_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale_d,
                          at::Tensor& out, at::Tensor& lse) {
  const int64_t batch = q.size(0), nq = q.size(1), nk = k.size(1);
  constexpr int64_t block_m = kFwdBlockM, block_n = kFwdBlockN;
  const int64_t q_blocks = ceil_div(nq, block_m);
  const scalar_t scale = static_cast<scalar_t>(scale_d);
  constexpr scalar_t kNegInf = -std::numeric_limits<scalar_t>::infinity();
  auto lse_a = lse.accessor<scalar_t, 2>();

  struct Scratch {
    at::Tensor tile;                     // block_m x block_n scores, then probabilities
    std::vector<scalar_t> row_max, row_sum;  // running max and sum of the online softmax
  };
  const auto make_scratch = [&] {
    return Scratch{at::empty({block_m * block_n}, q.options()), std::vector<scalar_t>(block_m),
                   std::vector<scalar_t>(block_m)};
  };
  parallel_tasks(batch * q_blocks, make_scratch, [&](Scratch& scratch, int64_t task) {
    at::Tensor& tile = scratch.tile;
    std::vector<scalar_t>& row_max = scratch.row_max;
    std::vector<scalar_t>& row_sum = scratch.row_sum;
    {
      const int64_t b = task / q_blocks;
      const int64_t i0 = (task % q_blocks) * block_m, bm = std::min(block_m, nq - i0);
      const at::Tensor q_i = q[b].narrow(0, i0, bm);
      at::Tensor o_i = out[b].narrow(0, i0, bm);  // contiguous bm x Ev: the accumulator
      o_i.zero_();
      std::fill(row_max.begin(), row_max.end(), kNegInf);
      std::fill(row_sum.begin(), row_sum.end(), scalar_t(0));
      for (int64_t j0 = 0; j0 < nk; j0 += block_n) {
        const int64_t bn = std::min(block_n, nk - j0);
        at::Tensor s = tile.narrow(0, 0, bm * bn).view({bm, bn});
        at::mm_out(s, q_i, k[b].narrow(0, j0, bn).t());
        online_softmax_rows(s.data_ptr<scalar_t>(), bm, bn, scale, row_max.data(), row_sum.data(),
                            o_i.data_ptr<scalar_t>(), o_i.size(1));
        o_i.addmm_(s, v[b].narrow(0, j0, bn));
      }
      normalize_rows(o_i.data_ptr<scalar_t>(), bm, o_i.size(1), row_max.data(), row_sum.data(), &lse_a[b][i0]);
    }
  });
}

// Whether x [B, N, C] is channel-first: unit stride along N (a view of a convolution's [B, C, N]).
bool channel_first(const at::Tensor& x) { return x.stride(1) == 1 || x.size(1) == 1; }

// x.transpose(1, 2) ([B, C, N], unit stride along N) of x [B, N, C]: as it lies when x is
// channel-first, else a copy.
at::Tensor channel_rows(const at::Tensor& x) {
  const at::Tensor t = x.transpose(1, 2);
  return channel_first(x) ? t : t.contiguous();
}

#if ATTNSEG_HAVE_F32_GEMM
// The fp32 forward on our GEMMs (f32_gemm.h: AVX-512 or AVX2, `ops`), computed transposed so that a channel-first
// v (a convolution's output, as PositionAttention passes it) is read where it lies: per task
// (batch, block of up to kF32BlockM queries, part of the keys: see below), per block of kF32BlockN keys,
//   Sᵀ = K_j Q_iᵀ           (A: K's rows; B: Q_iᵀ, packed once per task into 64-query panels;
//                            Sᵀ written as the 64-query panels the next product reads as B)
//   column online softmax   (one query per column: max, exp, sum over the keys of the tile)
//   Oᵀ = Oᵀ·α + V_jᵀ Pᵀ      (A: vᵀ's rows, unit stride along the keys; C: an Ev x kF32BlockM scratch;
//                            the rescale by α = e^(m_old − m_new) folded into the GEMM's loads of C)
// then Oᵀ /= l, written transposed into out's rows. Beyond inputs and outputs: k as rows (a copy,
// B·Nk·E, unless k's rows have unit stride) and per thread the tile, Oᵀ and Q_iᵀ (832 KiB at E = 64,
// Ev = 512).
// Tiles: up to 256 queries x 256 keys, as the micro-kernel measured fastest (the Sᵀ panels, 256 KiB,
// and Oᵀ, 512 KiB at Ev = 512, stay in a 2 MiB L2). For many threads (schedule.h: forward_split) the
// query blocks shrink to 128 or 64 queries, and the keys may be split into 2 or 4 parts: task
// (b, query block, part s) then runs key blocks [s·k_blocks/parts, (s+1)·k_blocks/parts), writes its
// own normalised rows (part 0 into out, part s > 0 into an Nq x Ev buffer of its own) and lse_s, and
// the task that finishes a query block's parts last combines them, in part order:
//   lse = m + log Σ_s e^(lse_s − m) (m = max_s lse_s),  out = Σ_s e^(lse_s − lse) out_s,
// parts with lse_s = −inf (no finite logit) taking no weight.
constexpr int64_t kF32BlockM = kF32FwdMaxBlockM, kF32BlockN = kF32FwdBlockN;

// Rows [i0, i0 + bm) of batch b: out and lse from the key parts' (combine, above). out rows are
// Ev floats apart; part s > 0 at parts[s − 1], lse_parts [parts][B][Nq].
void combine_key_parts(float* out_b, const float* parts_b, int64_t part_stride, const float* lse_parts_b,
                       int64_t lse_part_stride, float* lse_b, int64_t parts, int64_t bm, int64_t ev) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  std::vector<float> weight(parts);
  for (int64_t i = 0; i < bm; ++i) {
    float m = kNegInf;
    for (int64_t s = 0; s < parts; ++s) {
      const float l = lse_parts_b[s * lse_part_stride + i];
      m = l != l ? l : std::max(m, l);  // a NaN lse poisons the row, as in the unsplit kernel
    }
    if (m == kNegInf || std::isinf(m) || m != m) {  // no finite logit in any part, +inf or NaN: as unsplit
      lse_b[i] = m;
      if (m != kNegInf) std::fill(out_b + i * ev, out_b + (i + 1) * ev, std::numeric_limits<float>::quiet_NaN());
      continue;
    }
    float sum = 0.0f;
    for (int64_t s = 0; s < parts; ++s) {
      const float l = lse_parts_b[s * lse_part_stride + i];
      weight[s] = l == kNegInf ? 0.0f : std::exp(l - m);
      sum += weight[s];
    }
    lse_b[i] = m + std::log(sum);
    for (int64_t s = 0; s < parts; ++s) weight[s] /= sum;
    float* row = out_b + i * ev;
    // part 0 lies in out already; a part without a finite logit (weight 0) holds NaN and is skipped
    if (weight[0] != 1.0f) {
      if (weight[0] == 0.0f) std::fill(row, row + ev, 0.0f); else scale_row(row, ev, weight[0]);
    }
    for (int64_t s = 1; s < parts; ++s) {
      if (weight[s] == 0.0f) continue;
      const float* part = parts_b + (s - 1) * part_stride + i * ev;
      const float w = weight[s];
      for (int64_t c = 0; c < ev; ++c) row[c] += w * part[c];
    }
  }
}

// v_t: [B, Ev, Nk] with unit stride along Nk (v.transpose(1, 2) of a channel-first v).
void attention_fwd_f32(const F32Ops& ops, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v_t,
                       double scale_d, at::Tensor& out, at::Tensor& lse) {
  const int64_t batch = q.size(0), nq = q.size(1), nk = k.size(1), e = q.size(2), ev = v_t.size(1);
  const ForwardSplit split = forward_split(batch, nq, nk, ev, plan_threads());
  const int64_t block_m = split.block_m, parts = split.key_parts;
  const int64_t q_blocks = ceil_div(nq, block_m), k_blocks = ceil_div(nk, kF32BlockN);
  const float scale = static_cast<float>(scale_d);
  const at::Tensor k_rows = k.stride(2) == 1 || e == 1 ? k : k.contiguous();  // A of Sᵀ = K Qᵀ: rows of E
  const float* q_ptr = q.data_ptr<float>();
  const int64_t sq_b = q.stride(0), sq_n = q.stride(1), sq_e = q.stride(2);
  const int64_t sv_b = v_t.stride(0), sv_e = v_t.stride(1);
  // key parts: parts 1.. write their rows here, every part its lse; a counter a query block
  const at::Tensor part_out = parts > 1 ? at::empty({parts - 1, batch, nq, ev}, q.options()) : at::Tensor();
  const at::Tensor part_lse = parts > 1 ? at::empty({parts, batch, nq}, q.options()) : at::Tensor();
  std::vector<std::atomic<int64_t>> parts_done(parts > 1 ? batch * q_blocks : 0);

  struct Scratch {
    at::Tensor q_t, tile, o_t;  // Q_iᵀ panels, Sᵀ / Pᵀ panels, Oᵀ (Ev x kF32BlockM)
    std::vector<float> col_max, col_sum, alpha;
  };
  const auto make_scratch = [&] {
    const auto f32 = q.options();
    return Scratch{at::empty({kF32BlockM * std::max<int64_t>(e, 1)}, f32), at::empty({kF32BlockN * kF32BlockM}, f32),
                   at::empty({std::max<int64_t>(ev, 1) * kF32BlockM}, f32), std::vector<float>(kF32BlockM),
                   std::vector<float>(kF32BlockM), std::vector<float>(kF32BlockM)};
  };
  parallel_tasks(batch * q_blocks * parts, make_scratch, [&](Scratch& t, int64_t task) {
    const int64_t s = task % parts, block = task / parts, b = block / q_blocks;
    const int64_t i0 = (block % q_blocks) * block_m, bm = std::min(block_m, nq - i0);
    const int64_t panels = ceil_div(bm, kF32Panel);
    float* q_t = t.q_t.data_ptr<float>();
    float* tile = t.tile.data_ptr<float>();
    float* o_t = t.o_t.data_ptr<float>();
    // Q_iᵀ as panels [panel][E][64], queries past bm zero.
    pack_panels(q_ptr + b * sq_b + i0 * sq_n, sq_e, sq_n, e, bm, q_t);
    std::fill(o_t, o_t + ev * kF32BlockM, 0.0f);
    std::fill(t.col_max.begin(), t.col_max.end(), -std::numeric_limits<float>::infinity());
    std::fill(t.col_sum.begin(), t.col_sum.end(), 0.0f);
    const float* k_b = k_rows.data_ptr<float>() + b * k_rows.stride(0);
    const float* v_b = v_t.data_ptr<float>() + b * sv_b;
    const int64_t j_begin = s * k_blocks / parts * kF32BlockN, j_end = std::min(nk, (s + 1) * k_blocks / parts * kF32BlockN);
    for (int64_t j0 = j_begin; j0 < j_end; j0 += kF32BlockN) {
      const int64_t bn = std::min(kF32BlockN, j_end - j0);
      f32_gemm(ops, bn, panels * kF32Panel, e, F32A{k_b + j0 * k_rows.stride(1), k_rows.stride(1), 1}, F32B{q_t, e * kF32Panel},
               F32C{tile, bn * kF32Panel, kF32Panel}, false);
      ops.column_online_softmax(tile, bn, panels, scale, t.col_max.data(), t.col_sum.data(), t.alpha.data());
      f32_gemm(ops, ev, panels * kF32Panel, bn, F32A{v_b + j0, sv_e, 1}, F32B{tile, bn * kF32Panel},
               F32C{o_t, kF32Panel, kF32BlockM}, true, t.alpha.data());
    }
    // out[i0 + i][c] = Oᵀ[c][i] / l_i; lse_i = m_i + log l_i (normalize_rows' semantics).
    float* const out_rows = s == 0 ? out.data_ptr<float>() + (b * nq + i0) * ev
                                   : part_out.data_ptr<float>() + ((s - 1) * batch * nq + b * nq + i0) * ev;
    float* const lse_rows = parts == 1 ? lse.data_ptr<float>() + b * nq + i0
                                       : part_lse.data_ptr<float>() + (s * batch + b) * nq + i0;
    for (int64_t i = 0; i < bm; ++i) {
      const float m = t.col_max[i], l = t.col_sum[i], inv_l = 1.0f / l;
      lse_rows[i] = std::isinf(m) ? m : m + std::log(l);
      float* out_row = out_rows + i * ev;
      for (int64_t c = 0; c < ev; ++c) out_row[c] = o_t[c * kF32BlockM + i] * inv_l;
    }
    // The last of the block's parts to finish combines them (acq_rel: it sees the others' rows).
    if (parts > 1 && parts_done[block].fetch_add(1, std::memory_order_acq_rel) == parts - 1) {
      combine_key_parts(out.data_ptr<float>() + (b * nq + i0) * ev,
                        part_out.data_ptr<float>() + (b * nq + i0) * ev, batch * nq * ev,
                        part_lse.data_ptr<float>() + b * nq + i0, batch * nq, lse.data_ptr<float>() + b * nq + i0,
                        parts, bm, ev);
    }
  });
}

// The fp32 backward on our GEMMs (AVX-512 or AVX2, `ops`), flash-attention-2 order on backward_schedule's
// tasks (batch, group of key blocks, part of the chunk's rows: backward_row_parts), over chunks of
// kF32BwdChunk queries, each in blocks of ops.bwd_rows rows (256 on AVX-512, 512 on AVX2). The P
// and dP / dS tiles are 64-key panels of a block's rows ([bn / 64][rows][64]), so that they are the
// B operands of the key-side products as written:
//   S = Q_i K_jᵀ              A: q's rows;  B: Kᵀ in panels (once per call)
//   P = exp(S·scale − lse)
//   dV_jᵀ += dO_iᵀ P          A: dOᵀ's rows (unit stride along the queries)
//   dP = dO_i V_jᵀ            A: dO's rows;  B: V_jᵀ in panels (per task and chunk, reused by the
//                            chunk's blocks: 1 MiB at Ev = 512; per 256-row chunk it cost 9 %;
//                            B's panels outer on AVX2: F32Ops::dp_panels_outer)
//   dS = P ∘ (dP − delta) · scale
//   dK_jᵀ += Q_iᵀ dS          A: qᵀ's rows
//   dQ_i += dS K_j            A: dS's panels;  B: K in panels (once per call)
// A channel-first tensor (the module's q and dO) gives its ᵀ rows as it lies, a row-major one its
// rows; the other form is laid out per chunk, once for all of the chunk's tasks (ChunkRows:
// O(chunk·E) for q, O(chunk·Ev) for dO). dKᵀ and dVᵀ go straight into channel-first gradients (else
// into buffers copied at the end), dQ's rows into a contiguous dq directly, else into a chunk's
// rows added with the partials into dq's layout after each chunk (DqPlan). No gradient or dQ
// buffer is zeroed. Beyond inputs and outputs: K and Kᵀ in panels (B·N·E each), two chunks'
// layouts and partial dQ of the key-block groups (the schedule is pipelined: 2 x (groups − 1) x B
// x kF32BwdChunk x E, 8.5 MiB at N = 9,216, E = 64; two chunks of dQ's rows more unless dq is
// contiguous), the row parts' dKᵀ and dVᵀ (few keys only: (parts − 1) x B x Nk x (E + Ev),
// (parts − 1)·Nk ≤ the chunk) and per thread the two tiles and V_jᵀ's panels (at Ev = 512: 2 MiB
// on AVX-512, 3 MiB on AVX2).

// The query-side operands of a chunk, for x [B, Nq, C] (q or dO): its rows (C along the
// reduction) and its ᵀ rows (the queries along the reduction), each with unit stride along the
// reduction. Where x's layout gives one (a channel-first x its ᵀ rows, a row-major x its rows), it is
// read where it lies; the other is laid out per chunk (O(chunk · C) floats, once for all of the
// chunk's tasks, so once per call in all), in 16 x 16 blocks. (After gemm_ready, x always has one
// of the two; laying out both is there for any strides.) Two slots, chunk index % 2, as
// backward_schedule lays out a chunk while the previous one's tasks still read theirs.
struct ChunkRows {
  const float* base;
  int64_t sb, sn, sc, batch, channels, chunk, slots;
  bool has_rows, has_t_rows;
  int64_t parts;      // of the buffer: how many of the two x does not give
  at::Tensor buffer;  // [slot][B][parts][chunk · C]: the rows (chunk x C) if x lacks them, then the ᵀ rows (C x chunk)
  ChunkRows(const at::Tensor& x, int64_t chunk_rows)
      : base(x.data_ptr<float>()), sb(x.stride(0)), sn(x.stride(1)), sc(x.stride(2)), batch(x.size(0)),
        channels(x.size(2)), chunk(chunk_rows), slots(chunk_slots(x.size(1), chunk_rows)),
        has_rows(x.stride(2) == 1 || x.size(2) == 1), has_t_rows(channel_first(x)),
        parts(int64_t(!has_rows) + int64_t(!has_t_rows)),
        buffer(at::empty({slots * batch * parts * chunk * channels}, x.options())) {}
  bool needs_layout() const { return parts > 0; }
  float* part(int64_t b, bool t, int64_t c0) const {
    const int64_t slot = c0 / chunk % slots;
    return buffer.data_ptr<float>() + ((slot * batch + b) * parts + (t && !has_rows ? 1 : 0)) * chunk * channels;
  }
  // backward_schedule's ChunkLayout: rows r0 .. r0 + rows of batch b of the chunk at c0.
  void lay_out(int64_t c0, int64_t b, int64_t r0, int64_t rows) const {
    const float* src = base + b * sb + (c0 + r0) * sn;
    if (!has_rows) copy_2d(src, sn, sc, rows, channels, part(b, false, c0) + r0 * channels, channels);
    if (!has_t_rows) copy_2d(src, sc, sn, channels, rows, part(b, true, c0) + r0, chunk);
  }
  // Row i (a query of the chunk starting at c0) of batch b, and the stride between rows.
  const float* rows(int64_t b, int64_t i, int64_t c0) const {
    return has_rows ? base + b * sb + i * sn : part(b, false, c0) + (i - c0) * channels;
  }
  int64_t rows_ld() const { return has_rows ? sn : channels; }
  // Column i of the ᵀ rows of batch b (channel 0), and the stride between channels.
  const float* t_rows(int64_t b, int64_t i, int64_t c0) const {
    return has_t_rows ? base + b * sb + i * sn : part(b, true, c0) + (i - c0);
  }
  int64_t t_rows_ld() const { return has_t_rows ? sc : chunk; }
};

// delta, lse: fp32 [B, Nq] contiguous; dq, dk, dv in any layout, overwritten (need not be zeroed);
// B, Nq, Nk > 0.
void attention_bwd_f32(const F32Ops& ops, const at::Tensor& grad_out, const at::Tensor& delta, const at::Tensor& q,
                       const at::Tensor& k, const at::Tensor& v, const at::Tensor& lse, double scale_d, at::Tensor& dq,
                       at::Tensor& dk, at::Tensor& dv) {
  const int64_t batch = q.size(0), nq = q.size(1), nk = k.size(1), e = q.size(2), ev = v.size(2);
  const float scale = static_cast<float>(scale_d);
  const auto f32 = q.options();
  const int64_t chunk_rows = std::min(nq, kF32BwdChunk);
  ChunkRows q_chunk(q, chunk_rows);          // rows: A of S; ᵀ rows: A of dKᵀ
  ChunkRows do_chunk(grad_out, chunk_rows);  // rows: A of dP; ᵀ rows: A of dVᵀ
  const at::Tensor v_t = channel_rows(v);    // V_jᵀ's panels come from it: [B, Ev, Nk]
  const int64_t key_panels = ceil_div(nk, kF32Panel), e_panels = ceil_div(e, kF32Panel);
  at::Tensor k_t_panels = at::empty({batch, key_panels * e * kF32Panel}, f32);  // B of S:  Kᵀ [E x Nk]
  at::Tensor k_panels = at::empty({batch, e_panels * nk * kF32Panel}, f32);     // B of dQ: K [Nk x E]
  // Kᵀ's panels [key panel][E][64] and K's [E panel][Nk][64], a (batch, 64 keys) slice a task
  at::parallel_for(0, batch * key_panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / key_panels, j0 = (task % key_panels) * kF32Panel, keys = std::min(kF32Panel, nk - j0);
      const float* k_j = k.data_ptr<float>() + b * k.stride(0) + j0 * k.stride(1);
      pack_panels(k_j, k.stride(2), k.stride(1), e, keys, k_t_panels.data_ptr<float>() + b * k_t_panels.stride(0) + j0 * e);
      pack_panels(k_j, k.stride(1), k.stride(2), keys, e, k_panels.data_ptr<float>() + b * k_panels.stride(0) + j0 * kF32Panel,
                  nk * kF32Panel);
    }
  });
  // Every gradient element is written before it is added to (the first query block writes dKᵀ
  // and dVᵀ, each task's first key block its dQ share: DqPlan::first_writes), so no gradient or
  // dQ buffer is zeroed.
  const bool dk_direct = channel_first(dk), dv_direct = channel_first(dv);
  at::Tensor dk_t = dk_direct ? dk.transpose(1, 2) : at::empty({batch, e, nk}, f32);
  at::Tensor dv_t = dv_direct ? dv.transpose(1, 2) : at::empty({batch, ev, nk}, f32);
  // dQ_i += dS K_j needs a row-major C: dq itself when it is contiguous, else a chunk's rows
  // (DqPlan::row_buffer), added with the groups' partials into dq's layout after each chunk.
  const DqPlan dq_plan{/*first_writes=*/true, /*row_buffer=*/!dq.is_contiguous()};
  // Each chunk's rows in parts, parts 1.. with dKᵀ and dVᵀ of their own: for few keys
  // (backward_row_parts), or for many threads (backward_split).
  const int64_t row_parts =
      backward_split(batch, nq, nk, e, ev, kF32BwdBlockN, kF32BwdChunk,
                     q_chunk.needs_layout() || do_chunk.needs_layout(), dq_plan.row_buffer, plan_threads())
          .row_parts;
  at::Tensor dk_parts = row_parts > 1 ? at::empty({row_parts - 1, batch, e, nk}, f32) : at::Tensor();
  at::Tensor dv_parts = row_parts > 1 ? at::empty({row_parts - 1, batch, ev, nk}, f32) : at::Tensor();

  ChunkLayout lay_out_chunk;
  if (q_chunk.needs_layout() || do_chunk.needs_layout())
    lay_out_chunk = [&](int64_t c0, int64_t b, int64_t r0, int64_t rows) {
      q_chunk.lay_out(c0, b, r0, rows);
      do_chunk.lay_out(c0, b, r0, rows);
    };
  const float* lse_ptr = lse.data_ptr<float>();
  const float* delta_ptr = delta.data_ptr<float>();

  struct Scratch {
    at::Tensor p, ds, v_panels;  // P and dP / dS tiles (64-key panels of a block's rows), V_jᵀ's panels
  };
  const auto make_scratch = [&] {
    const int64_t tile = ops.bwd_rows * kF32BwdBlockN;
    return Scratch{at::zeros({tile}, f32), at::zeros({tile}, f32), at::empty({kF32BwdBlockN * std::max<int64_t>(ev, 1)}, f32)};
  };
  backward_schedule<float>(batch, nq, nk, kF32BwdBlockN, dq, make_scratch,
                           [&](Scratch& t, int64_t b, int64_t kb_begin, int64_t kb_end, int64_t c0, int64_t,
                               at::Tensor& dq_chunk_t, const RowPart& part) {
    float* p = t.p.data_ptr<float>();
    float* ds = t.ds.data_ptr<float>();
    float* v_panels = t.v_panels.data_ptr<float>();
    const float* v_t_b = v_t.data_ptr<float>() + b * v_t.stride(0);
    const float* k_t_b = k_t_panels.data_ptr<float>() + b * k_t_panels.stride(0);
    const float* k_b = k_panels.data_ptr<float>() + b * k_panels.stride(0);
    // part 0 into the gradients, part r > 0 into its own dKᵀ, dVᵀ; each first written by the
    // part's first block of the first chunk
    const at::Tensor& dk_dst = part.part == 0 ? dk_t : dk_parts[part.part - 1];
    const at::Tensor& dv_dst = part.part == 0 ? dv_t : dv_parts[part.part - 1];
    float* dk_t_b = dk_dst.data_ptr<float>() + b * dk_dst.stride(0);
    float* dv_t_b = dv_dst.data_ptr<float>() + b * dv_dst.stride(0);
    const int64_t first_row = c0 == 0 ? part.i_begin : -1;
    for (int64_t kb = kb_begin; kb < kb_end; ++kb) {
      const int64_t j0 = kb * kF32BwdBlockN, bn = std::min(kF32BwdBlockN, nk - j0), panels = ceil_div(bn, kF32Panel);
      pack_panels(v_t_b + j0, v_t.stride(1), 1, ev, bn, v_panels);
      for (int64_t i0 = part.i_begin; i0 < part.i_end; i0 += ops.bwd_rows) {
        const int64_t rows = std::min(ops.bwd_rows, part.i_end - i0), tile_panel = rows * kF32Panel;
        const float* q_rows_i = q_chunk.rows(b, i0, c0);
        const float* q_t_i = q_chunk.t_rows(b, i0, c0);
        const float* do_rows_i = do_chunk.rows(b, i0, c0);
        const float* do_t_i = do_chunk.t_rows(b, i0, c0);
        float* dq_i = dq_chunk_t.data_ptr<float>() + (i0 - c0) * e;  // the chunk's dQ: c_rows x E, row-major
        f32_gemm(ops, rows, bn, e, F32A{q_rows_i, q_chunk.rows_ld(), 1},
                 F32B{k_t_b + (j0 / kF32Panel) * e * kF32Panel, e * kF32Panel}, F32C{p, tile_panel, kF32Panel}, false);
        ops.recompute_probabilities_panels(p, rows, panels, scale, lse_ptr + b * nq + i0);
        f32_gemm(ops, ev, bn, rows, F32A{do_t_i, do_chunk.t_rows_ld(), 1}, F32B{p, tile_panel},
                 F32C{dv_t_b + j0, kF32Panel, dv_dst.stride(1)}, /*accumulate=*/i0 != first_row);
        f32_gemm(ops, rows, bn, ev, F32A{do_rows_i, do_chunk.rows_ld(), 1}, F32B{v_panels, ev * kF32Panel},
                 F32C{ds, tile_panel, kF32Panel}, false, nullptr, ops.dp_panels_outer);
        ops.softmax_grad_panels(p, ds, rows, panels, delta_ptr + b * nq + i0, scale);
        f32_gemm(ops, e, bn, rows, F32A{q_t_i, q_chunk.t_rows_ld(), 1}, F32B{ds, tile_panel},
                 F32C{dk_t_b + j0, kF32Panel, dk_dst.stride(1)}, /*accumulate=*/i0 != first_row);
        f32_gemm(ops, rows, e, bn, F32A{ds, kF32Panel, 1, tile_panel}, F32B{k_b + j0 * kF32Panel, nk * kF32Panel},
                 F32C{dq_i, kF32Panel, e}, /*accumulate=*/kb > kb_begin);
      }
    }
  }, lay_out_chunk, kF32BwdChunk, dq_plan, row_parts);
  for (int64_t r = 0; r + 1 < row_parts; ++r) {  // in part order: the sums' bits are the shape's alone
    dk_t.add_(dk_parts[r]);
    dv_t.add_(dv_parts[r]);
  }
  if (!dk_direct) dk.copy_(dk_t.transpose(1, 2));
  if (!dv_direct) dv.copy_(dv_t.transpose(1, 2));
}
#endif  // ATTNSEG_HAVE_F32_GEMM

template <typename scalar_t>
void attention_bwd_kernel(const at::Tensor& grad_out, const at::Tensor& delta, const at::Tensor& q,
                          const at::Tensor& k, const at::Tensor& v, const at::Tensor& lse, double scale_d,
                          at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const int64_t batch = q.size(0), nq = q.size(1), nk = k.size(1);
  const scalar_t scale = static_cast<scalar_t>(scale_d);
  auto lse_a = lse.accessor<scalar_t, 2>();
  auto delta_a = delta.accessor<scalar_t, 2>();
  constexpr int64_t block_m = kBlockM, block_n = kBwdBlockN;
  const auto make_tiles = [&] {
    return std::make_pair(at::empty({block_m * block_n}, q.options()), at::empty({block_m * block_n}, q.options()));
  };
  backward_schedule<scalar_t>(batch, nq, nk, block_n, dq, make_tiles,
                              [&](std::pair<at::Tensor, at::Tensor>& tiles, int64_t b, int64_t kb_begin, int64_t kb_end,
                                  int64_t c0, int64_t c_rows, at::Tensor& dq_chunk, const RowPart&) {
    at::Tensor& p_tile = tiles.first;
    at::Tensor& dp_tile = tiles.second;
    for (int64_t kb = kb_begin; kb < kb_end; ++kb) {
      const int64_t j0 = kb * block_n, bn = std::min(block_n, nk - j0);
      const at::Tensor k_j = k[b].narrow(0, j0, bn), v_j = v[b].narrow(0, j0, bn);
      at::Tensor dk_j = dk[b].narrow(0, j0, bn), dv_j = dv[b].narrow(0, j0, bn);
      for (int64_t i0 = c0; i0 < c0 + c_rows; i0 += block_m) {
        const int64_t bm = std::min(block_m, c0 + c_rows - i0);
        const at::Tensor q_i = q[b].narrow(0, i0, bm), do_i = grad_out[b].narrow(0, i0, bm);
        at::Tensor p = p_tile.narrow(0, 0, bm * bn).view({bm, bn});
        at::Tensor dp = dp_tile.narrow(0, 0, bm * bn).view({bm, bn});
        at::mm_out(p, q_i, k_j.t());
        scalar_t* p_ptr = p.data_ptr<scalar_t>();
        for (int64_t r = 0; r < bm; ++r) recompute_probabilities(p_ptr + r * bn, bn, scale, lse_a[b][i0 + r]);
        dv_j.addmm_(p.t(), do_i);
        at::mm_out(dp, do_i, v_j.t());
        scalar_t* dp_ptr = dp.data_ptr<scalar_t>();
        for (int64_t r = 0; r < bm; ++r) softmax_grad_row(p_ptr + r * bn, dp_ptr + r * bn, bn, delta_a[b][i0 + r]);
        dk_j.addmm_(dp.t(), q_i, /*beta=*/1, /*alpha=*/scale);
        dq_chunk.narrow(0, i0 - c0, bm).addmm_(dp, k_j, /*beta=*/1, /*alpha=*/scale);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// bf16 (or fp16) inputs on a CPU with a low-precision GEMM engine (lowp_gemm.h: AMX through
// ATen's brgemm, or our AVX512-BF16 micro-kernel): every product is a GEMM of T operands with
// fp32 accumulation and an fp32 result, as flash-attention does on GPUs. Logits, the softmax
// statistics, lse, dP and the accumulators of O, dQ, dK, dV are fp32; P and dS are rounded to T
// right before the GEMMs that consume them. The same tiles, tasks and dQ groups as the fp32
// kernels above. The operands are arranged once per call (O(N·(E + Ev)) elements of T): the A
// operands row-major with K even (zero-padded), the B operands pair-packed in the engine's panels.
// ---------------------------------------------------------------------------------------------

// t [B, rows, cols] -> contiguous [B, rows, cols rounded up to even] of `dtype`, zero-padded: an A operand.
at::Tensor lowp_rows(const at::Tensor& t, at::ScalarType dtype) {
  return at::constant_pad_nd(t.to(dtype), {0, t.size(2) & 1}).contiguous();
}

// The B operand of a product whose K runs over the rows of t [B, rows, cols], pair-packed in
// panels of `width` columns (lowp_gemm.h): [B, ceil(cols / width), ceil(rows / 2), width, 2], zero-padded.
struct PackedB {
  at::Tensor data;
  int64_t panel_stride, width;  // words between panels; columns per panel
  PackedB(const at::Tensor& t, at::ScalarType dtype, int64_t width_) : width(width_) {
    const int64_t rows = t.size(1), cols = t.size(2);
    const int64_t pad_cols = ceil_div(cols, width) * width - cols;
    const at::Tensor padded = at::constant_pad_nd(t.to(dtype), {0, pad_cols, 0, rows & 1});
    const int64_t pairs = padded.size(1) / 2, panels = padded.size(2) / width;
    data = padded.view({t.size(0), pairs, 2, panels, width}).permute({0, 3, 1, 4, 2}).contiguous();
    panel_stride = pairs * width;
  }
  // The operand from row k0 (even) of K and column n0 (a multiple of width) on, in batch b.
  PackedRef at(int64_t b, int64_t k0, int64_t n0) const {
    const auto* base = reinterpret_cast<const uint32_t*>(data.data_ptr()) + b * (data.stride(0) / 2);
    return {base + (n0 / width) * panel_stride + (k0 / 2) * width, panel_stride, width};
  }
};

// Batch b of a contiguous tensor (no per-tile Tensor views in the loops).
template <typename T>
T* batch_ptr(const at::Tensor& t, int64_t b) { return t.data_ptr<T>() + b * t.stride(0); }
template <typename T>
const T* lowp_ptr(const at::Tensor& t, int64_t b) { return reinterpret_cast<const T*>(t.data_ptr()) + b * t.stride(0); }
uint32_t* words_ptr(at::Tensor& t) { return reinterpret_cast<uint32_t*>(t.data_ptr<int32_t>()); }

// out: T [B, Nq, Ev] contiguous; lse: fp32 [B, Nq].
template <typename T>
void attention_fwd_lowp(const LowpGemm<T>& gemm, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        double scale_d, at::Tensor& out, at::Tensor& lse) {
  const int64_t batch = q.size(0), nq = q.size(1), nk = k.size(1), ev = v.size(2);
  const int64_t q_blocks = ceil_div(nq, kBlockM);
  const float scale = static_cast<float>(scale_d);
  const at::ScalarType dtype = q.scalar_type();
  const at::Tensor q_rows = lowp_rows(q, dtype);                                  // A of S = Q Kᵀ:  [B, Nq, E2]
  const PackedB k_t(k.transpose(1, 2), dtype, gemm.panel_width(std::min(nk, kBlockN)));  // B of S: Kᵀ
  const PackedB v_pairs(v, dtype, gemm.panel_width(ev));                         // B of O += P V:  V
  const int64_t e2 = q_rows.size(2);
  const auto f32 = q.options().dtype(at::kFloat);
  float* lse_ptr = lse.data_ptr<float>();

  struct Scratch {
    at::Tensor scores, probs, acc;  // fp32 S tile, T P tile (K padded to even), fp32 O accumulator
    std::vector<float> row_max, row_sum;
  };
  const auto make_scratch = [&] {
    return Scratch{at::empty({kBlockM * kBlockN}, f32), at::empty({kBlockM * (kBlockN + 1)}, q.options()),
                   at::empty({kBlockM * ev}, f32), std::vector<float>(kBlockM), std::vector<float>(kBlockM)};
  };
  parallel_tasks(batch * q_blocks, make_scratch, [&](Scratch& scratch, int64_t task) {
    const int64_t b = task / q_blocks;
    const int64_t i0 = (task % q_blocks) * kBlockM, bm = std::min(kBlockM, nq - i0);
    float* s = scratch.scores.template data_ptr<float>();
    float* acc = scratch.acc.template data_ptr<float>();
    T* probs = reinterpret_cast<T*>(scratch.probs.data_ptr());
    std::fill(acc, acc + bm * ev, 0.0f);
    std::fill(scratch.row_max.begin(), scratch.row_max.end(), -std::numeric_limits<float>::infinity());
    std::fill(scratch.row_sum.begin(), scratch.row_sum.end(), 0.0f);
    const T* q_i = lowp_ptr<T>(q_rows, b) + i0 * e2;
    for (int64_t j0 = 0; j0 < nk; j0 += kBlockN) {
      const int64_t bn = std::min(kBlockN, nk - j0), bn2 = bn + (bn & 1);
      gemm(bm, bn, e2, q_i, e2, k_t.at(b, 0, j0), s, bn, false);
      online_softmax_rows(s, bm, bn, scale, scratch.row_max.data(), scratch.row_sum.data(), acc, ev);
      gemm.round_rows(s, bm, bn, bn, probs, bn2);
      gemm(bm, ev, bn2, probs, bn2, v_pairs.at(b, j0, 0), acc, ev, true);
    }
    gemm.release();
    normalize_rows(acc, bm, ev, scratch.row_max.data(), scratch.row_sum.data(), lse_ptr + b * nq + i0);
    out[b].narrow(0, i0, bm).copy_(scratch.acc.narrow(0, 0, bm * ev).view({bm, ev}));
  });
}

// delta, lse: fp32 [B, Nq] contiguous; dq: fp32 [B, Nq, E]; dk_t: fp32 [B, E, Nk]; dv_t: fp32 [B, Ev, Nk] (zeroed;
// dK and dV are accumulated transposed, dKᵀ = Qᵀ dS and dVᵀ = dOᵀ P, so that their B operands are
// P and dS pair-packed over the query rows, which the tile loop writes directly). dq and dk_t come
// back unscaled (Σ dS K, Σ Qᵀ dS): the caller multiplies them by the scale once.
template <typename T>
void attention_bwd_lowp(const LowpGemm<T>& gemm, const at::Tensor& grad_out, const at::Tensor& delta,
                        const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lse,
                        double scale_d, at::Tensor& dq, at::Tensor& dk_t, at::Tensor& dv_t) {
  const int64_t batch = q.size(0), nq = q.size(1), nk = k.size(1), e = q.size(2), ev = v.size(2);
  const float scale = static_cast<float>(scale_d);
  const at::ScalarType dtype = q.scalar_type();
  const int64_t key_width = gemm.panel_width(std::min(nk, kBlockN));
  const at::Tensor q_rows = lowp_rows(q, dtype);                       // A of S = Q Kᵀ:     [B, Nq, E2]
  const PackedB k_t(k.transpose(1, 2), dtype, key_width);              // B of S:            Kᵀ
  const at::Tensor do_rows = lowp_rows(grad_out, dtype);               // A of dP = dO Vᵀ:   [B, Nq, Ev2]
  const PackedB v_t(v.transpose(1, 2), dtype, key_width);              // B of dP:           Vᵀ
  const at::Tensor do_t = lowp_rows(grad_out.transpose(1, 2), dtype);  // A of dVᵀ = dOᵀ P:  [B, Ev, Nq2]
  const at::Tensor q_t = lowp_rows(q.transpose(1, 2), dtype);          // A of dKᵀ = Qᵀ dS:  [B, E, Nq2]
  const PackedB k_pairs(k, dtype, gemm.panel_width(e));                // B of dQ = dS K:    K
  const int64_t e2 = q_rows.size(2), ev2 = do_rows.size(2), nq2 = do_t.size(2);
  const auto f32 = q.options().dtype(at::kFloat);
  const float* lse_ptr = lse.data_ptr<float>();
  const float* delta_ptr = delta.data_ptr<float>();

  struct Scratch {
    at::Tensor p, dp, p_pairs, ds_pairs, ds_rows;
  };
  const auto make_scratch = [&] {
    const int64_t tile = kBlockM * kBlockN, pair_words = pair_packed_words(kBlockM, kBlockN, key_width);
    return Scratch{at::empty({tile}, f32), at::empty({tile}, f32), at::empty({pair_words}, f32.dtype(at::kInt)),
                   at::empty({pair_words}, f32.dtype(at::kInt)), at::empty({kBlockM * (kBlockN + 1)}, q.options())};
  };
  backward_schedule<float>(batch, nq, nk, kBlockN, dq, make_scratch,
                           [&](Scratch& t, int64_t b, int64_t kb_begin, int64_t kb_end, int64_t c0, int64_t c_rows,
                               at::Tensor& dq_chunk_t, const RowPart&) {
    float* dq_chunk = dq_chunk_t.data_ptr<float>();
    float* dk_t_b = batch_ptr<float>(dk_t, b);
    float* dv_t_b = batch_ptr<float>(dv_t, b);
    float* p = t.p.template data_ptr<float>();
    float* dp = t.dp.template data_ptr<float>();
    T* ds_rows = reinterpret_cast<T*>(t.ds_rows.data_ptr());
    for (int64_t kb = kb_begin; kb < kb_end; ++kb) {
      const int64_t j0 = kb * kBlockN, bn = std::min(kBlockN, nk - j0), bn2 = bn + (bn & 1);
      for (int64_t i0 = c0; i0 < c0 + c_rows; i0 += kBlockM) {
        const int64_t bm = std::min(kBlockM, c0 + c_rows - i0), bm2 = bm + (bm & 1);
        gemm(bm, bn, e2, lowp_ptr<T>(q_rows, b) + i0 * e2, e2, k_t.at(b, 0, j0), p, bn, false);
        for (int64_t r = 0; r < bm; ++r) recompute_probabilities(p + r * bn, bn, scale, lse_ptr[b * nq + i0 + r]);
        const PackedRef p_pairs = gemm.pack_pairs(p, bm, bn, bn, words_ptr(t.p_pairs));
        gemm(ev, bn, bm2, lowp_ptr<T>(do_t, b) + i0, nq2, p_pairs, dv_t_b + j0, nk, true);
        gemm(bm, bn, ev2, lowp_ptr<T>(do_rows, b) + i0 * ev2, ev2, v_t.at(b, 0, j0), dp, bn, false);
        for (int64_t r = 0; r < bm; ++r) softmax_grad_row(p + r * bn, dp + r * bn, bn, delta_ptr[b * nq + i0 + r]);
        const PackedRef ds_pairs = gemm.pack_pairs(dp, bm, bn, bn, words_ptr(t.ds_pairs));
        gemm.round_rows(dp, bm, bn, bn, ds_rows, bn2);
        gemm(e, bn, bm2, lowp_ptr<T>(q_t, b) + i0, nq2, ds_pairs, dk_t_b + j0, nk, true);
        gemm(bm, e, bn2, ds_rows, bn2, k_pairs.at(b, j0, 0), dq_chunk + (i0 - c0) * e, e, true);
      }
    }
    gemm.release();
  });
}

// The engine for q's type, or kNone: bf16/fp16 inputs are then computed in fp32.
LowpEngine engine_for(const at::Tensor& q) { return lowp_engine(q.scalar_type()); }

// Runs fn(LowpGemm<T>{engine}) with T the C++ type of dtype (bf16 or fp16).
template <typename Fn>
void with_lowp_gemm(at::ScalarType dtype, LowpEngine engine, const Fn& fn) {
  if (dtype == at::kBFloat16) {
    fn(LowpGemm<c10::BFloat16>{engine});
  } else {
    fn(LowpGemm<c10::Half>{engine});
  }
}

// fp16/bf16 inputs are computed in fp32 (the accumulation type); fp32/fp64 run as they are.
at::Tensor compute_view(const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  return gemm_ready(dtype == at::kHalf || dtype == at::kBFloat16 ? t.to(at::kFloat) : t);
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                     const at::Tensor& v_in, double scale) {
  // The ATen GEMMs below must not be autocast again: fp32 accumulation is promised.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  check_attention_inputs(q_in, k_in, v_in, "attnseg::attention_fwd");
  TORCH_CHECK(q_in.device().is_cpu(), "attnseg::attention_fwd: the CPU kernel got tensors on ", q_in.device());
  const LowpEngine engine = engine_for(q_in);
  const bool lowp = engine != LowpEngine::kNone;
  const at::Tensor q = lowp ? q_in : compute_view(q_in), k = lowp ? k_in : compute_view(k_in),
                   v = lowp ? v_in : compute_view(v_in);
  const int64_t batch = q.size(0), nq = q.size(1), nk = k.size(1), ev = v.size(2);
  at::Tensor out = at::empty({batch, nq, ev}, q.options());
  at::Tensor lse = at::empty({batch, nq}, q.options().dtype(stats_dtype(q.scalar_type())));
  if (nk == 0) {  // softmax over no keys: the reference gives zeros and lse = -inf
    out.zero_();
    lse.fill_(-std::numeric_limits<double>::infinity());
  } else if (out.numel() > 0 || lse.numel() > 0) {
    if (lowp) {
      with_lowp_gemm(q.scalar_type(), engine, [&](const auto& gemm) { attention_fwd_lowp(gemm, q, k, v, scale, out, lse); });
      return {out, lse};
    }
    // f32_kernel() also rejects a bad ATTNSEG_CPU_F32_KERNEL where our kernels are not built.
    const F32Kernel f32 = q.scalar_type() == at::kFloat ? f32_kernel(channel_first(v)) : F32Kernel::kAten;
    if (f32 != F32Kernel::kAten) {
#if ATTNSEG_HAVE_F32_GEMM
      attention_fwd_f32(f32_ops(f32), q, k, channel_rows(v), scale, out, lse);
      return {out.to(q_in.scalar_type()), lse.to(stats_dtype(q_in.scalar_type()))};
#endif
    }
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_fwd_cpu",
                               [&] { attention_fwd_kernel<scalar_t>(q, k, v, scale, out, lse); });
  }
  return {out.to(q_in.scalar_type()), lse.to(stats_dtype(q_in.scalar_type()))};
}

// delta_i = rowsum(dO_i ∘ O_i) − dlse_i (in `dtype`), so that dS = P ∘ (dP − delta) also carries
// the gradient flowing into lse (∂lse_i/∂S_ij = P_ij). One block of rows at a time, so the
// product temporary stays a tile, not B x Nq x Ev.
at::Tensor softmax_delta(const at::Tensor& grad_out, const at::Tensor& out, const std::optional<at::Tensor>& grad_lse,
                         at::ScalarType dtype) {
  const int64_t batch = out.size(0), nq = out.size(1);
  at::Tensor delta = at::empty({batch, nq}, out.options().dtype(dtype));
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t i0 = 0; i0 < nq; i0 += kBlockM) {
      const int64_t bm = std::min(kBlockM, nq - i0);
      at::Tensor delta_i = delta[b].narrow(0, i0, bm);
      at::sum_out(delta_i, grad_out[b].narrow(0, i0, bm).to(dtype) * out[b].narrow(0, i0, bm).to(dtype), {1});
    }
  }
  if (grad_lse.has_value() && grad_lse->defined()) delta.sub_(grad_lse->to(dtype));
  return delta;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(const at::Tensor& grad_out_in,
                                                                 const std::optional<at::Tensor>& grad_lse_in,
                                                                 const at::Tensor& q_in, const at::Tensor& k_in,
                                                                 const at::Tensor& v_in, const at::Tensor& out_in,
                                                                 const at::Tensor& lse_in, double scale) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const char* op = "attnseg::attention_bwd";
  check_attention_bwd_inputs(grad_out_in, grad_lse_in, q_in, k_in, v_in, out_in, lse_in, op);
  TORCH_CHECK(q_in.device().is_cpu(), op, ": the CPU kernel got tensors on ", q_in.device());
  const int64_t batch = q_in.size(0), nq = q_in.size(1), nk = k_in.size(1);
  const bool run = batch > 0 && nq > 0 && nk > 0;  // E = 0 still has uniform attention
  const auto dtype = q_in.scalar_type();
  const LowpEngine engine = engine_for(q_in);
  if (engine != LowpEngine::kNone) {
    const at::Tensor delta = softmax_delta(grad_out_in, out_in, grad_lse_in, at::kFloat);
    const auto f32 = q_in.options().dtype(at::kFloat);
    at::Tensor dq = at::zeros({batch, nq, q_in.size(2)}, f32);
    at::Tensor dk_t = at::zeros({batch, k_in.size(2), nk}, f32);
    at::Tensor dv_t = at::zeros({batch, v_in.size(2), nk}, f32);
    if (run) {
      with_lowp_gemm(dtype, engine, [&](const auto& gemm) {
        attention_bwd_lowp(gemm, grad_out_in, delta, q_in, k_in, v_in, lse_in.contiguous(), scale, dq, dk_t, dv_t);
      });
      dq.mul_(scale);
      dk_t.mul_(scale);
    }
    // Gradients in the inputs' layouts (empty_like rules, as the fake kernel).
    return {at::empty_like(q_in).copy_(dq), at::empty_like(k_in).copy_(dk_t.transpose(1, 2)),
            at::empty_like(v_in).copy_(dv_t.transpose(1, 2))};
  }
  const at::Tensor q = compute_view(q_in), k = compute_view(k_in), v = compute_view(v_in);
  const auto compute_dtype = q.scalar_type();
  const at::Tensor grad_out = gemm_ready(grad_out_in.to(compute_dtype));
  const at::Tensor lse = lse_in.to(compute_dtype);
  const at::Tensor delta = softmax_delta(grad_out, out_in, grad_lse_in, compute_dtype);
  // Gradients in the inputs' layouts (empty_like rules, as the fake kernel): autograd then
  // accumulates them into channel-first leaves without another copy.
  const F32Kernel f32 = compute_dtype == at::kFloat ? f32_kernel(channel_first(v)) : F32Kernel::kAten;
  if (run && f32 != F32Kernel::kAten) {
#if ATTNSEG_HAVE_F32_GEMM
    at::Tensor dq = at::empty_like(q_in, q.options());
    at::Tensor dk = at::empty_like(k_in, k.options());
    at::Tensor dv = at::empty_like(v_in, v.options());
    attention_bwd_f32(f32_ops(f32), grad_out, delta, q, k, v, lse.contiguous(), scale, dq, dk, dv);
    return {dq.to(dtype), dk.to(dtype), dv.to(dtype)};
#endif
  }
  at::Tensor dq = at::zeros_like(q_in, q.options());
  at::Tensor dk = at::zeros_like(k_in, k.options());
  at::Tensor dv = at::zeros_like(v_in, v.options());
  if (run) {
    AT_DISPATCH_FLOATING_TYPES(compute_dtype, "attention_bwd_cpu", [&] {
      attention_bwd_kernel<scalar_t>(grad_out, delta, q, k, v, lse, scale, dq, dk, dv);
    });
  }
  return {dq.to(dtype), dk.to(dtype), dv.to(dtype)};
}

std::vector<double> cpu_attention_plan(int64_t batch, int64_t nq, int64_t nk, int64_t e, int64_t ev, int64_t threads) {
  TORCH_CHECK(batch >= 1 && nq >= 1 && nk >= 1 && e >= 1 && ev >= 1 && threads >= 1,
              "attnseg::cpu_attention_plan: every size and the thread count must be >= 1, got batch=", batch,
              ", nq=", nq, ", nk=", nk, ", e=", e, ", ev=", ev, ", threads=", threads);
  const ForwardSplit forward = forward_split(batch, nq, nk, ev, threads);
  const ModelledRun forward_unsplit = model_independent(forward_task_costs(batch, nq, nk, ev, kF32FwdMaxBlockM, 1), threads);
  // channel-first q and dO: q's rows and dO's rows laid out per chunk; a channel-first dq: the row buffer
  const BackwardSplit backward = backward_split(batch, nq, nk, e, ev, kF32BwdBlockN, kF32BwdChunk, true, true, threads);
  const int64_t chunk_rows = std::min(nq, kF32BwdChunk), groups = backward_groups(batch, nk, kF32BwdBlockN);
  const ModelledRun backward_unsplit =
      model_backward(batch, nq, nk, e, ev, kF32BwdBlockN, chunk_rows, groups,
                     backward_row_parts(batch, nq, nk, kF32BwdBlockN, kF32BwdChunk), true, true, threads);
  return {double(forward.block_m), double(forward.key_parts), forward.run.idle_share(), forward_unsplit.idle_share(),
          double(backward.row_parts), backward.run.idle_share(), backward_unsplit.idle_share()};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnseg, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
}

TORCH_LIBRARY_IMPL(attnseg, CompositeExplicitAutograd, m) {
  m.impl("cpu_attention_plan", &cpu_attention_plan);
}

}  // namespace attnseg::cpu
