"""The backend registry and auto's rule (attnseg/_backends.py), on synthetic tables and on the
table the repository ships."""

from __future__ import annotations

import json

import pytest
import torch

import attnseg
from attnseg import _backends
from helpers import load_benchmark

CPU = torch.device("cpu")
KIND = _backends.device_kind(CPU)
SIZES = {"B": 1, "Nq": 9216, "Nk": 9216, "E": 64, "Ev": 512}


def row(backend, ms, mib, mode="training", **sizes):
    return {"op": "attention", "device": KIND, "dtype": "float32", "mode": mode, **(sizes or SIZES),
            "backend": backend, "median_ms": ms, "peak_mib": mib, "source": "test"}


def choose(table, training=True, sizes=SIZES, candidates=("native", "chunked")):
    return _backends.choose("attention", CPU, torch.float32, training, sizes, table=tuple(table),
                            candidates=candidates)


def test_fastest_within_the_memory_bound():
    table = [row("math", 1000, 1000), row("native", 900, 300), row("chunked", 950, 120)]
    choice = choose(table)
    assert choice.backend == "chunked", choice  # native is faster but holds 0.3 of the math's peak
    assert "peak at most 0.25" in choice.reason and "B=1, Nq=9216" in choice.reason
    table[1]["peak_mib"] = 200
    assert choose(table).backend == "native"


def test_small_maps_speed_decides():
    sizes = {"B": 2, "Nq": 256, "Nk": 256, "E": 64, "Ev": 512}
    table = [row("math", 10, 5, **sizes), row("native", 12, 3, **sizes), row("chunked", 9, 6, **sizes)]
    choice = choose(table, sizes=sizes)
    assert choice.backend == "chunked" and "speed decides" in choice.reason
    table[0]["median_ms"] = 8  # the math fastest: auto takes the math itself
    assert choose(table, sizes=sizes).backend == "reference"
    cam = [dict(r, op="channel_attention", C=512, N=256) for r in table]
    for r in cam:
        for f in ("Nq", "Nk", "E", "Ev"):
            del r[f]
    cam_sizes = {"B": 2, "C": 512, "N": 256}
    assert _backends.choose("channel_attention", CPU, torch.float32, True, cam_sizes, table=tuple(cam),
                            candidates=("native", "chunked")).backend == "reference"
    half = tuple(dict(r, dtype="bfloat16") for r in cam)  # the math's CAM in bf16 forms the Gram in bf16
    assert _backends.choose("channel_attention", CPU, torch.bfloat16, True, cam_sizes, table=half,
                            candidates=("native", "chunked")).backend == "chunked"


def test_nothing_within_the_bound_takes_the_least_memory():
    table = [row("math", 1000, 1000), row("native", 900, 400), row("chunked", 950, 300)]
    choice = choose(table)
    assert choice.backend == "chunked" and "least memory" in choice.reason


def test_a_missing_candidate_row_means_the_default():
    table = [row("math", 1000, 1000), row("native", 900, 100)]
    choice = choose(table, candidates=("native", "triton", "chunked"))
    assert "no row for triton, chunked" in choice.reason
    assert choice.backend == "native"  # the CPU's default for a large map


def test_rows_too_far_in_size_are_not_used():
    far = {"B": 1, "Nq": 1024, "Nk": 1024, "E": 64, "Ev": 512}  # 81x less work
    table = [row("math", 1, 1, **far), row("native", 2, 1, **far), row("chunked", 1, 1, **far)]
    choice = choose(table)
    assert choice.rows == () and "no measured row within 4x" in choice.reason
    near = {"B": 2, "Nq": 9216, "Nk": 6000, "E": 64, "Ev": 512}  # 1.3x the work
    table = [row("math", 10, 1000, **near), row("native", 9, 10, **near), row("chunked", 8, 10, **near)]
    assert choose(table).backend == "chunked"


def test_the_key_includes_mode_dtype_and_device():
    table = [row("math", 1000, 1000, mode="forward"), row("native", 2000, 10, mode="forward"),
             row("chunked", 900, 10, mode="forward")]
    assert choose(table, training=False).backend == "chunked"
    assert choose(table, training=True).rows == ()  # no training rows
    other = [dict(r, device="cpu:other") for r in table]
    assert choose(other, training=False).rows == ()


def test_defaults():
    large, small = float("inf"), 1.0
    both = ("native", "chunked")
    assert _backends.default_backend("attention", CPU, "training", large, both)[0] == "native"
    assert _backends.default_backend("attention", CPU, "training", small, both)[0] == "reference"  # the math
    assert _backends.default_backend("channel_attention", CPU, "training", small, both)[0] == "native"
    assert _backends.default_backend("attention", torch.device("cuda"), "training", large,
                                     ("native", "triton", "chunked"))[0] == "chunked"
    assert _backends.default_backend("channel_attention", torch.device("cuda"), "forward", large,
                                     ("native", "triton", "chunked"))[0] == "chunked"
    backend, why = _backends.default_backend("attention", CPU, "training", large, ("chunked",))
    assert backend == "chunked" and "unavailable" in why


def test_explain_reads_the_call():
    x, q = torch.randn(2, 16, 4, 4), torch.randn(2, 2, 4, 4)
    choice = attnseg.explain(x, q, q, x)
    assert choice.key == {"op": "attention", "device": KIND, "dtype": "float32", "mode": "forward"}
    assert choice.backend in ("native", "chunked", "reference") and str(choice).startswith(choice.backend)
    assert attnseg.explain(x.requires_grad_(), q, q, x).key["mode"] == "training"
    with torch.no_grad():
        assert attnseg.explain(x, q, q, x).key["mode"] == "forward"
    assert attnseg.explain(x, op="channel_attention").key["op"] == "channel_attention"
    qv = torch.randn(1, 5, 3)
    assert attnseg.explain(qv, qv, qv).backend in ("native", "chunked", "reference")
    meta = torch.randn(1, 5, 3, device="meta")
    assert attnseg.explain(meta, meta, meta).backend == "chunked"  # torch's GEMMs are all there is
    with pytest.raises(ValueError, match="op must be"):
        attnseg.explain(x, op="pam")
    with pytest.raises(TypeError, match="pass the call's tensors"):
        attnseg.explain()


def test_auto_runs_what_explain_says(monkeypatch):
    used = []
    for name in ("native", "chunked", "reference"):
        backend = _backends.get(name)
        original = type(backend).position_attention
        monkeypatch.setattr(type(backend), "position_attention",
                            lambda self, *a, _o=original, **kw: used.append(self.name) or _o(self, *a, **kw))
    for side in (4, 96):
        x, q = torch.randn(1, 16, side, side), torch.randn(1, 2, side, side)
        expected = attnseg.explain(x, q, q, x).backend
        with torch.no_grad():
            attnseg.position_attention(x, q, q, x, torch.ones(1))
        assert used[-1] == expected


def test_check_backend():
    assert attnseg.check_backend("chunked") == "chunked"
    for bad in ("fused", "Chunked", None, 3):
        with pytest.raises(ValueError, match="backend must be one of"):
            attnseg.check_backend(bad)
    with pytest.raises(ValueError, match="concrete backend"):
        _backends.get("auto")
    assert set(attnseg.BACKENDS) == {"auto", "native", "triton", "chunked", "reference"}


# ---------------------------------------------------------------------------------------------
# The table in the repository
# ---------------------------------------------------------------------------------------------


def test_shipped_table_is_well_formed():
    rows = _backends.table_rows()
    assert rows, "attnseg/backend_table.json has no rows"
    names = set(_backends.concrete_names()) | {"math"}
    for r in rows:
        assert r["op"] in ("attention", "channel_attention") and r["backend"] in names, r
        assert r["mode"] in ("forward", "training") and r["median_ms"] > 0 and r["peak_mib"] >= 0, r
        assert r["source"], r
        fields = ("B", "Nq", "Nk", "E", "Ev") if r["op"] == "attention" else ("B", "C", "N")
        assert all(isinstance(r[f], int) and r[f] > 0 for f in fields), r
    kinds = {r["device"] for r in rows}
    assert "cuda:sm_90" in kinds, "the H200 run's rows (docs/gpu_check.md) are missing"


def test_h200_seed_matches_docs():
    bench = load_benchmark("backend_table")
    seeded = bench.rows_from_markdown(str(bench.REPO_ROOT / "docs" / "gpu_check.md"), "cuda:sm_90", "x")
    shipped = [r for r in _backends.table_rows() if r["device"] == "cuda:sm_90"]
    strip = lambda r: {k: v for k, v in r.items() if k != "source"}  # noqa: E731
    assert sorted(map(json.dumps, map(strip, seeded))) == sorted(map(json.dumps, map(strip, shipped)))
    # the run measured the math fastest for CAM: with no chunked rows auto takes chunked there
    choice = _backends.choose("channel_attention", torch.device("cuda"), torch.float16, False,
                              {"B": 1, "C": 512, "N": 9216}, candidates=("native", "triton", "chunked"),
                              kind="cuda:sm_90")
    assert choice.backend == "chunked" and "no row for chunked" in choice.reason
