"""Tests of the parts of benchmarks/gpu_check.py that run without a GPU: the plan and its predicted
skips, the FLOP counts, the ratios and the Markdown report, the JUnit parser, and the clear exit
without CUDA."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import BENCHMARKS, load_benchmark

gc = load_benchmark("gpu_check")
import _common  # noqa: E402  (benchmarks/_common.py, beside gpu_check)

GIB = 1024**3


def test_plan_covers_the_issue_grid_in_priority_order():
    cases = gc.plan_cases()
    pam = [c for c in cases if c.op == "pam"]
    cam = [c for c in cases if c.op == "cam"]
    assert len(pam) == 2 * 2 * 3 * 2 * 5 and len(cam) == 2 * 2 * 3 * 2 * 4
    assert {c.n for c in cases} == {9216, 32768} and {c.batch for c in cases} == {1, 8}
    assert {c.impl for c in pam} == {"native", "triton", "chunked", "sdpa", "math"}
    assert {c.impl for c in cam} == {"native", "triton", "chunked", "math"}
    assert len(set(cases)) == len(cases)
    # fp16 first, fp32 last: a spent budget cuts fp32 rows first
    order = [c.dtype for c in cases]
    assert order.index("bfloat16") > max(i for i, d in enumerate(order) if d == "float16")
    assert cases[0] == gc.Case("pam", "native", "fwd", 9216, 1, "float16")


def test_useful_flop_counts():
    fwd = gc.Case("pam", "native", "fwd", 9216, 8, "float16")
    assert fwd.useful_flop == 2 * 8 * 9216 * 9216 * (64 + 512)
    assert gc.Case("pam", "math", "fwd+bwd", 9216, 8, "float16").useful_flop == 3 * fwd.useful_flop
    cam = gc.Case("cam", "native", "fwd", 32768, 1, "float32")
    assert cam.useful_flop == 4 * 512 * 512 * 32768


def test_math_rows_that_cannot_fit_are_predicted_skipped():
    free = 79 * GIB
    big = gc.Case("pam", "math", "fwd+bwd", 32768, 8, "float32")
    assert gc.math_bytes_needed(big) == 3 * 8 * 32768**2 * 4  # 96 GiB
    reason = gc.predicted_skip(big, free)
    assert reason.startswith("would need 96 GiB (3 N×N maps of 32.0 GiB)")
    assert gc.predicted_skip(gc.Case("pam", "math", "fwd", 32768, 8, "float16"), free) is None  # 32 GiB
    assert gc.predicted_skip(gc.Case("pam", "native", "fwd+bwd", 32768, 8, "float32"), 1) is None
    assert gc.predicted_skip(gc.Case("cam", "math", "fwd+bwd", 32768, 8, "float32"), 1) is None
    skipped = [c for c in gc.plan_cases() if gc.predicted_skip(c, free)]
    assert skipped == [big]


def _result(impl, median_s, status="ok", reason="", **case):
    fields = {"op": "pam", "mode": "fwd", "n": 9216, "batch": 1, "dtype": "float16", **case}
    times = [median_s * 2, median_s, median_s * 0.5] if median_s else []
    return gc.CaseResult(gc.Case(impl=impl, **fields), status, reason, times, 10.0 if median_s else None)


def test_table_ratios_compare_rows_of_the_same_case_only():
    results = [_result("native", 0.01), _result("sdpa", 0.02), _result("math", 0.04),
               _result("math", 1.0, batch=8), _result("triton", None, "failed", "timed out after 60 s")]
    rows = gc.table_rows(results)
    native = rows[0]
    assert native[:6] == ["PAM", "9,216", "1", "float16", "fwd", "native"]
    assert native[6] == "10"  # ms
    assert float(native[7]) == pytest.approx(results[0].case.useful_flop / 0.01 / 1e12, rel=1e-2)
    assert native[9:] == ["0.25", "0.50"]  # vs math (0.04 s, B = 1, not the B = 8 row), vs sdpa
    assert rows[2][9:] == ["1.00", "2.00"]
    assert rows[4][6] == "failed: timed out after 60 s"
    table = gc.markdown_table(gc.TABLE_HEADER, rows)
    lines = table.splitlines()
    assert lines[0].startswith("| op | N |") and lines[1].count("---") == len(gc.TABLE_HEADER)
    assert all(line.count("|") == len(gc.TABLE_HEADER) + 1 for line in lines)


def test_report_is_written_with_environment_tests_and_table(tmp_path):
    results = [_result("native", 0.01), _result("math", None, "skipped", "would need 96 GiB")]
    tests = {"tests/test_cuda_native.py": {"passed": 3, "failed": 1, "errors": 0, "skipped": 0,
                                           "failed_ids": ["t::test_x"], "wall_s": 12.0},
             "tests/test_triton.py -k test_gpu_": {"problem": "timed out after 90 s"}}
    path = tmp_path / "sub" / "gpu_check.md"
    gc.write_report(path, ["GPU: test"], tests, results, 42.0)
    text = path.read_text()
    assert "- GPU: test" in text and "3 passed, 1 failed" in text and "failed: `t::test_x`" in text
    assert "timed out after 90 s" in text and "skipped: would need 96 GiB" in text and "took 42 s" in text


def test_parse_junit_counts(tmp_path):
    xml = tmp_path / "junit.xml"
    xml.write_text("""<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="4">
      <testcase classname="tests.a" name="ok"/>
      <testcase classname="tests.a" name="bad"><failure message="x"/></testcase>
      <testcase classname="tests.a" name="err"><error message="y"/></testcase>
      <testcase classname="tests.a" name="skip"><skipped message="needs a CUDA GPU"/></testcase>
    </testsuite></testsuites>""")
    counts = gc.parse_junit(xml)
    assert counts == {"passed": 1, "failed": 1, "errors": 1, "skipped": 1,
                      "failed_ids": ["tests.a::bad", "tests.a::err"]}


def test_dry_run_into_a_closed_pipe_ends_quietly():
    """`gpu_check.py --dry-run | head`: when the reader has closed the pipe, the plan stops with
    exit status 0 and no BrokenPipeError traceback. The pipe is closed before the script writes
    (it imports torch first), so that its first write already fails: no race with the pipe's buffer."""
    proc = subprocess.Popen([sys.executable, str(BENCHMARKS / "gpu_check.py"), "--dry-run"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 0, stderr
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr


def test_dry_run_prints_the_plan():
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py"), "--dry-run", "--dtypes", "float32"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "72 cases" in proc.stdout and "skipped: would need 96 GiB" in proc.stdout
    assert "estimated total: " in proc.stdout and "cost model (H200 run of 2026-12-04" in proc.stdout


def test_plan_cost_model():
    cases = [gc.Case("pam", "math", "fwd", 9216, 1, "float16"), gc.Case("pam", "chunked", "fwd", 9216, 1, "float16")]
    rows = [{"op": "attention", "device": "cuda:sm_90", "dtype": "float16", "mode": "forward", "Nq": 9216, "B": 1,
             "backend": "math", "median_ms": 0.5}]
    parts = gc.estimate_seconds(cases, 79 * GIB, rows, tests_s=100.0)
    calls = gc.WARMUPS + gc.REPEATS  # 0.5 ms: the time budget never cuts the 10 timed calls
    assert parts["timed calls"] == pytest.approx(2 * calls * 0.0005)  # chunked timed like the math
    assert parts["process starts"] == gc.PROCESS_START_S  # one row group
    assert parts["total"] == pytest.approx(gc.BUILD_S + 100.0 + gc.PROCESS_START_S + parts["timed calls"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_without_cuda_it_fails_fast_and_says_why():
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "--dry-run" in proc.stderr


def test_bad_dtype_is_refused():
    with pytest.raises(SystemExit):
        gc.parse_args(["--dtypes", "float8"])


@pytest.mark.parametrize("op, impl", [("pam", "native"), ("pam", "chunked"), ("pam", "math"), ("cam", "native"),
                                      ("cam", "chunked"), ("cam", "math")])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_run_case_measures_small_cases_on_the_cpu(op, impl, mode):
    pytest.importorskip("attnseg")
    import attnseg

    if impl == "native" and not attnseg.native_available():
        pytest.skip("needs the compiled extension")
    case = gc.Case(op, impl, mode, 40, 2, "float32")
    measured = gc.run_case(gc.dataclasses.asdict(case), device="cpu")
    assert 1 <= len(measured["times_s"]) <= gc.REPEATS and all(t > 0 for t in measured["times_s"])
    assert measured["peak_mib"] >= 0


def test_run_case_reports_an_sdpa_refusal_as_unsupported():
    # the memory-efficient SDPA kernel is CUDA-only: on the CPU forcing it is refused
    measured = gc.run_case(gc.dataclasses.asdict(gc.Case("pam", "sdpa", "fwd", 40, 1, "float32")), device="cpu")
    assert set(measured) == {"unsupported"} and "kernel" in measured["unsupported"].lower()


def test_first_triton_case_of_each_kind_gets_the_compile_timeout():
    args = gc.parse_args([])
    compiled = set()
    first = gc.Case("pam", "triton", "fwd", 9216, 1, "float16")
    assert gc.case_timeout(first, args, compiled) == args.compile_timeout
    assert gc.case_timeout(gc.Case("pam", "triton", "fwd", 32768, 8, "float16"), args, compiled) == args.case_timeout
    assert gc.case_timeout(gc.Case("pam", "triton", "fwd+bwd", 9216, 1, "float16"), args, compiled) \
        == args.compile_timeout
    assert gc.case_timeout(gc.Case("pam", "native", "fwd", 9216, 1, "bfloat16"), args, compiled) == args.case_timeout


def test_tests_import_the_attnseg_the_timings_use(tmp_path):
    """An attnseg built in place in this checkout (not installed) must be what the GPU tests
    import: pytest puts tests/ on sys.path, not the root (the first GPU run lost its tests so)."""
    environ = {"PATH": "/usr/bin:/bin", "ATTNSEG_QUIET": "1", "PYTHONPATH": str(tmp_path)}
    env = gc.pytest_environment(gc.REPO_ROOT / "attnseg", environ)
    assert env["ATTNSEG_REQUIRE_NATIVE"] == "1"
    assert env["PYTHONPATH"].split(":") == [str(gc.REPO_ROOT), str(tmp_path)]
    where = subprocess.run([sys.executable, "-c", "import attnseg; print(attnseg.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).resolve().parent == (gc.REPO_ROOT / "attnseg").resolve()
    # an installed attnseg (site-packages) is found as it is: the environment is left alone
    installed = gc.pytest_environment(tmp_path / "site-packages" / "attnseg", environ)
    assert installed["PYTHONPATH"] == str(tmp_path)


@pytest.mark.requires_native
def test_profile_case_lists_the_costliest_kernels_on_the_cpu():
    """The kernel profile runs its case under torch.profiler and ranks what it ran by self time
    (on the CPU: operators, among them the native attention ops)."""
    case = gc.Case("pam", "native", "fwd+bwd", 300, 1, "float32")
    kernels = gc.profile_case(gc.dataclasses.asdict(case), device="cpu")["kernels"]
    assert 1 <= len(kernels) <= gc.PROFILE_ROWS
    names = [name for name, _, _ in kernels]
    assert "attnseg::attention_bwd" in names and "attnseg::attention_fwd" in names, names
    times = [ms for _, _, ms in kernels]
    assert all(ms > 0 for ms in times) and times == sorted(times, reverse=True)
    assert all(calls >= 1 for _, calls, _ in kernels)


def test_profile_section_of_the_report(tmp_path):
    ok = _common.ChildOutcome({"kernels": [["flash_attention_bwd_dkdq_kernel<...>", 1, 25.125],
                                      ["flash_attention_kernel<...>", 1, 1.25]]}, None, None, 3.0)
    lines = gc.profile_lines(ok)
    assert "| flash_attention_bwd_dkdq_kernel<...> | 1 | 25.1 |" in lines[-1]
    assert "failed: killed by SIGKILL" in gc.profile_lines(_common.ChildOutcome(None, "killed by SIGKILL", None, 1.0))[-1]
    assert "not run" in gc.profile_lines(None)[-1]
    path = tmp_path / "gpu_check.md"
    gc.write_report(path, ["GPU: test"], {}, [], 1.0, lines)
    text = path.read_text()
    assert "## Kernel profile" in text and "flash_attention_bwd_dkdq_kernel" in text
    gc.write_report(path, ["GPU: test"], {}, [], 1.0)
    assert "## Kernel profile" not in path.read_text()


class _InProcessRunner:
    """IsolatedRunner's interface, running the target here on the CPU; `fail_groups`: every
    run_group call comes back as a dead child, as a crash or an OOM kill would."""

    def __init__(self, fail_groups=False):
        self.fail_groups, self.calls = fail_groups, []

    def run(self, target, payload, *, timeout_s=None):
        self.calls.append(target.__name__)
        if self.fail_groups and target is gc.run_group:
            return _common.ChildOutcome(None, "killed by SIGKILL (out of memory?)", None, 1.0)
        return _common.ChildOutcome(target(payload, device="cpu"), None, None, 0.1)


@pytest.mark.requires_native
def test_run_group_times_a_row_group_in_one_process_and_stops_after_an_error():
    cases = [gc.Case("pam", impl, "fwd", 40, 1, "float32") for impl in ("native", "sdpa", "math")]
    results = gc.run_group([gc.dataclasses.asdict(c) for c in cases], device="cpu")["results"]
    assert [sorted(r) for r in results] == [["peak_mib", "times_s"], ["unsupported"], ["peak_mib", "times_s"]]
    # an error that is not an out-of-memory stops the group: the case after it is not reported
    broken = gc.dataclasses.asdict(gc.Case("pam", "native", "fwd", 40, 1, "float64"))  # no such dtype here
    results = gc.run_group([gc.dataclasses.asdict(cases[0]), broken, gc.dataclasses.asdict(cases[2])], device="cpu")
    assert len(results["results"]) == 2 and "times_s" in results["results"][0]
    assert results["results"][1] == {"error": "KeyError: 'float64'"}


@pytest.mark.requires_native
@pytest.mark.parametrize("fail_groups", [False, True])
def test_time_cases_runs_groups_and_reruns_what_a_group_did_not_report(fail_groups):
    cases = [gc.Case("pam", impl, mode, 40, 1, "float32") for mode in ("fwd", "fwd+bwd") for impl in ("native", "math")]
    results = [gc.CaseResult(case) for case in cases]
    runner = _InProcessRunner(fail_groups)
    gc.time_cases(results, runner, gc.parse_args([]), gc.time.monotonic() + 300, free_bytes=64 * GIB)
    assert [r.status for r in results] == ["ok"] * 4 and all(r.median_s > 0 for r in results)
    # one process per row group; after a dead group child, each of its cases once more alone
    expected = ["run_group", "run_case", "run_case"] * 2 if fail_groups else ["run_group"] * 2
    assert runner.calls == expected


def test_time_cases_marks_what_the_budget_leaves_not_run():
    results = [gc.CaseResult(gc.Case("pam", impl, "fwd", 40, 1, "float32")) for impl in ("native", "math")]
    runner = _InProcessRunner()
    gc.time_cases(results, runner, gc.parse_args([]), gc.time.monotonic() + 1, free_bytes=64 * GIB)
    assert runner.calls == [] and [r.status for r in results] == ["not run"] * 2


def test_measured_rows_become_backend_table_rows():
    results = [_result("chunked", 0.002, op="pam", mode="fwd+bwd"), _result("sdpa", 0.003, op="pam", mode="fwd+bwd"),
               _result("math", None, status="not run", op="pam", mode="fwd+bwd")]
    rows = gc.backend_table_rows(results, "cuda:sm_90", "test")
    assert [r["backend"] for r in rows] == ["chunked"]  # sdpa is no backend; unmeasured rows are left out
    assert rows[0]["mode"] == "training" and rows[0]["op"] == "attention" and rows[0]["median_ms"] == 2.0
