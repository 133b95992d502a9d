"""PositionAttention with a backend (default "auto") against the official math, paired in one process.

Both modules hold the same weights (gamma 0.5). Their calls alternate (in alternating order each
round), so a host whose speed drifts slows both alike; the ratio shown is the median of the
per-round ratios backend / official, with each side's median time. Where ``auto`` picks, the
line says what it picked and why (``attnseg.explain``). Memory is not measured here (see
``pam_memory.py``, a fresh process per case).

    python benchmarks/module_paired.py                       # B = 2, C = 512, 16², 32², 48²; fwd and fwd+bwd
    python benchmarks/module_paired.py --sizes 96 --backend chunked --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import format_table, import_attnseg, parse_choices, progress  # noqa: E402

attnseg = import_attnseg()
MODES = ("fwd", "fwd+bwd")


def paired(side: int, batch: int, channels: int, backend: str, mode: str, rounds: int) -> dict:
    torch.manual_seed(0)
    official = attnseg.PositionAttention(channels, backend="reference")
    candidate = attnseg.PositionAttention(channels, backend=backend)
    candidate.load_state_dict(official.state_dict())
    for module in (official, candidate):
        module.gamma.data.fill_(0.5)
    train = mode == "fwd+bwd"
    x = torch.randn(batch, channels, side, side, requires_grad=train)
    grad_out = torch.randn_like(x)
    with torch.set_grad_enabled(train):
        choice = attnseg.explain(x, candidate.query_conv(x), candidate.key_conv(x), candidate.value_conv(x))

    def call(module) -> float:
        started = time.perf_counter()
        with torch.set_grad_enabled(train):
            out = module(x)
            if train:
                out.backward(grad_out)
        elapsed = time.perf_counter() - started
        x.grad = None
        for p in module.parameters():
            p.grad = None
        return elapsed

    for module in (official, candidate, official, candidate):  # warm-up
        call(module)
    times = {"official": [], "candidate": []}
    for index in range(rounds):
        order = (("official", official), ("candidate", candidate))
        for name, module in order if index % 2 else order[::-1]:
            times[name].append(call(module))
    ratios = [c / o for c, o in zip(times["candidate"], times["official"])]
    return {"official_s": statistics.median(times["official"]), "candidate_s": statistics.median(times["candidate"]),
            "ratio": statistics.median(ratios), "choice": choice if backend == "auto" else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="PositionAttention(backend) against the official math, paired")
    parser.add_argument("--sizes", default="16,32,48", help="map sides H = W (default 16,32,48: N = 256 to 2,304)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--backend", default="auto", choices=attnseg.BACKENDS)
    parser.add_argument("--modes", type=parse_choices(MODES), default=list(MODES))
    parser.add_argument("--rounds", type=int, default=21, help="paired rounds per case (default 21)")
    args = parser.parse_args(argv)
    print(f"PositionAttention({args.channels}, backend={args.backend!r}) vs the official math, B={args.batch}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; median of {args.rounds} paired rounds")
    rows = []
    for side in (int(s) for s in args.sizes.split(",") if s):
        for mode in args.modes:
            progress(f"{side}x{side} {mode} ...")
            result = paired(side, args.batch, args.channels, args.backend, mode, args.rounds)
            rows.append([f"{side * side:,}", f"{side}x{side}", mode, f"{result['official_s'] * 1e3:.2f} ms",
                         f"{result['candidate_s'] * 1e3:.2f} ms", f"{result['ratio']:.3f}",
                         result["choice"].backend if result["choice"] else args.backend])
            if result["choice"]:
                progress(f"  auto: {result['choice']}")
    print(format_table(["N", "H x W", "mode", "official", args.backend, "paired ratio", "ran"], rows))
    print("paired ratio: median over rounds of backend time / official time in the same round (below 1 is faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
