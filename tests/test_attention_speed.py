"""Tests of benchmarks/attention_speed.py without timing anything that matters: the FLOP counts,
the ceiling that the recomputed S puts on a fused forward + backward's "of roof", and one tiny
CPU run that prints it."""

from __future__ import annotations

import csv
import statistics
import sys

import pytest
from helpers import load_benchmark

speed = load_benchmark("attention_speed")
common = sys.modules["_common"]  # the helpers the script imported (benchmarks/ is not a package)


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


def test_paired_roofline_judges_each_call_by_the_faster_reading_beside_it():
    probe = common.PairedGemmProbe.__new__(common.PairedGemmProbe)  # readings without timing torch.mm
    probe.readings = [9e9, 50e9, 40e9, 60e9, 20e9]  # a warm-up's reading first, then one around each call
    paired = probe.pair([1.0, 2.0, 4.0])
    assert paired == [50e9, 60e9, 60e9]
    # call 2 took 2 s against 1.2e11 / 6e10 = 2 s of roofline: 1.0; calls 1 and 3, 2.4 and 0.5
    roof_s, of_roof = common.paired_of_roof(1.2e11, [1.0, 2.0, 4.0], paired)
    assert roof_s == pytest.approx(2.0) and of_roof == pytest.approx(1.0)
    with pytest.raises(ValueError, match="a reading before each of the 5 calls, and one after the last, have 5"):
        probe.pair([1.0, 2.0, 4.0, 8.0, 16.0])


def test_tiny_cpu_run_with_a_paired_roofline(tmp_path, capsys):
    csv_path = tmp_path / "speed.csv"
    status = speed.main(["--device", "cpu", "--sizes", "8x8", "--impls", "native", "--modes", "fwd",
                         "--repeats", "3", "--warmups", "1", "--paired-roofline", "--csv", str(csv_path)])
    out = capsys.readouterr().out
    assert status == 0
    assert "paired roofline (--paired-roofline), used for the table" in out
    row = next(csv.DictReader(csv_path.open()))
    readings = [float(f) for f in row["paired_gemm_flop_per_s"].split()]
    times = [float(t) for t in row["times_s"].split()]
    assert row["roofline_paired"] == "yes" and len(readings) == len(times) == 3 and min(readings) > 0
    expected = statistics.median(int(row["useful_flop"]) / f / t for f, t in zip(readings, times))
    assert float(row["of_roof"]) == pytest.approx(expected, rel=1e-5)


def test_gemm_probe_is_sized_to_the_measured_rate(monkeypatch):
    import torch

    _common = common
    # a GEMM rate of 0.2 GFLOP/s (bf16 without bf16 instructions): the probe shrinks to the floor
    monkeypatch.setattr(_common, "time_call", lambda call, meter, cuda_events: 2 * 256**3 / 0.2e9)
    assert _common.gemm_probe_size(torch.device("cpu"), torch.float32) == _common.GEMM_PROBE_SIZE
    # 100 GFLOP/s: (1e11 · 0.5 / 2)^(1/3) = 2,924, capped at the full size
    monkeypatch.setattr(_common, "time_call", lambda call, meter, cuda_events: 2 * 256**3 / 1e11)
    assert _common.gemm_probe_size(torch.device("cpu"), torch.float32) == _common.GEMM_ROOFLINE_SIZE
    # 2.6 GFLOP/s: (2.6e9 · 0.25)^(1/3) = 866 -> 768, a 0.35 s product
    monkeypatch.setattr(_common, "time_call", lambda call, meter, cuda_events: 2 * 256**3 / 2.6e9)
    assert _common.gemm_probe_size(torch.device("cpu"), torch.float32) == 768
