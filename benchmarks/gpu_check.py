"""One command for a bare GPU machine: build, GPU tests, timings, kernel profiles and the autotune
sweep, in 9 minutes (``--budget``, default 540 s, the build included).

    python benchmarks/gpu_check.py             # on a CUDA machine: writes docs/gpu/<gpu>.md and .json
    python benchmarks/gpu_check.py --plan      # anywhere: the cases, peers, sweep and the time estimate
    python benchmarks/gpu_check.py --dry-run   # anywhere: the whole pipeline on the CPU at tiny sizes

Without a CUDA device (and without ``--plan`` / ``--dry-run``) it stops at once with exit status 2.

In order, each step bounded by what is left of the budget (the cost model below predicts each
group; a group that cannot fit is skipped and the report says so):

1. **Build, Triton precompile and peers, side by side.** ``setup.py build_ext --inplace`` for this
   GPU's architecture only (``TORCH_CUDA_ARCH_LIST`` from ``torch.cuda.get_device_capability()``,
   ``MAX_JOBS`` = the cores, ``ATTNSEG_FORCE_CUDA=1``). Its 3 CUDA sources leave most cores idle:
   there, every config the Triton prune keeps at the timed cases' launches is compiled into Triton's
   disk cache (:func:`run_precompile`), so that the autotuner later only loads and benchmarks them.
   On the idle GPU the peers, which need nothing of attnseg, are timed in a process of their own (it
   may crash: FlexAttention's compile): ``scaled_dot_product_attention`` under
   ``sdpa_kernel(backend)`` for every SDPA backend (flash, efficient, cuDNN, math; a backend that
   refuses Ev != E reads "unsupported" with PyTorch's reason), and FlexAttention (``FLEX_DTYPES``)
   compiled with kernel options whose tiles fit Ev = 512.
2. **GPU tests**: one pytest process, ``tests/test_cuda_native.py`` and the Triton GPU tests,
   ``ATTNSEG_REQUIRE_NATIVE=1``; at ``--test-budget`` it is interrupted (SIGINT), so that its JUnit
   report still counts what ran.
3. **Timings** in one process (a fresh one only after a crash or a timeout): PAM, the generic op
   softmax(q kᵀ) v with q, k [B, N, E], v [B, N, Ev] (E = 64, Ev = 512; channel-first views, as
   PAM passes them, and dO likewise; N = 9,216 and 32,768, B = 1 and 8) for native, triton,
   chunked and the official math (``attnseg.reference``), in fp16, then bf16, then fp32,
   fwd+bwd before fwd; then CAM (C = 512, official variant). Each case: one warm-up (it compiles
   and autotunes Triton), then up to ``REPEATS`` calls timed by CUDA events until they add up to
   ``CASE_TIMING_S``; a case whose warm-up took over ``SLOW_CALL_S`` after its impl already ran in
   the process is timed by that call alone. Peak: ``torch.cuda.max_memory_allocated()`` above
   ``memory_allocated()`` after ``reset_peak_memory_stats()``, the largest over the timed calls.
   A math case whose N×N maps cannot fit (:func:`math_bytes_needed`) is skipped by the memory model.
4. **Kernel profiles**: each fused impl, fwd and fwd+bwd, fp16, at ``PROFILE_SHAPES``, one call
   under torch.profiler (CUDA activity): the top kernels, their time and the TFLOP/s each achieves
   (FLOPs attributed by kernel name, :func:`kernel_flop`; else a time share only).
5. **The autotune sweep**: the backends and the math at the other DANet sizes (``SWEEP_SIZES``),
   fp16 and bf16. Every timed row (3 and 5) is written to ``attnseg/backend_table.json`` under this
   GPU's key (``cuda:sm_XY``), which ``backend="auto"`` reads, and what Triton's autotuner chose
   for every kernel and key to ``attnseg/triton/tuned/<gpu>.json`` (:mod:`attnseg.triton.tuned`).
6. **The report**: ``docs/gpu/<gpu>.md`` (time, TFLOP/s, peak, ratio to the math of the same run)
   and ``docs/gpu/<gpu>.json`` beside it, with the environment (GPU, driver, CUDA, torch, triton,
   attnseg commit).

TFLOP/s count useful FLOPs, the same for every row of an op (1 multiply-add = 2 FLOPs; softmax
not counted): PAM fwd 2·B·N²·(E + Ev), fwd+bwd 3× that; CAM fwd 4·B·C²·N, fwd+bwd 3× that.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import multiprocessing
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import torch

from _common import REPO_ROOT, PeakMemoryMeter, forward_call, format_ratio, import_attnseg, progress, time_call

GIB, MIB = 1024**3, 1024**2
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
ELEMENT_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
FUSED = ("native", "triton", "chunked")
PAM_IMPLS = (*FUSED, "math")
CAM_IMPLS = (*FUSED, "math")
SDPA_BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION",
                 "sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-math": "MATH"}
PEER_IMPLS = (*SDPA_BACKENDS, "flex")
MODES = ("fwd+bwd", "fwd")  # training first: the rows the fused backward has to win
SIZES = (9216, 32768)
BATCHES = (1, 8)
SWEEP_SIZES = (9409, 16384)  # mmsegmentation's 769 crop and a 1024 crop (the timed sizes are swept already)
SWEEP_DTYPES = ("float16", "bfloat16")
PROFILE_SHAPES = ((9216, 8),)  # (N, B), fp16: the DANet head's training shape
E, EV, CAM_C = 64, 512, 512
MEMORY_FRACTION = 0.9  # of the free device memory a case may be predicted to use
WARMUPS, REPEATS, CASE_TIMING_S, SLOW_CALL_S = 1, 5, 0.3, 1.0
PROFILE_ROWS = 8
# FlexAttention's default tiles hold a BLOCK_M x Ev accumulator and BLOCK_N x Ev tiles of V; at
# Ev = 512 they overflow shared memory. These fit an sm_90 block (227 KiB) in fp32 too.
FLEX_KERNEL_OPTIONS = {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 32, "fwd_num_stages": 2, "fwd_num_warps": 8,
                       "bwd_BLOCK_M1": 16, "bwd_BLOCK_N1": 32, "bwd_BLOCK_M2": 32, "bwd_BLOCK_N2": 16,
                       "bwd_num_stages": 1, "bwd_num_warps": 8}
FLOP_CONVENTION = ("useful FLOPs, 1 multiply-add = 2 FLOPs, softmax not counted, the same count for every "
                   "row of an op: PAM fwd 2·B·N²·(E + Ev), fwd+bwd 3× fwd; CAM fwd 4·B·C²·N, fwd+bwd 3× fwd "
                   "(fused kernels' recomputed products not counted)")

# ---------------------------------------------------------------------------------------------
# The cost model (--plan and the time budget), all its numbers here. Measured in the H200 run of
# 2026-12-04 (docs/gpu_check.md): the build for sm_90 alone (135 s on 16 cores), a process that
# imports torch and starts CUDA (about 8 s), the tests (19 passed in 170 s, so they are cut at
# --test-budget), and every fp16 median of that page's table (native, triton, SDPA's efficient
# kernel, the math), read from it by measured_medians(). The rest are estimates, marked "guess",
# until a run of this script measures them (its JSON keeps every case's wall time).
# ---------------------------------------------------------------------------------------------
MODEL_SOURCE = REPO_ROOT / "docs" / "gpu_check.md"
BUILD_S = 135.0
PROCESS_START_S = 8.0
TEST_BUDGET_S = 45.0
# bf16 as fp16 (same tensor cores); fp32 without tensor cores (TF32 off): a guess
DTYPE_SLOWDOWN = {"float16": 1.0, "bfloat16": 1.0, "float32": 8.0}
# an impl without a measured row is predicted as this one, times the factor (guesses)
STAND_INS = {"chunked": ("math", 1.1), "sdpa-math": ("math", 2.0), "flex": ("sdpa", 1.0), "sdpa-efficient": ("sdpa", 1.0)}
REFUSAL_S = 0.05  # an SDPA backend that refuses Ev != E: inputs made, refusal raised (a guess)
PREDICTED_REFUSALS = ("sdpa-flash", "sdpa-cudnn")  # FlashAttention-2 refuses Ev != E (DESIGN.md); cuDNN's head dims stop at 256
CASE_OVERHEAD_S = 0.05  # inputs, gc and the allocator between cases (a guess)
# Triton: every config the prune keeps is compiled once per dtype and launch (the precompile
# beside the build does that, in PRECOMPILE_PROCESSES processes: 3 CUDA sources leave most cores to
# it), then the autotuner loads each from the disk cache and benchmarks it once per key (N rounded up
# to a power of two: N = 9,216, 9,409 and 16,384 share one; B is not in it). N = 9,409 is another
# specialisation (not a multiple of 16): its best configs are compiled again. The kept configs per
# kernel and dtype below were counted by triton_jobs() for sm_90 (232,448 B of shared memory) at
# N = 9,216, B = 1 and 8, on 2026-12-07; tests/test_gpu_check.py checks they still hold. The H200
# run's first 3 Triton tests autotuned the PAM kernels at Ev = 512 in three dtypes in most of its
# 170 s: about 1 s a config, compile and benchmark; the split below is a guess.
TRITON_COMPILE_S = 1.0
TRITON_BENCH_S = 0.15
TRITON_CACHED_S = 0.05  # a precompiled config loaded from the disk cache (a guess)
TRITON_KEPT = {("_attn_fwd", "half"): 16, ("_attn_bwd_dkdv", "half"): 50, ("_attn_bwd_dq", "half"): 16,
               ("_cam_nt_partial", "half"): 32, ("_cam_apply", "half"): 16, ("_cam_grad_x", "half"): 16,
               ("_attn_fwd", "float32"): 11, ("_attn_bwd_dkdv", "float32"): 4, ("_attn_bwd_dq", "float32"): 1,
               ("_cam_nt_partial", "float32"): 30, ("_cam_apply", "float32"): 16, ("_cam_grad_x", "float32"): 6}
TRITON_UNALIGNED_LAUNCHES = 3  # launches per kernel compiled again for N = 9,409 (their best config): a guess
PRECOMPILE_PROCESSES = 12
TRITON_KERNELS = {("pam", "fwd"): ("_attn_fwd",), ("pam", "fwd+bwd"): ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"),
                  ("cam", "fwd"): ("_cam_nt_partial", "_cam_apply"),
                  ("cam", "fwd+bwd"): ("_cam_nt_partial", "_cam_apply", "_cam_grad_x")}
FLEX_COMPILE_S = {"fwd": 25.0, "fwd+bwd": 45.0}  # Inductor's flex template, once per dtype and mode (dynamic shapes): a guess
# FlexAttention is timed in fp16 only: each dtype is another pair of compiles (70 s by the line
# above) for a peer whose fp16 rows already say whether and how fast it runs at Ev = 512
FLEX_DTYPES = ("float16",)
PROFILE_S = 1.5  # profiler start and trace processing, per profiled case (a guess)
REPORT_S = 3.0  # tables, JSON, the auto table and the tuned file (a guess)


@dataclasses.dataclass(frozen=True)
class Case:
    op: str  # "pam" or "cam"
    impl: str
    mode: str
    n: int
    batch: int
    dtype: str

    @property
    def key(self) -> tuple:
        """The case without its impl: rows with the same key are compared with each other."""
        return (self.op, self.mode, self.n, self.batch, self.dtype)

    @property
    def useful_flop(self) -> int:
        if self.op == "pam":
            forward = 2 * self.batch * self.n * self.n * (E + EV)
        else:
            forward = 4 * self.batch * CAM_C * CAM_C * self.n
        return forward if self.mode == "fwd" else 3 * forward

    @property
    def label(self) -> str:
        return f"{self.op} {self.impl} {self.mode} N={self.n} B={self.batch} {self.dtype}"


def case_of(payload: dict) -> Case:
    """The Case of a request's payload (which may carry options beside the case's fields)."""
    return Case(**{field.name: payload[field.name] for field in dataclasses.fields(Case)})


@dataclasses.dataclass
class CaseResult:
    case: Case
    status: str = "pending"  # "ok", "skipped", "unsupported", "failed", "not run"
    reason: str = ""
    times_s: list[float] = dataclasses.field(default_factory=list)
    peak_mib: float | None = None
    wall_s: float | None = None  # the case's wall time in its process, warm-up and compiles included

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.times_s) if self.status == "ok" and self.times_s else None

    @property
    def tflops(self) -> float | None:
        median = self.median_s
        return self.case.useful_flop / median / 1e12 if median else None


@dataclasses.dataclass
class Group:
    """Cases that one request to one worker process runs, one after another."""

    name: str
    worker: str  # "peers" or "main"
    kind: str  # "time", "profile" or "sweep"
    cases: list[Case]


# ---------------------------------------------------------------------------------------------
# The plan (runs anywhere)
# ---------------------------------------------------------------------------------------------


def _shape_order(sizes, batches):
    return [(n, mode, b) for n in sizes for mode in MODES for b in batches]


def plan_groups(dtypes=tuple(DTYPES), sizes=SIZES, batches=BATCHES, sweep_sizes=SWEEP_SIZES,
                profile_shapes=PROFILE_SHAPES, sweep_dtypes=SWEEP_DTYPES, flex_dtypes=FLEX_DTYPES) -> list[Group]:
    """Every group, most important first: the peers (beside the build), then PAM by dtype (fp16,
    bf16, fp32; at each size fwd+bwd before fwd, B = 1 before 8), CAM, the profiles, the sweep."""
    groups = []
    for dtype in dtypes:
        for mode in MODES:
            cases = [Case("pam", impl, mode, n, b, dtype) for n in sizes for b in batches for impl in PEER_IMPLS
                     if impl != "flex" or dtype in flex_dtypes]
            groups.append(Group(f"peers {dtype} {mode}", "peers", "time", cases))
    for op, impls in (("pam", PAM_IMPLS), ("cam", CAM_IMPLS)):
        for dtype in dtypes:
            for n, mode, b in _shape_order(sizes, batches):
                groups.append(Group(f"{op.upper()} {dtype} {mode} N={n:,} B={b}", "main", "time",
                                    [Case(op, impl, mode, n, b, dtype) for impl in impls]))
    profile_dtype = "float16" if "float16" in dtypes else dtypes[0]
    groups.append(Group("profiles", "main", "profile",
                        [Case("pam", impl, mode, n, b, profile_dtype) for n, b in profile_shapes
                         for impl in FUSED for mode in MODES]))
    for dtype in [d for d in sweep_dtypes if d in dtypes]:
        for op, impls in (("pam", PAM_IMPLS), ("cam", CAM_IMPLS)):
            groups.append(Group(f"sweep {op.upper()} {dtype}", "main", "sweep",
                                [Case(op, impl, mode, n, b, dtype) for n, mode, b in _shape_order(sweep_sizes, batches)
                                 for impl in impls]))
    return groups


def math_bytes_needed(case: Case) -> int:
    """What a case that materialises the N×N maps holds at its peak, 0 for the others. The math
    (attnseg.reference): 2 maps in the forward (S, P), 4 with the backward (the H200 run measured
    33,024 and 66,048 MiB at N = 32,768, B = 8, fp16: 2 and 4 maps of 16 GiB). SDPA's math backend
    is counted at fp32 maps for every dtype (it may upcast half inputs)."""
    if case.op != "pam" or case.impl not in ("math", "sdpa-math"):
        return 0
    maps = 2 if case.mode == "fwd" else 4
    element = 4 if case.impl == "sdpa-math" else ELEMENT_BYTES[case.dtype]
    return maps * case.batch * case.n * case.n * element


def predicted_skip(case: Case, free_bytes: int) -> str | None:
    """"would need X GiB ..." for a case whose maps cannot fit, else None."""
    need = math_bytes_needed(case)
    if need and need > MEMORY_FRACTION * free_bytes:
        maps = 2 if case.mode == "fwd" else 4
        return (f"would need {need / GIB:.0f} GiB ({maps} N×N maps of {need / maps / GIB:.1f} GiB) "
                f"of {free_bytes / GIB:.0f} GiB free")
    return None


def measured_medians(path: Path = MODEL_SOURCE) -> dict:
    """{(op, impl, mode, N, B): seconds} of the fp16 rows of a gpu_check page's timings table."""
    medians = {}
    if not path.exists():
        return medians
    for line in path.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 9 or cells[0] not in ("PAM", "CAM") or cells[3] != "float16":
            continue
        try:
            medians[(cells[0].lower(), cells[5], cells[4], int(cells[1].replace(",", "")), int(cells[2]))] = \
                float(cells[6]) / 1e3
        except ValueError:  # "not run: ..."
            continue
    return medians


def predicted_median_s(case: Case, medians: dict) -> float:
    """One call of ``case`` in the model: its fp16 median from the H200 run (or a stand-in's, at the
    nearest measured size scaled by N²·B), scaled by dtype."""
    impl, factor = case.impl, 1.0
    if not any(key[:2] == (case.op, impl) for key in medians):
        impl, factor = STAND_INS.get(case.impl, ("math", 1.0))
    same = {key: m for key, m in medians.items() if key[:3] == (case.op, impl, case.mode)}
    if not same:
        return 1.0
    size = case.n * case.n * case.batch if case.op == "pam" else case.n * case.batch
    nearest = min(same, key=lambda key: abs(math.log((key[3] ** 2 * key[4] if case.op == "pam" else key[3] * key[4])
                                                     / size)))
    scale = size / (nearest[3] ** 2 * nearest[4] if case.op == "pam" else nearest[3] * nearest[4])
    return same[nearest] * scale * factor * DTYPE_SLOWDOWN[case.dtype]


def predicted_case_s(case: Case, medians: dict, seen: set | None = None) -> float:
    """Seconds ``case`` takes in the model: warm-up and timed calls (see the module docstring),
    plus CASE_OVERHEAD_S. ``seen``: (impl, mode, dtype) already run in the process (updated)."""
    if case.impl in PREDICTED_REFUSALS:
        return REFUSAL_S
    median = predicted_median_s(case, medians)
    kind = (case.op, case.impl, case.mode, case.dtype)
    first = seen is None or kind not in seen
    if seen is not None:
        seen.add(kind)
    if median > SLOW_CALL_S and not first:
        calls = 1
    else:
        calls = WARMUPS + max(1, min(REPEATS, math.ceil(CASE_TIMING_S / median)))
    return calls * median + CASE_OVERHEAD_S


def triton_kept(kernel: str, dtype: str) -> int:
    return TRITON_KEPT[(kernel, "float32" if dtype == "float32" else "half")]


def precompile_s(dtypes) -> float:
    """The precompile's wall time: a process start, then every kept config of every dtype, shared
    by PRECOMPILE_PROCESSES processes."""
    jobs = sum(triton_kept(kernel, dtype) for dtype in dtypes for kernel in {k for ks in TRITON_KERNELS.values() for k in ks})
    return PROCESS_START_S + jobs * TRITON_COMPILE_S / PRECOMPILE_PROCESSES


def compile_s(group: Group, compiled: set, precompiled: bool = True) -> float:
    """Triton autotunes and Flex compiles that ``group`` is the first to need (``compiled`` updated);
    ``precompiled`` False: the precompile did not (fully) run, the autotuner compiles too."""
    seconds = 0.0
    for case in group.cases:
        if case.impl == "triton":
            for kernel in TRITON_KERNELS[(case.op, case.mode)]:
                kept = triton_kept(kernel, case.dtype)
                if not precompiled and (kernel, case.dtype) not in compiled:
                    compiled.add((kernel, case.dtype))
                    seconds += kept * TRITON_COMPILE_S
                tune_key = (kernel, case.dtype, 1 << (case.n - 1).bit_length())
                if tune_key not in compiled:
                    compiled.add(tune_key)
                    seconds += kept * (TRITON_CACHED_S + TRITON_BENCH_S)
                if case.n % 16 and (kernel, case.dtype, "unaligned") not in compiled:
                    compiled.add((kernel, case.dtype, "unaligned"))
                    seconds += TRITON_UNALIGNED_LAUNCHES * TRITON_COMPILE_S
        elif case.impl == "flex" and ("flex", case.mode, case.dtype) not in compiled:
            compiled.add(("flex", case.mode, case.dtype))
            seconds += FLEX_COMPILE_S[case.mode]
    return seconds


def predicted_group_s(group: Group, medians: dict, free_bytes: int, state: dict) -> float:
    """The group's seconds in the model; ``state`` carries what earlier groups compiled and ran."""
    seen, compiled = state.setdefault("seen", set()), state.setdefault("compiled", set())
    seconds = compile_s(group, compiled, state.get("precompiled", True))
    for case in group.cases:
        if predicted_skip(case, free_bytes):
            continue
        seconds += predicted_case_s(case, medians, seen)
        if group.kind == "profile":
            seconds += PROFILE_S
    return seconds


def estimate_seconds(groups: list[Group], free_bytes: int, medians: dict, *, build: bool = True,
                     test_budget_s: float = TEST_BUDGET_S) -> dict:
    """The plan's cost model: (build ∥ peers), tests, the main process's groups, the report."""
    state: dict = {}
    peers = sum(predicted_group_s(g, medians, free_bytes, state) for g in groups if g.worker == "peers")
    main = sum(predicted_group_s(g, medians, free_bytes, state) for g in groups if g.worker == "main")
    # this process and the timings' start CUDA; the peers' start is inside the build, pytest's in its budget
    starts = 1 + any(g.worker == "main" for g in groups)
    dtypes = sorted({c.dtype for g in groups for c in g.cases if c.impl == "triton"})
    parts = {"build ∥ peers ∥ Triton precompile": max(BUILD_S if build else 0.0, peers + PROCESS_START_S,
                                                      precompile_s(dtypes)),
             "tests": test_budget_s, "process starts": PROCESS_START_S * starts,
             "main process": main, "report": REPORT_S}
    parts["peers (beside the build)"] = peers + PROCESS_START_S
    parts["precompile (beside the build)"] = precompile_s(dtypes)
    parts["total"] = sum(v for k, v in parts.items() if "(beside the build)" not in k)
    return parts


def print_plan(groups: list[Group], free_bytes: int, medians: dict, *, build: bool = True,
               test_budget_s: float = TEST_BUDGET_S, budget_s: float = 540.0) -> dict:
    print(f"gpu_check plan (free GPU memory assumed: {free_bytes / GIB:.0f} GiB; budget {budget_s:.0f} s)")
    triton_dtypes = sorted({c.dtype for g in groups for c in g.cases if c.impl == "triton"})
    print(f"1. build for this GPU's architecture only ({'~%.0f s' % BUILD_S if build else 'skipped'}); beside it "
          f"the Triton precompile ({', '.join(triton_dtypes)}: every kept config in {PRECOMPILE_PROCESSES} processes, "
          f"~{precompile_s(triton_dtypes):.0f} s) and the peers in their own process:")
    state: dict = {}
    for stage, kinds in (("peers", ("time",)), ("main", ("time",)), ("main", ("profile",)), ("main", ("sweep",))):
        if stage == "main" and kinds == ("time",):
            print(f"2. GPU tests: tests/test_cuda_native.py and tests/test_triton.py's GPU tests (at most {test_budget_s:.0f} s)")
            print("3. timings, in one process:")
        elif kinds == ("profile",):
            print("4. kernel profiles (torch.profiler, CUDA activity), in that process:")
        elif kinds == ("sweep",):
            print("5. autotune sweep (rows for auto's table, Triton's choices for attnseg/triton/tuned/):")
        for group in (g for g in groups if g.worker == stage and g.kind in kinds):
            seconds = predicted_group_s(group, medians, free_bytes, state)
            impls = list(dict.fromkeys(c.impl for c in group.cases))
            shapes = sorted({(c.n, c.batch) for c in group.cases})
            print(f"   {group.name}: {', '.join(impls)} at " + ", ".join(f"N={n:,} B={b}" for n, b in shapes) +
                  f"  ~{seconds:.1f} s")
            for case in group.cases:
                skip = predicted_skip(case, free_bytes)
                if skip:
                    print(f"      {case.label} -> skipped: {skip}")
    print("6. report: docs/gpu/<gpu>.md and .json; rows for attnseg/backend_table.json (cuda:sm_XY); "
          "attnseg/triton/tuned/<gpu>.json")
    cases = [c for g in groups for c in g.cases]
    print(f"{len(cases)} cases; impls: {', '.join(PAM_IMPLS)} (PAM), {', '.join(CAM_IMPLS)} (CAM); peers: "
          f"{', '.join(PEER_IMPLS)} (SDPA under sdpa_kernel with each backend; FlexAttention compiled with "
          f"{FLEX_KERNEL_OPTIONS})")
    parts = estimate_seconds(groups, free_bytes, medians, build=build, test_budget_s=test_budget_s)
    print("processes: this one, the peers' (beside the build; a fresh one after a crash), the tests' pytest, "
          "the timings' (a fresh one only after a crash or a timeout)")
    print("cost model (the H200 run of 2026-12-04, docs/gpu_check.md; guesses in gpu_check.py): " +
          ", ".join(f"{k} {v:.0f} s" for k, v in parts.items() if k != "total"))
    print(f"estimated total: {parts['total']:.0f} s (budget {budget_s:.0f} s)")
    return parts


# ---------------------------------------------------------------------------------------------
# One case (runs in a worker process; on the CPU in the tests and --dry-run)
# ---------------------------------------------------------------------------------------------


class Unsupported(Exception):
    """A peer (or a backend) refused the case; its reason is the message."""


def _first_line(exc) -> str:
    """The first line of an exception's (or a warning's) message, without torch's source locations."""
    text = re.sub(r"\s*\(Triggered internally at [^)]*\)\.?", "", str(exc)).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


def _sdpa(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def attend(q, k, v):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(
                q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), scale=1.0).squeeze(1)

    return attend


_FLEX: dict = {}


def _flex(device: torch.device, compiled: bool):
    """flex_attention on [B, 1, N, E] views, compiled (dynamic shapes: one compile per dtype and
    mode) with FLEX_KERNEL_OPTIONS; eager where ``compiled`` is False (the CPU dry run)."""
    from torch.nn.attention.flex_attention import flex_attention

    if compiled and "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=True)
    fn = _FLEX["fn"] if compiled else flex_attention
    options = FLEX_KERNEL_OPTIONS if compiled else None

    def attend(q, k, v):
        return fn(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), scale=1.0, kernel_options=options).squeeze(1)

    return attend


def _case_call(case: Case, device: torch.device, compile_flex: bool = True):
    """The case's timed work: (call, drop_grads); raises Unsupported where a backend refuses it."""
    attnseg = import_attnseg() if case.impl in (*FUSED, "math") else None
    dtype = DTYPES[case.dtype]
    grad = case.mode == "fwd+bwd"
    torch.manual_seed(0)
    if case.op == "pam":
        contiguous = case.impl in PEER_IMPLS  # SDPA's fused kernels need stride(-1) == 1
        if contiguous:
            leaves = [torch.randn(case.batch, case.n, w, device=device, dtype=dtype, requires_grad=grad) for w in (E, E, EV)]
            inputs = leaves
            grad_out = torch.randn(case.batch, case.n, EV, device=device, dtype=dtype)
        else:  # the [B, N, E] views of channel-first convolution outputs that PAM passes; dO likewise
            leaves = [torch.randn(case.batch, w, case.n, device=device, dtype=dtype, requires_grad=grad) for w in (E, E, EV)]
            inputs = [leaf.transpose(1, 2) for leaf in leaves]
            grad_out = torch.randn(case.batch, EV, case.n, device=device, dtype=dtype).transpose(1, 2)
        if case.impl in SDPA_BACKENDS:
            attend = _sdpa(SDPA_BACKENDS[case.impl])
        elif case.impl == "flex":
            attend = _flex(device, compile_flex and device.type == "cuda")
        elif case.impl == "math":
            attend = attnseg.reference.attention
        else:
            def attend(q, k, v):
                return attnseg.attention(q, k, v, 1.0, backend=case.impl)
    else:
        # post-ReLU-like (non-negative) features scaled by N^-1/2: Gram entries about 1/3 in every dtype
        inputs = [(torch.rand(case.batch, CAM_C, case.n, 1, device=device) / math.sqrt(case.n))
                  .to(dtype).requires_grad_(grad)]
        leaves = inputs
        gamma = torch.ones(1, device=device, dtype=dtype)
        if case.impl == "math":
            def attend(x):
                return attnseg.reference.channel_attention(x, gamma)
        else:
            def attend(x):
                return attnseg.channel_attention(x, gamma, backend=case.impl)
        grad_out = torch.randn(case.batch, CAM_C, case.n, 1, device=device, dtype=dtype)
    call, drop_grads = forward_call(lambda: attend(*inputs), leaves, grad_out if grad else None)
    return call, drop_grads


def _refusal(case: Case, exc: BaseException) -> str | None:
    """Why a case is unsupported, or None where ``exc`` is a failure: an SDPA backend's refusal, a
    backend that cannot run here, and anything FlexAttention raises (its compile included)."""
    name = type(exc).__name__
    if case.impl in SDPA_BACKENDS and isinstance(exc, RuntimeError) and (
            "No available kernel" in str(exc) or "No viable backend" in str(exc)):
        return _first_line(exc)
    if name == "BackendUnavailableError" or case.impl == "flex":
        return f"{name}: {_first_line(exc)}"
    return None


def _time_one(call, meter: PeakMemoryMeter, cuda: bool) -> tuple[float, float]:
    """(seconds, peak MiB) of one call: CUDA events on a GPU, perf_counter on the CPU."""
    meter.start()
    seconds = time_call(call, meter, cuda)
    return seconds, meter.stop()


_SEEN: set = set()  # (op, impl, mode, dtype) that ran in this process: nothing left to compile


def run_case(payload: dict, device: str = "cuda") -> dict:
    """One case's times (s), peak (MiB) and wall time, or ``{"unsupported": reason}``.

    One warm-up, then up to REPEATS timed calls until they add up to CASE_TIMING_S; where the warm-up
    took over SLOW_CALL_S and the impl already ran in this process, that call is the timing.
    """
    device = torch.device(device)
    case = case_of(payload)
    started = time.perf_counter()
    cuda = device.type == "cuda"
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call, drop_grads = _case_call(case, device, payload.get("compile_flex", True))
            meter = PeakMemoryMeter(device)
            drop_grads()
            warm_s, warm_peak = _time_one(call, meter, cuda)
    except Exception as exc:
        why = _refusal(case, exc)
        if why is None:
            raise
        reasons = "; ".join(dict.fromkeys(_first_line(w.message) for w in caught if str(w.message).strip()))
        return {"unsupported": why + (f" ({reasons})" if reasons else ""), "wall_s": time.perf_counter() - started}
    kind = (case.op, case.impl, case.mode, case.dtype)
    first = kind not in _SEEN
    _SEEN.add(kind)
    times, peaks = [], []
    if warm_s > SLOW_CALL_S and not first:
        times, peaks = [warm_s], [warm_peak]
    else:
        for _ in range(REPEATS):
            if times and sum(times) >= CASE_TIMING_S:
                break
            drop_grads()
            seconds, peak = _time_one(call, meter, cuda)
            times.append(seconds)
            peaks.append(peak)
    return {"times_s": times, "peak_mib": max(peaks), "wall_s": time.perf_counter() - started,
            **({"triton_tuning": triton_tuning()} if case.impl == "triton" else {})}


def run_group(payloads: list[dict], device: str = "cuda") -> dict:
    """The cases of one group in turn, in this process: ``{"results": [...]}``, a result or
    ``{"error": reason}`` per case. After an error other than running out of memory the group stops
    (the context may be unusable); the caller runs what is left in a fresh process."""
    results = []
    for payload in payloads:
        try:
            results.append(run_case(payload, device))
        except Exception as exc:  # reported per case; the caller decides about the rest
            results.append({"error": f"{type(exc).__name__}: {_first_line(exc)}"})
            if not isinstance(exc, torch.cuda.OutOfMemoryError):
                break
        finally:
            gc.collect()  # the case's tensors go before the next case's peak is measured
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
    return {"results": results}


def triton_tuning() -> list[dict]:
    """What Triton's autotuner chose in this process, for every attnseg kernel and key:
    [{"kernel", "dtype", "key": {argument: value}, "config": {"kwargs", "num_warps", "num_stages"}}]."""
    entries = []
    for module_name in ("attnseg.triton.attention", "attnseg.triton.channel_attention"):
        module = sys.modules.get(module_name)
        for lazy in vars(module).values() if module else ():
            tuner = getattr(lazy, "_built", {}).get(False) if hasattr(lazy, "fn") else None
            entries.extend(autotuner_entries(lazy.fn.__name__, tuner) if tuner is not None else [])
    return entries


def autotuner_entries(kernel_name: str, tuner) -> list[dict]:
    """The entries of one ``triton.runtime.autotuner.Autotuner``'s cache: its key is the key
    arguments' values, then the dtypes of the tensor arguments in argument order."""
    names = list(getattr(tuner, "keys", ()))
    entries = []
    for key, config in dict(getattr(tuner, "cache", {})).items():
        values, dtypes = list(key[:len(names)]), [str(d).replace("torch.", "") for d in key[len(names):]]
        entries.append({"kernel": kernel_name, "dtypes": dtypes, "key": dict(zip(names, values)),
                        "config": {"kwargs": dict(config.kwargs), "num_warps": config.num_warps,
                                   "num_stages": config.num_stages}})
    return entries


def profile_case(payload: dict, device: str = "cuda") -> dict:
    """One call of the case under torch.profiler after a warm-up: ``{"kernels": [[name, calls, ms]]}``
    (CUDA kernels by self device time; on the CPU, operators by self CPU time), ``"total_ms"``."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device)
    case = case_of(payload)
    call, drop_grads = _case_call(case, device)
    cuda = device.type == "cuda"
    drop_grads()
    call()
    drop_grads()
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        call()
        if cuda:
            torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        self_us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if self_us > 0 and (cuda or event.key.startswith(("attnseg::", "aten::"))):
            rows.append([event.key, event.count, self_us / 1e3])
    rows.sort(key=lambda row: -row[2])
    return {"kernels": rows, "total_ms": sum(row[2] for row in rows)}


def profile_group(payloads: list[dict], device: str = "cuda") -> dict:
    results = []
    for payload in payloads:
        try:
            results.append(profile_case(payload, device))
        except Exception as exc:
            results.append({"error": f"{type(exc).__name__}: {_first_line(exc)}"})
        gc.collect()
    return {"results": results}


# FLOPs of the kernels that can be told apart by name: (pattern, forward-width multiple). A kernel
# matching pattern p does 2·B·N²·w(E, Ev) FLOPs per call of the op; cuBLAS GEMMs are pooled.
KERNEL_FLOP = (
    (r"_attn_fwd|flash_attention_fwd_kernel|attention_fwd_kernel|ffma_attention_kernel", lambda e, ev: e + ev),
    (r"_attn_bwd_dkdv|attention_bwd_dkv_kernel", lambda e, ev: 2 * (e + ev)),  # S, dP, dV, dK
    (r"_attn_bwd_dq|attention_bwd_dq_kernel(?!.*convert)", lambda e, ev: 2 * e + ev),  # S, dP, dQ
    (r"flash_attention_bwd_dv_kernel", lambda e, ev: e + ev),  # S, dV
    (r"flash_attention_bwd_dkdq_kernel", lambda e, ev: 3 * e + ev),  # S, dP, dK, dQ
)
GEMM_PATTERN = r"gemm|cutlass|xmma|nvjet|sm90_|sm80_|aten::bmm|aten::mm|aten::baddbmm|aten::matmul"


def kernel_flop(name: str, case: Case) -> float | None:
    """FLOPs per op call of the kernel called ``name``, where its name says which product it is."""
    for pattern, width in KERNEL_FLOP:
        if re.search(pattern, name):
            return 2.0 * case.batch * case.n * case.n * width(E, EV)
    return None


def gemm_flop(case: Case) -> float:
    """The chunked backend's GEMM FLOPs (docs/chunked.md): the forward's two products, and in
    training the backward's five (S recomputed, dV, dP, dQ, dK)."""
    forward = 2.0 * case.batch * case.n * case.n * (E + EV)
    return forward if case.mode == "fwd" else forward + 2.0 * case.batch * case.n * case.n * (3 * E + 2 * EV)


def profile_rows(case: Case, outcome: dict) -> list[list[str]]:
    """The profile table of one case: kernel, calls, ms, share, TFLOP/s (attributed FLOPs)."""
    kernels = outcome["kernels"]
    total = outcome["total_ms"] or 1.0
    rows = []
    gemm = [k for k in kernels if kernel_flop(k[0], case) is None and re.search(GEMM_PATTERN, k[0], re.I)]
    for name, calls, ms in kernels[:PROFILE_ROWS]:
        flop = kernel_flop(name, case)
        rate = f"{flop / (ms / 1e3) / 1e12:.3g}" if flop else "-"
        rows.append([name[:90], str(calls), f"{ms:.3g}", f"{100 * ms / total:.0f} %", rate])
    if gemm:
        gemm_ms = sum(k[2] for k in gemm)
        rows.append([f"all {len(gemm)} GEMM kernels together", str(sum(k[1] for k in gemm)), f"{gemm_ms:.3g}",
                     f"{100 * gemm_ms / total:.0f} %", f"{gemm_flop(case) / (gemm_ms / 1e3) / 1e12:.3g}"])
    return rows


# ---------------------------------------------------------------------------------------------
# Triton precompile beside the build: the autotuner's compiles become disk-cache hits
# ---------------------------------------------------------------------------------------------


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # not installed, or broken
        return False
    return True


def triton_launches(dtype_name: str, n: int, batch: int) -> list:
    """(LazyKernel, args, kwargs) of every Triton launch that the timed PAM and CAM cases make, fwd
    and bwd, recorded on CPU tensors of their layouts (:func:`attnseg.triton.offline.record_launches`:
    the launcher runs, nothing is launched)."""
    attnseg = import_attnseg()
    from attnseg.triton import offline

    dtype = DTYPES[dtype_name]
    triton_backend = attnseg._backends.get("triton")
    q, k, v = (torch.empty(batch, w, n, dtype=dtype).transpose(1, 2).requires_grad_() for w in (E, E, EV))
    grad_out = torch.empty(batch, EV, n, dtype=dtype).transpose(1, 2)
    x = torch.empty(batch, CAM_C, n, dtype=dtype).requires_grad_()

    def pam():
        triton_backend.attention(q, k, v, 1.0)[0].backward(grad_out)

    def cam():
        triton_backend.channel_product(x, True).backward(torch.empty(batch, CAM_C, n, dtype=dtype))

    return offline.record_launches(pam) + offline.record_launches(cam)


def _specialisation(value):
    """How Triton tells launches apart: ints by == 1 and divisibility by 16, tensors by dtype."""
    if isinstance(value, torch.Tensor):
        return str(value.dtype)
    if isinstance(value, int) and not isinstance(value, bool):
        return ("int", value == 1, value % 16 == 0)
    return value


def triton_jobs(payload: dict) -> list:
    """Every (kernel, args, kwargs, config) to compile, deduplicated, in a fixed order: what the
    prune keeps for this GPU (``arch``, ``shared_memory``) at the recorded launches."""
    from attnseg.triton import offline

    jobs, seen = [], set()
    for dtype_name in payload["dtypes"]:
        for batch in payload["batches"]:
            for kernel, args, kwargs in triton_launches(dtype_name, payload["n"], batch):
                if kernel.configs is None:
                    continue
                configs = offline.kept_configs(kernel, args, kwargs, payload["arch"],
                                               {payload["arch"]: payload["shared_memory"]})
                spec = (kernel.__name__, tuple(map(_specialisation, args)),
                        tuple(sorted((k, _specialisation(v)) for k, v in kwargs.items())))
                for config in configs:
                    identity = (spec, tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages)
                    if identity not in seen:
                        seen.add(identity)
                        jobs.append((kernel, args, kwargs, config))
    return jobs


def precompile_triton(payload: dict, device: str = "cuda") -> dict:
    """Compile share ``index`` of ``count`` of :func:`triton_jobs` into Triton's disk cache through
    ``JITFunction.warmup`` (the launch path without the launch: the same cache key); where
    ``device`` is not CUDA only count them. ``{"jobs", "compiled", "failed": [why, ...]}``."""
    jobs = triton_jobs(payload)
    mine = jobs[payload.get("index", 0)::payload.get("count", 1)]
    compiled, failed = 0, []
    for kernel, args, kwargs, config in mine if device == "cuda" else ():
        try:
            # the autotuner's own merge of the launch's keywords and the config's
            kernel.compiled_jit_function().warmup(*[a.dtype if isinstance(a, torch.Tensor) else a for a in args],
                                                  grid=(1,), **dict(kwargs, **config.all_kwargs()))
            compiled += 1
        except Exception as exc:  # the autotuner will compile it (or fail on it) itself
            failed.append(f"{kernel.__name__}: {type(exc).__name__}: {_first_line(exc)}")
    return {"jobs": len(jobs), "mine": len(mine), "compiled": compiled, "failed": failed[:5]}


def run_precompile(payload: dict, processes: int, device: str, timeout_s: float) -> dict:
    """:func:`precompile_triton` in ``processes`` spawned processes at once (the build's nvcc jobs
    leave most cores idle: 3 CUDA sources); {"jobs", "compiled", "failed", "wall_s"}."""
    from concurrent.futures import ProcessPoolExecutor, wait

    started = time.monotonic()
    summary = {"jobs": 0, "compiled": 0, "failed": [], "processes": processes}
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(precompile_triton, {**payload, "index": i, "count": processes}, device)
                   for i in range(processes)]
        done, pending = wait(futures, timeout=timeout_s)
        for future in done:
            try:
                part = future.result()
            except Exception as exc:  # a process died: its share is compiled by the autotuner later
                summary["failed"].append(f"{type(exc).__name__}: {_first_line(exc)}")
                continue
            summary["jobs"] = part["jobs"]
            summary["compiled"] += part["compiled"]
            summary["failed"] += part["failed"]
        if pending:
            summary["failed"].append(f"{len(pending)} processes still compiling after {timeout_s:.0f} s")
            for process in list(getattr(pool, "_processes", {}).values()):
                process.kill()
    summary["wall_s"] = time.monotonic() - started
    return summary


# ---------------------------------------------------------------------------------------------
# Worker processes: one long-lived process runs request after request
# ---------------------------------------------------------------------------------------------


def _worker_loop(connection, device: str) -> None:
    """A worker's body: requests (function name, payload) in, ("ok", result) / ("error", why) out."""
    os.environ.setdefault("ATTNSEG_QUIET", "1")
    while True:
        try:
            request = connection.recv()
        except EOFError:
            return
        if request is None:
            return
        name, payload = request
        try:
            connection.send(("ok", globals()[name](payload, device)))
        except BaseException as exc:  # reported; the parent decides
            connection.send(("error", f"{type(exc).__name__}: {_first_line(exc)}"))


class Worker:
    """One child process (spawned: no state inherited) that serves requests until it dies or is
    closed; a request after a death or a timeout starts a fresh one (``starts`` counts them)."""

    def __init__(self, device: str):
        self.device, self.starts = device, 0
        self._context = multiprocessing.get_context("spawn")
        self._process = self._connection = None

    def _start(self) -> None:
        parent, child = self._context.Pipe()
        self._process = self._context.Process(target=_worker_loop, args=(child, self.device), daemon=True)
        self._process.start()
        child.close()
        self._connection = parent
        self.starts += 1

    def call(self, name: str, payload, timeout_s: float) -> tuple[dict | None, str | None]:
        """(result, None), or (None, why) where the request failed, timed out or the process died."""
        if self._process is None or not self._process.is_alive():
            self._start()
        self._connection.send((name, payload))
        try:
            if self._connection.poll(max(timeout_s, 0.1)):
                status, value = self._connection.recv()
                return (value, None) if status == "ok" else (None, value)
        except (EOFError, ConnectionError):
            pass
        else:
            self.kill()
            return None, f"timed out after {timeout_s:.0f} s"
        self._process.join(5)
        code = self._process.exitcode
        self.kill()
        signame = signal.Signals(-code).name if code is not None and code < 0 else f"status {code}"
        return None, f"the process died ({signame})"

    def kill(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.join()
        self._process = self._connection = None

    def close(self) -> None:
        if self._process is not None and self._process.is_alive():
            try:
                self._connection.send(None)
                self._process.join(10)
            except (BrokenPipeError, OSError):
                pass
        self.kill()


# ---------------------------------------------------------------------------------------------
# Running the groups under the budget
# ---------------------------------------------------------------------------------------------


class Budget:
    """Wall time from the script's start; ``fits`` compares what is left with a prediction."""

    def __init__(self, seconds: float, started: float | None = None):
        self.seconds, self.started = seconds, time.monotonic() if started is None else started
        self.log: list[str] = []

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.started)

    def fits(self, what: str, predicted_s: float) -> bool:
        left = self.left()
        if predicted_s <= left:
            return True
        self.log.append(f"{what}: skipped, {max(left, 0):.0f} s of the {self.seconds:.0f} s budget left, "
                        f"the cost model predicts {predicted_s:.0f} s")
        progress(self.log[-1])
        return False


def run_groups(groups: list[Group], workers: dict, budget: Budget, medians: dict, free_bytes: int,
               results: dict, state: dict, extra: dict, case_payload: dict | None = None) -> None:
    """Runs ``groups`` (in order) on their workers, within ``budget``; fills ``results`` (Case ->
    CaseResult), ``extra["profiles"]`` and ``extra["triton_tuning"]``."""
    for group in groups:
        todo = []
        for case in group.cases:
            result = results.setdefault(case, CaseResult(case))
            skip = predicted_skip(case, free_bytes) if group.kind != "profile" else None
            if skip:
                result.status, result.reason = "skipped", skip
            else:
                todo.append(case)
        predicted = predicted_group_s(Group(group.name, group.worker, group.kind, todo), medians, free_bytes, state)
        if todo and not budget.fits(group.name, predicted):
            todo = []
        for case in group.cases:
            if case not in todo and results[case].status == "pending":
                results[case].status, results[case].reason = "not run", "time budget (see the budget log)"
        if not todo:
            continue
        worker = workers[group.worker]
        payloads = [{**dataclasses.asdict(c), **(case_payload or {})} for c in todo]
        timeout = max(3 * predicted, 120.0)
        progress(f"{group.name}: {len(todo)} cases (~{predicted:.0f} s) ...")
        if group.kind == "profile":
            outcome, why = worker.call("profile_group", payloads, min(timeout, max(budget.left(), 10.0)))
            for case, profiled in zip(todo, (outcome or {}).get("results", [])):
                extra.setdefault("profiles", {})[case] = profiled
            for case in todo[len((outcome or {}).get("results", [])):]:
                extra.setdefault("profiles", {})[case] = {"error": why or "not reported"}
            continue
        while todo:
            outcome, why = worker.call("run_group", payloads[-len(todo):], min(timeout, max(budget.left(), 10.0)))
            reported = (outcome or {}).get("results", [])
            for case, measured in zip(todo, reported):
                record_case(results[case], measured, extra)
                show(results[case])
            rest = todo[len(reported):]
            if reported and "error" in reported[-1] and "OutOfMemoryError" not in reported[-1]["error"]:
                worker.kill()  # after an error the process (its CUDA context) may be unusable: a fresh one
            if not rest:
                break
            if why is not None:  # the process died or timed out during rest[0]: that case failed
                results[rest[0]].status, results[rest[0]].reason = "failed", why
                show(results[rest[0]])
                rest = rest[1:]
            todo = rest
            if todo and not budget.fits(f"{group.name} (after a failure)", 1.0):
                for case in todo:
                    results[case].status, results[case].reason = "not run", "time budget (see the budget log)"
                break


def show(result: CaseResult) -> None:
    progress(f"  {result.case.label}: {result.status}" +
             (f" {result.median_s * 1e3:.3g} ms" if result.median_s else f" ({result.reason})"))


def record_case(result: CaseResult, measured: dict, extra: dict | None = None) -> None:
    """A case's outcome from run_case's (or run_group's) dict."""
    result.wall_s = measured.get("wall_s")
    if "unsupported" in measured:
        result.status, result.reason = "unsupported", measured["unsupported"]
    elif "error" in measured:
        result.status, result.reason = "failed", measured["error"]
    else:
        result.status, result.times_s, result.peak_mib = "ok", measured["times_s"], measured["peak_mib"]
    if extra is not None and measured.get("triton_tuning"):
        merged = {tuning_identity(e): e for e in extra.get("triton_tuning", [])}
        merged.update({tuning_identity(e): e for e in measured["triton_tuning"]})
        extra["triton_tuning"] = list(merged.values())


def tuning_identity(entry: dict) -> tuple:
    return (entry["kernel"], tuple(entry["dtypes"]), tuple(sorted(entry["key"].items())))


# ---------------------------------------------------------------------------------------------
# Build and tests
# ---------------------------------------------------------------------------------------------


def build_environment(capability: tuple[int, int], environ=os.environ) -> dict:
    """The build's environment: this GPU's architecture only, every core, the CUDA kernels forced."""
    return {**environ, "TORCH_CUDA_ARCH_LIST": f"{capability[0]}.{capability[1]}",
            "MAX_JOBS": str(os.cpu_count() or 1), "ATTNSEG_FORCE_CUDA": "1"}


def build_extension(capability: tuple[int, int], timeout_s: float) -> dict:
    """``setup.py build_ext --inplace`` for one architecture: {"ok", "wall_s", "arch", "tail"}."""
    env = build_environment(capability)
    started = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout_s)
        ok, tail = proc.returncode == 0, (proc.stdout + proc.stderr).strip().splitlines()[-3:]
    except subprocess.TimeoutExpired:
        ok, tail = False, [f"timed out after {timeout_s:.0f} s"]
    return {"ok": ok, "wall_s": time.monotonic() - started, "arch": env["TORCH_CUDA_ARCH_LIST"], "tail": tail}


TEST_TARGETS = ["tests/test_cuda_native.py", "tests/test_triton.py::test_gpu_attention_matches_reference",
                "tests/test_triton.py::test_gpu_channel_attention_matches_reference",
                "tests/test_triton.py::test_gpu_opcheck_and_compile"]


def pytest_environment(attnseg_dir: str | Path, environ=os.environ) -> dict:
    """The tests' environment: they must import the attnseg that the timings use (pytest puts
    tests/ on sys.path, not the root, so an in-place build is found only with the checkout on
    PYTHONPATH: the H200 run of 2026-12-04 lost its tests that way)."""
    env = {**environ, "ATTNSEG_REQUIRE_NATIVE": "1"}
    if Path(attnseg_dir).resolve().parent == REPO_ROOT.resolve():
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), environ.get("PYTHONPATH")]))
    return env


def run_tests(budget_s: float, attnseg_dir: str | Path, targets=tuple(TEST_TARGETS)) -> dict:
    """One pytest process over ``targets``; at ``budget_s`` it gets SIGINT (pytest then ends the
    session and writes its JUnit report with what ran), 15 s later SIGKILL."""
    pytest_exe = Path(sys.executable).with_name("pytest")
    command = [str(pytest_exe)] if pytest_exe.exists() else [sys.executable, "-m", "pytest"]
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as folder:
        xml = Path(folder) / "junit.xml"
        proc = subprocess.Popen([*command, *targets, "-q", "-p", "no:cacheprovider", f"--junitxml={xml}"],
                                cwd=REPO_ROOT, env=pytest_environment(attnseg_dir), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        interrupted = False
        try:
            output, _ = proc.communicate(timeout=budget_s)
        except subprocess.TimeoutExpired:
            interrupted = True
            proc.send_signal(signal.SIGINT)
            try:
                output, _ = proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                output, _ = proc.communicate()
        outcome = parse_junit(xml) if xml.exists() else {
            "problem": f"pytest exited with {proc.returncode}, no report: " +
                       " / ".join((output or "").strip().splitlines()[-3:])}
    outcome["wall_s"] = time.monotonic() - started
    if interrupted:
        outcome["interrupted"] = f"interrupted at the test budget ({budget_s:.0f} s)"
    return outcome


def parse_junit(path: str | Path) -> dict:
    """passed/failed/errors/skipped counts (and the failed test ids) from a pytest JUnit XML file."""
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failed_ids": []}
    for suite in suites:
        for testcase in suite.iter("testcase"):
            if not testcase.get("name"):  # the test a SIGINT interrupted: pytest writes it without a name
                continue
            outcome = next((child.tag for child in testcase if child.tag in ("failure", "error", "skipped")), None)
            name = f"{testcase.get('classname', '')}::{testcase.get('name', '')}"
            if outcome in ("failure", "error"):
                counts["failed" if outcome == "failure" else "errors"] += 1
                counts["failed_ids"].append(name)
            elif outcome == "skipped":
                counts["skipped"] += 1
            else:
                counts["passed"] += 1
    return counts


def test_summary_line(outcome: dict) -> str:
    if "problem" in outcome:
        return f"- {outcome['problem']}"
    line = (f"- {outcome['passed']} passed, {outcome['failed']} failed, {outcome['errors']} errors, "
            f"{outcome['skipped']} skipped ({outcome['wall_s']:.0f} s)")
    if outcome.get("interrupted"):
        line += f"; {outcome['interrupted']}"
    return line + "".join(f"\n  - failed: `{test_id}`" for test_id in outcome["failed_ids"])


# ---------------------------------------------------------------------------------------------
# Outputs: the report, the JSON, auto's table rows, the tuned file
# ---------------------------------------------------------------------------------------------


def markdown_table(header, rows) -> str:
    def line(cells):
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"
    return "\n".join([line(header), line(["---"] * len(header)), *map(line, rows)])


REASON_CHARS = 240  # a table cell's reason; the JSON has it whole
TABLE_HEADER = ["op", "N", "B", "dtype", "mode", "impl", "median ms", "TFLOP/s", "peak MiB", "vs math"]


def baseline_time(results: list[CaseResult], case: Case, impl: str = "math") -> float | None:
    return next((r.median_s for r in results if r.case.impl == impl and r.case.key == case.key), None)


def table_rows(results: list[CaseResult]) -> list[list[str]]:
    rows = []
    for r in results:
        c = r.case
        head = [c.op.upper(), f"{c.n:,}", str(c.batch), c.dtype, c.mode, c.impl]
        if r.status == "ok":
            rows.append(head + [f"{r.median_s * 1e3:.3g}", f"{r.tflops:.3g}", f"{r.peak_mib:,.0f}",
                                format_ratio(r.median_s, baseline_time(results, c))])
        else:
            reason = r.reason if len(r.reason) <= REASON_CHARS else r.reason[:REASON_CHARS - 3] + "..."
            rows.append(head + [f"{r.status}: {reason}", "", "", ""])
    return rows


def environment_info(device: torch.device) -> dict:
    """GPU (or CPU), driver, CUDA, torch, triton, attnseg version and commit."""
    info = {"torch": torch.__version__, "cuda": torch.version.cuda}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, arch=f"sm_{props.major}{props.minor}", memory_gib=round(props.total_memory / GIB),
                    sms=props.multi_processor_count)
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            info["driver"] = "unknown (no nvidia-smi)"
    else:
        info.update(gpu="none (CPU dry run)", arch="cpu", driver="-")
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:
        info["triton"] = f"not importable ({type(exc).__name__})"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=20).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=20).stdout.strip()
        info["attnseg_commit"] = (commit or "unknown") + (" (with local changes)" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        info["attnseg_commit"] = "unknown (no git)"
    return info


def environment_lines(info: dict) -> list[str]:
    return [f"GPU: {info['gpu']} ({info['arch']}{', %s GiB, %s SMs' % (info['memory_gib'], info['sms']) if 'sms' in info else ''})"
            f", driver {info['driver']}",
            f"torch {info['torch']}, CUDA {info['cuda']}, triton {info['triton']}",
            f"attnseg commit {info['attnseg_commit']}"]


def write_report(path: Path, info: dict, build: dict | None, tests: dict | None, results: list[CaseResult],
                 profiles: dict, tuning: list[dict], budget_log: list[str], took_s: float,
                 precompile: dict | None = None) -> None:
    """docs/gpu/<gpu>.md: environment, build, tests, budget, timings, sweep, profiles, Triton's choices."""
    timed = [r for r in results if r.case.n in SIZES or r.case.n not in SWEEP_SIZES]
    swept = [r for r in results if r not in timed]
    build_line = ("skipped" if build is None else
                  f"TORCH_CUDA_ARCH_LIST={build['arch']}: {'ok' if build['ok'] else 'FAILED'} in {build['wall_s']:.0f} s"
                  + ("" if build["ok"] else " (" + " / ".join(build["tail"]) + ")"))
    text = ["# GPU check: " + info["gpu"], "",
            "Written by `python benchmarks/gpu_check.py` (method in its docstring; docs/gpu_check.md).", "",
            "## Environment", "", *[f"- {line}" for line in environment_lines(info)], "",
            "## Build and tests", "", f"- build: {build_line}",
            *([f"- Triton precompile beside it: {precompile.get('compiled', 0)} of {precompile.get('jobs', '?')} "
               f"configs in {precompile.get('wall_s', 0):.0f} s" +
               (f" ({'; '.join(precompile['failed'][:3])})" if precompile.get("failed") else "")] if precompile else []),
            "- tests (" + ", ".join(f"`{t}`" for t in TEST_TARGETS) + "):",
            "  " + (test_summary_line(tests) if tests else "- skipped"), "",
            "## Time budget", "", *([f"- {line}" for line in budget_log] or ["- every group ran"]),
            f"- took {took_s:.0f} s", "",
            "## Timings", "", f"TFLOP/s: {FLOP_CONVENTION}. PAM: E = {E}, Ev = {EV}, channel-first views "
            f"(peers: contiguous); CAM: C = {CAM_C}, official variant. vs math: time against the math's row of the "
            "same case in this run (below 1 is faster).", "", markdown_table(TABLE_HEADER, table_rows(timed)), ""]
    if swept:
        text += ["## Sweep (rows for auto's table)", "", markdown_table(TABLE_HEADER, table_rows(swept)), ""]
    if profiles:
        text += ["## Kernel profiles", "", f"One call after a warm-up under torch.profiler; the {PROFILE_ROWS} "
                 "costliest kernels by self time. TFLOP/s: the FLOPs of the product(s) a kernel's name identifies "
                 "(fwd: S and P V; dK/dV: S, dP, dV, dK; dQ: S, dP, dQ), GEMMs of the chunked backend pooled.", ""]
        for case, outcome in profiles.items():
            text.append(f"`{case.label}`" + (f": {outcome['error']}" if "error" in outcome else
                                             f", {outcome['total_ms']:.3g} ms of kernels:"))
            text.append("")
            if "error" not in outcome:
                text += [markdown_table(["kernel", "calls", "ms", "share", "TFLOP/s"], profile_rows(case, outcome)), ""]
    if tuning:
        text += ["## Triton's autotune choices", "", markdown_table(
            ["kernel", "dtypes", "key", "config"],
            [[e["kernel"], "/".join(dict.fromkeys(e["dtypes"])), ", ".join(f"{k}={v}" for k, v in e["key"].items()),
              ", ".join(f"{k}={v}" for k, v in e["config"]["kwargs"].items()) +
              f", warps={e['config']['num_warps']}, stages={e['config']['num_stages']}"] for e in tuning]), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text))


def write_json(path: Path, info: dict, build, tests, results: list[CaseResult], profiles: dict, tuning: list[dict],
               budget_log: list[str], took_s: float) -> None:
    data = {"environment": info, "build": build, "tests": tests, "budget_log": budget_log, "took_s": took_s,
            "results": [{**dataclasses.asdict(r.case), "status": r.status, "reason": r.reason,
                         "median_ms": r.median_s * 1e3 if r.median_s else None, "times_ms": [t * 1e3 for t in r.times_s],
                         "tflops": r.tflops, "peak_mib": r.peak_mib, "wall_s": r.wall_s} for r in results],
            "profiles": [{**dataclasses.asdict(c), **o} for c, o in profiles.items()], "triton_tuning": tuning}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def backend_table_rows(results: list[CaseResult], kind: str, source: str) -> list[dict]:
    """The measured rows of the backends and the math, as attnseg/backend_table.json holds them."""
    rows = []
    for result in results:
        case = result.case
        if result.median_s is None or case.impl not in (*FUSED, "math"):
            continue
        sizes = ({"B": case.batch, "Nq": case.n, "Nk": case.n, "E": E, "Ev": EV} if case.op == "pam"
                 else {"B": case.batch, "C": CAM_C, "N": case.n})
        rows.append({"op": "attention" if case.op == "pam" else "channel_attention", "device": kind,
                     "dtype": case.dtype, "mode": "forward" if case.mode == "fwd" else "training", **sizes,
                     "backend": case.impl, "median_ms": round(result.median_s * 1e3, 4),
                     "peak_mib": round(result.peak_mib, 2), "source": source})
    return rows


def write_tuned(path: Path, info: dict, entries: list[dict], source: str) -> int:
    """Merge ``entries`` into the tuned file of this GPU (same kernel, dtype and key replaced)."""
    try:
        old = json.loads(path.read_text()).get("entries", [])
    except FileNotFoundError:
        old = []
    merged = {tuning_identity(e): e for e in old}
    merged.update({tuning_identity(e): e for e in entries})
    ordered = sorted(merged.values(), key=lambda e: (e["kernel"], e["dtypes"], sorted(e["key"].items())))
    data = {"gpu": info["gpu"], "arch": info["arch"], "triton": info["triton"], "torch": info["torch"],
            "source": source, "entries": ordered}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return len(ordered)


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Build, GPU tests, timings, profiles and the autotune sweep on a "
                                                 "GPU machine, within a time budget (default 9 minutes).",
                                     epilog="See the module docstring for the method and the FLOP convention.")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for everything, the build included (540)")
    parser.add_argument("--test-budget", type=float, default=TEST_BUDGET_S,
                        help=f"seconds for the GPU tests ({TEST_BUDGET_S:.0f})")
    parser.add_argument("--build-timeout", type=float, default=300.0, help="seconds for the build (300)")
    parser.add_argument("--skip-build", action="store_true", help="use the extension as it is")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="default float16,bfloat16,float32")
    parser.add_argument("--flex-dtypes", default=",".join(FLEX_DTYPES),
                        help=f"dtypes FlexAttention is compiled for (default {','.join(FLEX_DTYPES)}: each costs two compiles)")
    parser.add_argument("--output", type=Path, default=None,
                        help="the report (default docs/gpu/<gpu>.md; the JSON beside it)")
    parser.add_argument("--table", type=Path, default=REPO_ROOT / "attnseg" / "backend_table.json",
                        help="auto's table: this GPU's rows replace those of the same key")
    parser.add_argument("--tuned-dir", type=Path, default=REPO_ROOT / "attnseg" / "triton" / "tuned",
                        help="where Triton's choices go (<gpu>.json)")
    parser.add_argument("--plan", action="store_true", help="print the plan and the estimate, run nothing (no GPU needed)")
    parser.add_argument("--dry-run", action="store_true",
                        help="the whole pipeline on the CPU at tiny sizes, outputs under --output's folder "
                             "(default: a temporary folder); no build, no tests")
    parser.add_argument("--gpu-memory", type=float, default=79.0, help="free GiB assumed by --plan (79: an H100)")
    args = parser.parse_args(argv)
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    args.flex_dtypes = [d.strip() for d in args.flex_dtypes.split(",") if d.strip()]
    unknown = [d for d in args.dtypes + args.flex_dtypes if d not in DTYPES]
    if unknown or not args.dtypes:
        parser.error(f"--dtypes: unknown {unknown}; choose from {','.join(DTYPES)}")
    return args


def tuned_module():
    """attnseg/triton/tuned.py loaded from its file: importing the attnseg package would load the
    compiled extension into this process before the build rewrites it (a truncated mapped file)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("attnseg_triton_tuned", REPO_ROOT / "attnseg" / "triton" / "tuned.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The CPU dry run: every step but the build and the tests, at sizes a CPU runs in seconds
DRY_RUN = {"sizes": (48,), "batches": (2,), "sweep_sizes": (40,), "profile_shapes": ((48, 2),),
           "dtypes": ("float32",), "sweep_dtypes": ("float32",), "flex_dtypes": ("float32",)}


def main(argv=None) -> int:
    """Exit status: 0 all ran, 1 a test, the build or a case failed, 2 no CUDA device."""
    args = parse_args(argv)
    medians = measured_medians()
    if args.plan:
        try:
            print_plan(plan_groups(args.dtypes, flex_dtypes=args.flex_dtypes), int(args.gpu_memory * GIB), medians, build=not args.skip_build,
                       test_budget_s=0.0 if args.skip_tests else args.test_budget, budget_s=args.budget)
            sys.stdout.flush()
        except BrokenPipeError:  # `--plan | head`: end quietly, as a Unix filter does
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if not args.dry_run and not torch.cuda.is_available():
        built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        print(f"gpu_check: no CUDA device visible to torch {torch.__version__} ({built}); this command needs a "
              "GPU. `--plan` prints the plan, `--dry-run` runs it on the CPU at tiny sizes.", file=sys.stderr)
        return 2
    return run(args, medians)


def run(args, medians: dict) -> int:
    budget = Budget(args.budget)
    dry = args.dry_run
    device = "cpu" if dry else "cuda"
    info = environment_info(torch.device(device))
    for line in environment_lines(info):
        progress(line)
    groups = plan_groups(**DRY_RUN) if dry else plan_groups(args.dtypes, flex_dtypes=args.flex_dtypes)
    slug = tuned_module().gpu_kind(info["gpu"]) if not dry else "cpu-dry-run"
    output = args.output or (Path(tempfile.mkdtemp(prefix="gpu_check_")) / f"{slug}.md" if dry
                             else REPO_ROOT / "docs" / "gpu" / f"{slug}.md")
    table_path = output.parent / "backend_table.json" if dry else args.table
    tuned_path = (output.parent if dry else args.tuned_dir) / f"{slug}.json"
    free_bytes = 64 * GIB if dry else torch.cuda.mem_get_info()[0]
    workers = {"peers": Worker(device), "main": Worker(device)}
    results: dict = {}
    extra: dict = {}
    state: dict = {}
    payload_extra = {"compile_flex": not dry}
    # 1. the build, and beside it the peers (they need nothing of attnseg)
    peer_groups = [g for g in groups if g.worker == "peers"]

    # the peers may take the build's time, or what the cost model gives them where that is longer
    peer_state: dict = {}
    window = max(BUILD_S if not (dry or args.skip_build) else 0.0,
                 PROCESS_START_S + sum(predicted_group_s(g, medians, free_bytes, peer_state) for g in peer_groups))
    peer_budget = Budget(args.budget if dry else min(window, args.budget), budget.started)
    peer_budget.log = budget.log

    def peers():
        try:
            run_groups(peer_groups, workers, peer_budget, medians, free_bytes, results, state, extra,
                       case_payload=payload_extra)
        finally:
            workers["peers"].close()

    threads = [threading.Thread(target=peers, daemon=True)]
    # and the Triton precompile, on the cores nvcc leaves idle
    precompile: dict = {}
    triton_dtypes = sorted({c.dtype for g in groups for c in g.cases if c.impl == "triton"})
    if triton_dtypes:
        if dry:
            shape = {"n": DRY_RUN["sizes"][0], "arch": 90, "shared_memory": 232448, "batches": DRY_RUN["batches"]}
        else:
            props = torch.cuda.get_device_properties(0)
            shape = {"n": SIZES[0], "arch": props.major * 10 + props.minor, "batches": list(BATCHES),
                     "shared_memory": getattr(props, "shared_memory_per_block_optin", props.shared_memory_per_block)}
        processes = 1 if dry else max(1, min(PRECOMPILE_PROCESSES, (os.cpu_count() or 4) - 4))

        def compile_triton():
            try:
                precompile.update(run_precompile({"dtypes": triton_dtypes, **shape}, processes, device,
                                                 timeout_s=max(min(budget.left() - 60, 240), 10)))
            except Exception as exc:  # the autotuner compiles what is missing
                precompile["failed"] = [f"{type(exc).__name__}: {_first_line(exc)}"]
            progress(f"Triton precompile: {precompile.get('compiled', 0)} of {precompile.get('jobs', '?')} configs "
                     f"compiled{' (a CPU: counted only)' if dry else ''}{', problems: ' + '; '.join(precompile['failed'][:3]) if precompile.get('failed') else ''}")

        threads.append(threading.Thread(target=compile_triton, daemon=True))
    for thread in threads:
        thread.start()
    build = None
    if not dry and not args.skip_build:
        capability = torch.cuda.get_device_capability()
        progress(f"building for sm_{capability[0]}{capability[1]} ({os.cpu_count()} jobs) ...")
        build = build_extension(capability, min(args.build_timeout, max(budget.left(), 10)))
        progress(f"build: {'ok' if build['ok'] else 'FAILED'} in {build['wall_s']:.0f} s")
    for thread in threads:  # the timings must not share the GPU (or the cores) with them
        thread.join()
    # the model's Triton costs from here on: with compiles where the precompile fell short
    state["precompiled"] = dry or (bool(precompile) and precompile.get("compiled", 0) >= 0.9 * precompile.get("jobs", 1))
    # 2. tests
    attnseg = import_attnseg()
    tests = None
    if not dry and not args.skip_tests and budget.fits("tests", min(args.test_budget, 10.0)):
        progress(f"pytest (at most {args.test_budget:.0f} s) ...")
        tests = run_tests(min(args.test_budget, budget.left()), Path(attnseg.__file__).parent)
        progress(test_summary_line(tests))
    # 3-5. timings, profiles, sweep, in one process
    try:
        run_groups([g for g in groups if g.worker == "main"], workers, budget, medians, free_bytes, results, state,
                   extra, case_payload=payload_extra)
    finally:
        workers["main"].close()
    # 6. outputs
    ordered = [results[c] for g in groups if g.kind != "profile" for c in g.cases if c in results]
    profiles = extra.get("profiles", {})
    tuning = extra.get("triton_tuning", [])
    took = budget.seconds - budget.left()
    source = f"{info['gpu']}, benchmarks/gpu_check.py, {time.strftime('%Y-%m-%d')}"
    build_info = {**build, "triton_precompile": precompile} if build else {"triton_precompile": precompile}
    write_report(output, info, build, tests, ordered, profiles, tuning, budget.log, took, precompile)
    write_json(output.with_suffix(".json"), info, build_info, tests, ordered, profiles, tuning, budget.log, took)
    print(f"report: {output} and {output.with_suffix('.json')}")
    kind = attnseg._backends.device_kind(torch.device(device))
    rows = backend_table_rows(ordered, kind, source)
    if rows:
        from backend_table import merge_rows

        print(f"{len(rows)} rows ({kind}) written to {table_path} ({merge_rows(str(table_path), rows)} in all)")
    if tuning:
        print(f"{len(tuning)} Triton choices written to {tuned_path} ({write_tuned(tuned_path, info, tuning, source)} in all)")
    failed = any(r.status == "failed" for r in ordered) or (build is not None and not build["ok"]) or (
        tests is not None and (tests.get("failed") or tests.get("errors") or "problem" in tests))
    print(f"took {took:.0f} s of the {budget.seconds:.0f} s budget; {'something failed' if failed else 'all ran'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
