"""benchmarks/module_memory.py and benchmarks/cpu_scaling.py at tiny sizes: they run, and what they
print follows from what they measured."""

from __future__ import annotations

import re

import pytest
import torch

from helpers import load_benchmark

pytestmark = pytest.mark.requires_native

module_memory = load_benchmark("module_memory")
cpu_scaling = load_benchmark("cpu_scaling")


def test_live_tensor_tracker_sees_creation_and_release():
    """The tracker counts a tensor an op creates while it lives and forgets it once freed; views of
    an existing storage and tensors made before the call are not counted."""
    existing = torch.randn(256, 256)
    with module_memory.LiveTensors().existing(existing) as tracker:
        tracker.start_phase("forward")
        a = torch.empty(1024, 1024)  # 4 MiB
        view = existing.view(-1)  # noqa: F841
        b = a + 1
        del a
        c = b * 2  # noqa: F841
    peak = tracker.peaks["forward"]
    assert peak.tracked == 2 * 4 * 2 ** 20  # a and b, or b and c: never all three
    assert sorted(n for _, n in peak.snapshot) == [4 * 2 ** 20] * 2


def test_module_memory_tiny_run(capsys):
    assert module_memory.main(["--size", "12", "--channels", "16", "--backend", "chunked", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "attnseg backend='chunked'" in out and "official math" in out
    assert re.search(r"live at the backward peak \([\d.,]+ MiB\)", out)
    assert re.search(r"resident peak, backend=chunked / official: .* = \d+\.\d{3}", out)


def test_cpu_scaling_models_and_measures(capsys):
    assert cpu_scaling.main(["--n", "512", "--model-threads", "1,16,64", "--threads", "2", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if re.match(r"^(1|16|64)\s+\d+\s+\d", line)]
    assert [r[0] for r in rows] == ["1", "16", "64"]
    assert rows[0][1:3] == ["256", "1"]  # one thread: the unsplit forward
    assert re.search(r"^fwd\+bwd\s+2\s", out, re.M)


def test_cpu_scaling_rejects_bad_thread_lists():
    with pytest.raises(SystemExit):
        cpu_scaling.main(["--threads", "0"])
