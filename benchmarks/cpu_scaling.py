"""How the fused CPU attention scales with threads: the modelled split, and measured speed-ups.

Part 1, for thread counts this machine need not have: the split the fp32 kernels plan
(``attnseg::cpu_attention_plan``, csrc/cpu/schedule.h) at the shape, and the modelled idle share
of the threads, split and unsplit, forward and backward.

Part 2, measured here: the op (channel-first q, k, v, as PositionAttention passes them; fp32)
forward and forward+backward at 1 thread and at each of ``--threads``, in alternating order in
one process; the speed-up is the median of the paired ratios t(1 thread) / t(T threads).

    python benchmarks/cpu_scaling.py                       # N = 9,216, B = 1, E = 64, Ev = 512; 1 vs 2 threads
    python benchmarks/cpu_scaling.py --model-threads 8,16,32,64,128 --threads 2,4 --rounds 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import format_table, import_attnseg, machine_load_note, progress  # noqa: E402

attnseg = import_attnseg()


def parse_ints(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def model_table(batch: int, n: int, e: int, ev: int, threads: list[int]) -> str:
    rows = []
    for t in threads:
        block_m, parts, fwd, fwd0, row_parts, bwd, bwd0 = torch.ops.attnseg.cpu_attention_plan(batch, n, n, e, ev, t)
        rows.append([str(t), f"{int(block_m)}", f"{int(parts)}", f"{fwd0:.1%}", f"{max(fwd, 0.0):.1%}",
                     f"{int(row_parts)}", f"{bwd0:.1%}", f"{max(bwd, 0.0):.1%}"])
    return format_table(["threads", "fwd query block", "fwd key parts", "fwd idle unsplit", "fwd idle",
                         "bwd row parts", "bwd idle unsplit", "bwd idle"], rows)


def measure(batch: int, n: int, e: int, ev: int, threads: list[int], rounds: int) -> str:
    torch.manual_seed(0)
    q = torch.randn(batch, e, n).transpose(1, 2).requires_grad_()
    k = torch.randn(batch, e, n).transpose(1, 2).requires_grad_()
    v = torch.randn(batch, ev, n).transpose(1, 2).requires_grad_()
    grad = torch.randn(batch, n, ev)

    def forward():
        with torch.no_grad():
            attnseg.attention(q, k, v, backend="native")

    def training():
        for t in (q, k, v):
            t.grad = None
        attnseg.attention(q, k, v, backend="native").backward(grad)

    rows = []
    for mode, call in (("fwd", forward), ("fwd+bwd", training)):
        for t in threads:
            times = {1: [], t: []}
            for r in range(rounds):
                for count in ((1, t) if r % 2 == 0 else (t, 1)):
                    torch.set_num_threads(count)
                    call()  # warm: the thread pool at this size
                    start = time.perf_counter()
                    call()
                    times[count].append(time.perf_counter() - start)
            ratios = [a / b for a, b in zip(times[1], times[t])]
            rows.append([mode, str(t), f"{statistics.median(times[1]) * 1e3:,.0f} ms",
                         f"{statistics.median(times[t]) * 1e3:,.0f} ms", f"{statistics.median(ratios):.2f}",
                         f"{min(ratios):.2f}-{max(ratios):.2f}"])
            progress(f"  {mode} at {t} threads: speed-up {statistics.median(ratios):.2f}")
    return format_table(["mode", "threads T", "1 thread", "T threads", "speed-up (median)", "range"], rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=9216, help="Nq = Nk (default 9,216: a 768 crop)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--e", type=int, default=64)
    parser.add_argument("--ev", type=int, default=512)
    parser.add_argument("--model-threads", type=parse_ints, default=[1, 2, 4, 8, 16, 32, 64],
                        help="thread counts for the modelled split (default 1,2,4,8,16,32,64)")
    parser.add_argument("--threads", type=parse_ints, default=None,
                        help="thread counts to measure against 1 (default: this machine's cores, if more than 1)")
    parser.add_argument("--rounds", type=int, default=5, help="paired rounds per thread count (default 5)")
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    threads = args.threads if args.threads is not None else ([cores] if cores > 1 else [])
    print(f"attention B={args.batch} N={args.n:,} E={args.e} Ev={args.ev}, fp32, channel-first q, k, v; "
          f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, {cores} cores")
    print("\nmodelled split (csrc/cpu/schedule.h; idle = share of the threads' time without a task):")
    print(model_table(args.batch, args.n, args.e, args.ev, args.model_threads))
    if not threads:
        print("\none core: no speed-up to measure")
        return 0
    if max(threads) > cores:
        print(f"\nnote: {max(threads)} threads on {cores} cores: oversubscribed, the speed-up is not the kernels'")
    note = machine_load_note()
    if note:
        print("\n" + note.replace("the sweep", "the measurement"))
    print(f"\nmeasured, {args.rounds} paired rounds (1 thread vs T threads, alternating order):")
    print(measure(args.batch, args.n, args.e, args.ev, threads, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
