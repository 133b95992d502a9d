"""Tests of benchmarks/attention_speed.py without timing anything that matters: the FLOP counts,
the ceiling that the recomputed S puts on a fused forward + backward's "of roof", and one tiny
CPU run that prints it."""

from __future__ import annotations

import pytest
from helpers import load_benchmark

speed = load_benchmark("attention_speed")


def _case(impl="native", mode="fwd+bwd", e=64, ev=512, batch=1, side=96):
    return speed.Case(impl, mode, side, side, batch, e, ev, 1.0, "strided", "float32", "cpu", 2, 5, 1, 60.0)


def test_useful_flop_counts_the_reference_matmuls():
    n = 96 * 96
    assert _case(mode="fwd").useful_flop == 2 * n * n * (64 + 512)
    assert _case().useful_flop == 3 * _case(mode="fwd").useful_flop
    assert _case(batch=3).useful_flop == 3 * _case().useful_flop


def test_recompute_ceiling_is_useful_over_executed_flops():
    # DANet's PAM (E = C/8, Ev = C): the recomputed S is 64 / (3 · 576 + 64) of the executed FLOPs
    assert _case().recompute_ceiling == pytest.approx(1728 / 1792)
    assert _case(e=256, ev=256).recompute_ceiling == pytest.approx(6 / 7)
    assert _case(impl="triton", batch=4, side=32).recompute_ceiling == pytest.approx(1728 / 1792)
    # nothing is recomputed in a forward, nor by the reference (it keeps P for its backward); sdpa's
    # backward recomputes or not depending on the kernel it picks: no claim
    assert _case(mode="fwd").recompute_ceiling is None
    assert _case(impl="reference").recompute_ceiling is None
    assert _case(impl="sdpa").recompute_ceiling is None


def test_tiny_cpu_run_prints_the_ceiling(capsys):
    status = speed.main(["--device", "cpu", "--sizes", "8x8", "--impls", "native", "--modes", "fwd+bwd",
                         "--repeats", "1", "--warmups", "1", "--e", "16", "--ev", "48"])
    out = capsys.readouterr().out
    assert status == 0
    assert "'of roof' is at most 0.923 here" in out  # 3 · 64 / (3 · 64 + 16)
