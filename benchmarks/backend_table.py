"""Measure every backend against the official math and write the table that ``backend="auto"`` reads.

For each op (PAM's generic attention at the DANet head's widths, E = 64, Ev = 512, fed with the
channel-first [B, N, E] views the module makes; CAM at C = 512, official variant), size, dtype
and mode ("forward" under ``torch.no_grad()``; "training", forward then backward with inputs
that require grad), every backend that can run here and the math (``attnseg.reference``) are
timed and measured for peak memory. Times: the backends and the math of one size in one fresh
process, their calls in turns (:func:`run_times`; median of up to ``--repeats`` rounds). Peak
memory: each case in a fresh process of its own (``_common.IsolatedRunner``, the method of
``_common.PeakMemoryMeter``, as in ``pam_memory.py``), which would disturb the timing of small
cases (it trims the allocator before every call) and is therefore kept apart from it.

The table printed has each row's time and peak against the math of the same size. With
``--write`` (default ``attnseg/backend_table.json``) the rows replace those of the same key
(op, device kind, dtype, mode, size, backend) in the table; the rule that reads them is in
``attnseg/_backends.py``.

Usage (from the repository root):

    python benchmarks/backend_table.py                          # CPU, fp32, both ops, prints only
    python benchmarks/backend_table.py --write attnseg/backend_table.json
    python benchmarks/backend_table.py --sizes 16,32 --ops attention --modes training
    python benchmarks/backend_table.py --from-markdown docs/gpu_check.md --kind cuda:sm_90 \
        --source "H200 run of 2026-12-04 (docs/gpu_check.md)" --write    # rows of a GPU check's table
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    REPO_ROOT,
    IsolatedRunner,
    PeakMemoryMeter,
    format_mib,
    format_ratio,
    format_seconds,
    format_table,
    forward_call,
    import_attnseg,
    measure_call,
    parse_choices,
    progress,
)

attnseg = import_attnseg()

OPS = ("attention", "channel_attention")
MODES = ("forward", "training")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_SIZES = "16,32,48,64,96"  # square maps of side H = W: N = 256 ... 9,216
DEFAULT_TABLE = os.path.join(REPO_ROOT, "attnseg", "backend_table.json")
MATH = "math"


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    backend: str  # a concrete backend, or "math" (attnseg.reference)
    side: int
    batch: int
    dtype: str
    mode: str
    device: str
    threads: int
    repeats: int
    time_budget_s: float
    channels: int = 512
    key_channels: int = 64

    @property
    def n(self) -> int:
        return self.side * self.side

    def sizes(self) -> dict:
        if self.op == "attention":
            return {"B": self.batch, "Nq": self.n, "Nk": self.n, "E": self.key_channels, "Ev": self.channels}
        return {"B": self.batch, "C": self.channels, "N": self.n}


def build_call(case: Case):
    """The measured call of ``case`` and the function that drops its gradients."""
    device, dtype = torch.device(case.device), DTYPES[case.dtype]
    train = case.mode == "training"
    torch.manual_seed(0)
    b, c, e, n = case.batch, case.channels, case.key_channels, case.n
    if case.op == "attention":
        q, k = (torch.randn(b, e, n, device=device, dtype=dtype, requires_grad=train) for _ in range(2))
        v = torch.randn(b, c, n, device=device, dtype=dtype, requires_grad=train)
        leaves = [q, k, v]
        if case.backend == MATH:
            def forward():
                return attnseg.reference.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        else:
            def forward():
                return attnseg.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         backend=case.backend)
        out_shape = (b, n, c)
    else:
        x = torch.randn(b, c, case.side, case.side, device=device, dtype=dtype, requires_grad=train)
        gamma = torch.full((1,), 0.5, device=device)
        leaves = [x]
        if case.backend == MATH:
            def forward():
                return attnseg.reference.channel_attention(x, gamma)
        else:
            def forward():
                return attnseg.channel_attention(x, gamma, backend=case.backend)
        out_shape = tuple(x.shape)
    grad_out = torch.randn(out_shape, device=device, dtype=dtype) if train else None
    return forward_call(forward, leaves, grad_out)


def run_peak(payload: dict) -> dict:
    """Child entry point: the case's largest peak (MiB) over two calls after a warm-up."""
    case = Case(**payload)
    torch.set_num_threads(case.threads)
    meter = PeakMemoryMeter(torch.device(case.device))
    call, drop_grads = build_call(case)
    measured = measure_call(call, meter, repeats=2, warmups=1, before_each=drop_grads)
    return {"peak_mib": measured.peak_mib}


def run_times(payloads: list[dict]) -> dict:
    """Child entry point: the median time (s) of each case of one size, timed in turns.

    The cases' calls alternate, in reversed order every other round, so that a host whose speed
    drifts slows them alike; nothing else runs between them (the memory meter's page trimming,
    which would make every call fault its memory in anew, is kept out of the timing)."""
    cases = [Case(**payload) for payload in payloads]
    torch.set_num_threads(cases[0].threads)
    synchronize = torch.cuda.synchronize if cases[0].device == "cuda" else (lambda: None)
    calls = [build_call(case) for case in cases]

    def timed(call, drop_grads) -> float:
        drop_grads()
        synchronize()
        started = time.perf_counter()
        call()
        synchronize()
        return time.perf_counter() - started

    for _ in range(2):  # warm-up: one-time allocations, thread pools, kernels' first use
        for call, drop_grads in calls:
            timed(call, drop_grads)
    times: list[list[float]] = [[] for _ in cases]
    budget, repeats = cases[0].time_budget_s * len(cases), cases[0].repeats
    for index in range(repeats):
        if index and sum(map(sum, times)) >= budget:
            break
        order = list(range(len(cases)))
        for i in (order if index % 2 == 0 else order[::-1]):
            times[i].append(timed(*calls[i]))
    return {"median_s": [statistics.median(t) for t in times], "calls": len(times[0])}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Time and peak memory of every backend against the math; "
                                                 "writes the table backend='auto' reads.")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtypes", type=parse_choices(tuple(DTYPES)), default=["float32"])
    parser.add_argument("--ops", type=parse_choices(OPS), default=list(OPS))
    parser.add_argument("--modes", type=parse_choices(MODES), default=list(MODES))
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help=f"map sides H = W (default {DEFAULT_SIZES})")
    parser.add_argument("--batch", type=int, default=2, help="B (default 2)")
    parser.add_argument("--backends", type=parse_choices(tuple(n for n in attnseg._backends.concrete_names() if n != "reference")),
                        default=None, help="default: every backend that auto may pick here")
    parser.add_argument("--repeats", type=int, default=21, help="rounds of timed calls per size (default 21)")
    parser.add_argument("--time-budget", type=float, default=4.0,
                        help="stop the rounds once the calls add up to this many seconds per case (default 4; "
                             "at least one round runs)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--write", nargs="?", const=DEFAULT_TABLE, default=None, metavar="PATH",
                        help=f"merge the rows into this table (default when given without a path: {DEFAULT_TABLE})")
    parser.add_argument("--source", default=None, help="the rows' source note (default: machine, command and date)")
    parser.add_argument("--from-markdown", metavar="PATH",
                        help="measure nothing: take the rows of a gpu_check.py timings table (a docs/gpu page)")
    parser.add_argument("--kind", help="with --from-markdown: the device kind of those rows (e.g. cuda:sm_90)")
    args = parser.parse_args(argv)
    if args.from_markdown and not (args.kind and args.source):
        parser.error("--from-markdown needs --kind and --source")
    args.sizes = [int(side) for side in args.sizes.split(",") if side]
    if args.threads is None:
        args.threads = torch.get_num_threads()
    if args.backends is None:
        args.backends = list(attnseg._backends.auto_candidates(torch.device(args.device)))
    return args


def machine_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"{model or platform.processor() or 'CPU'}, {torch.get_num_threads()} threads"


def table_rows(results: list[tuple[Case, dict]], kind: str, source: str) -> list[dict]:
    rows = []
    for case, result in results:
        rows.append({"op": case.op, "device": kind, "dtype": case.dtype, "mode": case.mode, **case.sizes(),
                     "backend": case.backend, "median_ms": round(result["median_s"] * 1e3, 4),
                     "peak_mib": round(result["peak_mib"], 2), "source": source})
    return rows


def merge_rows(path: str, new_rows: list[dict]) -> int:
    """Replace the rows of ``path`` that ``new_rows`` measure again; return the row count."""
    identity = ("op", "device", "dtype", "mode", "B", "Nq", "Nk", "E", "Ev", "C", "N", "backend")
    try:
        with open(path) as f:
            table = json.load(f)
    except FileNotFoundError:
        table = {}
    fresh = {tuple(row.get(f) for f in identity) for row in new_rows}
    rows = [row for row in table.get("rows", []) if tuple(row.get(f) for f in identity) not in fresh] + new_rows
    rows.sort(key=lambda row: tuple(str(row.get(f)) for f in identity))
    table = {"about": "Measured time and peak memory per backend; read by attnseg/_backends.py (backend='auto'). "
                      "Written by benchmarks/backend_table.py and benchmarks/gpu_check.py.",
             "rows": rows}
    with open(path, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    return len(rows)


MARKDOWN_MODES = {"fwd": "forward", "fwd+bwd": "training"}
MARKDOWN_OPS = {"PAM": "attention", "CAM": "channel_attention"}


def rows_from_markdown(path: str, kind: str, source: str, batch_channels: int = 512, key_channels: int = 64) -> list[dict]:
    """Table rows from the timings table of a gpu_check.py page (op | N | B | dtype | mode | impl |
    median ms | TFLOP/s | peak MiB | ...): the measured rows of backends and of the math; rows
    that did not run, and peers that are not backends (sdpa), are left out."""
    names = set(attnseg._backends.concrete_names()) | {MATH}
    rows = []
    with open(path) as f:
        for line in f:
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if len(cells) < 9 or cells[0] not in MARKDOWN_OPS or cells[5] not in names:
                continue
            try:
                n, b = int(cells[1].replace(",", "")), int(cells[2])
                median_ms, peak_mib = float(cells[6]), float(cells[8].replace(",", ""))
            except ValueError:  # "failed: ..." or "not run: ..."
                continue
            op = MARKDOWN_OPS[cells[0]]
            sizes = ({"B": b, "Nq": n, "Nk": n, "E": key_channels, "Ev": batch_channels} if op == "attention"
                     else {"B": b, "C": batch_channels, "N": n})
            rows.append({"op": op, "device": kind, "dtype": cells[3], "mode": MARKDOWN_MODES[cells[4]], **sizes,
                         "backend": cells[5], "median_ms": median_ms, "peak_mib": peak_mib, "source": source})
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_markdown:
        rows = rows_from_markdown(args.from_markdown, args.kind, args.source)
        print(f"{len(rows)} measured rows in {args.from_markdown}")
        if args.write:
            print(f"written to {args.write} ({merge_rows(args.write, rows)} rows in all)")
        return 0 if rows else 1
    started = time.perf_counter()
    kind = attnseg._backends.device_kind(torch.device(args.device))
    date = datetime.date.today().isoformat()
    source = args.source or f"{machine_name(args.device)}, benchmarks/backend_table.py, {date}"
    print(f"backends against the math on {kind} ({machine_name(args.device)}); torch {torch.__version__}, "
          f"{args.threads} threads; times: median of up to {args.repeats} rounds of the backends' calls in turns, "
          "one process per size; peaks: a fresh process per case")
    runner = IsolatedRunner(preload=("torch", "attnseg"))
    cases = [Case(op, backend, side, args.batch, dtype, mode, args.device, args.threads, args.repeats,
                  args.time_budget)
             for op in args.ops for dtype in args.dtypes for mode in args.modes for side in args.sizes
             for backend in [MATH, *args.backends]]
    results: list[tuple[Case, dict]] = []
    failed = 0
    groups: dict[tuple, list[Case]] = {}
    for case in cases:
        groups.setdefault((case.op, case.dtype, case.mode, case.side), []).append(case)
    for index, group in enumerate(groups.values(), 1):
        elapsed = time.perf_counter() - started
        left = f", about {elapsed / (index - 1) * (len(groups) - index + 1):.0f} s left" if index > 1 else ""
        first = group[0]
        progress(f"[{index}/{len(groups)}{left}] {first.op} {first.dtype} {first.mode} N={first.n} B={first.batch}: "
                 f"{', '.join(c.backend for c in group)} ...", end="")
        timing = runner.run(run_times, [dataclasses.asdict(c) for c in group], timeout_s=1800)
        if timing.result is None:
            failed += len(group)
            progress(f" failed: {timing.failure}")
            continue
        cells = []
        for case, median_s in zip(group, timing.result["median_s"]):
            peak = runner.run(run_peak, dataclasses.asdict(case), timeout_s=600)
            if peak.result is None:
                failed += 1
                cells.append(f"{case.backend} failed: {peak.failure}")
                continue
            results.append((case, {"median_s": median_s, "peak_mib": peak.result["peak_mib"]}))
            cells.append(f"{case.backend} {format_seconds(median_s)} / {format_mib(peak.result['peak_mib'])} MiB")
        progress(f" {'; '.join(cells)}")
    math_of = {(c.op, c.dtype, c.mode, c.side): r for c, r in results if c.backend == MATH}
    lines = []
    for case, result in results:
        base = math_of.get((case.op, case.dtype, case.mode, case.side))
        lines.append([case.op, case.dtype, case.mode, f"{case.n:,}", str(case.batch), case.backend,
                      format_seconds(result["median_s"]), format_mib(result["peak_mib"]),
                      format_ratio(result["median_s"], base and base["median_s"]),
                      format_ratio(result["peak_mib"], base and base["peak_mib"])])
    print()
    print(format_table(["op", "dtype", "mode", "N", "B", "backend", "median", "peak MiB", "time / math",
                        "peak / math"], lines))
    print("\ntime / math, peak / math: against the math (attnseg.reference) of the same op, dtype, mode and size")
    if args.write:
        count = merge_rows(args.write, table_rows(results, kind, source))
        print(f"\n{len(results)} rows written to {args.write} ({count} in all)")
    print(f"\ntook {time.perf_counter() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
