"""The chunked backend (attnseg/chunked.py): the op pair against the fp64 reference, its chunking,
memory and layouts, and every place a backend name is accepted.

Tolerances: helpers.assert_matches_reference (flash-attention's criterion: the error against fp64
at most 2x PyTorch's own in the same dtype, plus a few ulps; see helpers' docstring). For fp16
and bf16 the yardstick is the official math in that dtype, which is what the backend replaces:
the issue's bar is "at least as accurate as the math in that dtype".
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attnseg
from attnseg import chunked, config, reference
from helpers import (assert_matches_reference, autograd_attention, autograd_cam, check_attention_backend,
                     check_cam_backend, strided_randn)

NO_LIMIT = 0  # max_chunks: only the budget decides


def run_chunked(budget_bytes: int, max_chunks: int = NO_LIMIT):
    return autograd_attention(lambda q, k, v, scale: chunked.attention_fwd(q, k, v, scale, budget_bytes, max_chunks))


def inputs(b, nq, nk, e, ev, dtype, layouts=("channel_first", "contiguous", "channel_first"), seed=0, std=1.0):
    g = torch.Generator().manual_seed(seed)
    return tuple(strided_randn(b, n, w, layout, dtype, g, std) for (n, w), layout
                 in zip(((nq, e), (nk, e), (nk, ev)), layouts))


def row_budget(b, nk, dtype, rows):
    """The backward budget that makes chunks of ``rows`` query rows."""
    return b * nk * chunked.BYTES_PER_MAP_ELEMENT[(dtype, True)] * rows


# ---------------------------------------------------------------------------------------------
# The op against the reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("rows", [1, 7, 40, 10**6], ids=["rows1", "rows7", "rows40", "one_chunk"])
@pytest.mark.parametrize("layouts", [("channel_first",) * 3, ("contiguous", "sliced", "batch_major")],
                         ids=["channel_first", "mixed"])
def test_matches_reference(dtype, rows, layouts):
    # Nq = 97 and rows 7 / 40: the last chunk is short (97 = 13·7 + 6 = 2·40 + 17)
    q, k, v = inputs(2, 97, 111, 7, 13, dtype, layouts)
    check_attention_backend(run_chunked(row_budget(2, 111, dtype, rows)), q, k, v, 0.37)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [13, 10**6], ids=["chunks", "one_chunk"])
def test_half_precision_at_least_as_accurate_as_the_math(dtype, rows):
    # the DANet widths at a small N; scale E^-0.5 keeps fp16 logits in range for the math
    q, k, v = inputs(1, 130, 77, 64, 96, dtype)
    check_attention_backend(run_chunked(row_budget(1, 77, dtype, rows)), q, k, v, 64 ** -0.5)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (2, 5, 1, 3, 2), (1, 33, 64, 1, 130)],
                         ids=["all_one", "one_key", "e1"])
def test_edge_shapes(shape):
    q, k, v = inputs(*shape, torch.float64)
    check_attention_backend(run_chunked(row_budget(shape[0], shape[2], torch.float64, 3)), q, k, v, 1.0)


def test_gradcheck_across_chunks():
    q, k, v = (t.requires_grad_() for t in inputs(2, 11, 9, 3, 4, torch.float64))
    budget = row_budget(2, 9, torch.float64, 4)  # chunks of 4, 4 and 3 rows
    assert torch.autograd.gradcheck(lambda q, k, v: chunked.attention_fwd(q, k, v, 0.8, budget, NO_LIMIT),
                                    (q, k, v))


def test_empty_batch():
    q, k, v = (torch.randn(0, 5, 3), torch.randn(0, 4, 3), torch.randn(0, 4, 2))
    out = attnseg.attention(q, k, v, backend="chunked")
    assert out.shape == (0, 5, 2)


def test_deterministic_bitwise():
    q, k, v = inputs(2, 70, 50, 8, 12, torch.float32)
    run = run_chunked(row_budget(2, 50, torch.float32, 9))
    grad_out, grad_lse = torch.randn(2, 70, 12), torch.randn(2, 70)
    torch.use_deterministic_algorithms(True)
    try:
        first = run(q, k, v, 0.5, grad_out, grad_lse)
        second = run(q, k, v, 0.5, grad_out, grad_lse)
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Chunks and memory
# ---------------------------------------------------------------------------------------------


def test_chunk_rows_from_budget():
    per_row = 2 * 100 * chunked.BYTES_PER_MAP_ELEMENT[(torch.float32, True)]  # 1,600 bytes
    assert chunked.chunk_rows(2, 50, 100, torch.float32, 10 * per_row, NO_LIMIT, backward=True) == 10
    assert chunked.chunk_rows(2, 50, 100, torch.float32, 10 * per_row + per_row - 1, NO_LIMIT, True) == 10
    assert chunked.chunk_rows(2, 50, 100, torch.float32, 1, NO_LIMIT, True) == 1  # one row over budget still runs
    assert chunked.chunk_rows(2, 50, 100, torch.float32, 10**12, NO_LIMIT, True) == 50  # the whole map: one chunk
    assert chunked.chunk_rows(2, 50, 100, torch.float32, 1, 4, True) == 13  # at most 4 chunks: ceil(50 / 4)
    assert chunked.chunk_rows(0, 50, 100, torch.float32, per_row, NO_LIMIT, True) == 2  # B = 0 counts as 1


class _Allocations(TorchDispatchMode):
    """Records every aten op and the bytes of each tensor it returns that owns new storage."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, tuple]] = []
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        self.ops.append((str(func), args))
        outputs = result if isinstance(result, (tuple, list)) else (result,)
        for t in outputs:
            if isinstance(t, torch.Tensor) and t._base is None and "view" not in str(func):
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return result


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_map_sized_tensor_and_no_copy_of_the_inputs(dtype):
    b, n, e, ev = 1, 600, 8, 40
    query, key = (torch.randn(b, e, n, dtype=dtype, requires_grad=True) for _ in range(2))
    value = torch.randn(b, ev, n, dtype=dtype, requires_grad=True)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # channel-first views, as the module's
    budget_mib = 0.05  # 52 KB: chunks of 5 to 10 rows of the 600 x 600 map
    out_bytes = b * n * ev * 4  # the largest N-sized tensors: out, dv (and fp32 accumulators)
    with _Allocations() as record:
        out = attnseg.attention(q, k, v, backend="chunked", chunk_budget_mib=budget_mib)
        out.backward(torch.randn_like(out))
    map_bytes = b * n * n * 4
    assert record.largest <= max(budget_mib * 2**20, out_bytes), (record.largest, map_bytes)
    for name, args in record.ops:
        if any(name.startswith(f"aten.{op}") for op in ("clone", "contiguous", "_to_copy", "copy_")):
            sources = [a for a in args[1 if name.startswith("aten.copy_") else 0:] if isinstance(a, torch.Tensor)]
            assert not any(s.numel() == t.numel() and s.data_ptr() == t.data_ptr()
                           for s in sources for t in (query, key, value)), f"{name} copied an input"


def test_budget_argument_and_environment(monkeypatch):
    q, k, v = inputs(1, 64, 64, 4, 4, torch.float32)
    expected = reference.attention(q, k, v)
    monkeypatch.setenv("ATTNSEG_CHUNK_BUDGET_MIB", "0.001")
    assert config.chunk_policy(torch.device("cpu")) == (1048, 0)
    torch.testing.assert_close(attnseg.attention(q, k, v, backend="chunked"), expected)
    assert config.chunk_policy(torch.device("cpu"), 2.0) == (2 << 20, 0)  # the argument wins
    monkeypatch.setenv("ATTNSEG_CHUNK_BUDGET_MIB", "lots")
    with pytest.raises(ValueError, match="ATTNSEG_CHUNK_BUDGET_MIB must be a positive number of MiB, got 'lots'"):
        attnseg.attention(q, k, v, backend="chunked")
    monkeypatch.delenv("ATTNSEG_CHUNK_BUDGET_MIB")
    floor = int(config.DEFAULT_CHUNK_BUDGET_MIB["cpu"] * 2**20)
    assert config.chunk_policy(torch.device("cpu")) == (floor, config.MAX_DEFAULT_CHUNKS)
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="chunk_budget_mib"):
            attnseg.attention(q, k, v, backend="chunked", chunk_budget_mib=bad)
    with pytest.raises(TypeError, match="chunk_budget_mib must be a number"):
        attnseg.attention(q, k, v, backend="chunked", chunk_budget_mib="64")


def test_default_budget_caps_the_chunk_count():
    # 16 chunks at most: a map far over the floor is cut into ceil(N / 16)-row chunks
    rows = chunked.chunk_rows(1, 10_000, 10_000, torch.float32, 1 << 20, config.MAX_DEFAULT_CHUNKS, True)
    assert rows == math.ceil(10_000 / config.MAX_DEFAULT_CHUNKS)


# ---------------------------------------------------------------------------------------------
# As the other backends: opcheck, compile, export, autocast, double backward
# ---------------------------------------------------------------------------------------------


def test_opcheck():
    q, k, v = (t.requires_grad_() for t in inputs(2, 9, 7, 3, 5, torch.float32))
    torch.library.opcheck(torch.ops.attnseg.chunked_attention_fwd, (q, k, v, 0.5, 2000, 0))
    out, lse = chunked.attention_fwd(q, k, v, 0.5, 2000, 0)
    torch.library.opcheck(torch.ops.attnseg.chunked_attention_bwd,
                          (torch.randn_like(out), torch.randn_like(lse), q.detach(), k.detach(), v.detach(),
                           out.detach(), lse.detach(), 0.5, 2000, 0))


def test_compile_fullgraph_and_export():
    q, k, v = inputs(1, 40, 30, 4, 6, torch.float32)

    def f(q, k, v):
        return attnseg.attention(q, k, v, 0.5, backend="chunked", chunk_budget_mib=0.001) * 2

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v))

    class Attend(torch.nn.Module):
        def forward(self, q, k, v):
            return f(q, k, v)

    exported = torch.export.export(Attend(), (q, k, v))
    assert any("chunked_attention_fwd" in str(node.target) for node in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(q, k, v), f(q, k, v))


def test_module_under_autocast_matches_the_official_module_under_autocast():
    torch.manual_seed(0)
    module = attnseg.PositionAttention(32, backend="chunked")
    official = attnseg.PositionAttention(32, backend="reference")
    official.load_state_dict(module.state_dict())
    for m in (module, official):
        m.gamma.data.fill_(0.7)
    x = torch.randn(2, 32, 6, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = module(x), official(x)
    assert y.dtype == y_ref.dtype
    y64 = attnseg.PositionAttention(32, backend="reference").double()
    y64.load_state_dict(module.state_dict())
    expected = y64(x.double())
    assert_matches_reference("autocast out", y.float(), expected, y_ref.float(), reduction=42)


def test_double_backward_raises():
    q, k, v = (t.requires_grad_() for t in inputs(1, 5, 4, 2, 3, torch.float64))
    out = attnseg.attention(q, k, v, backend="chunked")
    (dq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(attnseg.DoubleBackwardError, match="chunked_attention_fwd"):
        dq.sum().backward()


# ---------------------------------------------------------------------------------------------
# Channel attention through library GEMMs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("official", [True, False], ids=["official", "paper"])
def test_channel_attention_matches_reference(dtype, official):
    g = torch.Generator().manual_seed(3)
    x = strided_randn(2, 37, 101, "channel_first", torch.float64, g)
    x = (torch.relu(x) * 0.3 + 0.01 * x).to(dtype)
    check_cam_backend(autograd_cam(lambda x, official: (chunked.channel_attention(x, official), None)), x, official)


def test_channel_attention_fp16_gram_does_not_overflow():
    # post-ReLU features at N = 9,216: the fp16 Gram matrix (the math in fp16) overflows
    x = (torch.rand(1, 8, 96, 96) * 5).half()
    gamma = torch.ones(1)
    official_fp16 = reference.channel_attention(x.float().half(), gamma.half())
    assert not torch.isfinite(official_fp16).all(), "the premise: the fp16 math overflows here"
    y = attnseg.channel_attention(x, gamma, backend="chunked")
    expected = reference.channel_attention(x.double(), gamma.double())
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), expected, rtol=2e-3, atol=2e-3)


# ---------------------------------------------------------------------------------------------
# Everywhere a backend is accepted
# ---------------------------------------------------------------------------------------------


def _same_weights(make):
    torch.manual_seed(0)
    fused, ref = make("chunked"), make("reference")
    ref.load_state_dict(fused.state_dict())
    for module in (fused, ref):
        for name, p in module.named_parameters():
            if name.endswith("gamma"):
                p.data.fill_(0.6)
    return fused.eval(), ref.eval()


@pytest.mark.parametrize("make", [
    lambda b: attnseg.PositionAttention(16, backend=b),
    lambda b: attnseg.ChannelAttention(16, backend=b),
    lambda b: attnseg.DANetHead(64, 3, backend=b),
    lambda b: attnseg.NonLocal2d(16, backend=b),
], ids=["PositionAttention", "ChannelAttention", "DANetHead", "NonLocal2d"])
def test_modules_accept_chunked(make):
    fused, ref = _same_weights(make)
    x = torch.randn(2, fused.in_channels if hasattr(fused, "in_channels") and fused.in_channels else 16, 5, 6,
                    dtype=torch.float64)
    fused, ref = fused.double(), ref.double()
    assert "backend='chunked'" in repr(fused)
    out, expected = fused(x), ref(x)
    for a, b in zip(out if isinstance(out, tuple) else (out,), expected if isinstance(expected, tuple) else (expected,)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_object_context_attention_accepts_chunked():
    fused, ref = _same_weights(lambda b: attnseg.ObjectContextAttention(16, 8, 16, dropout=0.0, backend=b))
    x, regions = torch.randn(2, 16, 5, 6, dtype=torch.float64), torch.randn(2, 4, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(fused.double()(x, regions), ref.double()(x, regions), rtol=1e-10, atol=1e-10)


def test_convert_model_and_hook_accept_chunked():
    from test_modules import PAM_Module  # the official module's code

    converted = attnseg.convert_model(torch.nn.Sequential(PAM_Module(16)), backend="chunked")
    assert converted[0].backend == "chunked"
    from attnseg.integrations.mmengine import ConvertAttentionHook

    assert ConvertAttentionHook(backend="chunked").backend == "chunked"
