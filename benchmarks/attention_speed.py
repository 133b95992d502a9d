"""Speed of the attention op out = softmax(q kᵀ · scale) v: attnseg's backends, the reference, SDPA.

Rows ("impls"), all fed the same input tensors:

* "triton": ``attnseg.attention(q, k, v, scale, backend="triton")``. CUDA only here: on the CPU
  Triton runs only under its interpreter (TRITON_INTERPRET=1), far too slow to time.
* "native": ``attnseg.attention(..., backend="native")``, the compiled extension.
* "chunked": ``attnseg.attention(..., backend="chunked")``, queries in chunks on torch's GEMMs.
* "reference": ``attnseg.reference.attention``, which materialises the Nq×Nk map: the baseline.
* "sdpa": ``torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)`` on the same
  tensors seen as [B, 1, N, E] (a view: SDPA's fused kernels take only 4-D inputs). PyTorch picks
  its kernel; the notes say which one it picked. On the CPU, Ev ≠ E means its math path, which
  materialises the map. On CUDA the memory-efficient kernel handles Ev ≠ E, but every fused SDPA
  kernel needs stride(-1) == 1, so with the default channel-first views it falls back to math too;
  ``--layout contiguous`` gives every row contiguous [B, N, E] inputs instead.

A backend that cannot run is never replaced by another: its rows are skipped and the reason printed.

Workload: q [B, Nq, E], k [B, Nk, E], v [B, Nk, Ev] with Nq = Nk = N = H·W; by default DANet's
position attention: B = 1, E = 64, Ev = 512, scale = 1, N = 32², 48², 64², 96², 128². With the
default ``--layout strided`` the inputs are the [B, N, E] views the PAM module makes of its
channel-first convolution outputs (``torch.randn(B, E, N).transpose(1, 2)``). Modes: "fwd", a
forward under ``torch.no_grad()``; "fwd+bwd", a forward with inputs that require grad and
``out.backward(grad_out)`` (grad_out made with the inputs; gradients dropped before each call).

Method: every (size, mode, impl) case runs in a fresh process (``_common.IsolatedRunner``):
``--warmups`` untimed calls, then ``--repeats`` timed calls (fewer once they pass
``--time-budget`` seconds); the table shows the median. CUDA: each call timed by
``torch.cuda.Event``s recorded around it, the device synchronized before and after. CPU:
``time.perf_counter`` to the end of the call, all rows with the same ``--threads``.

Peak memory above the inputs (``_common.PeakMemoryMeter``, the largest over the timed calls):
CUDA, ``torch.cuda.max_memory_allocated() - memory_allocated()`` at the start of the call; CPU,
the same fresh-process VmHWM - VmRSS meter as pam_memory.py (gc + malloc_trim, VmHWM reset via
/proc/self/clear_refs before each call).

Throughput counts USEFUL FLOPs, the reference's matmul count, for every row, so TFLOP/s compare
like with like (one multiply-add = 2 FLOPs; softmax and exponentials not counted):

* fwd:     2·B·Nq·Nk·E (q kᵀ) + 2·B·Nq·Nk·Ev (P v)
* fwd+bwd: fwd + 2·B·Nq·Nk·(2E + 2Ev) (dV = Pᵀ dO, dP = dO vᵀ, dQ = dS k, dK = dSᵀ q)
  = 3 × fwd. Fused kernels also recompute S = q kᵀ in the backward (another 2·B·Nq·Nk·E);
  that is not counted, so their TFLOP/s are what the same time would mean for the reference.

"vs ref" is time / the reference's time for the same size and mode, in the same run.
"roofline" is the time the case's useful FLOPs would take at the GEMM throughput of its dtype,
measured in the same run (``_common.GemmRoofline``: torch.mm of 2048 x 2048 matrices, same threads
and device, before and after the sweep, the faster taken); "of roof" = roofline / median time.
Since the recomputed S is not counted, a fused fwd+bwd row's "of roof" cannot exceed
3(E + Ev) / (3(E + Ev) + E) even with every GEMM at torch.mm's rate and the softmax free (0.964 at
E = 64, Ev = 512; 0.857 at E = Ev); the table's footer prints it.

    python benchmarks/attention_speed.py --device cpu --dtype bfloat16 --sizes 96x96 --impls native

On a host whose speed drifts (a shared or virtual machine: torch.mm itself can read 30 % apart
from one minute to the next) the sweep's two readings say little about the minute a case ran in.
``--paired-roofline`` reads torch.mm (the faster of 2 calls) inside each case's process before
every timed call and after the last, judges each call against the faster of the two readings
around it, and shows the medians over the calls (``_common.PairedGemmProbe``):

    python benchmarks/attention_speed.py --device cpu --sizes 96x96 --impls native --repeats 9 --paired-roofline

Usage (from the repository root):

    python benchmarks/attention_speed.py                   # CUDA if available, else CPU
    python benchmarks/attention_speed.py --quick           # CI: tiny sizes, 1 repeat (< 1 min on CPU)
    python benchmarks/attention_speed.py --sizes 64x64,128x128 --modes fwd --impls native,reference
    python benchmarks/attention_speed.py --csv benchmarks/results/speed.csv --plot benchmarks/results/speed.png
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from _common import (
    GEMM_ROOFLINE_SIZE,
    PAIRED_GEMM_CALLS,
    GemmRoofline,
    IsolatedRunner,
    PairedGemmProbe,
    PeakMemoryMeter,
    PlotPanel,
    attnseg_used_line,
    available_memory_bytes,
    format_mib,
    format_ratio,
    format_seconds,
    format_table,
    import_attnseg,
    machine_load_note,
    measure_call,
    paired_of_roof,
    parse_choices,
    parse_sizes,
    plot_loglog,
    progress,
    write_csv,
)

attnseg = import_attnseg()

DEFAULT_SIZES = "32x32,48x48,64x64,96x96,128x128"
QUICK_SIZES = "8x8,16x16,24x24"
IMPLS = ("triton", "native", "chunked", "reference", "sdpa")
MODES = ("fwd", "fwd+bwd")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
BASELINE = "reference"
FUSED_IMPLS = ("triton", "native", "chunked")
# Every product of these is a library GEMM in the input dtype, so their time follows torch.mm's rate
# in it (0.2-3 GFLOP/s for bf16 on a CPU without bf16 instructions): --max-case-s applies to them.
GEMM_BOUND_IMPLS = ("chunked", "reference")  # their backward recomputes S = q kᵀ
CASE_TIMEOUT_S = 1800.0
FLOP_CONVENTION = ("useful FLOPs (the reference's matmuls, 1 multiply-add = 2 FLOPs, softmax not counted), "
                   "the same count for every row: fwd 2·B·N²·(E + Ev); fwd+bwd 3× that, "
                   "the backward's 2·B·N²·(2E + 2Ev) added (fused kernels' recomputed q kᵀ not counted)")


@dataclasses.dataclass(frozen=True)
class Case:
    impl: str
    mode: str
    height: int
    width: int
    batch: int
    e: int
    ev: int
    scale: float
    layout: str
    dtype: str
    device: str
    threads: int
    repeats: int
    warmups: int
    time_budget_s: float
    paired_roofline: bool = False

    @property
    def n(self) -> int:
        return self.height * self.width

    @property
    def useful_flop(self) -> int:
        forward = 2 * self.batch * self.n * self.n * (self.e + self.ev)
        if self.mode == "fwd":
            return forward
        return forward + 2 * self.batch * self.n * self.n * (2 * self.e + 2 * self.ev)

    @property
    def recompute_ceiling(self) -> float | None:
        """The most "of roof" this case can show, for the fused impls' forward + backward: their
        backward recomputes S = q kᵀ (2·B·N²·E FLOPs that useful_flop leaves out), so even at the
        GEMM roofline the case takes (useful + recomputed) FLOPs: 3(E + Ev) / (3(E + Ev) + E). That
        is for S recomputed once, as the CPU kernels do; a GPU backward that recomputes S per
        kernel sits lower still. None for fwd, for the reference (it keeps P for its backward) and
        for sdpa (whether it recomputes depends on the kernel it picks)."""
        if self.mode == "fwd" or self.impl not in FUSED_IMPLS:
            return None
        return self.useful_flop / (self.useful_flop + 2 * self.batch * self.n * self.n * self.e)

    @property
    def label(self) -> str:
        return f"N={self.n} ({self.height}x{self.width}) {self.mode} {self.impl}"


# ---------------------------------------------------------------------------------------------
# The child: build one case's inputs and measure it
# ---------------------------------------------------------------------------------------------


def sdpa(q, k, v, scale: float):
    """SDPA on [B, 1, N, E] views of the [B, N, E] inputs (its fused kernels want 4-D)."""
    return F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), scale=scale).squeeze(1)


def sdpa_kernel_choice(q, k, v, scale: float) -> str:
    """The SDPA kernel PyTorch picks for these inputs (private API: "unknown" if it is gone)."""
    try:
        from torch.nn.attention import SDPBackend

        choice = torch._fused_sdp_choice(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), scale=scale)
        return SDPBackend(choice).name.lower()
    except Exception as exc:
        return f"unknown ({type(exc).__name__})"


def make_inputs(case: Case):
    """q, k, v as [B, N, E] / [B, N, Ev] views (strided: of channel-first tensors), and the leaves."""
    device, dtype = torch.device(case.device), DTYPES[case.dtype]
    grad = case.mode == "fwd+bwd"
    torch.manual_seed(0)
    if case.layout == "strided":
        leaves = [torch.randn(case.batch, c, case.n, device=device, dtype=dtype, requires_grad=grad)
                  for c in (case.e, case.e, case.ev)]
        return [leaf.transpose(1, 2) for leaf in leaves], leaves
    leaves = [torch.randn(case.batch, case.n, c, device=device, dtype=dtype, requires_grad=grad)
              for c in (case.e, case.e, case.ev)]
    return leaves, leaves


def run_case(payload: dict) -> dict:
    """Child entry point: measure one case; returns its times (s), peak (MiB) and notes."""
    case = Case(**payload)
    torch.set_num_threads(case.threads)
    (q, k, v), leaves = make_inputs(case)
    attend = {
        "triton": functools.partial(attnseg.attention, backend="triton"),
        "native": functools.partial(attnseg.attention, backend="native"),
        "chunked": functools.partial(attnseg.attention, backend="chunked"),
        "reference": attnseg.reference.attention,
        "sdpa": sdpa,
    }[case.impl]
    if case.mode == "fwd":
        def call():
            with torch.no_grad():
                attend(q, k, v, case.scale)
    else:
        grad_out = torch.randn(case.batch, case.n, case.ev, device=q.device, dtype=q.dtype)

        def call():
            attend(q, k, v, case.scale).backward(grad_out)

    probe = PairedGemmProbe(q.device, q.dtype) if case.paired_roofline else None

    def before_each():  # outside the timing and the memory measurement
        for leaf in leaves:
            leaf.grad = None
        if probe:
            probe.read()

    meter = PeakMemoryMeter(torch.device(case.device))
    measured = measure_call(call, meter, repeats=case.repeats, warmups=case.warmups, before_each=before_each,
                            time_budget_s=case.time_budget_s, cuda_events=case.device == "cuda")
    if probe:
        probe.read()
    kernel = sdpa_kernel_choice(q, k, v, case.scale) if case.impl == "sdpa" else None
    return {"times_s": measured.times_s, "peak_mib": measured.peak_mib, "sdpa_kernel": kernel,
            "paired_flop_per_s": probe.pair(measured.times_s) if probe else [],
            "paired_gemm_size": probe.size if probe else None}


# ---------------------------------------------------------------------------------------------
# The parent: plan, run, report
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CaseResult:
    case: Case
    status: str = "pending"  # then "ok", "failed" or "skipped"
    reason: str = ""
    detail: str = ""
    times_s: list[float] = dataclasses.field(default_factory=list)
    peak_mib: float | None = None
    sdpa_kernel: str | None = None
    paired_flop_per_s: list[float] = dataclasses.field(default_factory=list)  # --paired-roofline
    paired_gemm_size: int | None = None  # the size of its torch.mm (_common.gemm_probe_size)

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.times_s) if self.times_s else None

    def roofline(self, sweep: GemmRoofline) -> tuple[float | None, float | None]:
        """(roofline seconds, "of roof"): against the GEMM readings paired with this case's calls
        when it has them (``--paired-roofline``), else against the sweep's roofline."""
        if self.paired_flop_per_s:
            return paired_of_roof(self.case.useful_flop, self.times_s, self.paired_flop_per_s)
        roof_s = sweep.seconds(self.case.useful_flop)
        return roof_s, (roof_s / self.median_s if roof_s and self.median_s else None)

    @property
    def tflops(self) -> float | None:
        return self.case.useful_flop / self.median_s / 1e12 if self.median_s else None


def skip_reason(impl: str, device: str) -> str | None:
    """Why ``impl`` cannot be timed on ``device``, or None."""
    if impl == "sdpa":
        return None
    try:
        reason = attnseg.available_backends(device)[impl]
    except Exception as exc:  # a broken backend module must not stop the other rows
        reason = f"{type(exc).__name__}: {exc}"
    if reason is None and impl == "triton" and device == "cpu":
        reason = "Triton runs on CPU tensors only in its interpreter (TRITON_INTERPRET=1): far too slow to time"
    return reason


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time and peak memory of softmax(q k^T * scale) v: attnseg's triton and native "
                    "backends, the reference (baseline) and torch SDPA.",
        epilog="See the module docstring for the method and the FLOP convention.")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default cuda if available, else cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="default float16 on CUDA, float32 on CPU")
    parser.add_argument("--sizes", type=parse_sizes, default=None,
                        help=f"feature-map sizes HxW, N = H*W, comma-separated (default {DEFAULT_SIZES})")
    parser.add_argument("--modes", type=parse_choices(MODES), default=list(MODES), help="default fwd,fwd+bwd")
    parser.add_argument("--impls", type=parse_choices(IMPLS), default=list(IMPLS),
                        help=f"default {','.join(IMPLS)}")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per case (default 20 CUDA, 3 CPU)")
    parser.add_argument("--warmups", type=int, default=None, help="untimed calls first (default 3 CUDA, 1 CPU)")
    parser.add_argument("--time-budget", type=float, default=60.0,
                        help="stop repeating a case once its timed calls add up to this many seconds (default 60)")
    parser.add_argument("--max-case-s", type=float, default=10.0,
                        help="skip a chunked or reference case that the measured torch.mm rate predicts to take "
                             "longer than this (default 10 s; such rates are bf16 on a CPU without bf16 instructions)")
    parser.add_argument("--quick", action="store_true",
                        help=f"CI/plumbing: sizes {QUICK_SIZES}, 1 warm-up, 1 repeat (unless given)")
    parser.add_argument("--paired-roofline", action="store_true",
                        help="also read torch.mm's FLOP/s before every timed call and after the last, in the "
                             "case's process, and judge each call against the faster reading beside it: "
                             "'of roof' is then the median of the per-call ratios. For hosts whose speed drifts "
                             "(shared or virtual machines); each call costs about 4 extra 2048^3 GEMMs")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default torch.get_num_threads())")
    parser.add_argument("--batch", type=int, default=1, help="B (default 1)")
    parser.add_argument("--e", type=int, default=64, help="E, the q/k channels (default 64)")
    parser.add_argument("--ev", type=int, default=512, help="Ev, the v channels (default 512)")
    parser.add_argument("--scale", type=float, default=1.0, help="logits scale (default 1, DANet)")
    parser.add_argument("--layout", choices=("strided", "contiguous"), default="strided",
                        help="strided: [B, N, E] views of channel-first tensors, as DANet's module makes them "
                             "(default); contiguous: [B, N, E] tensors")
    parser.add_argument("--csv", metavar="PATH", help="write one row per case")
    parser.add_argument("--plot", metavar="PATH.png", help="time, TFLOP/s and memory against N (needs matplotlib)")
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    cuda = args.device == "cuda"
    args.dtype = args.dtype or ("float16" if cuda else "float32")
    args.sizes = args.sizes or parse_sizes(QUICK_SIZES if args.quick else DEFAULT_SIZES)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 20 if cuda else 3
    if args.warmups is None:
        args.warmups = 3 if cuda and not args.quick else 1
    if args.threads is None:
        args.threads = torch.get_num_threads()
    if min(args.repeats, args.warmups, args.threads, args.batch, args.e, args.ev) < 1:
        parser.error("--repeats, --warmups, --threads, --batch, --e and --ev must be >= 1")
    return args


def skip_slow_cases(results: list[CaseResult], roofline: GemmRoofline, max_case_s: float) -> None:
    """Skip the GEMM-bound cases that the measured torch.mm rate predicts to take longer than
    ``max_case_s`` (warm-up and one timed call at the case's FLOPs over that rate: a lower bound)."""
    rate = roofline.flop_per_s
    if not rate:
        return
    for r in results:
        if r.case.impl in GEMM_BOUND_IMPLS:
            predicted = (r.case.warmups + 1) * r.case.useful_flop / rate
            if predicted > max_case_s:
                r.status = "skipped"
                r.reason = f"predicted > {max_case_s:g} s"
                r.detail = (f"predicted at least {predicted:,.0f} s (torch.mm {r.case.dtype} at {rate / 1e9:.3g} GFLOP/s "
                            f"here); --max-case-s {predicted * 1.5:.0f} runs it")


def run_all(results: list[CaseResult], args, runner: IsolatedRunner) -> None:
    headroom = available_memory_bytes() if args.device == "cpu" else None  # fail cleanly, not by OOM killer
    for index, result in enumerate(results, 1):
        if result.status == "skipped":
            progress(f"[{index}/{len(results)}] {result.case.label}: skipped, {result.detail}")
            continue
        progress(f"[{index}/{len(results)}] {result.case.label} ...", end="")
        outcome = runner.run(run_case, dataclasses.asdict(result.case), timeout_s=CASE_TIMEOUT_S,
                             memory_headroom_bytes=headroom)
        if outcome.result is None:
            result.status, result.reason, result.detail = "failed", outcome.failure, outcome.detail or ""
            progress(f" failed: {outcome.failure}")
            continue
        result.status = "ok"
        result.times_s, result.peak_mib = outcome.result["times_s"], outcome.result["peak_mib"]
        result.sdpa_kernel = outcome.result["sdpa_kernel"]
        result.paired_flop_per_s = outcome.result["paired_flop_per_s"]
        result.paired_gemm_size = outcome.result.get("paired_gemm_size")
        progress(f" {format_seconds(result.median_s)}")


def reference_time(results: list[CaseResult], case: Case) -> float | None:
    for other in results:
        if other.case.impl == BASELINE and (other.case.n, other.case.mode) == (case.n, case.mode):
            return other.median_s
    return None


def table_rows(results: list[CaseResult], roofline: GemmRoofline) -> list[list[str]]:
    rows = []
    for r in results:
        c = r.case
        roof_s, of_roof = r.roofline(roofline)
        measured = [format_seconds(r.median_s), f"{r.tflops:.3g}", format_mib(r.peak_mib),
                    format_ratio(r.median_s, reference_time(results, c)),
                    format_seconds(roof_s) if roof_s else "-", format_ratio(of_roof, 1.0)] \
            if r.status == "ok" else [f"{r.status}: {r.reason}", "", "", "", "", ""]
        rows.append([f"{c.n:,}", f"{c.height}x{c.width}", c.mode, c.impl, *measured])
    return rows


def csv_rows(results: list[CaseResult], roofline: GemmRoofline) -> list[dict]:
    return [{**csv_row(r, results), **csv_roofline(r, roofline)} for r in results]


def csv_roofline(r: CaseResult, roofline: GemmRoofline) -> dict:
    roof_s, of_roof = r.roofline(roofline)
    return {"roofline_s": "" if roof_s is None else f"{roof_s:.6g}", "of_roof": "" if of_roof is None else f"{of_roof:.6g}",
            "roofline_paired": "yes" if r.paired_flop_per_s else "no",
            "paired_gemm_flop_per_s": " ".join(f"{f:.6g}" for f in r.paired_flop_per_s)}


def csv_row(r: CaseResult, results: list[CaseResult]) -> dict:
    return {
        "n": r.case.n, "height": r.case.height, "width": r.case.width, "mode": r.case.mode, "impl": r.case.impl,
        "device": r.case.device, "dtype": r.case.dtype, "batch": r.case.batch, "e": r.case.e, "ev": r.case.ev,
        "scale": r.case.scale, "layout": r.case.layout, "threads": r.case.threads, "status": r.status,
        "reason": r.detail or r.reason, "timed_calls": len(r.times_s),
        "median_s": "" if r.median_s is None else f"{r.median_s:.6g}",
        "useful_flop": r.case.useful_flop, "tflops": "" if r.tflops is None else f"{r.tflops:.6g}",
        "peak_mib": "" if r.peak_mib is None else f"{r.peak_mib:.3f}",
        "time_vs_reference": format_ratio(r.median_s, reference_time(results, r.case)),
        "recompute_ceiling": "" if r.case.recompute_ceiling is None else f"{r.case.recompute_ceiling:.6g}",
        "sdpa_kernel": r.sdpa_kernel or "", "times_s": " ".join(f"{t:.6g}" for t in r.times_s),
    }


def write_plot(path: str, results: list[CaseResult], args) -> str | None:
    colors = {"triton": "tab:green", "native": "tab:red", "chunked": "tab:purple", "reference": "tab:blue",
              "sdpa": "tab:orange"}
    panels = []
    for mode in args.modes:
        row = [PlotPanel(f"{mode}: median time", "N = H*W", "seconds", {}),
               PlotPanel(f"{mode}: useful TFLOP/s", "N = H*W", "TFLOP/s", {}),
               PlotPanel(f"{mode}: peak memory above inputs", "N = H*W", "MiB", {})]
        for r in results:
            if r.case.mode != mode or r.status != "ok":
                continue
            for panel, value in zip(row, (r.median_s, r.tflops, r.peak_mib)):
                xs, ys = panel.series.setdefault(r.case.impl, ([], []))
                panel.styles[r.case.impl] = {"color": colors[r.case.impl], "marker": "o"}
                if value and value > 0:
                    xs.append(r.case.n)
                    ys.append(value)
        panels.append(row)
    return plot_loglog(path, panels, f"softmax(q k^T) v: B={args.batch} E={args.e} Ev={args.ev} "
                                     f"{args.dtype} {args.layout} on {args.device}")


def main(argv=None) -> int:
    """Run every case; exit status 1 if one failed (skipped rows do not count)."""
    args = parse_args(argv)
    started = time.perf_counter()
    skipped = {impl: skip_reason(impl, args.device) for impl in args.impls}
    impls = [impl for impl in args.impls if skipped[impl] is None]
    results = [CaseResult(Case(impl, mode, h, w, args.batch, args.e, args.ev, args.scale, args.layout, args.dtype,
                               args.device, args.threads, args.repeats, args.warmups, args.time_budget,
                               args.paired_roofline))
               for h, w in args.sizes for mode in args.modes for impl in impls]

    print(f"softmax(q k^T * scale) v: q, k [B, N, E], v [B, N, Ev]; B={args.batch} E={args.e} Ev={args.ev} "
          f"scale={args.scale:g}, {args.dtype}, {args.layout} inputs, on {args.device}")
    runner = IsolatedRunner(preload=("torch", "attnseg"))
    print(f"attnseg {attnseg.__version__}; torch {torch.__version__}; torch threads {args.threads}")
    print(attnseg_used_line(attnseg, runner))
    print(f"each case in a fresh process: {args.warmups} warm-up call(s), {args.repeats} timed call(s) "
          f"({'CUDA events' if args.device == 'cuda' else 'time.perf_counter'}), median shown")
    print(f"TFLOP/s: {FLOP_CONVENTION}")
    print(f"peak memory above the inputs: {PeakMemoryMeter(torch.device(args.device)).describe()}")
    for impl, reason in skipped.items():
        if reason is not None:
            print(f"{impl}: skipped — {reason}")
    load = machine_load_note()
    if load:
        print(load)
    print(flush=True)

    roofline = GemmRoofline(runner, args.device, args.dtype, args.threads)
    roofline.measure()
    skip_slow_cases(results, roofline, args.max_case_s)
    run_all(results, args, runner)
    roofline.measure()
    print(format_table(["N", "H x W", "mode", "impl", "median", "TFLOP/s", "peak MiB", "vs ref", "roofline", "of roof"],
                       table_rows(results, roofline), align="><<<>>>>>>"))
    print("vs ref: time / reference time, same size and mode (below 1 is faster)")
    print(roofline.describe())
    if args.paired_roofline:
        sizes = "/".join(str(n) for n in sorted({r.paired_gemm_size for r in results if r.paired_gemm_size}))
        print(f"paired roofline (--paired-roofline), used for the table: in each case's process torch.mm "
              f"{args.dtype} {sizes or GEMM_ROOFLINE_SIZE}^3 (sized to its measured rate), the faster of "
              f"{PAIRED_GEMM_CALLS} calls, read before every "
              "timed call and after the last; each call's roofline time = the case's FLOPs / the faster of "
              "the two readings around it; 'roofline' and 'of roof' = the medians over the calls of that "
              "time and of roofline time / call time")
    ceilings = sorted({c for r in results if r.status == "ok" and (c := r.case.recompute_ceiling) is not None})
    if ceilings:
        print(f"fused fwd+bwd: the backward recomputes S = q kᵀ (2·B·N²·E FLOPs, not in the useful count), so "
              f"'of roof' is at most {' / '.join(f'{c:.3f}' for c in ceilings)} here even at GEMM speed: "
              f"3(E + Ev) / (3(E + Ev) + E)")
    notes = sorted({f"sdpa picked its {r.sdpa_kernel} kernel ({r.case.mode})" for r in results if r.sdpa_kernel})
    notes += [f"{r.case.label} {r.status}: {r.detail or r.reason}" for r in results if r.status in ("failed", "skipped")]
    notes += [f"{r.case.label}: {len(r.times_s)} timed call(s), --time-budget reached"
              for r in results if r.status == "ok" and len(r.times_s) < args.repeats]
    if notes:
        print("\nNotes:\n" + "\n".join(f"  - {note}" for note in notes))
    if args.csv:
        write_csv(args.csv, csv_rows(results, roofline))
        print(f"\nCSV written to {args.csv}")
    if args.plot:
        problem = write_plot(args.plot, results, args)
        print(f"\nplot not written: {problem}" if problem else f"\nplot written to {args.plot}")
    print(f"\ntook {time.perf_counter() - started:.1f} s")
    return 1 if any(r.status == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
