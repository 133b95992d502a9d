"""Tests of benchmarks/gpu_check.py that run without a GPU: the plan (it covers every item and fits
the budget), the cost model, the memory model, the budget's skips, the worker process, the table
writer, the Triton tuned file and its loader, the report writer on synthetic results, the kernel
FLOP attribution, the interrupted test run, and the whole pipeline on the CPU at tiny sizes."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from helpers import BENCHMARKS, load_benchmark

gc = load_benchmark("gpu_check")

GIB = 1024**3
H100_FREE = 79 * GIB


def _plan_output(*flags) -> str:
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py"), "--plan", *flags],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


def test_plan_covers_every_item_most_important_first():
    groups = gc.plan_groups()
    timed = [g for g in groups if g.worker == "main" and g.kind == "time"]
    cases = {c for g in timed for c in g.cases}
    for op, impls in (("pam", ("native", "triton", "chunked", "math")), ("cam", ("native", "triton", "chunked", "math"))):
        for dtype in ("float16", "bfloat16", "float32"):
            for mode in ("fwd", "fwd+bwd"):
                for n in (9216, 32768):
                    for b in (1, 8):
                        assert all(gc.Case(op, impl, mode, n, b, dtype) in cases for impl in impls)
    # the first timed group: fp16 PAM forward + backward at N = 9,216 for every fused backend and the math
    assert timed[0].cases == [gc.Case("pam", impl, "fwd+bwd", 9216, 1, "float16") for impl in gc.PAM_IMPLS]
    order = [(g.cases[0].op, g.cases[0].dtype) for g in timed]
    assert order.index(("pam", "bfloat16")) > max(i for i, k in enumerate(order) if k == ("pam", "float16"))
    assert order.index(("pam", "float32")) > max(i for i, k in enumerate(order) if k == ("pam", "bfloat16"))
    assert order.index(("cam", "float16")) > max(i for i, k in enumerate(order) if k[0] == "pam")
    kinds = [g.kind for g in groups if g.worker == "main"]
    assert kinds.index("profile") > max(i for i, k in enumerate(kinds) if k == "time")
    assert kinds.index("sweep") > kinds.index("profile") and kinds[-1] == "sweep"
    # peers: every SDPA backend in every dtype and mode, FlexAttention in its dtypes
    peers = {c for g in groups if g.worker == "peers" for c in g.cases}
    for dtype in ("float16", "bfloat16", "float32"):
        for impl in gc.SDPA_BACKENDS:
            assert gc.Case("pam", impl, "fwd+bwd", 32768, 8, dtype) in peers
    assert {c.dtype for c in peers if c.impl == "flex"} == set(gc.FLEX_DTYPES)
    # profiles: each fused backend, fwd and fwd+bwd; the sweep: the other DANet sizes
    profiled = next(g for g in groups if g.kind == "profile").cases
    assert {(c.impl, c.mode) for c in profiled} == {(i, m) for i in gc.FUSED for m in gc.MODES}
    swept = {c for g in groups if g.kind == "sweep" for c in g.cases}
    assert {c.n for c in swept} == set(gc.SWEEP_SIZES) and {c.impl for c in swept} == set(gc.PAM_IMPLS)


def test_plan_estimate_fits_the_budget_and_names_what_it_runs():
    out = _plan_output()
    lines = out.strip().splitlines()
    total = int(re.fullmatch(r"estimated total: (\d+) s \(budget 540 s\)", lines[-1]).group(1))
    assert 300 <= total <= 540
    assert lines[-2].startswith("cost model (the H200 run of 2026-12-04")
    for needed in ("sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math", "flex", "Triton precompile",
                   "GPU tests", "kernel profiles", "autotune sweep", "attnseg/triton/tuned/", "cuda:sm_XY",
                   "fwd_BLOCK_M"):
        assert needed in out, needed
    assert "pam math fwd+bwd N=32768 B=8 float32 -> skipped: would need 128 GiB (4 N×N maps of 32.0 GiB)" in out
    # fewer dtypes, less time; without the build the estimate drops by the build's share
    assert int(re.search(r"estimated total: (\d+)", _plan_output("--dtypes", "float16")).group(1)) < total


def test_plan_into_a_closed_pipe_ends_quietly():
    proc = subprocess.Popen([sys.executable, str(BENCHMARKS / "gpu_check.py"), "--plan"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 0, stderr
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr


# ---------------------------------------------------------------------------------------------
# The cost model and the memory model
# ---------------------------------------------------------------------------------------------


def test_model_reads_the_h200_medians_and_scales_stand_ins():
    medians = gc.measured_medians()
    assert medians[("pam", "triton", "fwd+bwd", 9216, 1)] == pytest.approx(3.87e-3)
    assert medians[("pam", "sdpa", "fwd", 32768, 8)] == pytest.approx(90.9e-3)
    assert all(key[0] in ("pam", "cam") for key in medians) and len(medians) >= 48
    # chunked: the math's median times its factor; fp32 the dtype factor; a size in between scaled by N²·B
    math_case = gc.Case("pam", "math", "fwd", 9216, 1, "float16")
    chunked = gc.Case("pam", "chunked", "fwd", 9216, 1, "float32")
    assert gc.predicted_median_s(chunked, medians) == pytest.approx(
        gc.predicted_median_s(math_case, medians) * gc.STAND_INS["chunked"][1] * gc.DTYPE_SLOWDOWN["float32"])
    bigger = gc.Case("pam", "math", "fwd", 9216, 2, "float16")
    assert gc.predicted_median_s(bigger, medians) == pytest.approx(2 * medians[("pam", "math", "fwd", 9216, 1)])


def test_case_cost_warm_up_repeats_and_slow_calls():
    fast = {("pam", "math", "fwd", 9216, 1): 0.001}
    case = gc.Case("pam", "math", "fwd", 9216, 1, "float16")
    assert gc.predicted_case_s(case, fast) == pytest.approx((gc.WARMUPS + gc.REPEATS) * 0.001 + gc.CASE_OVERHEAD_S)
    slow = {("pam", "native", "fwd+bwd", 32768, 8): 2.47}
    big = gc.Case("pam", "native", "fwd+bwd", 32768, 8, "float16")
    seen = set()
    assert gc.predicted_case_s(big, slow, seen) == pytest.approx(2 * 2.47 + gc.CASE_OVERHEAD_S)  # first: warm-up + 1
    assert gc.predicted_case_s(big, slow, seen) == pytest.approx(2.47 + gc.CASE_OVERHEAD_S)  # then its warm-up alone
    assert gc.predicted_case_s(gc.Case("pam", "sdpa-flash", "fwd", 9216, 1, "float16"), slow) == gc.REFUSAL_S


def test_compile_cost_counts_each_kernel_dtype_and_key_once():
    compiled = set()
    first = gc.Group("g", "main", "time", [gc.Case("pam", "triton", "fwd+bwd", 9216, 1, "float16")])
    per_key = sum(gc.triton_kept(k, "float16") for k in gc.TRITON_KERNELS[("pam", "fwd+bwd")]) * (
        gc.TRITON_CACHED_S + gc.TRITON_BENCH_S)
    assert gc.compile_s(first, compiled) == pytest.approx(per_key)
    assert gc.compile_s(first, compiled) == 0  # the same kernels and key: the autotuner's cache
    same_key = gc.Group("g", "main", "time", [gc.Case("pam", "triton", "fwd", 16384, 8, "float16")])
    assert gc.compile_s(same_key, compiled) == 0  # N = 16,384 rounds to N = 9,216's key
    unaligned = gc.Group("g", "main", "time", [gc.Case("pam", "triton", "fwd", 9409, 8, "float16")])
    assert gc.compile_s(unaligned, compiled) == pytest.approx(gc.TRITON_UNALIGNED_LAUNCHES * gc.TRITON_COMPILE_S)
    # where the precompile fell short, the autotuner compiles every kept config itself
    bf16 = gc.Group("g", "main", "time", [gc.Case("pam", "triton", "fwd", 9216, 1, "bfloat16")])
    assert gc.compile_s(bf16, set(), precompiled=False) == pytest.approx(
        gc.triton_kept("_attn_fwd", "bfloat16") * (gc.TRITON_COMPILE_S + gc.TRITON_CACHED_S + gc.TRITON_BENCH_S))
    flex = gc.Group("g", "peers", "time", [gc.Case("pam", "flex", "fwd", n, 1, "float16") for n in (9216, 32768)])
    assert gc.compile_s(flex, compiled) == gc.FLEX_COMPILE_S["fwd"]  # dynamic shapes: one compile


def test_estimate_adds_the_parts_and_overlaps_the_build():
    groups = gc.plan_groups()
    medians = gc.measured_medians()
    parts = gc.estimate_seconds(groups, H100_FREE, medians)
    beside = max(gc.BUILD_S, parts["peers (beside the build)"], parts["precompile (beside the build)"])
    assert parts["build ∥ peers ∥ Triton precompile"] == pytest.approx(beside)
    assert parts["total"] == pytest.approx(beside + parts["tests"] + parts["process starts"] + parts["main process"]
                                           + parts["report"])
    assert parts["process starts"] == 2 * gc.PROCESS_START_S  # this process and the timings'
    assert parts["precompile (beside the build)"] == pytest.approx(gc.precompile_s(["bfloat16", "float16", "float32"]))
    without_build = gc.estimate_seconds(groups, H100_FREE, medians, build=False)
    assert without_build["total"] < parts["total"]


def test_memory_model_skips_only_maps_that_cannot_fit():
    big = gc.Case("pam", "math", "fwd+bwd", 32768, 8, "float16")
    assert gc.math_bytes_needed(big) == 4 * 8 * 32768**2 * 2  # 64 GiB, as the H200 run measured (66,048 MiB)
    assert gc.predicted_skip(big, H100_FREE) is None
    assert gc.predicted_skip(big, 60 * GIB).startswith("would need 64 GiB (4 N×N maps of 16.0 GiB) of 60 GiB free")
    assert gc.math_bytes_needed(gc.Case("pam", "math", "fwd", 32768, 8, "float32")) == 2 * 8 * 32768**2 * 4
    assert gc.math_bytes_needed(gc.Case("pam", "sdpa-math", "fwd", 9216, 1, "float16")) == 2 * 9216**2 * 4
    assert gc.math_bytes_needed(gc.Case("pam", "triton", "fwd+bwd", 32768, 8, "float32")) == 0
    assert gc.math_bytes_needed(gc.Case("cam", "math", "fwd+bwd", 32768, 8, "float32")) == 0
    skipped = {(c.impl, c.dtype) for g in gc.plan_groups() for c in g.cases if gc.predicted_skip(c, H100_FREE)}
    assert skipped == {("math", "float32"), ("sdpa-math", "float16"), ("sdpa-math", "bfloat16"), ("sdpa-math", "float32")}


@pytest.mark.skipif(not gc.triton_available(), reason="needs triton (the prune runs without a GPU)")
def test_kept_config_counts_of_the_model_still_hold():
    """TRITON_KEPT is what the prune keeps for sm_90 at the DANet launches; a change of the kernels'
    configs that moves it by more than half must update the model."""
    for dtype in ("float16", "float32"):
        jobs = gc.triton_jobs({"dtypes": [dtype], "batches": [1], "n": 9216, "arch": 90, "shared_memory": 232448})
        counted = {}
        for kernel, *_ in jobs:
            counted[kernel.__name__] = counted.get(kernel.__name__, 0) + 1
        for kernel in {k for ks in gc.TRITON_KERNELS.values() for k in ks}:
            model = gc.triton_kept(kernel, dtype)
            assert model / 1.5 <= counted.get(kernel, 0) <= model * 1.5, (kernel, dtype, counted)


# ---------------------------------------------------------------------------------------------
# The budget, the groups and the worker
# ---------------------------------------------------------------------------------------------


class _FakeWorker:
    """Worker's interface, running the functions here; ``die_at``: the case index at which the
    "process" dies (the reply of that request stops before it)."""

    def __init__(self, die_at=None):
        self.calls, self.die_at = [], die_at

    def call(self, name, payload, timeout_s):
        self.calls.append((name, len(payload)))
        if self.die_at is not None and self.die_at < len(payload):
            done = gc.run_group(payload[:self.die_at], device="cpu")
            self.die_at = None
            return done, "the process died (SIGKILL)"
        return getattr(gc, name)(payload, device="cpu"), None

    def kill(self):
        self.calls.append(("kill", 0))


def test_budget_skips_a_group_that_cannot_fit_and_says_so():
    budget = gc.Budget(100.0)
    assert budget.fits("small", 10.0) and budget.log == []
    assert not budget.fits("PAM float32 fwd N=9,216 B=1", 500.0)
    assert re.match(r"PAM float32 fwd N=9,216 B=1: skipped, (99|100) s of the 100 s budget left, "
                    r"the cost model predicts 500 s", budget.log[0])


def test_run_groups_skips_by_the_model_and_reruns_after_a_death(monkeypatch):
    cases = [gc.Case("pam", impl, "fwd", 40, 1, "float32") for impl in ("chunked", "math")]
    slow = [gc.Case("pam", "math", "fwd", 40, 1, "bfloat16")]
    groups = [gc.Group("fast", "main", "time", cases), gc.Group("slow", "main", "time", slow)]
    medians = {("pam", "math", "fwd", 40, 1): 0.001, ("pam", "chunked", "fwd", 40, 1): 0.001}
    monkeypatch.setitem(gc.DTYPE_SLOWDOWN, "bfloat16", 1e6)  # the bf16 group is predicted to take far too long
    worker = _FakeWorker(die_at=0)
    results, extra = {}, {}
    budget = gc.Budget(100.0)
    gc.run_groups(groups, {"main": worker}, budget, medians, 64 * GIB, results, {}, extra)
    # the group's process died at its first case: that case failed, the rest ran in a second request
    assert results[cases[0]].status == "failed" and "died" in results[cases[0]].reason
    assert results[cases[1]].status == "ok" and results[cases[1]].median_s > 0
    assert worker.calls == [("run_group", 2), ("run_group", 1)]
    assert results[slow[0]].status == "not run" and budget.log and budget.log[0].startswith("slow: skipped")


def test_worker_process_serves_requests_and_survives_an_error():
    worker = gc.Worker("cpu")
    try:
        case = gc.dataclasses.asdict(gc.Case("pam", "math", "fwd", 32, 1, "float32"))
        result, why = worker.call("run_group", [case], timeout_s=300)
        assert why is None and "times_s" in result["results"][0]
        result, why = worker.call("no_such_function", None, timeout_s=60)
        assert result is None and why.startswith("KeyError")
        result, why = worker.call("run_group", [case], timeout_s=300)  # the same process, still serving
        assert why is None and worker.starts == 1
    finally:
        worker.close()


@pytest.mark.parametrize("impl", ["chunked", "math", "sdpa-math", "flex"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_run_case_measures_small_cases_on_the_cpu(impl, mode):
    measured = gc.run_case(gc.dataclasses.asdict(gc.Case("pam", impl, mode, 40, 2, "float32")), device="cpu")
    if impl == "flex" and mode == "fwd+bwd":  # FlexAttention has no backward on the CPU: a reason, not a crash
        assert "backward" in measured["unsupported"]
        return
    assert 1 <= len(measured["times_s"]) <= gc.REPEATS and all(t > 0 for t in measured["times_s"])
    assert measured["peak_mib"] >= 0 and measured["wall_s"] > 0


def test_sdpa_backends_that_refuse_ev_unlike_e_say_why():
    measured = gc.run_case(gc.dataclasses.asdict(gc.Case("pam", "sdpa-flash", "fwd", 40, 1, "float32")), device="cpu")
    assert "same last dimension" in measured["unsupported"] and "Triggered internally" not in measured["unsupported"]
    measured = gc.run_case(gc.dataclasses.asdict(gc.Case("pam", "sdpa-efficient", "fwd", 40, 1, "float32")), device="cpu")
    assert set(measured) == {"unsupported", "wall_s"}


# ---------------------------------------------------------------------------------------------
# Build, tests
# ---------------------------------------------------------------------------------------------


def test_build_is_for_this_gpu_only():
    env = gc.build_environment((9, 0), {"PATH": "/bin", "TORCH_CUDA_ARCH_LIST": "8.0;8.6;9.0+PTX"})
    assert env["TORCH_CUDA_ARCH_LIST"] == "9.0" and env["ATTNSEG_FORCE_CUDA"] == "1"
    assert int(env["MAX_JOBS"]) >= 1 and env["PATH"] == "/bin"
    assert gc.build_environment((10, 0), {})["TORCH_CUDA_ARCH_LIST"] == "10.0"


def test_tests_import_the_attnseg_the_timings_use(tmp_path):
    environ = {"PATH": "/usr/bin:/bin", "ATTNSEG_QUIET": "1", "PYTHONPATH": str(tmp_path)}
    env = gc.pytest_environment(gc.REPO_ROOT / "attnseg", environ)
    assert env["ATTNSEG_REQUIRE_NATIVE"] == "1"
    assert env["PYTHONPATH"].split(":") == [str(gc.REPO_ROOT), str(tmp_path)]
    installed = gc.pytest_environment(tmp_path / "site-packages" / "attnseg", environ)
    assert installed["PYTHONPATH"] == str(tmp_path)


def test_an_interrupted_test_run_still_counts_what_ran(tmp_path):
    suite = tmp_path / "test_slow.py"
    suite.write_text("import time\n\ndef test_quick():\n    assert True\n\ndef test_slow():\n    time.sleep(120)\n")
    outcome = gc.run_tests(20.0, tmp_path / "attnseg", targets=(str(suite),))
    assert outcome["passed"] == 1 and outcome["failed"] == 0, outcome
    assert outcome["interrupted"].startswith("interrupted at the test budget (20 s)")
    assert outcome["wall_s"] < 60
    assert "1 passed" in gc.test_summary_line(outcome) and "interrupted" in gc.test_summary_line(outcome)


def test_parse_junit_counts(tmp_path):
    xml = tmp_path / "junit.xml"
    xml.write_text("""<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="4">
      <testcase classname="tests.a" name="ok"/>
      <testcase classname="tests.a" name="bad"><failure message="x"/></testcase>
      <testcase classname="tests.a" name="err"><error message="y"/></testcase>
      <testcase classname="tests.a" name="skip"><skipped message="needs a CUDA GPU"/></testcase>
    </testsuite></testsuites>""")
    assert gc.parse_junit(xml) == {"passed": 1, "failed": 1, "errors": 1, "skipped": 1,
                                   "failed_ids": ["tests.a::bad", "tests.a::err"]}


# ---------------------------------------------------------------------------------------------
# Outputs: auto's table, Triton's tuned file, the report
# ---------------------------------------------------------------------------------------------


def _result(impl, median_s, status="ok", reason="", **case):
    fields = {"op": "pam", "mode": "fwd", "n": 9216, "batch": 1, "dtype": "float16", **case}
    times = [median_s * 2, median_s, median_s * 0.5] if median_s else []
    return gc.CaseResult(gc.Case(impl=impl, **fields), status, reason, times, 10.0 if median_s else None)


def test_measured_rows_replace_this_gpus_rows_in_autos_table(tmp_path):
    load_benchmark("backend_table")
    from backend_table import merge_rows

    table = tmp_path / "backend_table.json"
    old = gc.backend_table_rows([_result("chunked", 0.004, mode="fwd+bwd")], "cuda:sm_90", "old")
    other = gc.backend_table_rows([_result("chunked", 0.009, mode="fwd+bwd")], "cuda:sm_80", "other")
    merge_rows(str(table), old + other)
    results = [_result("chunked", 0.002, mode="fwd+bwd"), _result("sdpa-efficient", 0.003, mode="fwd+bwd"),
               _result("flex", 0.003, mode="fwd+bwd"), _result("math", None, status="not run", mode="fwd+bwd"),
               _result("triton", 0.001, op="cam", n=32768, batch=8)]
    rows = gc.backend_table_rows(results, "cuda:sm_90", "new")
    assert [r["backend"] for r in rows] == ["chunked", "triton"]  # peers are no backends; unmeasured rows left out
    assert rows[0]["mode"] == "training" and rows[0]["op"] == "attention" and rows[0]["median_ms"] == 2.0
    assert rows[1]["op"] == "channel_attention" and rows[1]["C"] == 512 and rows[1]["N"] == 32768
    assert merge_rows(str(table), rows) == 3
    written = json.loads(table.read_text())["rows"]
    sm90 = [r for r in written if r["device"] == "cuda:sm_90" and r["backend"] == "chunked"]
    assert [r["source"] for r in sm90] == ["new"]  # replaced, not duplicated
    assert any(r["device"] == "cuda:sm_80" for r in written)  # another GPU's rows stay


class _Config:
    def __init__(self, kwargs, num_warps, num_stages):
        self.kwargs, self.num_warps, self.num_stages = kwargs, num_warps, num_stages


class _Autotuner:
    keys = ["TUNE_NQ", "TUNE_NK", "E", "EV"]

    def __init__(self, cache):
        self.cache = cache


def test_autotune_choices_round_trip_through_the_tuned_file(tmp_path):
    from attnseg.triton import tuned

    fp16 = ("torch.float16",) * 4 + ("torch.float32",)
    tuner = _Autotuner({(16384, 16384, 64, 512, *fp16): _Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_EV": 128}, 8, 2),
                        (32768, 32768, 64, 512, *fp16): _Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_EV": 256}, 4, 3)})
    entries = gc.autotuner_entries("_attn_fwd", tuner)
    assert entries[0] == {"kernel": "_attn_fwd", "dtypes": ["float16"] * 4 + ["float32"],
                          "key": {"TUNE_NQ": 16384, "TUNE_NK": 16384, "E": 64, "EV": 512},
                          "config": {"kwargs": {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_EV": 128},
                                     "num_warps": 8, "num_stages": 2}}
    info = {"gpu": "NVIDIA H100 80GB HBM3", "arch": "sm_90", "triton": "3.6.0", "torch": "2.11"}
    path = tmp_path / f"{tuned.gpu_kind(info['gpu'])}.json"
    assert path.name == "nvidia-h100-80gb-hbm3.json"
    assert gc.write_tuned(path, info, entries, "test") == 2
    newer = [{**entries[0], "config": {"kwargs": {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_EV": 128}, "num_warps": 4,
                                       "num_stages": 2}}]
    assert gc.write_tuned(path, info, newer, "test") == 2  # the same kernel, dtypes and key: replaced
    tuned.load_entries.cache_clear()
    key = {"TUNE_NQ": 16384, "TUNE_NK": 16384, "E": 64, "EV": 512, "NQ": 9216,
           "dtypes": [torch.float16] * 4 + [torch.float32]}
    device = ("NVIDIA H100 80GB HBM3", "sm_90")
    assert tuned.best_config("_attn_fwd", key, device, tmp_path)["kwargs"] == {"BLOCK_M": 64, "BLOCK_N": 32,
                                                                             "BLOCK_EV": 128}
    # another GPU of the same architecture falls back on this file; another architecture, or dtype, finds nothing
    assert tuned.best_config("_attn_fwd", key, ("NVIDIA H200", "sm_90"), tmp_path) is not None
    assert tuned.best_config("_attn_fwd", key, ("NVIDIA A100", "sm_80"), tmp_path) is None
    assert tuned.best_config("_attn_fwd", {**key, "dtypes": [torch.bfloat16] * 4 + [torch.float32]}, device,
                             tmp_path) is None
    assert tuned.best_config("_attn_bwd_dq", key, device, tmp_path) is None
    assert tuned.best_config("_attn_fwd", key, torch.device("cpu"), tmp_path) is None


def test_narrow_keeps_the_tuned_config_where_it_is_among_the_candidates(tmp_path):
    from attnseg.triton import tuned

    (tmp_path / "nvidia-h200.json").write_text(json.dumps({"arch": "sm_90", "entries": [
        {"kernel": "_attn_bwd_dq", "dtypes": ["float16", "float16"], "key": {"TUNE_NQ": 16384},
         "config": {"kwargs": {"BLOCK_M": 64, "BLOCK_N": 32}, "num_warps": 4, "num_stages": 3}}]}))
    tuned.load_entries.cache_clear()
    candidates = [_Config({"BLOCK_M": 64, "BLOCK_N": 32}, 4, 2), _Config({"BLOCK_M": 64, "BLOCK_N": 32}, 4, 3),
                  _Config({"BLOCK_M": 128, "BLOCK_N": 64}, 8, 3)]
    args = {"Q": torch.empty(1, dtype=torch.float16), "dQ": torch.empty(1, dtype=torch.float16), "TUNE_NQ": 16384,
            "BLOCK_E": 64}
    device = ("NVIDIA H200", "sm_90")
    assert tuned.narrow(candidates, "_attn_bwd_dq", args, device, tmp_path) == [candidates[1]]
    assert tuned.narrow(candidates, "_attn_bwd_dq", {**args, "TUNE_NQ": 32768}, device, tmp_path) == candidates
    assert tuned.narrow(candidates[:1], "_attn_bwd_dq", args, device, tmp_path) == candidates[:1]  # pruned away


def test_kernel_flops_by_name_and_pooled_gemms():
    case = gc.Case("pam", "triton", "fwd+bwd", 9216, 8, "float16")
    fwd = 2.0 * 8 * 9216**2 * (64 + 512)
    assert gc.kernel_flop("_attn_fwd", case) == fwd
    assert gc.kernel_flop("_attn_bwd_dkdv", case) == 2 * fwd
    assert gc.kernel_flop("_attn_bwd_dq", case) == 2.0 * 8 * 9216**2 * (2 * 64 + 512)
    assert gc.kernel_flop("void flash_attention_bwd_dkdq_kernel<64, 512>(...)", case) == 2.0 * 8 * 9216**2 * (3 * 64 + 512)
    assert gc.kernel_flop("flash_attention_bwd_dq_convert_kernel", case) is None
    assert gc.kernel_flop("_attn_bwd_delta", case) is None
    chunked = gc.Case("pam", "chunked", "fwd", 9216, 8, "float16")
    rows = gc.profile_rows(chunked, {"kernels": [["sm90_xmma_gemm_f16f16_f32", 2, 3.0], ["elementwise_exp", 1, 1.0]],
                                     "total_ms": 4.0})
    assert rows[0][:4] == ["sm90_xmma_gemm_f16f16_f32", "2", "3", "75 %"] and rows[0][4] == "-"
    assert rows[-1][0] == "all 1 GEMM kernels together" and float(rows[-1][4]) == pytest.approx(fwd / 3e-3 / 1e12, rel=1e-2)


def test_report_and_json_on_synthetic_results(tmp_path):
    results = [_result("native", 0.01), _result("triton", 0.005), _result("math", 0.04),
               _result("sdpa-flash", None, "unsupported", "Flash attention requires q,k,v to have the same last dimension"),
               _result("math", None, "skipped", "would need 128 GiB", n=32768, batch=8),
               _result("chunked", 0.002, n=16384)]
    profile_case = gc.Case("pam", "triton", "fwd", 9216, 1, "float16")
    profiles = {profile_case: {"kernels": [["_attn_fwd", 1, 1.0]], "total_ms": 1.0},
                gc.Case("pam", "native", "fwd", 9216, 1, "float16"): {"error": "RuntimeError: x"}}
    tuning = [{"kernel": "_attn_fwd", "dtypes": ["float16", "float32"], "key": {"TUNE_NQ": 16384},
               "config": {"kwargs": {"BLOCK_M": 128}, "num_warps": 8, "num_stages": 2}}]
    info = {"gpu": "NVIDIA H100", "arch": "sm_90", "memory_gib": 80, "sms": 132, "driver": "580.1", "torch": "2.11",
            "cuda": "13.0", "triton": "3.6.0", "attnseg_commit": "abc1234"}
    tests = {"passed": 16, "failed": 0, "errors": 0, "skipped": 0, "failed_ids": [], "wall_s": 40.0,
             "interrupted": "interrupted at the test budget (45 s)"}
    build = {"ok": True, "wall_s": 130.0, "arch": "9.0", "tail": []}
    log = ["CAM float32 fwd N=32,768 B=8: skipped, 3 s of the 540 s budget left, the cost model predicts 5 s"]
    path = tmp_path / "gpu" / "nvidia-h100.md"
    gc.write_report(path, info, build, tests, results, profiles, tuning, log, 530.0,
                    {"jobs": 393, "compiled": 390, "failed": [], "wall_s": 40.0})
    text = path.read_text()
    assert "NVIDIA H100 (sm_90, 80 GiB, 132 SMs), driver 580.1" in text and "attnseg commit abc1234" in text
    assert "TORCH_CUDA_ARCH_LIST=9.0: ok in 130 s" in text and "390 of 393 configs" in text
    assert "16 passed, 0 failed" in text and "interrupted at the test budget" in text
    assert log[0] in text and "took 530 s" in text
    assert "| PAM | 9,216 | 1 | float16 | fwd | triton | 5 |" in text and "| 0.12 |" in text  # vs the math: 5 / 40
    assert "unsupported: Flash attention requires" in text and "skipped: would need 128 GiB" in text
    assert "## Sweep" in text and "| PAM | 16,384 | 1 | float16 | fwd | chunked |" in text
    fwd_tflops = 2 * 9216**2 * 576 / 1e-3 / 1e12
    assert f"| _attn_fwd | 1 | 1 | 100 % | {fwd_tflops:.3g} |" in text and "RuntimeError: x" in text
    assert "| _attn_fwd | float16/float32 | TUNE_NQ=16384 | BLOCK_M=128, warps=8, stages=2 |" in text
    gc.write_json(path.with_suffix(".json"), info, build, tests, results, profiles, tuning, log, 530.0)
    data = json.loads(path.with_suffix(".json").read_text())
    assert data["environment"]["driver"] == "580.1" and len(data["results"]) == len(results)
    assert data["results"][1]["median_ms"] == pytest.approx(5.0) and data["results"][3]["status"] == "unsupported"
    assert data["triton_tuning"] == tuning and data["profiles"][1]["error"] == "RuntimeError: x"


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_without_cuda_it_fails_fast_and_says_why():
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "--plan" in proc.stderr and "--dry-run" in proc.stderr


def test_bad_dtype_is_refused():
    with pytest.raises(SystemExit):
        gc.parse_args(["--dtypes", "float8"])
    with pytest.raises(SystemExit):
        gc.parse_args(["--flex-dtypes", "int8"])


@pytest.mark.requires_native
def test_tiny_cpu_dry_run_runs_every_step(tmp_path):
    """``--dry-run``: the peers' and the timings' worker processes, the Triton precompile's process
    (counting), every group, the profiles, the sweep, the report, the JSON and auto's table, on the
    CPU at tiny sizes, written under tmp_path (the repository's files are left alone)."""
    table = gc.REPO_ROOT / "attnseg" / "backend_table.json"
    before = table.read_text()
    output = tmp_path / "cpu.md"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py"), "--dry-run", "--output", str(output)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert table.read_text() == before
    data = json.loads(output.with_suffix(".json").read_text())
    status = {(r["op"], r["impl"], r["mode"], r["n"]): r["status"] for r in data["results"]}
    n = gc.DRY_RUN["sizes"][0]
    for op in ("pam", "cam"):
        for impl in ("native", "chunked", "math"):
            assert status[(op, impl, "fwd+bwd", n)] == "ok" and status[(op, impl, "fwd", n)] == "ok"
        assert status[(op, "triton", "fwd", n)] == "unsupported"  # no interpreter here: a reason, not a crash
    assert status[("pam", "sdpa-math", "fwd", n)] == "ok" and status[("pam", "sdpa-flash", "fwd", n)] == "unsupported"
    assert status[("pam", "flex", "fwd", n)] == "ok"
    assert status[("pam", "math", "fwd", gc.DRY_RUN["sweep_sizes"][0])] == "ok"
    assert data["build"]["triton_precompile"]["jobs"] > 0
    assert any("kernels" in p for p in data["profiles"]) and data["budget_log"] == []
    rows = json.loads((tmp_path / "backend_table.json").read_text())["rows"]
    assert {r["backend"] for r in rows} == {"native", "chunked", "math"} and all(r["device"].startswith("cpu:") for r in rows)
    assert "## Kernel profiles" in output.read_text()
