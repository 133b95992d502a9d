"""Helpers shared by the attnseg benchmarks: isolation, peak memory, timing, output.

One place for everything a benchmark script needs besides its own workload:

* :func:`import_attnseg`: imports the installed attnseg, or the checkout this file lives in.
* :class:`IsolatedRunner`: runs one measurement in a fresh child process (forked from a
  forkserver that has already imported torch, so a child starts in milliseconds) and turns a
  crash, a kill (e.g. by the OOM killer) or a timeout into a failure reason.
* :class:`PeakMemoryMeter`: peak memory of a call above what was resident before it (see its
  docstring for the method), and :func:`check_memory_meter`, which validates it on tensors of
  known size.
* :func:`measure_call`: warm-up, then repeats, each timed (and measured for memory);
  :func:`forward_call`: a forward (or forward and backward) and its gradient reset, to measure.
* :class:`GemmRoofline`: torch.mm's FLOP/s before and after a sweep; :class:`PairedGemmProbe` and
  :func:`paired_of_roof`: the same read beside every call of a case, for hosts whose speed drifts.
* :func:`parse_sizes`, :func:`parse_choices`: argparse types; :func:`machine_load_note`: a
  warning when other processes keep the cores busy.
* :func:`format_table`, :func:`write_csv`, :func:`plot_loglog`, :func:`progress`: output.
  matplotlib is optional: without it :func:`plot_loglog` says why and writes nothing.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import ctypes.util
import dataclasses
import gc
import importlib
import math
import multiprocessing
import multiprocessing.forkserver
import os
import resource
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

MIB = 1024**2
REPO_ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# Imports and progress
# ---------------------------------------------------------------------------------------------


def import_attnseg():
    """Import attnseg: the installed package if there is one, else this checkout's.

    Sets ``ATTNSEG_QUIET=1`` first: benchmarks report a missing backend themselves, once,
    instead of the import-time warning (which would also repeat in every child process).
    """
    os.environ.setdefault("ATTNSEG_QUIET", "1")
    try:
        return importlib.import_module("attnseg")
    except ModuleNotFoundError as exc:
        if exc.name != "attnseg":
            raise
    sys.path.insert(0, str(REPO_ROOT))
    return importlib.import_module("attnseg")


def progress(message: str, *, end: str = "\n") -> None:
    """Progress on stderr (stdout carries only the results); ``end=""`` to finish the line later."""
    print(message, file=sys.stderr, end=end, flush=True)


# ---------------------------------------------------------------------------------------------
# Running one measurement in a fresh process
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ChildOutcome:
    """What came back from one child: ``result`` if it finished, else ``failure``."""

    result: dict | None
    failure: str | None  # short reason, e.g. "out of memory" or "killed by SIGKILL (out of memory?)"
    detail: str | None  # the exception with its message, where there was one
    wall_s: float


def _short_reason(exc: BaseException) -> str:
    """A few words for a table cell: "out of memory" for any allocation failure, else the type."""
    message = str(exc)
    if isinstance(exc, MemoryError) or "can't allocate memory" in message or "out of memory" in message:
        return "out of memory"
    return type(exc).__name__


def _child_entry(connection, target, payload, memory_headroom_bytes):
    """Runs in the child: limit its memory, call ``target(payload)``, send the outcome."""
    try:
        address_space = _proc_status_bytes("VmSize")
        if memory_headroom_bytes and address_space is not None:
            limit = address_space + memory_headroom_bytes
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        connection.send(("ok", target(payload)))
    except BaseException as exc:  # report everything, including MemoryError and KeyboardInterrupt
        detail = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
        try:
            connection.send(("error", _short_reason(exc), detail))
        except Exception:
            pass
    finally:
        connection.close()


def _describe_imports(modules: Sequence[str]) -> dict:
    """Runs in a child: the file each module comes from, and attnseg's native status."""
    found = {name: getattr(importlib.import_module(name), "__file__", None) for name in modules}
    if "attnseg" in modules:
        attnseg = sys.modules["attnseg"]
        found["native"] = "loaded" if attnseg.native_available() else f"NOT loaded: {attnseg.native_unavailable_reason()}"
    return found


def attnseg_used_line(parent_module, runner: "IsolatedRunner") -> str:
    """Header line naming the attnseg the measurements (in child processes) actually used."""
    child = runner.child_imports(("attnseg",))
    if "error" in child:
        return f"WARNING: could not ask a child process which attnseg it imports ({child['error']})"
    where = os.path.dirname(child["attnseg"])
    line = f"attnseg used by the measurements: {where} (native extension {child['native']})"
    if os.path.realpath(child["attnseg"]) != os.path.realpath(parent_module.__file__):
        line += f"\nWARNING: the child processes import {child['attnseg']}, this process {parent_module.__file__}"
    return line


class IsolatedRunner:
    """Runs ``target(payload) -> dict`` in a fresh process, one at a time (payload: picklable).

    Children are forked from a forkserver that imported ``preload`` (torch, attnseg) once but
    never ran a torch op, so each child is a clean process (no allocator state, no thread
    pools, no CUDA context) that starts in milliseconds instead of the ~2 s of a torch import.
    ``target`` must be a module-level function (it is pickled by name).
    """

    def __init__(self, preload: Sequence[str] = ("torch",)):
        methods = multiprocessing.get_all_start_methods()
        self.start_method = "forkserver" if "forkserver" in methods else "spawn"
        self._context = multiprocessing.get_context(self.start_method)
        if self.start_method == "forkserver":
            self._context.set_forkserver_preload(list(preload))
            self._start_forkserver_beside(preload)

    @staticmethod
    def _start_forkserver_beside(preload: Sequence[str]) -> None:
        """Start the forkserver so that it imports the same packages as this process.

        The forkserver is ``python -c ...``, so its sys.path starts with its current folder, and
        (CPython 3.11) it ignores the sys.path it is handed: started from a checkout's root it
        would import the source tree's attnseg (no compiled extension) although this process
        imported the installed one. Started with its current folder set to the folder that
        holds this process's attnseg, its first sys.path entry finds exactly that package.
        """
        module = sys.modules.get("attnseg") if "attnseg" in preload else None
        locations = list(getattr(getattr(module, "__spec__", None), "submodule_search_locations", None) or [])
        package_dir = Path(locations[0]) if locations else None
        if package_dir is None or not package_dir.is_dir():  # not imported, or from a zip: no trick
            multiprocessing.forkserver.ensure_running()  # (the header's child-import line still checks)
            return
        here = os.getcwd()
        os.chdir(package_dir.resolve().parent)
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            os.chdir(here)

    def child_imports(self, modules: Sequence[str] = ("attnseg",)) -> dict:
        """Where a child process imports ``modules`` from, and whether attnseg's kernels load there."""
        outcome = self.run(_describe_imports, tuple(modules), timeout_s=120)
        if outcome.result is None:
            return {"error": f"{outcome.failure}: {outcome.detail or ''}"}
        return outcome.result

    def run(self, target: Callable[[Any], dict], payload: Any, *, timeout_s: float | None = None,
            memory_headroom_bytes: int | None = None) -> ChildOutcome:
        """Run ``target(payload)`` in a child and wait for it (at most ``timeout_s``).

        ``memory_headroom_bytes`` (CPU only; CUDA reserves huge address ranges) limits the
        child's address space to its size at start plus that much, so that a case too big for
        the machine fails with an allocation error instead of waking the kernel's OOM killer.
        """
        started = time.perf_counter()
        receiver, sender = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=_child_entry, args=(sender, target, payload, memory_headroom_bytes), daemon=True
        )
        process.start()
        sender.close()
        message, timed_out = None, False
        try:
            if receiver.poll(timeout_s):  # also true at end of file: the child died
                message = receiver.recv()
            else:
                timed_out = True
                process.kill()
        except EOFError:  # the child died before sending anything; its exit code says how
            pass
        except BaseException:  # e.g. Ctrl-C: do not leave the child running
            process.kill()
            process.join()
            raise
        process.join()
        receiver.close()
        wall_s = time.perf_counter() - started
        if message is not None and message[0] == "ok":
            return ChildOutcome(message[1], None, None, wall_s)
        if message is not None:
            return ChildOutcome(None, message[1], message[2], wall_s)
        if timed_out:
            return ChildOutcome(None, f"timed out after {timeout_s:g} s", None, wall_s)
        code = process.exitcode
        if code is not None and code < 0:
            name = signal.Signals(-code).name
            hint = " (out of memory?)" if name == "SIGKILL" else ""
            return ChildOutcome(None, f"killed by {name}{hint}", None, wall_s)
        return ChildOutcome(None, f"child exited with status {code} without a result", None, wall_s)


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), or None."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ---------------------------------------------------------------------------------------------
# Peak memory
# ---------------------------------------------------------------------------------------------


def _proc_status_bytes(field: str) -> int | None:
    """A ``VmXXX`` field of /proc/self/status in bytes, or None where there is none."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _load_malloc_trim():
    path = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(path).malloc_trim if path else None
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


class PeakMemoryMeter:
    """Peak memory of a call above what was in use just before it, in MiB.

    CUDA: ``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()`` after
    ``torch.cuda.reset_peak_memory_stats()``: bytes handed out by the caching allocator.

    CPU (Linux), method "vmhwm": before the call, ``gc.collect()``, then ``malloc_trim(0)``
    (glibc), then ``"5"`` written to ``/proc/self/clear_refs``, which resets the peak resident
    set (VmHWM) to the current one, and the current resident set (VmRSS) is the baseline;
    after the call, the peak is VmHWM − baseline. The ``malloc_trim`` matters: glibc keeps
    freed blocks of up to 32 MiB resident in its heap for reuse, so without it memory freed by
    a warm-up call would already count in the baseline and hide the measured call's use of it.
    These are pages actually touched, as the kernel counts them (page granularity, allocator
    fragmentation included): what the process really needs, not what tensors add up to.

    CPU fallback "ru_maxrss", where clear_refs cannot be written: baseline = VmRSS before the
    call, peak = ru_maxrss after it. ru_maxrss is a lifetime peak that cannot be reset, so only
    the first call in the process is measured (one-time allocations included), and a call that
    does not raise the process's earlier peak reads NaN (unknown), not that earlier peak.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._malloc_trim = None
        if self.device.type == "cuda":
            self.method = "cuda"
            self.resettable = True
        elif self.device.type == "cpu":
            self._malloc_trim = _load_malloc_trim()
            self.resettable = _reset_peak_rss() and _proc_status_bytes("VmHWM") is not None
            self.method = "vmhwm" if self.resettable else "ru_maxrss"
        else:
            raise ValueError(f"no peak-memory measurement for device type {self.device.type!r}")
        self._baseline = 0
        self._earlier_peak = 0

    def describe(self) -> str:
        """One line naming the method, for a benchmark's header."""
        if self.method == "cuda":
            return "torch.cuda.max_memory_allocated() above memory_allocated() at the start of the call"
        trim = "gc + malloc_trim(0)" if self._malloc_trim is not None else "gc (no malloc_trim: not glibc)"
        if self.method == "vmhwm":
            return f"VmHWM - VmRSS of a fresh process, {trim}, VmHWM reset via /proc/self/clear_refs"
        return (f"ru_maxrss - VmRSS ({trim}); /proc/self/clear_refs is not writable, so the peak cannot be "
                "reset: the first call of each process is measured, one-time allocations included")

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        """Take the baseline; call right before the measured call."""
        gc.collect()
        if self.device.type == "cuda":
            self.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline = torch.cuda.memory_allocated(self.device)
            return
        if self._malloc_trim is not None:
            self._malloc_trim(0)
        if self.resettable:
            _reset_peak_rss()
        self._earlier_peak = self._ru_maxrss_bytes()
        current = _proc_status_bytes("VmRSS")
        self._baseline = current if current is not None else self._earlier_peak

    def restart_peak(self) -> None:
        """Start a new peak, above the same baseline (a call's phases: forward, then backward)."""
        gc.collect()
        if self.device.type == "cuda":
            self.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        if self._malloc_trim is not None:
            self._malloc_trim(0)
        if self.resettable:
            _reset_peak_rss()

    def stop(self) -> float:
        """Peak above the baseline since :meth:`start` (or :meth:`restart_peak`), in MiB (NaN where it
        cannot be known)."""
        self.synchronize()
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.resettable:
            peak = _proc_status_bytes("VmHWM")
        else:
            peak = self._ru_maxrss_bytes()
            if peak <= self._earlier_peak and self._earlier_peak > self._baseline:
                return math.nan  # hidden under an earlier peak of the process
        return max(0, peak - self._baseline) / MIB

    @staticmethod
    def _ru_maxrss_bytes() -> int:
        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def check_memory_meter(device: str) -> dict:
    """Measure allocations of known size with :class:`PeakMemoryMeter` (run it in a child).

    Returns ``{"method": ..., "checks": [(label, expected MiB, measured MiB), ...]}``. The
    second check is the trap a warm-up sets: a block freed into glibc's heap stays resident.
    """
    device = torch.device(device)
    meter = PeakMemoryMeter(device)

    def floats(mib: int) -> torch.Tensor:  # torch.ones touches every page; torch.empty would not
        return torch.ones(mib * MIB // 4, device=device)

    checks = []
    meter.start()
    tensor = floats(1024)
    del tensor
    checks.append(("1024 MiB tensor", 1024.0, meter.stop()))
    if meter.resettable:
        for mib in (32, 16):  # each freed at once: raises glibc's mmap threshold, then leaves 16 MiB in its heap
            floats(mib)
        meter.start()
        tensor = floats(16)
        del tensor
        checks.append(("16 MiB tensor, same size freed just before", 16.0, meter.stop()))
    return {"method": meter.describe(), "checks": checks}


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CallMeasurement:
    peak_mib: float  # the largest peak over the measured calls
    times_s: list[float]

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)


def forward_call(forward: Callable[[], torch.Tensor], leaves: Sequence[torch.Tensor],
                 grad_out: torch.Tensor | None) -> tuple[Callable[[], None], Callable[[], None]]:
    """(call, drop_grads) of a workload: ``forward()`` under ``torch.no_grad()`` when ``grad_out``
    is None, else ``forward().backward(grad_out)``; ``drop_grads`` sets every leaf's .grad to None."""
    if grad_out is not None:
        def call():
            forward().backward(grad_out)
    else:
        def call():
            with torch.no_grad():
                forward()

    def drop_grads():
        for leaf in leaves:
            leaf.grad = None

    return call, drop_grads


def measure_call(call: Callable[[], Any], meter: PeakMemoryMeter, *, repeats: int, warmups: int = 1,
                 before_each: Callable[[], None] | None = None,
                 time_budget_s: float | None = None, cuda_events: bool = False) -> CallMeasurement:
    """Time ``call`` ``repeats`` times after ``warmups`` untimed calls, measuring its peak memory.

    With a resettable meter every timed call is also measured for memory (the warm-up makes
    one-time allocations, such as thread pools, not count). Without one, only the first call of
    the process can be measured, so the first warm-up is the measured call.
    ``before_each`` runs before every call, outside the measurement (e.g. to drop gradients).
    ``time_budget_s``: stop repeating once the timed calls add up to this much (at least one
    timed call always runs), so that minute-long cases do not run ``repeats`` times.
    ``cuda_events``: time each call with ``torch.cuda.Event``s recorded around it (the GPU time
    between them) instead of ``time.perf_counter`` up to the synchronize that follows it.
    """
    if repeats < 1 or warmups < 1:
        raise ValueError(f"need repeats >= 1 and warmups >= 1, got {repeats} and {warmups}")
    prepare = before_each or (lambda: None)
    peaks: list[float] = []
    for warmup in range(warmups):
        prepare()
        if warmup == 0 and not meter.resettable:
            meter.start()
            call()
            peaks.append(meter.stop())
        else:
            call()
            meter.synchronize()
    times: list[float] = []
    for _ in range(repeats):
        if times and time_budget_s and sum(times) >= time_budget_s:
            break
        prepare()
        meter.start()
        times.append(time_call(call, meter, cuda_events))
        peak = meter.stop()
        if meter.resettable:
            peaks.append(peak)
    return CallMeasurement(max(peaks), times)


def time_call(call: Callable[[], Any], meter: PeakMemoryMeter, cuda_events: bool) -> float:
    """Seconds one ``call`` takes (the meter synchronizes its device after it)."""
    if cuda_events:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        call()
        end.record()
        meter.synchronize()
        return begin.elapsed_time(end) / 1e3  # milliseconds
    started = time.perf_counter()
    call()
    meter.synchronize()
    return time.perf_counter() - started


GEMM_ROOFLINE_SIZE = 2048  # torch.mm of two 2048 x 2048 matrices: the GEMM throughput of a dtype
GEMM_PROBE_SIZE = 256  # the first, small GEMM that measures a dtype's rate before the probe's size is set
GEMM_PROBE_TARGET_S = 0.5  # a roofline GEMM takes about this long, at most GEMM_ROOFLINE_SIZE


def gemm_probe_size(device: torch.device, dtype: torch.dtype, target_s: float = GEMM_PROBE_TARGET_S) -> int:
    """The roofline GEMM's size for ``dtype`` here: GEMM_ROOFLINE_SIZE where that takes at most
    ``target_s``, else the size (a multiple of 128, at least GEMM_PROBE_SIZE) that takes about
    ``target_s`` at the rate a GEMM_PROBE_SIZE³ torch.mm measures now. Where the dtype has no
    GEMM instructions (bf16 on CPUs without AVX-512 BF16 or AMX: about 0.2 GFLOP/s) a 2048³ product
    would take over a minute a call."""
    a, b = (torch.randn(GEMM_PROBE_SIZE, GEMM_PROBE_SIZE, device=device).to(dtype) for _ in range(2))
    meter = PeakMemoryMeter(device)
    torch.mm(a, b)  # warm-up
    seconds = min(time_call(lambda: torch.mm(a, b), meter, device.type == "cuda") for _ in range(3))
    rate = 2 * GEMM_PROBE_SIZE**3 / max(seconds, 1e-9)
    size = int((rate * target_s / 2) ** (1 / 3)) // 128 * 128
    return max(GEMM_PROBE_SIZE, min(GEMM_ROOFLINE_SIZE, size))


def gemm_throughput(payload: dict) -> dict:
    """Child entry point: FLOP/s of ``torch.mm`` on two ``size`` x ``size`` matrices of ``dtype``
    (name) on ``device`` with ``threads`` torch threads: 2 warm-ups, then the median of ``repeats``.
    Without a ``size``, :func:`gemm_probe_size` picks it."""
    torch.set_num_threads(payload["threads"])
    device, dtype = torch.device(payload["device"]), getattr(torch, payload["dtype"])
    size = payload.get("size") or gemm_probe_size(device, dtype)
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    meter = PeakMemoryMeter(device)
    measured = measure_call(lambda: torch.mm(a, b), meter, repeats=payload.get("repeats", 7), warmups=2,
                            cuda_events=device.type == "cuda")
    return {"flop_per_s": 2 * size**3 / measured.median_s, "times_s": measured.times_s, "size": size}


PAIRED_GEMM_CALLS = 2  # a paired roofline reading: the faster of this many torch.mm calls
# A paired reading's torch.mm takes about this long: it is read before every timed call of every
# case, so it is sized shorter than the sweep's roofline GEMM (GEMM_PROBE_TARGET_S).
PAIRED_GEMM_TARGET_S = 0.1


class PairedGemmProbe:
    """The GEMM roofline read beside each call of a case, in the case's own process: the roofline
    for hosts whose speed drifts (shared or virtual machines, where torch.mm itself can read 30 %
    apart from one minute to the next, so a roofline read before and after a sweep says little about
    the minute a case ran in).

    :meth:`read` takes the faster of ``calls`` torch.mm calls of ``size``² matrices (dtype, device
    and threads as the case; ``size`` from :func:`gemm_probe_size`) into a result buffer made once. Read it before every
    timed call and once after the last; :meth:`pair` gives each call the faster of the two readings
    around it, the stricter roofline, so a slow spell that hit the GEMM but not the call cannot lift
    the call's "of roof"."""

    def __init__(self, device: torch.device, dtype: torch.dtype, calls: int = PAIRED_GEMM_CALLS):
        self.size = gemm_probe_size(device, dtype, PAIRED_GEMM_TARGET_S)
        self.a, self.b = (torch.randn(self.size, self.size, device=device).to(dtype) for _ in range(2))
        # into a buffer made once: a 16 MiB result allocated and freed per reading would move glibc's
        # mmap threshold and so change the case's own peak-memory reading
        self.c = torch.mm(self.a, self.b)  # also the warm-up: thread pool, GEMM kernel selection
        self.meter, self.calls = PeakMemoryMeter(device), calls
        self.cuda_events = device.type == "cuda"
        self.readings: list[float] = []  # FLOP/s
        self.meter.synchronize()

    def read(self) -> None:
        fastest = min(time_call(lambda: torch.mm(self.a, self.b, out=self.c), self.meter, self.cuda_events)
                      for _ in range(self.calls))
        self.readings.append(2 * self.size**3 / fastest)

    def pair(self, times_s: list[float]) -> list[float]:
        """The FLOP/s each of the last ``len(times_s)`` calls is judged against (see the class)."""
        around = self.readings[-(len(times_s) + 1):]
        if len(around) != len(times_s) + 1:
            raise ValueError(f"need a reading before each of the {len(times_s)} calls, and one after the last, "
                             f"have {len(self.readings)}")
        return [max(before, after) for before, after in zip(around, around[1:])]


def paired_of_roof(flop: float, times_s: list[float], paired_flop_per_s: list[float]) -> tuple[float, float]:
    """(median roofline seconds, median "of roof") over calls, each call against its own paired
    roofline (:class:`PairedGemmProbe`): the median of the per-call ratios, not a ratio of medians."""
    roofs = [flop / rate for rate in paired_flop_per_s]
    return statistics.median(roofs), statistics.median(roof / t for roof, t in zip(roofs, times_s))


class GemmRoofline:
    """The GEMM roofline of a sweep: the FLOP/s of torch.mm in the sweep's dtype, threads and
    device (:func:`gemm_throughput`, in a fresh process), measured before and after the sweep; the
    faster of the two is the roofline (the stricter one). A case's roofline time is its FLOPs over it."""

    def __init__(self, runner: IsolatedRunner, device: str, dtype: str, threads: int):
        self.runner, self.payload = runner, {"device": device, "dtype": dtype, "threads": threads}
        self.measured: list[float] = []
        self.sizes: list[int] = []
        self.failure: str | None = None

    def measure(self) -> None:
        outcome = self.runner.run(gemm_throughput, dict(self.payload), timeout_s=600)
        if outcome.result is None:
            self.failure = outcome.failure
        else:
            self.measured.append(outcome.result["flop_per_s"])
            self.sizes.append(outcome.result["size"])

    @property
    def flop_per_s(self) -> float | None:
        return max(self.measured) if self.measured else None

    def seconds(self, flop: float) -> float | None:
        return flop / self.flop_per_s if self.flop_per_s else None

    def describe(self) -> str:
        p = self.payload
        if not self.measured:
            return f"roofline: not measured ({self.failure})"
        readings = ", ".join(f"{f / 1e9:.3g}" for f in self.measured)
        sizes = "/".join(str(size) for size in sorted(set(self.sizes)))
        return (f"roofline: torch.mm {p['dtype']} {sizes}^3 (sized to take about {GEMM_PROBE_TARGET_S:g} s, at most "
                f"{GEMM_ROOFLINE_SIZE}^3) on {p['device']}, {p['threads']} thread(s), "
                f"median of 7 in a fresh process, before and after the sweep: {readings} GFLOP/s; the faster is "
                "used; roofline time = the case's FLOPs / that; 'of roof' = roofline time / median time")


def machine_load_note() -> str | None:
    """A warning when other processes keep the cores busy: times are then noisy (memory is not)."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    cores = os.cpu_count() or 1
    if load < 0.5 * cores:
        return None
    return (f"WARNING: load average {load:.1f} on {cores} cores before the sweep: other processes are running, "
            "so times will be noisy (peak memory is not affected); --threads 1 suffers least from it")


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """ "32x32,128x256" -> [(32, 32), (128, 256)]; a bare "64" means 64x64."""
    sizes = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        parts = item.lower().replace("×", "x").split("x")
        if len(parts) == 1:
            parts = parts * 2
        try:
            height, width = (int(part) for part in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad size {item!r}: expected HxW, e.g. 64x64 or 128x256") from None
        if height < 1 or width < 1:
            raise argparse.ArgumentTypeError(f"bad size {item!r}: H and W must be >= 1")
        sizes.append((height, width))
    if not sizes:
        raise argparse.ArgumentTypeError("no sizes given")
    return sorted(set(sizes), key=lambda hw: (hw[0] * hw[1], hw))


def parse_choices(allowed: tuple[str, ...]):
    """An argparse type: a comma-separated subset of ``allowed``, returned in ``allowed``'s order."""

    def parse(text: str) -> list[str]:
        chosen = [part.strip() for part in text.split(",") if part.strip()]
        unknown = [part for part in chosen if part not in allowed]
        if unknown or not chosen:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)} (comma-separated), got {text!r}")
        return [part for part in allowed if part in chosen]

    return parse


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def format_mib(mib: float) -> str:
    if math.isnan(mib):
        return "unknown"
    return f"{mib:,.0f}" if mib >= 100 else f"{mib:.1f}"


def format_seconds(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} us"


def format_ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or denominator is None or denominator <= 0:
        return "-"
    ratio = numerator / denominator
    return f"{ratio:.3f}" if ratio < 0.1 else f"{ratio:.2f}"


def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def format_table(header: Sequence[str], rows: Iterable[Sequence[str]], align: str | None = None) -> str:
    """A plain-text table; ``align`` has one character per column, "<" (left) or ">" (right)."""
    rows = [list(map(str, row)) for row in rows]
    align = align or "<" * len(header)
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]

    def line(cells):
        return "  ".join(f"{cell:{a}{w}}" for cell, a, w in zip(cells, align, widths)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def write_csv(path: str | Path, rows: Sequence[dict]) -> None:
    """Write ``rows`` (dicts sharing their keys) as CSV, creating the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)


@dataclasses.dataclass
class PlotPanel:
    """One log-log panel: ``series`` maps a label to (xs, ys); ``styles`` to matplotlib kwargs."""

    title: str
    xlabel: str
    ylabel: str
    series: dict[str, tuple[list[float], list[float]]]
    styles: dict[str, dict] = dataclasses.field(default_factory=dict)


def _label_twos_and_fives(value: float, _position) -> str:
    """Minor log-axis labels at 2·10^k and 5·10^k only: readable, and an axis spanning less than a
    decade still gets numbers."""
    if value <= 0:
        return ""
    mantissa = value / 10 ** math.floor(math.log10(value))
    return f"{value:g}" if round(mantissa, 6) in (2, 5) else ""


def plot_loglog(path: str | Path, panels: Sequence[Sequence[PlotPanel]], suptitle: str) -> str | None:
    """Save a grid of log-log panels (rows of columns) as a PNG.

    Returns None on success, or why nothing was written (matplotlib is optional).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, NullFormatter
    except ImportError as exc:
        return f"matplotlib is not installed ({exc}); `pip install matplotlib` for --plot"
    n_rows, n_cols = len(panels), max(len(row) for row in panels)
    figure, axes = plt.subplots(n_rows, n_cols, figsize=(6.5 * n_cols, 4.5 * n_rows), squeeze=False)
    for row_index, row in enumerate(panels):
        for col_index in range(n_cols):
            axis = axes[row_index][col_index]
            if col_index >= len(row):
                axis.set_visible(False)
                continue
            panel = row[col_index]
            for label, (xs, ys) in panel.series.items():
                if xs:
                    axis.plot(xs, ys, label=label, **panel.styles.get(label, {}))
            axis.set_xscale("log")
            axis.set_yscale("log")
            x_values = sorted({x for xs, _ in panel.series.values() for x in xs})
            if x_values:  # tick the measured sizes themselves, in plain numbers
                axis.set_xticks(x_values, [f"{x:,.0f}" for x in x_values], rotation=45)
                axis.xaxis.set_minor_formatter(NullFormatter())
            axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            axis.yaxis.set_minor_formatter(FuncFormatter(_label_twos_and_fives))
            axis.set_title(panel.title)
            axis.set_xlabel(panel.xlabel)
            axis.set_ylabel(panel.ylabel)
            axis.grid(True, which="both", alpha=0.3)
            if panel.series:
                axis.legend(fontsize="small")
    figure.suptitle(suptitle)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return None
