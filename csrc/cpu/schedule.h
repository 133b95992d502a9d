// How the fp32 CPU attention kernels split their work for the machine's thread count, and the
// model that decides it: a list schedule of the kernel's tasks on T threads.
//
// The kernels hand their tasks to torch's threads from a shared counter, in a fixed order
// (attention.cpp: parallel_tasks). With equal tasks, T threads take ceil(tasks / T) rounds, so
// 36 tasks (the forward's 256-query blocks at N = 9,216, B = 1) leave 1 − 36 / (16 · 3) = 25 % of
// 16 threads idle and 44 % of 64. The split adapts to the thread count: the forward takes smaller
// query blocks (whole 64-query panels) and, where those are still too few, splits the keys into
// parts whose partial (out, lse) are combined (as split-KV decoding does); the backward splits each
// chunk's rows into parts with their own dK and dV. Each candidate split is modelled (the tasks'
// costs, with what the split costs: smaller blocks' lower GEMM throughput, the combine, the parts'
// extra packing), and the fastest modelled one is taken; a split is only taken where the idle time it
// removes exceeds what it costs.
//
// Reproducibility: the split depends on the shape and plan_threads() only. A key split changes the
// order of the forward's sums, and row parts the backward's, so results are bitwise the same for a
// given thread count, not across thread counts; under torch.use_deterministic_algorithms(True)
// the plan is the one-thread plan whatever the thread count, and the bits are the shape's alone.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <queue>
#include <string>
#include <vector>

namespace attnseg::cpu {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The thread count the kernels plan for: torch's, or ATTNSEG_CPU_PLAN_THREADS (a positive integer:
// to run another machine's split here, for tests and measurements); 1 under
// torch.use_deterministic_algorithms(True) (see above).
inline int64_t plan_threads() {
  if (at::globalContext().deterministicAlgorithms()) return 1;
  if (const char* env = std::getenv("ATTNSEG_CPU_PLAN_THREADS"); env != nullptr && *env != '\0') {
    char* end = nullptr;
    const long value = std::strtol(env, &end, 10);
    TORCH_CHECK(end != env && *end == '\0' && value >= 1 && value <= 4096,
                "ATTNSEG_CPU_PLAN_THREADS must be an integer from 1 to 4096 (the thread count the CPU kernels "
                "split their work for), got '", env, "'; unset it to use torch.get_num_threads()");
    return value;
  }
  return std::max<int64_t>(1, at::get_num_threads());
}

// A modelled run: its length and the thread time spent in tasks (the rest waits).
struct ModelledRun {
  double makespan = 0, busy = 0;
  int64_t threads = 1;
  // Share of the T threads' time not spent in tasks (waiting for a dependency, or out of tasks).
  double idle_share() const { return makespan > 0 ? 1.0 - busy / (double(threads) * makespan) : 0.0; }
};

// The list schedule parallel_tasks runs: the threads take steps 0, 1, ... in order from a shared
// counter; step s starts when a thread is free and ready(s, end) (the time its dependencies end;
// they are earlier steps, whose `end` is known), and lasts cost[s].
template <typename Ready>
ModelledRun model_schedule(const std::vector<double>& cost, int64_t threads, const Ready& ready) {
  std::priority_queue<double, std::vector<double>, std::greater<double>> free_at;
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(threads, static_cast<int64_t>(cost.size())));
  for (int64_t t = 0; t < workers; ++t) free_at.push(0.0);
  std::vector<double> end(cost.size());
  ModelledRun run;
  run.threads = threads;
  for (size_t s = 0; s < cost.size(); ++s) {
    const double start = std::max(free_at.top(), ready(static_cast<int64_t>(s), end));
    free_at.pop();
    end[s] = start + cost[s];
    free_at.push(end[s]);
    run.makespan = std::max(run.makespan, end[s]);
    run.busy += cost[s];
  }
  return run;
}

inline ModelledRun model_independent(const std::vector<double>& cost, int64_t threads) {
  return model_schedule(cost, threads, [](int64_t, const std::vector<double>&) { return 0.0; });
}

// ---- the fp32 forward (attention_fwd_f32) ----

constexpr int64_t kF32FwdMaxBlockM = 256, kF32FwdBlockN = 256;  // queries (at most) and keys per tile

// Time of a query-key pair of the forward in a block of bm queries, relative to 256-query blocks:
// the smaller the block, the more often each key block's Vᵀ (Ev x 256) streams through the caches
// for fewer queries. Measured on one thread of an AMD EPYC (AVX-512), N = 9,216, E = 64, Ev = 512,
// channel-first v, ATTNSEG_CPU_PLAN_THREADS forcing each split, medians of paired calls: 128 rows
// 1.01, 64 rows 1.08 (64 rows in 2 key parts: 1.11, the combine included).
inline double forward_block_cost(int64_t bm) { return bm >= 256 ? 1.0 : bm >= 128 ? 1.01 : 1.08; }
// A combine of key parts, per query row and part, in query-key pairs of work: it reads each part's
// Ev outputs once (about one pair's worth of time per 4 floats at E = 64, Ev = 512).
inline double forward_combine_pairs(int64_t ev) { return double(ev) / 4.0; }

struct ForwardSplit {
  int64_t block_m = kF32FwdMaxBlockM, key_parts = 1;
  ModelledRun run;
};

inline std::vector<double> forward_task_costs(int64_t batch, int64_t nq, int64_t nk, int64_t ev, int64_t block_m,
                                              int64_t parts) {
  const int64_t q_blocks = ceil_div(nq, block_m), k_blocks = ceil_div(nk, kF32FwdBlockN);
  std::vector<double> cost;
  cost.reserve(batch * q_blocks * parts);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t qb = 0; qb < q_blocks; ++qb)
      for (int64_t s = 0; s < parts; ++s) {
        const int64_t rows = std::min(block_m, nq - qb * block_m);
        const int64_t keys = std::min(nk, (s + 1) * k_blocks / parts * kF32FwdBlockN) - s * k_blocks / parts * kF32FwdBlockN;
        double c = double(rows) * double(keys) * forward_block_cost(block_m);
        if (parts > 1 && s == parts - 1) c += double(rows) * double(parts) * forward_combine_pairs(ev);
        cost.push_back(c);
      }
  return cost;
}

// The fastest modelled split of the forward for `threads`: query blocks of 256, 128 or 64 rows,
// keys in 1, 2 or 4 parts (at most one 256-key block a part); a candidate replaces the best so far
// only if it is modelled at least 3 % faster (so that the larger blocks, and fewer parts, win ties).
// Key parts are kept off for a single thread (nothing to gain, an Nq x Ev buffer per extra part).
inline ForwardSplit forward_split(int64_t batch, int64_t nq, int64_t nk, int64_t ev, int64_t threads) {
  ForwardSplit best;
  best.run = model_independent(forward_task_costs(batch, nq, nk, ev, best.block_m, 1), threads);
  if (threads <= 1) return best;
  const int64_t k_blocks = ceil_div(nk, kF32FwdBlockN);
  for (const int64_t parts : {1, 2, 4}) {
    if (parts > k_blocks) break;
    for (const int64_t block_m : {256, 128, 64}) {
      const ModelledRun run = model_independent(forward_task_costs(batch, nq, nk, ev, block_m, parts), threads);
      if (run.makespan < 0.97 * best.run.makespan) best = ForwardSplit{block_m, parts, run};
    }
  }
  return best;
}

// ---- the backward's pipelined schedule (attention.cpp: backward_schedule) ----

// Its steps, in the order the threads take them: L(0) C(0) L(1) C(1) R(0) L(2) C(2) R(1) ...
// (layout pieces, tasks, reduction pieces of each chunk; see backward_schedule for the waits).
enum class StepKind : uint8_t { kLayout, kTask, kReduce };
struct Step {
  StepKind kind;
  int64_t chunk, index;
};

inline std::vector<Step> backward_steps(int64_t chunks, int64_t tasks, bool lay_out, bool reduces,
                                        const std::function<int64_t(int64_t)>& pieces) {
  std::vector<Step> steps;
  const auto add = [&](StepKind kind, int64_t c, int64_t count) {
    for (int64_t i = 0; i < count; ++i) steps.push_back({kind, c, i});
  };
  for (int64_t c = 0; c < chunks; ++c) {
    if (c == 0 && lay_out) add(StepKind::kLayout, 0, pieces(0));
    add(StepKind::kTask, c, tasks);
    if (c > 0 && reduces) add(StepKind::kReduce, c - 1, pieces(c - 1));
    if (c + 1 < chunks && lay_out) add(StepKind::kLayout, c + 1, pieces(c + 1));
  }
  if (reduces) add(StepKind::kReduce, chunks - 1, pieces(chunks - 1));
  return steps;
}

// The schedule's waits, modelled: task (c, t) after L(c), task (c − 1, t) and R(c − 2); L(c) after
// the tasks of chunk c − 2; R(c) after the tasks of chunk c.
inline ModelledRun model_backward_steps(const std::vector<Step>& steps, const std::vector<double>& cost,
                                        int64_t chunks, int64_t tasks, int64_t threads) {
  std::vector<double> laid(chunks, 0.0), done(chunks, 0.0), reduced(chunks, 0.0), task_end(chunks * tasks, 0.0);
  const auto ready = [&](int64_t s, const std::vector<double>& end) {
    // fold the previous step's end into the per-chunk maxima (steps are visited in order)
    if (s > 0) {
      const Step& prev = steps[s - 1];
      const double e = end[s - 1];
      switch (prev.kind) {
        case StepKind::kLayout: laid[prev.chunk] = std::max(laid[prev.chunk], e); break;
        case StepKind::kTask:
          done[prev.chunk] = std::max(done[prev.chunk], e);
          task_end[prev.chunk * tasks + prev.index] = e;
          break;
        case StepKind::kReduce: reduced[prev.chunk] = std::max(reduced[prev.chunk], e); break;
      }
    }
    const Step& step = steps[s];
    const int64_t c = step.chunk;
    switch (step.kind) {
      case StepKind::kLayout: return c >= 2 ? done[c - 2] : 0.0;
      case StepKind::kTask: {
        double t = laid[c];
        if (c >= 1) t = std::max(t, task_end[(c - 1) * tasks + step.index]);
        if (c >= 2) t = std::max(t, reduced[c - 2]);
        return t;
      }
      case StepKind::kReduce: return done[c];
    }
    return 0.0;
  };
  return model_schedule(cost, threads, ready);
}

// Time of a query-key pair of the fp32 backward with its chunk's rows in `parts` parts, relative to
// one part: each part packs its key block's Vᵀ panels again, and the parts' dKᵀ and dVᵀ are summed
// at the end. Measured as forward_block_cost (the forward's share taken out): 2 parts 1.02, 4 parts 1.04.
inline double backward_part_cost(int64_t parts) { return parts <= 1 ? 1.0 : parts == 2 ? 1.02 : 1.04; }

struct BackwardSplit {
  int64_t row_parts = 1;
  ModelledRun run;
};

// The modelled run of the fp32 backward: chunks of chunk_rows queries, B x groups x parts tasks a
// chunk (group g: key blocks [g·k_blocks/groups, (g+1)·k_blocks/groups) of block_n keys; part r:
// whole 64-row panels of the chunk), layout and reduction pieces of 64 rows (costed as the copies
// and adds they are: a float moved is about a quarter of a pair's work at E = 64, Ev = 512).
inline ModelledRun model_backward(int64_t batch, int64_t nq, int64_t nk, int64_t e, int64_t ev, int64_t block_n,
                                  int64_t chunk_rows, int64_t groups, int64_t parts, bool lay_out, bool reduces,
                                  int64_t threads) {
  constexpr int64_t kPanel = 64;
  const int64_t chunks = ceil_div(nq, chunk_rows), k_blocks = ceil_div(nk, block_n);
  const auto rows_of = [&](int64_t c) { return std::min(chunk_rows, nq - c * chunk_rows); };
  const auto pieces = [&](int64_t c) { return batch * ceil_div(rows_of(c), kPanel); };
  const int64_t tasks = batch * groups * parts;
  const std::vector<Step> steps = backward_steps(chunks, tasks, lay_out, reduces, pieces);
  std::vector<double> cost;
  cost.reserve(steps.size());
  const double pair = backward_part_cost(parts);
  for (const Step& step : steps) {
    const int64_t rows = rows_of(step.chunk), panels = ceil_div(rows, kPanel);
    if (step.kind == StepKind::kTask) {
      const int64_t g = step.index / parts % groups, r = step.index % parts;
      const int64_t part_rows = std::min(rows, (r + 1) * panels / parts * kPanel) - r * panels / parts * kPanel;
      const int64_t keys = std::min(nk, (g + 1) * k_blocks / groups * block_n) - g * k_blocks / groups * block_n;
      cost.push_back(double(std::max<int64_t>(part_rows, 0)) * double(keys) * pair);
    } else {
      const int64_t piece_rows = std::min(kPanel, rows);
      const double floats = step.kind == StepKind::kLayout ? double(piece_rows) * double(e + ev)
                                                             : double(piece_rows) * double(e) * double(groups);
      cost.push_back(floats / 4.0);
    }
  }
  return model_backward_steps(steps, cost, chunks, tasks, threads);
}

}  // namespace attnseg::cpu
