"""Where a PositionAttention module's memory goes: live tensors by phase and by producer.

One forward and backward of ``PositionAttention(C)`` (fp32, CPU, x requires grad, gamma 0.5),
as ``pam_memory.py --scopes module`` runs it, under a dispatch mode that sees every tensor an op
creates (forward and backward alike) and when its storage is freed. It prints, for the attnseg
backend and for the official math (``backend="reference"``):

* per phase (forward, backward): the peak of the tracked live bytes above the inputs, and the
  peak resident memory (VmHWM) above the same start, whose excess over the tracked peak is what
  the ops allocate inside themselves (the kernels' tiles and buffers, which no op returns);
* at the tracked peak of each phase, the live tensors: which op made them, their shape, MiB.

Tensors that existed before the call (x, the weights, grad_out) are not counted.

    python benchmarks/module_memory.py                         # N = 96², C = 512, B = 1, auto vs official
    python benchmarks/module_memory.py --size 64 --backend chunked --top 12
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    IsolatedRunner,
    PeakMemoryMeter,
    format_table,
    import_attnseg,
    parse_choices,
    progress,
)

attnseg = import_attnseg()
MIB = 2.0 ** 20


@dataclass
class Live:
    label: str  # phase and op that produced the storage, with its shape
    nbytes: int
    handle: int  # the storage's weak reference (torch's _weak_ref), polled for expiry


@dataclass
class PhasePeak:
    tracked: int = 0  # peak of the tracked live bytes
    snapshot: list = field(default_factory=list)  # (label, bytes) live at that peak
    rss_peak: int = 0


class LiveTensors(TorchDispatchMode):
    """Tracks the storages that ops create and their lifetimes (by polling torch's storage weak
    references after every op); keeps per phase the peak of the live bytes and what was live."""

    def __init__(self, meter: PeakMemoryMeter | None = None):
        """With a ``meter``, each op also runs between a reset of the resident peak and a reading of
        it (so the phases' own resident peaks are not measured in that pass)."""
        super().__init__()
        self.live: dict[int, Live] = {}
        self.phase = "forward"
        self.peaks: dict[str, PhasePeak] = {}
        self.transients: list[tuple[str, int]] = []  # (phase: op, bytes) per op call, with a meter
        self.meter = meter
        self.untracked: set[int] = set()  # storages that existed before (inputs, weights, grad_out)

    def existing(self, *tensors: torch.Tensor) -> "LiveTensors":
        self.untracked.update(t.untyped_storage().data_ptr() for t in tensors)
        return self

    def _expire(self) -> None:
        for key in [key for key, entry in self.live.items() if torch.UntypedStorage._expired(entry.handle)]:
            torch.UntypedStorage._free_weak_ref(self.live.pop(key).handle)

    def _note_peak(self) -> None:
        total = sum(entry.nbytes for entry in self.live.values())
        peak = self.peaks.setdefault(self.phase, PhasePeak())
        if total > peak.tracked:
            peak.tracked = total
            peak.snapshot = [(entry.label, entry.nbytes) for entry in self.live.values()]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__ if hasattr(func, "__name__") else str(func)
        live_before = sum(entry.nbytes for entry in self.live.values())
        if self.meter is not None:
            self.meter.start()
        result = func(*args, **(kwargs or {}))
        inside = int(self.meter.stop() * MIB) if self.meter is not None else 0
        self._expire()
        created = 0
        for t in tree_leaves(result):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in self.live or key in self.untracked or storage.nbytes() == 0:
                continue
            created += storage.nbytes()
            self.live[key] = Live(f"{self.phase}: {name} {list(t.shape)}", storage.nbytes(), storage._weak_ref())
        if self.meter is not None:  # resident growth beyond the op's outputs: its own temporaries
            self.transients.append((f"{self.phase}: {name}", max(0, inside - created), live_before + inside))
        self._note_peak()
        return result

    def start_phase(self, phase: str) -> None:
        self._expire()
        self.phase = phase
        self.peaks.setdefault(phase, PhasePeak())
        self._note_peak()


def _measured_phase(tracker: LiveTensors, meter: PeakMemoryMeter, phase: str, run) -> None:
    if phase == "forward":
        meter.start()
    else:
        meter.restart_peak()
    tracker.start_phase(phase)
    run()
    tracker.peaks[phase].rss_peak = int(meter.stop() * MIB)


def measure(payload: dict) -> dict:
    """Child: one warm-up call, then one call under the tracker; the phases' peaks and live sets."""
    torch.set_num_threads(payload["threads"])
    torch.manual_seed(0)
    side, channels = payload["size"], payload["channels"]
    module = attnseg.PositionAttention(channels, backend=payload["backend"])
    with torch.no_grad():
        module.gamma.fill_(0.5)
    x = torch.randn(payload["batch"], channels, side, side, requires_grad=True)
    grad_out = torch.randn_like(x)
    leaves = [x, *module.parameters()]

    def drop():
        for leaf in leaves:
            leaf.grad = None

    module(x).backward(grad_out)  # warm-up: thread pools, tables, first-call allocations
    drop()
    gc.collect()
    meter = PeakMemoryMeter(torch.device("cpu"))
    tracker = LiveTensors().existing(x, grad_out, *module.parameters())
    outputs = []
    with tracker:  # pass 1: the phases' resident peaks and the live tensors
        _measured_phase(tracker, meter, "forward", lambda: outputs.append(module(x)))
        _measured_phase(tracker, meter, "backward", lambda: outputs.pop().backward(grad_out))
    drop()
    per_op = LiveTensors(PeakMemoryMeter(torch.device("cpu"))).existing(x, grad_out, *module.parameters())
    with per_op:  # pass 2: each op's resident growth beyond its outputs
        per_op.start_phase("forward")
        out = module(x)
        per_op.start_phase("backward")
        out.backward(grad_out)
    del out
    phases = {}
    for phase, peak in tracker.peaks.items():
        phases[phase] = {"tracked": peak.tracked, "rss_peak": peak.rss_peak, "snapshot": peak.snapshot}
    return {"phases": phases, "transients": per_op.transients, "backend": module.backend}


def report(name: str, result: dict, top: int) -> None:
    print(f"\n{name}")
    rows = []
    for phase, data in result["phases"].items():
        rows.append([phase, f"{data['tracked'] / MIB:,.1f}", f"{data['rss_peak'] / MIB:,.1f}",
                     f"{(data['rss_peak'] - data['tracked']) / MIB:,.1f}"])
    print(format_table(["phase", "tensors MiB (peak)", "resident MiB (peak)", "inside ops MiB"], rows))
    for phase, data in result["phases"].items():
        merged: dict[str, int] = {}
        for label, nbytes in data["snapshot"]:
            merged[label] = merged.get(label, 0) + nbytes
        ranked = sorted(merged.items(), key=lambda item: -item[1])
        shown = ranked[:top]
        rest = sum(nbytes for _, nbytes in ranked[top:])
        print(f"  live at the {phase} peak ({data['tracked'] / MIB:,.1f} MiB):")
        for label, nbytes in shown:
            print(f"    {nbytes / MIB:9,.2f} MiB  {label}")
        if rest:
            print(f"    {rest / MIB:9,.2f} MiB  {len(ranked) - top} more")


def report_transients(result: dict, top: int) -> None:
    ranked = sorted(result["transients"], key=lambda item: -item[1])[:top]
    ranked = [(label, nbytes) for label, nbytes, _ in ranked if nbytes >= MIB]
    if ranked:
        print("  temporaries inside ops (resident growth during the op beyond its outputs), largest:")
        for label, nbytes in ranked:
            print(f"    {nbytes / MIB:9,.2f} MiB  {label}")
    label, _, high = max(result["transients"], key=lambda item: item[2])
    print(f"  highest op: {label}: tensors live before it + its resident growth = {high / MIB:,.1f} MiB")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=96, help="H = W of x (default 96: N = 9,216)")
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--backend", type=parse_choices(("auto", "native", "chunked")), default=["auto"],
                        help="attnseg's backend (default auto)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--top", type=int, default=10, help="live tensors listed per phase (default 10)")
    args = parser.parse_args(argv)
    runner = IsolatedRunner()
    print(f"PositionAttention({args.channels}) at N = {args.size}² = {args.size ** 2:,}, B = {args.batch}, fp32, "
          f"cpu, {args.threads} thread(s); one forward + backward, x requires grad; above the inputs")
    results = {}
    for backend in (*args.backend, "reference"):
        progress(f"measuring backend={backend} ...")
        outcome = runner.run(measure, {"size": args.size, "channels": args.channels, "batch": args.batch,
                                       "backend": backend, "threads": args.threads})
        if outcome.result is None:
            print(f"backend={backend}: failed: {outcome.failure}\n{outcome.detail or ''}")
            return 1
        results[backend] = outcome.result
        label = "official math (backend='reference')" if backend == "reference" else f"attnseg backend={backend!r}"
        report(label, outcome.result, args.top)
        report_transients(outcome.result, args.top)
    print()
    for backend in args.backend:
        ours = max(p["rss_peak"] for p in results[backend]["phases"].values())
        theirs = max(p["rss_peak"] for p in results["reference"]["phases"].values())
        print(f"resident peak, backend={backend} / official: {ours / MIB:,.1f} / {theirs / MIB:,.1f} MiB = "
              f"{ours / theirs:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
