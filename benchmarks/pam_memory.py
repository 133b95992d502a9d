"""Peak memory and time of DANet position attention: the reference against a fused backend.

The reference (:mod:`attnseg.reference`, the official DANet code) materialises the N×N
attention map (N = H·W): 64 MiB at N = 4,096, 1 GiB at N = 16,384, 4 GiB at N = 32,768 in
fp32, and holds two such maps in the forward, more in the backward. The fused backends never
hold more than a tile of it, so their peak should grow linearly in N, the reference's
quadratically. This script measures both, over a sweep of square-ish feature maps:

* scopes: "op", the attention op alone, ``attnseg.reference.attention`` against
  ``attnseg.attention(..., backend=B)``, fed with the strided [B, N, E] views that the module
  makes of its channel-first convolution outputs (``torch.randn(B, E, N).transpose(1, 2)``);
  and "module", the whole ``attnseg.PositionAttention(C, backend=...)`` with its 1×1
  convolutions and residual.
* modes: "fwd", an inference forward under ``torch.no_grad()``; and "fwd+bwd", a forward with
  inputs (and parameters) that require grad, then ``out.backward(grad_out)`` with a random
  grad_out created with the inputs. Gradients are dropped before every call, so the ones a
  call produces count in its peak.

Defaults: B = 1, C = Ev = 512, E = C/8 = 64 (the DANet head), scale 1, float32, sizes 32², 48²,
64² and 96² (N = 9,216, a 768 crop at stride 8); ``--full`` adds 128² and 128×256 (N = 32,768, a
whole 1024×2048 Cityscapes frame at stride 8). The plot goes to ``pam_memory.png`` unless
``--plot`` or ``--no-plot`` says otherwise. Where
one N×N map of the reference would exceed 2 GiB (so at 128×256) the reference is skipped unless
``--reference-at-huge`` asks for it (it needs several 4 GiB maps and minutes per call there).

Method (see ``_common.PeakMemoryMeter``): every (implementation, scope, mode, size) case runs
in a fresh process, forked from a forkserver that imported torch but never ran an op. The child
creates the inputs (module, grad_out), runs ``--warmups`` untimed calls (so one-time
allocations, thread pools for instance, do not count), then ``--repeats`` calls, each timed with
``time.perf_counter`` and each measured for memory; the table shows the median time and the
largest peak. Peak memory is the peak ABOVE the inputs:

* CPU (Linux): before each call ``gc.collect()``, ``malloc_trim(0)`` (glibc would otherwise keep
  blocks freed by the warm-up resident, hiding their reuse), "5" written to
  ``/proc/self/clear_refs`` (resets the peak resident set VmHWM to the current VmRSS), baseline
  = VmRSS; after the call, peak = VmHWM − baseline. If clear_refs cannot be written, the
  fallback is ru_maxrss − VmRSS on the first call of the process (one-time allocations included),
  and the header says so.
* CUDA: ``torch.cuda.reset_peak_memory_stats()``, then max_memory_allocated − memory_allocated.

Each sweep first validates the meter in a child on allocations of known size: a 1024 MiB tensor
must read ~1024 MiB, and a 16 MiB tensor allocated right after an equal one was freed (the trap
that a warm-up sets) ~16 MiB. On the development machine (Linux 6.18, glibc) they read 1028 MiB
and 16.0 MiB (0 MiB without the malloc_trim), and the reference op's forward at 64×64 reads
136 MiB: its two 64 MiB maps (logits and softmax) and the 8 MiB output, as it should.
Both implementations run with the same ``torch.get_num_threads()``.
A case whose timed calls pass ``--time-budget`` seconds stops repeating early (one timed call
always runs). On the CPU a case may allocate at most ``--memory-limit-gib`` (default: the memory
available at start), so one that does not fit fails cleanly instead of waking the OOM killer.
A case that fails (allocation failure, killed child, timeout) shows "failed: reason" in its row
and the sweep goes on; the exit status is then 1. A backend that is not available is never
replaced by another: its rows say "skipped" and the reason is printed. Ctrl-C or SIGTERM stops
the sweep and still prints what was measured.

Usage (from the repository root):

    python benchmarks/pam_memory.py                        # 32² to 96², native vs reference (~2 min on 2 cores)
    python benchmarks/pam_memory.py --full                 # 32² to 128×256 (~20 min on 2 cores)
    python benchmarks/pam_memory.py --quick                # CI: 16², 24², 32², 1 repeat
    python benchmarks/pam_memory.py --sizes 96x96,128x128 --scopes op --modes fwd+bwd
    python benchmarks/pam_memory.py --csv benchmarks/results/pam.csv --plot benchmarks/results/pam.png
    python benchmarks/pam_memory.py --quick --backend reference   # plumbing test without _C
    python benchmarks/pam_memory.py --dtype bfloat16 --sizes 96x96 --scopes op   # bf16 against its roofline

The "roofline" column is the time the fused case's FLOPs (``Case.useful_flop``) would take at
the GEMM throughput of the sweep's dtype measured in the same run (``_common.GemmRoofline``:
torch.mm of 2048 x 2048 matrices, same threads, before and after the sweep, the faster taken).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import signal
import statistics
import sys
import time
from typing import Callable

import torch

from _common import (
    GemmRoofline,
    IsolatedRunner,
    attnseg_used_line,
    PeakMemoryMeter,
    PlotPanel,
    available_memory_bytes,
    check_memory_meter,
    format_bytes,
    format_mib,
    format_ratio,
    format_seconds,
    format_table,
    forward_call,
    import_attnseg,
    machine_load_note,
    measure_call,
    parse_choices,
    parse_sizes,
    plot_loglog,
    progress,
    write_csv,
)

attnseg = import_attnseg()

DEFAULT_SIZES = "32x32,48x48,64x64,96x96"  # about 2 minutes on 2 CPU cores, seconds on a GPU
FULL_SIZES = "32x32,48x48,64x64,96x96,128x128,128x256"  # --full: up to a whole Cityscapes frame
QUICK_SIZES = "16x16,24x24,32x32"
DEFAULT_PLOT = "pam_memory.png"  # written to the current folder unless --plot says otherwise
SCOPES = ("op", "module")
MODES = ("fwd", "fwd+bwd")
FUSED_BACKENDS = ("native", "triton", "chunked", "auto", "reference")  # "reference" only to test the plumbing
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
REFERENCE_MAP_LIMIT_BYTES = 2 * 1024**3  # beyond one map this big the reference needs --reference-at-huge
BASELINE = "reference"


@dataclasses.dataclass(frozen=True)
class Case:
    """One measurement; ``impl`` is "reference" (the baseline) or the fused backend's name."""

    impl: str
    baseline: bool
    scope: str
    mode: str
    height: int
    width: int
    batch: int
    channels: int
    reduction: int
    dtype: str
    device: str
    threads: int
    repeats: int
    warmups: int
    time_budget_s: float

    @property
    def pixels(self) -> int:
        return self.height * self.width

    @property
    def useful_flop(self) -> int:
        """The matmul FLOPs of the case (1 multiply-add = 2): attention 2·B·N²·(E + Ev) forward, and
        the module's 1×1 convolutions 2·B·N·C·(2E + C); three times that for forward + backward."""
        b, n, c = self.batch, self.pixels, self.channels
        e = c // self.reduction
        forward = 2 * b * n * n * (e + c) + (2 * b * n * c * (2 * e + c) if self.scope == "module" else 0)
        return forward if self.mode == "fwd" else 3 * forward

    @property
    def name(self) -> str:
        """The implementation's name in output; tells the two apart under --backend reference."""
        return self.impl if self.baseline or self.impl != BASELINE else "reference (as fused)"

    @property
    def label(self) -> str:
        return f"N={self.pixels} ({self.height}x{self.width}) {self.scope} {self.mode} {self.name}"


# ---------------------------------------------------------------------------------------------
# The child: build one workload and measure it
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Workload:
    call: Callable[[], None]  # one forward (or forward and backward)
    drop_grads: Callable[[], None]  # set every leaf's .grad to None


def build_workload(case: Case) -> Workload:
    """Create the inputs of ``case`` (and its module and grad_out) and the call to measure."""
    device, dtype = torch.device(case.device), DTYPES[case.dtype]
    train = case.mode == "fwd+bwd"
    b, c, n = case.batch, case.channels, case.pixels
    e = c // case.reduction
    torch.manual_seed(0)
    if case.scope == "op":
        # Channel-first, as the 1×1 convolutions produce them; the [B, N, E] views are strided.
        q, k = (torch.randn(b, e, n, device=device, dtype=dtype, requires_grad=train) for _ in range(2))
        v = torch.randn(b, c, n, device=device, dtype=dtype, requires_grad=train)
        if case.baseline:
            attend = attnseg.reference.attention
        else:
            attend = functools.partial(attnseg.attention, backend=case.impl)
        forward = lambda: attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 1.0)  # noqa: E731
        leaves = [q, k, v]
        out_shape = (b, n, c)
    else:
        backend = BASELINE if case.baseline else case.impl
        module = attnseg.PositionAttention(c, reduction=case.reduction, backend=backend).to(device, dtype)
        with torch.no_grad():
            module.gamma.fill_(0.5)  # a trained gamma is not 0: nothing may be short-cut on it
        x = torch.randn(b, c, case.height, case.width, device=device, dtype=dtype, requires_grad=train)
        forward = lambda: module(x)  # noqa: E731
        leaves = [x, *module.parameters()]
        out_shape = (b, c, case.height, case.width)

    grad_out = torch.randn(out_shape, device=device, dtype=dtype) if train else None
    return Workload(*forward_call(forward, leaves, grad_out))


def run_case(payload: dict) -> dict:
    """Child entry point: measure one case, return its peak (MiB) and times (s)."""
    case = Case(**payload)
    torch.set_num_threads(case.threads)
    meter = PeakMemoryMeter(torch.device(case.device))
    workload = build_workload(case)
    measured = measure_call(workload.call, meter, repeats=case.repeats, warmups=case.warmups,
                            before_each=workload.drop_grads, time_budget_s=case.time_budget_s)
    return {"peak_mib": measured.peak_mib, "times_s": measured.times_s, "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------
# The parent: plan, run, report
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CaseResult:
    case: Case
    status: str  # "ok", "skipped" or "failed"
    reason: str = ""  # why skipped or failed (short, for the table)
    detail: str = ""  # the full message, for the notes under the table
    peak_mib: float | None = None
    times_s: list[float] = dataclasses.field(default_factory=list)
    threads: int | None = None

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.times_s) if self.times_s else None

    def cell(self, text: str) -> str:
        """``text`` for a measured case, else "skipped" or "failed: reason"."""
        if self.status == "failed":
            return f"failed: {self.reason}"
        return text if self.status == "ok" else self.status




def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Peak memory above the inputs and time of DANet's position attention: "
                    "the reference (materialises N x N) against a fused attnseg backend.",
        epilog="Each case runs in a fresh process; see the module docstring for the method.",
    )
    parser.add_argument("--sizes", type=parse_sizes, default=None,
                        help=f"feature-map sizes HxW, comma-separated (default {DEFAULT_SIZES})")
    parser.add_argument("--quick", action="store_true",
                        help=f"CI mode: sizes {QUICK_SIZES}, 1 repeat, no plot (unless --sizes/--repeats say otherwise)")
    parser.add_argument("--full", action="store_true",
                        help=f"the full sweep, sizes {FULL_SIZES} (about 20 minutes on 2 CPU cores)")
    parser.add_argument("--backend", choices=FUSED_BACKENDS, default="native",
                        help="the fused backend compared with the reference (default native; 'reference' "
                             "compares the reference with itself, to test this script)")
    parser.add_argument("--scopes", type=parse_choices(SCOPES), default=list(SCOPES),
                        help="op (the attention op alone), module (PositionAttention); default op,module")
    parser.add_argument("--modes", type=parse_choices(MODES), default=list(MODES),
                        help="fwd (no_grad inference), fwd+bwd (forward and backward); default both")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default cuda if available, else cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per case, median shown (default 3, --quick 1)")
    parser.add_argument("--time-budget", type=float, default=60.0,
                        help="stop repeating a case once its timed calls add up to this many seconds "
                             "(at least one always runs; default 60, 0 = always --repeats)")
    parser.add_argument("--warmups", type=int, default=1, help="untimed calls before them (default 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for both implementations (default torch.get_num_threads())")
    parser.add_argument("--batch", type=int, default=1, help="B (default 1)")
    parser.add_argument("--channels", type=int, default=512, help="C = Ev (default 512, the DANet head)")
    parser.add_argument("--reduction", type=int, default=8, help="E = C / reduction (default 8)")
    parser.add_argument("--reference-at-huge", action="store_true",
                        help="also run the reference where one N x N map exceeds 2 GiB (e.g. 128x256: "
                             "several 4 GiB maps and minutes per call)")
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="seconds per case before it is failed (default 1800)")
    parser.add_argument("--memory-limit-gib", type=float, default=None,
                        help="CPU: memory a case may allocate before it fails with 'out of memory' instead "
                             "of waking the OOM killer (default: the MemAvailable at start; 0: no limit)")
    parser.add_argument("--csv", metavar="PATH", help="write one row per case")
    parser.add_argument("--plot", metavar="PATH.png", default=None,
                        help=f"memory and time against N, log-log (needs matplotlib; default {DEFAULT_PLOT}, "
                             "none with --quick)")
    parser.add_argument("--no-plot", action="store_true", help="write no plot")
    args = parser.parse_args(argv)
    if args.quick and args.full:
        parser.error("--quick and --full: choose one")
    if args.sizes is None:
        args.sizes = parse_sizes(QUICK_SIZES if args.quick else FULL_SIZES if args.full else DEFAULT_SIZES)
    if args.plot is None and not args.quick:
        args.plot = DEFAULT_PLOT
    if args.no_plot:
        args.plot = None
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.repeats < 1 or args.warmups < 1:
        parser.error("--repeats and --warmups must be >= 1")
    if args.channels % args.reduction:
        parser.error(f"--channels ({args.channels}) must be divisible by --reduction ({args.reduction})")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if args.threads is None:
        args.threads = torch.get_num_threads()
    return args


def backend_unavailable_reason(backend: str, device: str) -> str | None:
    if backend == "auto":  # always runs: it chooses among what is available
        return None
    try:
        return attnseg.available_backends(device)[backend]
    except Exception as exc:  # a broken backend module must not stop the baseline's rows
        return f"{type(exc).__name__}: {exc}"


def plan_cases(args) -> list[CaseResult]:
    """Every case of the sweep; the ones that cannot run come back already marked skipped."""
    fused_unavailable = backend_unavailable_reason(args.backend, args.device)
    element_size = torch.empty((), dtype=DTYPES[args.dtype]).element_size()
    planned = []
    for height, width in args.sizes:
        for scope in args.scopes:
            for mode in args.modes:
                for impl, baseline in ((BASELINE, True), (args.backend, False)):
                    case = Case(impl, baseline, scope, mode, height, width, args.batch, args.channels,
                                args.reduction, args.dtype, args.device, args.threads, args.repeats, args.warmups,
                                args.time_budget)
                    map_bytes = args.batch * case.pixels**2 * element_size
                    if not baseline and fused_unavailable:
                        reason = f"backend {args.backend!r} unavailable on {args.device}: {fused_unavailable}"
                        planned.append(CaseResult(case, "skipped", reason))
                    elif impl == BASELINE and map_bytes > REFERENCE_MAP_LIMIT_BYTES and not args.reference_at_huge:
                        reason = (f"reference skipped where one N x N map exceeds 2 GiB (here {format_bytes(map_bytes)}"
                                  " each, several alive at once); --reference-at-huge runs it")
                        planned.append(CaseResult(case, "skipped", reason))
                    else:
                        planned.append(CaseResult(case, "pending"))
    return planned


def run_sweep(planned: list[CaseResult], runner: IsolatedRunner, args) -> None:
    """Run the pending cases one at a time, filling in their results."""
    headroom = None
    if args.device == "cpu":
        limit_gib = args.memory_limit_gib
        headroom = available_memory_bytes() if limit_gib is None else int(limit_gib * 1024**3) or None
    to_run = [result for result in planned if result.status == "pending"]
    # time left, estimated from the time so far and each case's cost model: its N² work (the
    # reference's and the fused backends' time grow as N²), the backward three times the forward
    costs = [r.case.batch * r.case.pixels ** 2 * (3 if r.case.mode == "fwd+bwd" else 1) for r in to_run]
    started = time.perf_counter()
    for index, result in enumerate(to_run, 1):
        done = sum(costs[: index - 1])
        left = ""
        if done:
            seconds = (time.perf_counter() - started) * sum(costs[index - 1:]) / done
            left = f", about {seconds:.0f} s left"
        progress(f"[{index}/{len(to_run)}{left}] {result.case.label} ...", end="")
        try:
            outcome = runner.run(run_case, dataclasses.asdict(result.case), timeout_s=args.timeout,
                                 memory_headroom_bytes=headroom)
        except KeyboardInterrupt:  # keep what was measured: report it, mark the rest
            progress(" interrupted")
            for unfinished in to_run[index - 1:]:
                unfinished.status, unfinished.reason = "skipped", "sweep interrupted (Ctrl-C or SIGTERM)"
            return
        if outcome.result is not None:
            result.status = "ok"
            result.peak_mib = outcome.result["peak_mib"]
            result.times_s = outcome.result["times_s"]
            result.threads = outcome.result["threads"]
            summary = f"peak {format_mib(result.peak_mib)} MiB, median {format_seconds(result.median_s)}"
        else:
            result.status, result.reason, result.detail = "failed", outcome.failure, outcome.detail or ""
            summary = f"failed: {outcome.failure}"
        progress(f" {outcome.wall_s:.2f} s ({summary})")


def results_table(planned: list[CaseResult], fused: str, roofline: GemmRoofline) -> str:
    by_key = {(r.case.pixels, r.case.height, r.case.width, r.case.scope, r.case.mode, r.case.baseline): r
              for r in planned}
    header = ["N", "H x W", "scope", "mode", "ref MiB", f"{fused} MiB", "mem ratio",
              "ref time", f"{fused} time", "time ratio", "roofline", f"{fused} of roof"]
    rows = []
    for (n, h, w, scope, mode, baseline), ref in by_key.items():
        if not baseline:
            continue
        new = by_key[(n, h, w, scope, mode, False)]
        roof_s = roofline.seconds(new.case.useful_flop)
        rows.append([
            f"{n:,}", f"{h}x{w}", scope, mode,
            ref.cell(format_mib(ref.peak_mib or 0)), new.cell(format_mib(new.peak_mib or 0)),
            format_ratio(new.peak_mib, ref.peak_mib),
            ref.cell(format_seconds(ref.median_s or 0)), new.cell(format_seconds(new.median_s or 0)),
            format_ratio(new.median_s, ref.median_s),
            format_seconds(roof_s) if roof_s else "-", format_ratio(roof_s, new.median_s),
        ])
    return format_table(header, rows, align="><<<>>>>>>>>")


def growth_table(planned: list[CaseResult]) -> str | None:
    """Peak bytes per pixel at the smallest and largest N, and the fitted exponent of peak ~ N^p."""
    series: dict[tuple[str, str, str], list[tuple[int, float]]] = {}
    for result in planned:
        if result.status == "ok" and result.peak_mib and result.peak_mib > 0:
            key = (result.case.scope, result.case.mode, result.case.name)
            series.setdefault(key, []).append((result.case.pixels, result.peak_mib * 1024**2))
    rows = []
    for (scope, mode, impl), points in series.items():
        if len({n for n, _ in points}) < 2:
            continue
        points.sort()
        (n_lo, peak_lo), (n_hi, peak_hi) = points[0], points[-1]
        rows.append([scope, mode, impl, f"{format_bytes(peak_lo / n_lo)}/px at N={n_lo:,}",
                     f"{format_bytes(peak_hi / n_hi)}/px at N={n_hi:,}",
                     f"N^{loglog_slope(points):.2f}", f"N^{loglog_slope(points[-2:]):.2f}"])
    if not rows:
        return None
    header = ["scope", "mode", "impl", "smallest N", "largest N", "fit: peak ~", "two largest N"]
    return format_table(header, rows, align="<<<>>>>")


def loglog_slope(points: list[tuple[int, float]]) -> float:
    """Least-squares p of peak ~ N^p through (N, peak) points (at least two distinct N)."""
    logs = [(math.log(n), math.log(peak)) for n, peak in points]
    mean_x = sum(x for x, _ in logs) / len(logs)
    mean_y = sum(y for _, y in logs) / len(logs)
    return sum((x - mean_x) * (y - mean_y) for x, y in logs) / sum((x - mean_x) ** 2 for x, _ in logs)


def csv_rows(planned: list[CaseResult]) -> list[dict]:
    return [{
        "n": r.case.pixels, "height": r.case.height, "width": r.case.width, "scope": r.case.scope,
        "mode": r.case.mode, "impl": r.case.impl, "role": "baseline" if r.case.baseline else "fused",
        "device": r.case.device, "dtype": r.case.dtype, "batch": r.case.batch, "channels": r.case.channels,
        "key_channels": r.case.channels // r.case.reduction, "threads": r.threads or r.case.threads,
        "timed_calls": len(r.times_s), "status": r.status, "reason": r.detail or r.reason,
        "peak_mib": "" if r.peak_mib is None else f"{r.peak_mib:.3f}",
        "bytes_per_pixel": "" if r.peak_mib is None else f"{r.peak_mib * 1024**2 / r.case.pixels:.1f}",
        "median_s": "" if r.median_s is None else f"{r.median_s:.6f}",
        "times_s": " ".join(f"{t:.6f}" for t in r.times_s),
    } for r in planned]


def write_plot(path: str, planned: list[CaseResult], args) -> str | None:
    colors = {True: "tab:blue", False: "tab:red"}
    lines = {"fwd": "-", "fwd+bwd": "--"}
    memory_row, time_row = [], []
    for scope in args.scopes:
        memory = PlotPanel(f"{scope}: peak memory above inputs", "N = H*W", "MiB", {})
        timing = PlotPanel(f"{scope}: median time", "N = H*W", "seconds", {})
        for result in planned:
            if result.case.scope != scope or result.status != "ok":
                continue
            label = f"{result.case.name} {result.case.mode}"
            style = {"color": colors[result.case.baseline], "linestyle": lines[result.case.mode], "marker": "o"}
            for panel, value in ((memory, result.peak_mib), (timing, result.median_s)):
                xs, ys = panel.series.setdefault(label, ([], []))
                if value and value > 0:
                    xs.append(result.case.pixels)
                    ys.append(value)
                panel.styles[label] = style
        memory_row.append(memory)
        time_row.append(timing)
    title = (f"DANet PAM, reference vs {args.backend}: B={args.batch} C={args.channels} "
             f"E={args.channels // args.reduction} {args.dtype} on {args.device}")
    return plot_loglog(path, [memory_row, time_row], title)



def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def print_header(args, runner: IsolatedRunner) -> None:
    """What is compared, how, and the meter's check on allocations of known size."""
    e = args.channels // args.reduction
    print(f"DANet position attention: reference (attnseg.reference, materialises N x N) vs {args.backend}")
    print(f"attnseg {attnseg.__version__}; torch {torch.__version__}")
    print(attnseg_used_line(attnseg, runner))
    print(f"device {args.device}, {args.dtype}, B={args.batch} C=Ev={args.channels} E={e} scale=1; "
          f"torch threads {args.threads} for both implementations")
    print(f"each case in a fresh process ({runner.start_method}); {args.warmups} warm-up call(s), then "
          f"{args.repeats} timed call(s) (fewer past --time-budget {args.time_budget:g} s): median time, largest peak")
    load = machine_load_note()
    if load:
        print(load)
    fused_unavailable = backend_unavailable_reason(args.backend, args.device)
    if fused_unavailable:
        print(f"WARNING: the {args.backend} rows are skipped, not replaced: backend {args.backend!r} is unavailable "
              f"on {args.device}: {fused_unavailable}")
    if args.backend == BASELINE:
        print("note: --backend reference compares the reference with itself (the op scope through "
              "attnseg.attention, which also computes the logsumexp): a test of this script, not a result")
    check = runner.run(check_memory_meter, args.device, timeout_s=300)
    if check.result is None:
        print(f"WARNING: the memory meter's check failed ({check.failure}: {check.detail or ''})")
    else:
        print(f"peak memory above the inputs: {check.result['method']}")
        readings = "; ".join(f"{label}: {measured:.1f} MiB" for label, _, measured in check.result["checks"])
        print(f"meter check on known allocations: {readings}")
        for label, expected, measured in check.result["checks"]:
            if not abs(measured - expected) <= max(0.05 * expected, 2.0):
                print(f"WARNING: the meter read {measured:.1f} MiB for a {label} ({expected:.0f} MiB expected): "
                      "peak numbers below are not trustworthy")
    print(flush=True)


def print_report(planned: list[CaseResult], args, roofline: GemmRoofline) -> None:
    """The results table, the growth table and the notes (skips, failures, short cases)."""
    print(results_table(planned, args.backend, roofline))
    print("mem ratio and time ratio: fused / reference (below 1 is better)")
    print(f"{roofline.describe()}; FLOPs: {' '.join(Case.useful_flop.__doc__.split(':', 1)[1].split())}")
    growth = growth_table(planned)
    if growth:
        print()
        print("Growth of peak memory with N (linear: constant bytes/pixel, exponent ~1; the reference's "
              "N x N maps make it quadratic, exponent -> 2):")
        print(growth)
    notes = sorted({r.reason for r in planned if r.status == "skipped"})
    notes += [f"{r.case.label} failed: {r.detail or r.reason}" for r in planned if r.status == "failed"]
    cut_short = [r for r in planned if r.status == "ok" and len(r.times_s) < args.repeats]
    if cut_short:
        fewest = min(len(r.times_s) for r in cut_short)
        notes.append(f"{len(cut_short)} case(s) ran fewer than {args.repeats} timed calls (at least {fewest}): "
                     f"their calls passed --time-budget {args.time_budget:g} s")
    threads_seen = sorted({r.threads for r in planned if r.threads is not None})
    if threads_seen and threads_seen != [args.threads]:
        notes.append(f"WARNING: the children ran with {threads_seen} torch threads, {args.threads} were asked for")
    if notes:
        print()
        print("Notes:")
        for note in notes:
            print(f"  - {note}")


def main(argv=None) -> int:
    """Run the sweep; exit status 1 if a case failed (skipped cases do not count)."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # a CI timeout: report what was measured, like Ctrl-C
    started = time.perf_counter()
    planned = plan_cases(args)
    runner = IsolatedRunner(preload=("torch", "attnseg"))
    print_header(args, runner)
    roofline = GemmRoofline(runner, args.device, args.dtype, args.threads)
    roofline.measure()
    run_sweep(planned, runner, args)
    roofline.measure()
    print_report(planned, args, roofline)
    if args.csv:
        write_csv(args.csv, csv_rows(planned))
        print(f"\nCSV written to {args.csv}")
    if args.plot:
        problem = write_plot(args.plot, planned, args)
        print(f"\nplot not written: {problem}" if problem else f"\nplot written to {args.plot}")
    print(f"\nsweep took {time.perf_counter() - started:.1f} s")
    if any(r.status == "failed" for r in planned):
        return 1
    # CI (ATTNSEG_REQUIRE_NATIVE=1) needs every fused row measured: a fused backend that is
    # unavailable skips its rows, which must not pass there
    fused_skipped = [r for r in planned if r.status == "skipped" and not r.case.baseline]
    if os.environ.get("ATTNSEG_REQUIRE_NATIVE") == "1" and fused_skipped:
        print(f"\nATTNSEG_REQUIRE_NATIVE=1: {len(fused_skipped)} {args.backend} row(s) were skipped, not measured")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
