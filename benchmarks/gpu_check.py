"""One command for a GPU machine: the GPU tests, then a timing table, in under 8 minutes.

    python benchmarks/gpu_check.py                 # on a CUDA machine; writes docs/gpu_check.md
    python benchmarks/gpu_check.py --dry-run       # anywhere: print the plan and the predicted skips

Without a CUDA device it stops at once with exit status 2 and says so (``--dry-run`` works anywhere).

Steps, each bounded so that the table is always written:

1. The GPU tests: ``pytest tests/test_cuda_native.py`` and the Triton GPU tests
   (``pytest tests/test_triton.py -k test_gpu_``), with ``ATTNSEG_REQUIRE_NATIVE=1`` (a missing
   compiled extension fails instead of skipping); passed/failed/skipped/error counts read from
   pytest's JUnit XML. Their share of the time budget: ``--test-budget`` seconds.
2. A kernel profile: the native fp16 forward+backward at N = 9,216, B = 1 under torch.profiler, one
   call after two warm-ups, its costliest CUDA kernels by self time (``--skip-profile``: none).
3. Timings, one fresh process per row group (the impls of one op, mode, size, batch and dtype,
   ``_common.IsolatedRunner``; a case its process did not report runs again alone; per-case timeouts), in
   priority order (fp16, then bf16, then fp32; smaller sizes first) so that a spent
   ``--budget`` cuts the least useful rows, which then read "not run: time budget spent".
   PAM, the generic op out = softmax(q kᵀ) v: q, k [B, N, E], v [B, N, Ev], E = 64, Ev = 512,
   N = 9,216 and 32,768, B = 1 and 8; as PAM passes them (views of channel-first [B, E, N]
   tensors, the layout the Triton autotune table was measured on), and dO likewise (as the module's
   backward gives it), except for SDPA, which gets contiguous tensors (its fused kernels need
   stride(-1) == 1); impls native and triton (``attnseg.attention(backend=...)``), "sdpa"
   (``scaled_dot_product_attention`` on [B, 1, N, E] views inside
   ``sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION)``: the memory-efficient kernel forced; a case it
   refuses reads "unsupported" with PyTorch's reason) and "math", the official N² code
   (``attnseg.reference.attention``: bmm, softmax, bmm). CAM (``attnseg.channel_attention``, official
   variant, gamma = 1, x [B, C, N, 1]; math: ``attnseg.reference.channel_attention``) at C = 512:
   native, triton and math.
   Modes: "fwd" under ``torch.no_grad()``; "fwd+bwd", forward then ``backward(grad_out)``.
4. Method: 2 warm-up calls (the first compiles and autotunes Triton: the first triton case of each
   op, mode and dtype gets ``--compile-timeout``, the others find the kernels in Triton's cache),
   then up to 10 timed calls
   (fewer once they add up to 2 s), each timed by CUDA events; the median is shown. Peak memory:
   ``torch.cuda.max_memory_allocated()`` above ``memory_allocated()`` at the start of the call,
   after ``reset_peak_memory_stats()`` (the largest over the timed calls).
   The math rows whose N×N maps cannot fit are not run: the prediction (2 maps alive in the
   forward, 3 in forward+backward: S and P, then P, dP and dS; map = B·N²·element size) is
   compared with 90% of the free device memory, and the row says "skipped: would need X GiB".

TFLOP/s count useful FLOPs, the same for every row of an op (1 multiply-add = 2 FLOPs; softmax
not counted). PAM: fwd 2·B·N²·(E + Ev); fwd+bwd 3× that. CAM: fwd 4·B·C²·N (X Xᵀ and A X);
fwd+bwd 3× that. "vs math" and "vs sdpa" are time ratios against those rows of the same case
(below 1: faster).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import torch

from _common import (
    REPO_ROOT,
    IsolatedRunner,
    PeakMemoryMeter,
    format_ratio,
    forward_call,
    import_attnseg,
    measure_call,
    progress,
)

GIB = 1024**3
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
ELEMENT_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
PAM_IMPLS = ("native", "triton", "chunked", "sdpa", "math")
CAM_IMPLS = ("native", "triton", "chunked", "math")
MODES = ("fwd", "fwd+bwd")
SIZES = (9216, 32768)
BATCHES = (1, 8)
E, EV, CAM_C = 64, 512, 512
MEMORY_FRACTION = 0.9  # of the free device memory a math row may be predicted to use
WARMUPS, REPEATS, CASE_TIMING_S = 2, 10, 2.0
FLOP_CONVENTION = ("useful FLOPs, 1 multiply-add = 2 FLOPs, softmax not counted, the same count for every "
                   "row of an op: PAM fwd 2·B·N²·(E + Ev), fwd+bwd 3× fwd; CAM fwd 4·B·C²·N, fwd+bwd 3× fwd "
                   "(fused kernels' recomputed products not counted)")


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


@dataclasses.dataclass
class CaseResult:
    case: Case
    status: str = "pending"  # "ok", "skipped", "unsupported", "failed", "not run"
    reason: str = ""
    times_s: list[float] = dataclasses.field(default_factory=list)
    peak_mib: float | None = None

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.times_s) if self.status == "ok" and self.times_s else None

    @property
    def tflops(self) -> float | None:
        median = self.median_s
        return self.case.useful_flop / median / 1e12 if median else None


# ---------------------------------------------------------------------------------------------
# The plan (runs anywhere)
# ---------------------------------------------------------------------------------------------


def plan_cases(dtypes=tuple(DTYPES), sizes=SIZES, batches=BATCHES, ops=("pam", "cam")) -> list[Case]:
    """Every case, most useful first: by dtype, then op, size, batch, mode, impl."""
    cases = []
    for dtype in dtypes:
        for op in ops:
            for n in sizes:
                for batch in batches:
                    for mode in MODES:
                        for impl in PAM_IMPLS if op == "pam" else CAM_IMPLS:
                            cases.append(Case(op, impl, mode, n, batch, dtype))
    return cases


def math_bytes_needed(case: Case) -> int:
    """What the official N² math holds at its peak: 2 N×N maps in the forward, 3 with the backward."""
    if case.op != "pam" or case.impl != "math":
        return 0
    maps = 2 if case.mode == "fwd" else 3
    return maps * case.batch * case.n * case.n * ELEMENT_BYTES[case.dtype]


def predicted_skip(case: Case, free_bytes: int) -> str | None:
    """"skipped: would need X GiB ..." for a math row that cannot fit, else None."""
    need = math_bytes_needed(case)
    if need and need > MEMORY_FRACTION * free_bytes:
        maps = need // (case.batch * case.n * case.n * ELEMENT_BYTES[case.dtype])
        return (f"would need {need / GIB:.0f} GiB ({maps} N×N maps of {need / maps / GIB:.1f} GiB) "
                f"of {free_bytes / GIB:.0f} GiB free")
    return None


# ---------------------------------------------------------------------------------------------
# One case, in a child process (CUDA only)
# ---------------------------------------------------------------------------------------------


def _sdpa_efficient(q, k, v):
    """SDPA with the memory-efficient kernel forced, on [B, 1, N, E] views."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(
            q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), scale=1.0).squeeze(1)


class Unsupported(Exception):
    """SDPA refused the case (its reason is the message)."""


def _case_call(case: Case, device: torch.device):
    """The case's inputs and its timed work: (call, drop_grads); raises Unsupported where SDPA refuses it."""
    attnseg = import_attnseg()
    dtype = DTYPES[case.dtype]
    grad = case.mode == "fwd+bwd"
    torch.manual_seed(0)
    if case.op == "pam":
        if case.impl == "sdpa":  # its fused kernels need stride(-1) == 1: contiguous [B, N, E]
            leaves = [torch.randn(case.batch, case.n, width, device=device, dtype=dtype, requires_grad=grad)
                      for width in (E, E, EV)]
            inputs = leaves
        else:  # the [B, N, E] views of channel-first convolution outputs that PAM passes
            leaves = [torch.randn(case.batch, width, case.n, device=device, dtype=dtype, requires_grad=grad)
                      for width in (E, E, EV)]
            inputs = [leaf.transpose(1, 2) for leaf in leaves]
        attend = {"native": lambda q, k, v: attnseg.attention(q, k, v, 1.0, backend="native"),
                  "triton": lambda q, k, v: attnseg.attention(q, k, v, 1.0, backend="triton"),
                  "chunked": lambda q, k, v: attnseg.attention(q, k, v, 1.0, backend="chunked"),
                  "sdpa": _sdpa_efficient, "math": attnseg.reference.attention}[case.impl]
        # dO as PositionAttention's backward hands it over (its output goes back to channel-first):
        # channel-first views too; the H200 run of 2026-12-04 passed a contiguous dO (docs/gpu_check.md)
        grad_out = (torch.randn(case.batch, case.n, EV, device=device, dtype=dtype) if case.impl == "sdpa" else
                    torch.randn(case.batch, EV, case.n, device=device, dtype=dtype).transpose(1, 2))
    else:
        # post-ReLU-like (non-negative) features scaled by N^-1/2: Gram entries about 1/3 in every dtype
        inputs = [(torch.rand(case.batch, CAM_C, case.n, 1, device=device) / math.sqrt(case.n))
                  .to(dtype).requires_grad_(grad)]
        leaves = inputs
        gamma = torch.ones(1, device=device, dtype=dtype)  # gamma · A X + x, with A X in the timed work
        attend = {"native": lambda x: attnseg.channel_attention(x, gamma, backend="native"),
                  "triton": lambda x: attnseg.channel_attention(x, gamma, backend="triton"),
                  "chunked": lambda x: attnseg.channel_attention(x, gamma, backend="chunked"),
                  "math": lambda x: attnseg.reference.channel_attention(x, gamma)}[case.impl]
        grad_out = torch.randn(case.batch, CAM_C, case.n, 1, device=device, dtype=dtype)

    call, drop_grads = forward_call(lambda: attend(*inputs), leaves, grad_out if grad else None)

    if case.impl == "sdpa":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                call()
            except RuntimeError as exc:
                why = "; ".join(str(w.message).splitlines()[0] for w in caught)
                raise Unsupported(f"{str(exc).splitlines()[0]}" + (f" ({why})" if why else "")) from exc
    return call, drop_grads


def run_case(payload: dict, device: str = "cuda") -> dict:
    """Child entry point: one case's times (s) and peak (MiB), or ``{"unsupported": reason}``.

    ``device`` is "cuda" in the real run; the tests run small cases on the CPU through it.
    """
    device = torch.device(device)
    try:
        call, drop_grads = _case_call(Case(**payload), device)
    except Unsupported as refusal:
        return {"unsupported": str(refusal)}
    measured = measure_call(call, PeakMemoryMeter(device), repeats=REPEATS, warmups=WARMUPS,
                            before_each=drop_grads, time_budget_s=CASE_TIMING_S, cuda_events=device.type == "cuda")
    return {"times_s": measured.times_s, "peak_mib": measured.peak_mib}


def run_group(payloads: list[dict], device: str = "cuda") -> dict:
    """Child entry point: the cases of one group (the impls compared in one row group: same op,
    mode, size, batch and dtype) one after another in one process, so that they share one CUDA
    context; the H200 run of 2026-12-04 spent about 8 s a case on a fresh process each, most of it
    starting CUDA. ``{"results": [run_case's result, or {"error": reason}] ...}`` in order. After
    an error other than running out of memory (which may leave the context unusable) the group
    stops, and the caller runs the cases not reported each in a process of its own."""
    results = []
    for payload in payloads:
        try:
            results.append(run_case(payload, device))
        except Exception as exc:  # reported per case; the caller decides about the rest
            first_line = str(exc).splitlines()[0] if str(exc) else ""
            results.append({"error": f"{type(exc).__name__}: {first_line}"})
            if not isinstance(exc, torch.cuda.OutOfMemoryError):
                break
        gc.collect()  # the case's tensors go before the next case's peak is measured
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return {"results": results}


PROFILED_CASE = Case("pam", "native", "fwd+bwd", 9216, 1, "float16")
PROFILE_ROWS = 12


def profile_case(payload: dict, device: str = "cuda") -> dict:
    """Child entry point: one call of the case under torch.profiler, after two warm-up calls; the
    kernels (CUDA) or operators (CPU) by self time: ``{"kernels": [[name, calls, ms], ...]}``.

    The H200 run of 2026-12-04 found the CUDA C++ backward 7-16x slower than Triton with no way to tell
    which of its kernels (dV, dK/dQ with the ordered dQ counters, dQ conversion) takes the time.
    """
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device)
    try:
        call, drop_grads = _case_call(Case(**payload), device)
    except Unsupported as refusal:
        return {"unsupported": str(refusal)}
    cuda = device.type == "cuda"
    for _ in range(2):
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
        if self_us > 0:
            rows.append([event.key, event.count, self_us / 1e3])
    rows.sort(key=lambda row: -row[2])
    return {"kernels": rows[:PROFILE_ROWS]}


def profile_lines(outcome) -> list[str]:
    """The report's lines for the profiled case: a table of its kernels, or why there is none."""
    head = [f"`{PROFILED_CASE.label}`, one call after two warm-ups, under torch.profiler; "
            f"self time of the {PROFILE_ROWS} costliest kernels:", ""]
    if outcome is None:
        return head[:1] + ["", "not run (`--skip-profile` or the time budget)"]
    if outcome.result is None or "kernels" not in outcome.result:
        why = outcome.result["unsupported"] if outcome.result else (outcome.detail or outcome.failure)
        return head[:1] + ["", f"failed: {why}"]
    rows = [[name[:100], str(calls), f"{ms:.3g}"] for name, calls, ms in outcome.result["kernels"]]
    return head + [markdown_table(["kernel", "calls", "self ms"], rows)]


# ---------------------------------------------------------------------------------------------
# The report (runs anywhere)
# ---------------------------------------------------------------------------------------------


def baseline_time(results: list[CaseResult], case: Case, impl: str) -> float | None:
    for other in results:
        if other.case.impl == impl and other.case.key == case.key:
            return other.median_s
    return None


def table_rows(results: list[CaseResult]) -> list[list[str]]:
    rows = []
    for r in results:
        c = r.case
        head = [c.op.upper(), f"{c.n:,}", str(c.batch), c.dtype, c.mode, c.impl]
        if r.status == "ok":
            rows.append(head + [f"{r.median_s * 1e3:.3g}", f"{r.tflops:.3g}", f"{r.peak_mib:,.0f}",
                                format_ratio(r.median_s, baseline_time(results, c, "math")),
                                format_ratio(r.median_s, baseline_time(results, c, "sdpa"))])
        else:
            rows.append(head + [f"{r.status}: {r.reason}", "", "", "", ""])
    return rows


def markdown_table(header, rows) -> str:
    def line(cells):
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"
    return "\n".join([line(header), line(["---"] * len(header)), *map(line, rows)])


TABLE_HEADER = ["op", "N", "B", "dtype", "mode", "impl", "median ms", "TFLOP/s", "peak MiB", "vs math", "vs sdpa"]


def parse_junit(path: str | Path) -> dict:
    """passed/failed/errors/skipped counts (and the failed test ids) from a pytest JUnit XML file."""
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failed_ids": []}
    for suite in suites:
        for testcase in suite.iter("testcase"):
            outcome = next((child.tag for child in testcase if child.tag in ("failure", "error", "skipped")), None)
            name = f"{testcase.get('classname', '')}::{testcase.get('name', '')}"
            if outcome == "failure":
                counts["failed"] += 1
                counts["failed_ids"].append(name)
            elif outcome == "error":
                counts["errors"] += 1
                counts["failed_ids"].append(name)
            elif outcome == "skipped":
                counts["skipped"] += 1
            else:
                counts["passed"] += 1
    return counts


def test_summary_line(name: str, outcome: dict) -> str:
    if "problem" in outcome:
        return f"- `{name}`: {outcome['problem']}"
    line = (f"- `{name}`: {outcome['passed']} passed, {outcome['failed']} failed, {outcome['errors']} errors, "
            f"{outcome['skipped']} skipped ({outcome['wall_s']:.0f} s)")
    return line + "".join(f"\n  - failed: `{test_id}`" for test_id in outcome["failed_ids"])


def write_report(path: Path, environment: list[str], tests: dict, results: list[CaseResult], took_s: float,
                 profile: list[str] | None = None) -> None:
    text = ["# GPU check", "", "Written by `python benchmarks/gpu_check.py` (method in its docstring).", "",
            "## Environment", "", *[f"- {line}" for line in environment], "",
            "## Tests", "", *[test_summary_line(name, outcome) for name, outcome in tests.items()], "",
            *(["## Kernel profile", "", *profile, ""] if profile is not None else []),
            "## Timings", "", f"TFLOP/s: {FLOP_CONVENTION}. PAM: E = {E}, Ev = {EV}, channel-first views (SDPA: contiguous); "
            f"CAM: C = {CAM_C}, official variant. vs math / vs sdpa: time ratio against that row of the "
            "same case (below 1 is faster).", "", markdown_table(TABLE_HEADER, table_rows(results)), "",
            f"took {took_s:.0f} s", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text))


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def pytest_environment(attnseg_dir: str | Path, environ=os.environ) -> dict:
    """The environment of the pytest runs: they must import the attnseg that the timings use.

    pytest puts ``tests/`` on sys.path, not the repository root, so an attnseg built in place
    (``python setup.py build_ext --inplace``, not installed) is importable by the timings (which
    add the checkout) but not by the tests: the H200 run of 2026-12-04 lost its tests that way. When
    the imported attnseg is this checkout's, the checkout goes first on the tests' PYTHONPATH.
    """
    env = {**environ, "ATTNSEG_REQUIRE_NATIVE": "1"}
    if Path(attnseg_dir).resolve().parent == REPO_ROOT.resolve():
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), environ.get("PYTHONPATH")]))
    return env


def run_tests(budget_s: float, attnseg_dir: str | Path) -> dict:
    """The two GPU test runs, each bounded by what is left of ``budget_s``."""
    runs = {"tests/test_cuda_native.py": ["tests/test_cuda_native.py"],
            "tests/test_triton.py -k test_gpu_": ["tests/test_triton.py", "-k", "test_gpu_"]}
    pytest_exe = Path(sys.executable).with_name("pytest")
    command = [str(pytest_exe)] if pytest_exe.exists() else [sys.executable, "-m", "pytest"]
    env = pytest_environment(attnseg_dir)
    deadline, outcomes = time.monotonic() + budget_s, {}
    for name, arguments in runs.items():
        left = deadline - time.monotonic()
        if left < 10:
            outcomes[name] = {"problem": f"not run: test budget ({budget_s:.0f} s) spent"}
            continue
        progress(f"pytest {name} (at most {left:.0f} s) ...", end="")
        with tempfile.TemporaryDirectory() as folder:
            xml = Path(folder) / "junit.xml"
            started = time.monotonic()
            try:
                proc = subprocess.run([*command, *arguments, "-q", "-p", "no:cacheprovider", f"--junitxml={xml}"],
                                      cwd=REPO_ROOT, env=env,
                                      capture_output=True, text=True, timeout=left)
            except subprocess.TimeoutExpired:
                outcomes[name] = {"problem": f"timed out after {left:.0f} s"}
                progress(" timed out")
                continue
            if not xml.exists():
                tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
                outcomes[name] = {"problem": f"pytest exited with {proc.returncode}, no report: {' / '.join(tail)}"}
            else:
                outcomes[name] = {**parse_junit(xml), "wall_s": time.monotonic() - started}
        progress(f" {test_summary_line(name, outcomes[name])}")
    return outcomes


def environment_lines(attnseg) -> list[str]:
    props = torch.cuda.get_device_properties(0)
    try:
        import triton
        triton_version = triton.__version__
    except Exception as exc:
        triton_version = f"not importable ({type(exc).__name__})"
    native = "loaded" if attnseg.native_available() else f"NOT loaded: {attnseg.native_unavailable_reason()}"
    return [f"GPU: {props.name}, sm_{props.major}{props.minor}, {props.total_memory / GIB:.0f} GiB, "
            f"{props.multi_processor_count} SMs",
            f"torch {torch.__version__}, CUDA {torch.version.cuda}, triton {triton_version}",
            f"attnseg {attnseg.__version__} from {Path(attnseg.__file__).parent} (native extension {native})",
            f"auto backend on CUDA: {attnseg.available_backends('cuda')['auto']}"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="GPU tests and a timing table on a GPU machine (< 8 minutes).",
                                     epilog="See the module docstring for the method and the FLOP convention.")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "docs" / "gpu_check.md",
                        help="the Markdown report (default docs/gpu_check.md)")
    parser.add_argument("--budget", type=float, default=450.0,
                        help="seconds for everything, tests included (default 450); cases left read 'not run'")
    parser.add_argument("--test-budget", type=float, default=150.0, help="seconds for the tests (default 150)")
    parser.add_argument("--case-timeout", type=float, default=60.0, help="seconds per timed case (default 60)")
    parser.add_argument("--compile-timeout", type=float, default=180.0,
                        help="seconds for the first triton case of each op, mode and dtype (default 180)")
    parser.add_argument("--skip-tests", action="store_true", help="timings only")
    parser.add_argument("--table", type=Path, default=REPO_ROOT / "attnseg" / "backend_table.json",
                        help="the measured table backend='auto' reads: this GPU's rows replace those of the "
                             "same key (default attnseg/backend_table.json)")
    parser.add_argument("--skip-profile", action="store_true",
                        help="no kernel profile of the native fp16 forward+backward (N = 9,216, B = 1)")
    parser.add_argument("--dry-run", "--plan", action="store_true", dest="dry_run",
                        help="print the plan and the predicted skips (for --gpu-memory GiB free) and exit")
    parser.add_argument("--gpu-memory", type=float, default=79.0,
                        help="free GiB assumed by --dry-run (default 79, an 80 GB H100)")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="default float16,bfloat16,float32")
    args = parser.parse_args(argv)
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = [d for d in args.dtypes if d not in DTYPES]
    if unknown or not args.dtypes:
        parser.error(f"--dtypes: unknown {unknown}; choose from {','.join(DTYPES)}")
    return args


def case_timeout(case: Case, args, compiled: set) -> float:
    """``--case-timeout``, or ``--compile-timeout`` for the first triton case of each (op, mode,
    dtype): it compiles and autotunes every kept config (later cases find them in Triton's cache)."""
    if case.impl != "triton" or (case.op, case.mode, case.dtype) in compiled:
        return args.case_timeout
    compiled.add((case.op, case.mode, case.dtype))
    return max(args.case_timeout, args.compile_timeout)


# The cost model of --plan, from the H200 run of 2026-12-04 (docs/gpu_check.md): a child process
# that initialises CUDA took about 8 s; the extension's build for sm_90 alone 135 s on 16 cores.
PROCESS_START_S = 8.0
BUILD_S = 135.0
TRITON_FIRST_CASE_S = 30.0  # compile and autotune of a Triton kernel family (not measured: a guess)
DTYPE_SLOWDOWN = {"float16": 1.0, "bfloat16": 1.0, "float32": 8.0}  # fp32 without tensor cores (a guess)
UNMEASURED_IMPL_S = {"chunked": "math", "sdpa": "math"}  # an impl with no row: timed like this one


def predicted_case_s(case: Case, medians: dict) -> float:
    """Seconds ``case`` takes in the plan's model: its warm-ups and timed calls at the H200 run's
    median of the same (or a stand-in) impl, op, mode, size and batch in fp16, scaled by dtype."""
    impl = case.impl if (case.op, case.impl, case.mode, case.n, case.batch) in medians else \
        UNMEASURED_IMPL_S.get(case.impl, "math")
    median = medians.get((case.op, impl, case.mode, case.n, case.batch))
    if median is None:  # no stand-in either: the slowest measured row of the op
        median = max((m for key, m in medians.items() if key[0] == case.op), default=1.0)
    median *= DTYPE_SLOWDOWN[case.dtype]
    calls = WARMUPS + max(1, min(REPEATS, math.ceil(CASE_TIMING_S / median)))
    return calls * median


def estimate_seconds(cases: list[Case], free_bytes: int, rows: list[dict], tests_s: float) -> dict:
    """The plan's cost model (see the constants above): build, tests, one process per row group,
    Triton's first compiles and every case's calls; a math row predicted not to fit costs nothing."""
    medians = {("pam" if r["op"] == "attention" else "cam", r["backend"],
                "fwd" if r["mode"] == "forward" else "fwd+bwd", r.get("Nq") or r.get("N"), r["B"]): r["median_ms"] / 1e3
               for r in rows if r["device"] == "cuda:sm_90" and r["dtype"] == "float16"}
    groups = {case.key for case in cases}
    triton_firsts = {(case.op, case.mode, case.dtype) for case in cases if case.impl == "triton"}
    timings = sum(predicted_case_s(case, medians) for case in cases if not predicted_skip(case, free_bytes))
    parts = {"build": BUILD_S, "tests": tests_s, "process starts": PROCESS_START_S * len(groups),
             "triton compiles": TRITON_FIRST_CASE_S * len(triton_firsts), "timed calls": timings}
    parts["total"] = sum(parts.values())
    return parts


def print_plan(cases: list[Case], free_bytes: int, tests_s: float = 0.0) -> None:
    print(f"{len(cases)} cases, most useful first (free memory assumed: {free_bytes / GIB:.0f} GiB):")
    for index, case in enumerate(cases, 1):
        skip = predicted_skip(case, free_bytes)
        print(f"  {index:3d}. {case.label}" + (f"  -> skipped: {skip}" if skip else ""))
    peers = "SDPA's memory-efficient kernel (PAM), the official math (attnseg.reference)"
    print(f"impls: {', '.join(PAM_IMPLS)} (PAM); {', '.join(CAM_IMPLS)} (CAM); peers: {peers}")
    sys.path.insert(0, str(REPO_ROOT))
    from attnseg import _backends  # noqa: PLC0415  (the table's H200 rows are the model's data)

    parts = estimate_seconds(cases, free_bytes, list(_backends.table_rows()), tests_s)
    print("cost model (H200 run of 2026-12-04: " + ", ".join(f"{k} {v:.0f} s" for k, v in parts.items()
                                                            if k != "total") + ")")
    print(f"estimated total: {parts['total']:.0f} s")


def record_case(result: CaseResult, measured: dict) -> None:
    """A case's outcome from run_case's (or run_group's) dict."""
    if "unsupported" in measured:
        result.status, result.reason = "unsupported", measured["unsupported"]
    elif "error" in measured:
        result.status, result.reason = "failed", measured["error"]
    else:
        result.status = "ok"
        result.times_s, result.peak_mib = measured["times_s"], measured["peak_mib"]


def case_groups(results: list[CaseResult]) -> list[list[CaseResult]]:
    """Consecutive results of one key (op, mode, size, batch, dtype): the impls of one row group."""
    groups: list[list[CaseResult]] = []
    for result in results:
        if groups and groups[-1][-1].case.key == result.case.key:
            groups[-1].append(result)
        else:
            groups.append([result])
    return groups


def time_cases(results: list[CaseResult], runner, args, deadline: float, free_bytes: int) -> None:
    """Times every case in ``results`` (in order) until ``deadline``: each row group in one child
    (run_group); a case its child did not report (the child died, timed out, or stopped after an
    error) runs again alone (run_case). Cases the budget leaves read "not run"."""
    compiled: set = set()
    number = {id(result): index for index, result in enumerate(results, 1)}

    def show(result):
        progress(f"[{number[id(result)]}/{len(results)}] {result.case.label}: {result.status}" +
                 (f" {result.median_s * 1e3:.3g} ms" if result.median_s else f" ({result.reason})"))

    for group in case_groups(results):
        todo = []
        for result in group:
            skip = predicted_skip(result.case, free_bytes)
            if skip:
                result.status, result.reason = "skipped", skip
            else:
                todo.append(result)
        if not todo:
            continue
        timeouts = [case_timeout(result.case, args, compiled) for result in todo]
        left = deadline - time.monotonic()
        reported = []
        if left >= 5:
            outcome = runner.run(run_group, [dataclasses.asdict(r.case) for r in todo], timeout_s=min(sum(timeouts), left))
            reported = outcome.result["results"] if outcome.result is not None else []
        for result, measured in zip(todo, reported):
            record_case(result, measured)
            show(result)
        for result, timeout in zip(todo[len(reported):], timeouts[len(reported):]):
            left = deadline - time.monotonic()
            if left < 5:
                result.status, result.reason = "not run", f"time budget ({args.budget:.0f} s) spent"
                continue
            outcome = runner.run(run_case, dataclasses.asdict(result.case), timeout_s=min(timeout, left))
            if outcome.result is None and left < timeout and outcome.wall_s >= left:
                # cut short by the budget, not by its own timeout: not a failure of the case
                result.status, result.reason = "not run", f"time budget ({args.budget:.0f} s) spent during the case"
            elif outcome.result is None:
                result.status, result.reason = "failed", outcome.detail or outcome.failure
            else:
                record_case(result, outcome.result)
            show(result)


def backend_table_rows(results: list[CaseResult], kind: str, source: str) -> list[dict]:
    """The measured rows of the backends and the math, as attnseg/backend_table.json holds them."""
    rows = []
    for result in results:
        case = result.case
        if result.median_s is None or case.impl == "sdpa":
            continue
        sizes = ({"B": case.batch, "Nq": case.n, "Nk": case.n, "E": E, "Ev": EV} if case.op == "pam"
                 else {"B": case.batch, "C": CAM_C, "N": case.n})
        rows.append({"op": "attention" if case.op == "pam" else "channel_attention", "device": kind,
                     "dtype": case.dtype, "mode": "forward" if case.mode == "fwd" else "training", **sizes,
                     "backend": case.impl, "median_ms": round(result.median_s * 1e3, 4),
                     "peak_mib": round(result.peak_mib, 2), "source": source})
    return rows


def main(argv=None) -> int:
    """Exit status: 0 all ran, 1 a test or a case failed, 2 no CUDA device."""
    args = parse_args(argv)
    cases = plan_cases(args.dtypes)
    if args.dry_run:
        try:
            print_plan(cases, int(args.gpu_memory * GIB), 0.0 if args.skip_tests else args.test_budget)
            sys.stdout.flush()
        except BrokenPipeError:
            # The reader stopped early (`--dry-run | head`): end quietly, as a Unix filter does, with
            # stdout pointed at /dev/null so that the interpreter's own flush at exit cannot fail again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if not torch.cuda.is_available():
        built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        print(f"gpu_check: no CUDA device visible to torch {torch.__version__} ({built}); this command needs a "
              "GPU. `--dry-run` prints the plan.", file=sys.stderr)
        return 2
    started = time.monotonic()
    deadline = started + args.budget
    attnseg = import_attnseg()
    environment = environment_lines(attnseg)
    for line in environment:
        progress(line)
    tests = {} if args.skip_tests else run_tests(min(args.test_budget, args.budget / 2),
                                                 Path(attnseg.__file__).parent)
    free_bytes, _ = torch.cuda.mem_get_info()  # this process holds a context but no tensors
    runner = IsolatedRunner(preload=("torch", "attnseg"))
    profiled = None
    if not args.skip_profile and deadline - time.monotonic() > args.case_timeout:
        progress(f"profiling {PROFILED_CASE.label} ...", end="")
        profiled = runner.run(profile_case, dataclasses.asdict(PROFILED_CASE), timeout_s=args.case_timeout)
        progress(" done" if profiled.result else f" {profiled.failure}")
    profile = profile_lines(profiled)
    results = [CaseResult(case) for case in cases]
    time_cases(results, runner, args, deadline, free_bytes)
    write_report(args.output, environment, tests, results, time.monotonic() - started, profile)
    print(args.output.read_text())
    print(f"written to {args.output}")
    rows = backend_table_rows(results, attnseg._backends.device_kind(torch.device("cuda")),
                              f"{torch.cuda.get_device_name()}, benchmarks/gpu_check.py, {time.strftime('%Y-%m-%d')}")
    if rows and args.table is not None:
        from backend_table import merge_rows

        print(f"{len(rows)} rows written to {args.table} ({merge_rows(str(args.table), rows)} in all), "
              "which backend='auto' reads")
    failed_tests = any(o.get("failed") or o.get("errors") or "problem" in o for o in tests.values())
    return 1 if failed_tests or any(r.status == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
