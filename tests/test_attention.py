"""The generic attention op (torch.ops.attnseg.attention_fwd / attention_bwd through
attnseg.attention(backend="native")) against attnseg.reference.

Shapes: a covering set, not the cartesian product (CI has 2 cores). Together the cases hit
B in {1, 3}, Nq and Nk in {1, 7, 97, 1024} with Nq != Nk, E in {1, 3, 64, 80},
Ev in {1, 64, 512, 513} and scale in {1, E**-0.5, negative}, in fp64 and fp32, forward and
dq / dk / dv with gradients flowing into both ``out`` and ``lse``.
Tolerances: see helpers.py.
"""

from __future__ import annotations

import pytest
import torch

import attnseg
from attnseg import reference
import helpers
from helpers import FP64_TOL, assert_matches_reference, magnitude, max_abs_err

requires_native = pytest.mark.requires_native

# (B, Nq, Nk, E, Ev, scale); scale "inv_sqrt" means E ** -0.5.
SHAPES = [
    (1, 1, 1, 1, 1, 1.0),
    (3, 7, 97, 3, 64, "inv_sqrt"),
    (1, 97, 7, 64, 513, -0.7),
    (3, 1024, 97, 80, 1, 1.0),
    (1, 97, 1024, 64, 512, 1.0),  # DANet's PAM widths (E = 64, Ev = 512), Nq != Nk
    (3, 1024, 1024, 1, 64, -2.0),
    (1, 1, 1024, 80, 513, "inv_sqrt"),
    (3, 1024, 1, 3, 512, -0.25),  # Nk = 1: every row of P is exactly 1
    (1, 7, 7, 80, 64, 1.0),
]


def _scale_value(scale, e):
    return e**-0.5 if scale == "inv_sqrt" else scale


def _shape_id(shape):
    b, nq, nk, e, ev, scale = shape
    return f"B{b}-Nq{nq}-Nk{nk}-E{e}-Ev{ev}-s{scale}"


def _contiguous_views(q, k, v):
    return q, k, v


def _run(leaves, make_qkv, scale, backend, grad_out, grad_lse):
    """(out, lse, grads of the leaves) of attnseg.attention on views made from fresh leaves."""
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    q, k, v = make_qkv(*leaves)
    out, lse = attnseg.attention(q, k, v, scale, backend=backend, return_lse=True)
    grads = torch.autograd.grad((out, lse), leaves, (grad_out.to(out.dtype), grad_lse.to(lse.dtype)))
    return out.detach(), lse.detach(), grads


def _compare_native_to_reference(leaves, make_qkv, scale, *, names=("q", "k", "v")):
    """Native vs the fp64 reference (and PyTorch in the same dtype), forward, lse and grads."""
    dtype = leaves[0].dtype
    with torch.no_grad():
        q, k, v = make_qkv(*leaves)
    b, nq, _ = q.shape
    grad_out = torch.randn(b, nq, v.shape[-1], dtype=torch.float64)
    grad_lse = torch.randn(b, nq, dtype=torch.float64)
    reduction = max(q.shape[1], k.shape[1], q.shape[2], v.shape[2])
    logit_max = float((scale * torch.bmm(q.double(), k.double().transpose(1, 2))).abs().max())

    out, lse, grads = _run(leaves, make_qkv, scale, "native", grad_out, grad_lse)
    leaves64 = [t.detach().double() for t in leaves]
    out64, lse64, grads64 = _run(leaves64, make_qkv, scale, "reference", grad_out, grad_lse)
    if dtype == torch.float64:
        same = (None, None, (None, None, None))
    else:
        same = _run(leaves, make_qkv, scale, "reference", grad_out, grad_lse)

    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.is_contiguous(), f"out must be contiguous, got strides {out.stride()}"
    tol = {"reduction": reduction, "logit_max": logit_max}
    assert_matches_reference("out", out, out64, same[0], expected_dtype=dtype, **tol)
    assert_matches_reference("lse", lse, lse64, same[1], expected_dtype=lse_dtype, **tol)
    for name, g, g64, g_same in zip(names, grads, grads64, same[2]):
        assert_matches_reference(f"d{name}", g, g64, g_same, expected_dtype=dtype, **tol)


# ---------------------------------------------------------------------------------------------
# Reference comparisons
# ---------------------------------------------------------------------------------------------


# bf16 on the CPU runs through bf16 GEMMs (fp32 accumulation, P and dS rounded to bf16) where the
# CPU has bf16 dot products, else in fp32: either way it meets the flash-attention criterion.
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
DTYPE_IDS = ["fp64", "fp32", "bf16"]


@requires_native
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_matches_reference(shape, dtype):
    b, nq, nk, e, ev, scale = shape
    leaves = [torch.randn(b, nq, e, dtype=dtype), torch.randn(b, nk, e, dtype=dtype), torch.randn(b, nk, ev, dtype=dtype)]
    _compare_native_to_reference(leaves, _contiguous_views, _scale_value(scale, e))


# Non-contiguous layouts: the kernels take strides (DESIGN.md, "Layout"). Each case builds
# (q, k, v) as views of base tensors; gradients are compared on the bases.
STRIDED_LAYOUTS = {
    # q, k, v as the 1x1 convolutions give them: channel-first [B, E, N] transposed to [B, N, E]
    "channel_first": (
        lambda b, nq, nk, e, ev, dt: [torch.randn(b, e, nq, dtype=dt), torch.randn(b, e, nk, dtype=dt), torch.randn(b, ev, nk, dtype=dt)],
        lambda q, k, v: (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)),
    ),
    # slices with a step in the token dim (k) and in the feature dim (q: last stride 2)
    "step_slices": (
        lambda b, nq, nk, e, ev, dt: [torch.randn(b, nq, 2 * e, dtype=dt), torch.randn(b, 2 * nk + 1, e, dtype=dt), torch.randn(b, nk, ev, dtype=dt)],
        lambda q, k, v: (q[..., ::2], k[:, 1::2], v),
    ),
    # a transposed v and a batch-broadcast k (stride 0 in B, shared keys)
    "transposed_v_expanded_k": (
        lambda b, nq, nk, e, ev, dt: [torch.randn(b, nq, e, dtype=dt), torch.randn(1, nk, e, dtype=dt), torch.randn(b, ev, nk, dtype=dt)],
        lambda q, k, v: (q, k.expand(q.shape[0], -1, -1), v.transpose(1, 2)),
    ),
    # a batch-strided slice: every other batch element, and a permuted [N, B, E] buffer
    "batch_step_and_permuted": (
        lambda b, nq, nk, e, ev, dt: [torch.randn(2 * b, nq, e, dtype=dt), torch.randn(nk, b, e, dtype=dt), torch.randn(b, nk, ev, dtype=dt)],
        lambda q, k, v: (q[::2], k.permute(1, 0, 2), v),
    ),
}


@requires_native
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", list(STRIDED_LAYOUTS))
def test_non_contiguous_inputs(layout, dtype):
    make_leaves, make_qkv = STRIDED_LAYOUTS[layout]
    b, nq, nk, e, ev = 3, 97, 70, 64, 80
    leaves = make_leaves(b, nq, nk, e, ev, dtype)
    q, k, v = make_qkv(*leaves)
    assert not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous()), "layout is not strided"
    assert (q.shape, k.shape, v.shape) == ((b, nq, e), (b, nk, e), (b, nk, ev))
    _compare_native_to_reference(leaves, make_qkv, e**-0.5, names=("q_base", "k_base", "v_base"))


@requires_native
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_large_logits(dtype):
    """|S| in the thousands (DANet's unscaled q·k on large features): finite, and correct."""
    b, nq, nk, e, ev = 2, 97, 130, 64, 64
    q = 12.0 * torch.randn(b, nq, e, dtype=dtype)
    k = 12.0 * torch.randn(b, nk, e, dtype=dtype)
    v = torch.randn(b, nk, ev, dtype=dtype)
    logits = torch.bmm(q.double(), k.double().transpose(1, 2))
    assert logits.abs().max() > 2000, "inputs do not produce large logits"
    # Rows are then nearly one-hot: exp(S - max) underflows for almost every key.
    _compare_native_to_reference([q, k, v], _contiguous_views, 1.0)


@requires_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_inputs(dtype):
    """fp16/bf16 in, same dtype out, lse in fp32, accumulated in fp32: at least as accurate as
    PyTorch in that dtype (same criterion as fp32, with that dtype's eps)."""
    b, nq, nk, e, ev = 2, 97, 130, 64, 80
    leaves = [torch.randn(b, nq, e).to(dtype), torch.randn(b, nk, e).to(dtype), torch.randn(b, nk, ev).to(dtype)]
    _compare_native_to_reference(leaves, _contiguous_views, e**-0.5)


@requires_native
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nan_input_propagates(where):
    """A NaN in an input gives NaN exactly where the reference has NaN, not a crash."""
    b, nq, nk, e, ev = 2, 9, 11, 5, 6
    tensors = {"q": torch.randn(b, nq, e), "k": torch.randn(b, nk, e), "v": torch.randn(b, nk, ev)}
    tensors[where][1, 3, 2] = float("nan")
    q, k, v = (tensors[n].requires_grad_() for n in ("q", "k", "v"))
    out = attnseg.attention(q, k, v, backend="native")
    with torch.no_grad():
        expected = reference.attention(q, k, v)
    assert torch.isnan(expected).any()
    assert torch.equal(torch.isnan(out), torch.isnan(expected)), "NaN pattern differs from the reference"
    finite = ~torch.isnan(expected)
    torch.testing.assert_close(out[finite], expected[finite])
    # The backward must not crash either, and may not hide the NaN.
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert any(torch.isnan(g).any() for g in grads), "a NaN input gave entirely finite gradients"


@requires_native
def test_nq_nk_9409():
    """mmsegmentation's 769 crop: N = 97 x 97 = 9409, one fp32 forward and backward.

    Kept cheap: small widths, and the reference only for a subset of query rows. Rows of the
    output depend only on their own query, and with grad_out / grad_lse zero outside the subset
    the exact dk and dv are the subset's contribution alone, so a [1, m, E] reference gives the
    exact expected dq (subset rows), dk and dv of the full 9409 x 9409 problem.
    """
    n, e, ev = 97 * 97, 3, 5
    q, k, v = torch.randn(1, n, e), torch.randn(1, n, e), torch.randn(1, n, ev)
    rows = torch.cat([torch.tensor([0, 1, 63, 64, 65, 127, 128, 4095, 4096, n - 2, n - 1]), torch.randperm(n)[:53]]).unique()
    grad_out = torch.zeros(1, n, ev, dtype=torch.float64)
    grad_lse = torch.zeros(1, n, dtype=torch.float64)
    grad_out[:, rows] = torch.randn(1, len(rows), ev, dtype=torch.float64)
    grad_lse[:, rows] = torch.randn(1, len(rows), dtype=torch.float64)

    out, lse, (dq, dk, dv) = _run([q, k, v], _contiguous_views, 1.0, "native", grad_out, grad_lse)
    assert out.shape == (1, n, ev) and lse.shape == (1, n)

    def sub(qkv_leaves):
        return _run(qkv_leaves, lambda q_, k_, v_: (q_[:, rows], k_, v_), 1.0, "reference", grad_out[:, rows], grad_lse[:, rows])

    out64, lse64, (dq64, dk64, dv64) = sub([q.double(), k.double(), v.double()])
    out32, lse32, (dq32, dk32, dv32) = sub([q, k, v])
    assert_matches_reference("out[rows]", out[:, rows], out64, out32, reduction=n)
    assert_matches_reference("lse[rows]", lse[:, rows], lse64, lse32, reduction=n)
    assert_matches_reference("dq[rows]", dq[:, rows], dq64[:, rows], dq32[:, rows], reduction=n)
    assert_matches_reference("dk", dk, dk64, dk32, reduction=n)
    assert_matches_reference("dv", dv, dv64, dv32, reduction=n)
    others = torch.ones(n, dtype=torch.bool)
    others[rows] = False
    assert torch.count_nonzero(dq[:, others]) == 0, "dq is non-zero for rows with zero incoming gradient"


@requires_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("used", ["out_only", "lse_only"])
def test_partial_output_gradients(used, dtype):
    """Only one of (out, lse) reaches the loss: the other's gradient is absent (None/zero)."""
    b, nq, nk, e, ev = 2, 33, 47, 16, 24
    leaves = [torch.randn(b, nq, e, dtype=dtype), torch.randn(b, nk, e, dtype=dtype), torch.randn(b, nk, ev, dtype=dtype)]

    def grads(backend, ts):
        ts = [t.detach().clone().requires_grad_() for t in ts]
        if used == "out_only":
            out = attnseg.attention(*ts, 0.5, backend=backend)  # return_lse=False
            weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
            loss = (out * weight).sum()
        else:
            _, lse = attnseg.attention(*ts, 0.5, backend=backend, return_lse=True)
            loss = (lse * torch.linspace(-1, 1, lse.numel(), dtype=lse.dtype).view_as(lse)).sum()
        # lse does not depend on v: the reference leaves dv out of the graph (zeros here)
        return torch.autograd.grad(loss, ts, allow_unused=True, materialize_grads=True)

    native = grads("native", leaves)
    ref64 = grads("reference", [t.double() for t in leaves])
    same = grads("reference", leaves) if dtype != torch.float64 else (None,) * 3
    for name, g, g64, gs in zip("qkv", native, ref64, same):
        assert_matches_reference(f"d{name}", g, g64, gs, reduction=max(nk, ev))


@requires_native
@pytest.mark.parametrize("scale", [1.0, 0.125, -1.5])
def test_lse_is_logsumexp_of_scaled_logits(scale):
    q, k, v = torch.randn(2, 7, 3, dtype=torch.float64), torch.randn(2, 97, 3, dtype=torch.float64), torch.randn(2, 97, 1, dtype=torch.float64)
    _, lse = attnseg.attention(q, k, v, scale, backend="native", return_lse=True)
    expected = torch.logsumexp(scale * torch.bmm(q, k.transpose(1, 2)), dim=-1)
    assert lse.dtype == torch.float64 and lse.shape == (2, 7)
    assert max_abs_err(lse, expected) <= FP64_TOL * magnitude(expected)


# ---------------------------------------------------------------------------------------------
# gradcheck (float64, small shapes): the suite users run.
# ---------------------------------------------------------------------------------------------

GRADCHECK_SHAPES = [
    # (B, Nq, Nk, E, Ev, scale)
    (1, 1, 1, 1, 1, 1.0),
    (2, 5, 7, 3, 4, 1.0),
    (1, 7, 3, 4, 9, -0.6),
    (2, 4, 9, 2, 1, 0.5),
]


@requires_native
@pytest.mark.parametrize("with_lse", [False, True], ids=["out", "out+lse"])
@pytest.mark.parametrize("shape", GRADCHECK_SHAPES, ids=_shape_id)
def test_gradcheck_attention(shape, with_lse):
    b, nq, nk, e, ev, scale = shape
    inputs = (
        torch.randn(b, nq, e, dtype=torch.float64, requires_grad=True),
        torch.randn(b, nk, e, dtype=torch.float64, requires_grad=True),
        torch.randn(b, nk, ev, dtype=torch.float64, requires_grad=True),
    )

    def fn(q, k, v):
        return attnseg.attention(q, k, v, scale, backend="native", return_lse=with_lse)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@requires_native
def test_gradcheck_attention_lse_only_strided():
    """The grad_lse path alone (grad_out absent) through channel-first strided views."""
    base = (
        torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True),  # [B, E, Nq]
        torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True),  # [B, E, Nk]
        torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True),  # [B, Ev, Nk]
    )

    def fn(q, k, v):
        _, lse = attnseg.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), -0.8,
                                   backend="native", return_lse=True)
        return lse

    assert torch.autograd.gradcheck(fn, base, eps=1e-6, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# torch.library.opcheck: schema, fake kernels, autograd registration, AOT dispatch.
# ---------------------------------------------------------------------------------------------


def _attention_fwd_samples():
    def qkv(b, nq, nk, e, ev, dtype, requires_grad):
        q = torch.randn(b, nq, e, dtype=dtype, requires_grad=requires_grad)
        k = torch.randn(b, nk, e, dtype=dtype, requires_grad=requires_grad)
        v = torch.randn(b, nk, ev, dtype=dtype, requires_grad=requires_grad)
        return q, k, v

    torch.manual_seed(1)
    samples = [
        ("fp32", (*qkv(2, 5, 7, 3, 4, torch.float32, True), 1.0)),
        ("fp64_nograd", (*qkv(1, 9, 2, 8, 5, torch.float64, False), -0.5)),
    ]
    q = torch.randn(2, 3, 6, requires_grad=True).transpose(1, 2)  # channel-first view [2, 6, 3]
    k = torch.randn(2, 14, 3)[:, ::2]  # step slice [2, 7, 3]
    v = torch.randn(2, 5, 7).transpose(1, 2)  # transposed [2, 7, 5]
    samples.append(("strided", (q, k, v, 0.25)))
    return samples


@requires_native
@pytest.mark.parametrize("sample", range(3), ids=["fp32", "fp64_nograd", "strided"])
def test_opcheck_attention_fwd(sample):
    _, args = _attention_fwd_samples()[sample]
    torch.library.opcheck(torch.ops.attnseg.attention_fwd.default, args)


@requires_native
@pytest.mark.parametrize("with_grad_lse", [False, True], ids=["no_grad_lse", "grad_lse"])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_opcheck_attention_bwd(strided, with_grad_lse):
    b, nq, nk, e, ev, scale = 2, 6, 5, 3, 4, 0.7
    if strided:
        q = torch.randn(b, e, nq).transpose(1, 2)
        k = torch.randn(b, nk, 2 * e)[..., ::2]
        v = torch.randn(b, ev, nk).transpose(1, 2)
    else:
        q, k, v = torch.randn(b, nq, e), torch.randn(b, nk, e), torch.randn(b, nk, ev)
    out, lse = torch.ops.attnseg.attention_fwd(q, k, v, scale)
    grad_out = torch.randn(b, ev, nq).transpose(1, 2) if strided else torch.randn(b, nq, ev)
    grad_lse = torch.randn(b, nq) if with_grad_lse else None
    torch.library.opcheck(torch.ops.attnseg.attention_bwd.default, (grad_out, grad_lse, q, k, v, out, lse, scale))


@requires_native
@pytest.mark.parametrize("official", [True, False], ids=["official", "paper"])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_opcheck_channel_attention_fwd(strided, official):
    if strided:  # [B, C, N] view of a channels_last [B, C, H, W] map, as functional passes it
        x = torch.randn(2, 5, 3, 4).to(memory_format=torch.channels_last).flatten(2)
        assert not x.is_contiguous()
        x.requires_grad_()
    else:
        x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.attnseg.channel_attention_fwd.default, (x, official))


@requires_native
@pytest.mark.parametrize("official", [True, False], ids=["official", "paper"])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_opcheck_channel_attention_bwd(strided, official):
    x = torch.randn(2, 12, 5).transpose(1, 2) if strided else torch.randn(2, 5, 12)
    _, attn = torch.ops.attnseg.channel_attention_fwd(x, official)
    grad_y = torch.randn(2, 12, 5).transpose(1, 2) if strided else torch.randn(2, 5, 12)
    torch.library.opcheck(torch.ops.attnseg.channel_attention_bwd.default, (grad_y, x, attn, official))


# ---------------------------------------------------------------------------------------------
# Runs without the extension: the reference backend through the same public call.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1.0, -0.3])
def test_reference_backend_lse_and_out(scale):
    """The reference backend of attnseg.attention returns softmax(q kᵀ·scale) v and its lse."""
    q, k, v = torch.randn(2, 7, 3), torch.randn(2, 11, 3), torch.randn(2, 11, 5)
    out, lse = attnseg.attention(q, k, v, scale, backend="reference", return_lse=True)
    logits = scale * torch.bmm(q.double(), k.double().transpose(1, 2))
    expected = torch.bmm(torch.softmax(logits, -1), v.double())
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), torch.logsumexp(logits, -1), rtol=1e-5, atol=1e-5)


@requires_native
@pytest.mark.parametrize("nk", [1500, 19], ids=["key-block-groups", "few-keys-row-parts"])
@pytest.mark.parametrize("layout", ["row_major", "channel_first"])
def test_bitwise_deterministic_across_thread_counts(layout, nk):
    """The CPU kernels' task split never depends on the thread count: outputs and gradients
    are bitwise identical with 1, 2 and 7 threads, and across repeated calls. Row-major inputs take
    the ATen-GEMM kernels, channel-first ones our own (AVX-512 or AVX2) where the CPU has them (two
    query chunks there, three key-block groups, dQ through the row buffer; with 19 keys, one group
    and each chunk's rows in four parts, their dK and dV summed at the end). 7 threads are more
    than a chunk's 6 or 8 backward tasks, so the pipelined schedule runs the next chunk's tasks
    beside the last ones of the previous chunk (each waiting for its own predecessors)."""
    g = torch.Generator().manual_seed(3)
    if layout == "row_major":
        q, k, v = (torch.randn(2, n, w, generator=g) for n, w in ((1100, 64), (nk, 64), (nk, 96)))
    else:
        q, k, v = (_channel_first(2, n, w, g) for n, w in ((1100, 64), (nk, 64), (nk, 96)))
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    saved = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 1, 2, 7):
            torch.set_num_threads(threads)
            out = attnseg.attention(q, k, v, 0.125, backend="native")
            results.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v))))
    finally:
        torch.set_num_threads(saved)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def _cpu_capabilities() -> dict:
    return torch._C._cpu._get_cpu_capability()


def _cpu_has_bf16_dot() -> bool:
    capabilities = _cpu_capabilities()
    return bool(capabilities.get("avx512_bf16")) and bool(capabilities.get("avx512_bw"))


def _cpu_has_lowp_gemm(dtype) -> bool:
    """Whether `auto` picks a low-precision GEMM engine for dtype (csrc/cpu/lowp_gemm.h): oneDNN's
    AMX kernel through ATen's brgemm (AMX-BF16 / AMX-FP16), or the AVX512-BF16 micro-kernel."""
    capabilities = _cpu_capabilities()
    if dtype == torch.bfloat16:
        return bool(capabilities.get("amx_bf16")) or _cpu_has_bf16_dot()
    return bool(capabilities.get("amx_fp16"))


@requires_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_takes_low_precision_gemms_where_the_cpu_has_them(dtype):
    """Where the CPU has bf16 (fp16) dot products with fp32 accumulation, bf16 (fp16) inputs go
    through GEMMs of that type (P and dS rounded to it before the GEMMs that consume them, so
    results differ from the fp32 computation of the same inputs); without them they are computed
    in fp32 as before (bitwise the fp32 kernel rounded)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 300, 64), torch.randn(1, 290, 64), torch.randn(1, 290, 96)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    out, lse = torch.ops.attnseg.attention_fwd(q, k, v, 0.125)
    out32, lse32 = torch.ops.attnseg.attention_fwd(q.float(), k.float(), v.float(), 0.125)
    assert out.dtype == dtype and lse.dtype == torch.float32
    same = torch.equal(out, out32.to(dtype))
    assert same != _cpu_has_lowp_gemm(dtype), "took the wrong path for this CPU"


def _select(monkeypatch, variable, choices, name):
    """Sets the environment variable to choice `name`, or skips saying why this CPU cannot run it."""
    available = choices[name]()
    if available is not True:
        pytest.skip(available)
    monkeypatch.setenv(variable, name)


# ATTNSEG_CPU_LOWP_GEMM's engines, each where this CPU runs it (the skip says why not).
ENGINES = {
    "brgemm": lambda: bool(_cpu_capabilities().get("amx_bf16")) or "needs AMX-BF16 (oneDNN's AMX GEMM)",
    "avx512_bf16": lambda: _cpu_has_bf16_dot() or "needs AVX512-BF16",
    "fp32": lambda: True,
}


@requires_native
@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("shape", [(2, 37, 300, 64, 96), (1, 300, 513, 17, 512), (1, 1, 1, 1, 1)],
                         ids=["ragged", "odd-k-ev512", "single"])
def test_bf16_engines_match_reference(monkeypatch, engine, shape):
    """Every engine the CPU has meets the flash-attention criterion against fp64, forward and all
    gradients, on ragged tiles, an odd E (K padding) and a 512-wide Ev (two brgemm panels)."""
    _select(monkeypatch, "ATTNSEG_CPU_LOWP_GEMM", ENGINES, engine)
    b, nq, nk, e, ev = shape
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(b, n, w, generator=g).bfloat16() for n, w in ((nq, e), (nk, e), (nk, ev)))
    run = helpers.autograd_attention(lambda *a: torch.ops.attnseg.attention_fwd(*a))
    helpers.check_attention_backend(run, q, k, v, e ** -0.5)


@requires_native
@pytest.mark.parametrize("value, message", [("bogus", "must be auto, brgemm, avx512_bf16 or fp32"),
                                            ("brgemm-fp16", "ATTNSEG_CPU_LOWP_GEMM=brgemm")])
def test_engine_override_errors_are_clear(monkeypatch, value, message):
    """An unknown ATTNSEG_CPU_LOWP_GEMM, or an engine this CPU lacks, is an error naming the
    variable and the choices, not a silent fallback."""
    dtype = torch.bfloat16
    if value == "brgemm-fp16":
        if _cpu_capabilities().get("amx_fp16"):
            pytest.skip("this CPU has AMX-FP16: brgemm runs fp16")
        value, dtype = "brgemm", torch.float16
    monkeypatch.setenv("ATTNSEG_CPU_LOWP_GEMM", value)
    q = torch.randn(1, 8, 4).to(dtype)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.attnseg.attention_fwd(q, q, q, 0.5)


# ---------------------------------------------------------------------------------------------
# The fp32 kernels (ATTNSEG_CPU_F32_KERNEL): forward and backward on our own GEMMs
# (csrc/cpu/f32_gemm.h: AVX-512, or AVX2 + FMA), or on ATen's GEMM per tile. `auto` takes ours for a
# channel-first v, the widest this CPU runs. A CPU with AVX-512 runs the AVX2 ones too.
# ---------------------------------------------------------------------------------------------

F32_KERNELS = {
    "avx512": lambda: bool(_cpu_capabilities().get("avx512_dq")) or "needs AVX-512F/DQ",
    "avx2": lambda: (bool(_cpu_capabilities().get("avx2")) and bool(_cpu_capabilities().get("fma3"))) or "needs AVX2 and FMA",
    "aten": lambda: True,
}
# Our own kernels (the tests of their operand layouts and uninitialized buffers run on each).
OWN_F32_KERNELS = ["avx512", "avx2"]


def _channel_first(b, n, width, generator, scale=1.0):
    return (scale * torch.randn(b, width, n, generator=generator)).transpose(1, 2)


@requires_native
@pytest.mark.parametrize("kernel", list(F32_KERNELS))
@pytest.mark.parametrize("v_layout", ["channel_first", "contiguous"])
@pytest.mark.parametrize("shape", [(2, 300, 513, 64, 96), (1, 257, 255, 17, 513), (3, 1, 7, 1, 5), (1, 64, 256, 1, 6),
                                   (2, 2100, 600, 65, 70), (1, 300, 257, 200, 64), (2, 1100, 19, 64, 96)],
                         ids=["ragged-3-key-blocks", "ragged-panels-odd-e", "tiny", "one-full-key-block", "3-chunks",
                              "e-over-two-panels", "few-keys-row-parts"])
def test_f32_kernels_match_reference(monkeypatch, kernel, v_layout, shape):
    """Both fp32 kernels, forced, meet the fp32 criterion against fp64, forward, lse and all
    gradients: ragged query panels (300 = 256 + 44), key blocks of the forward (256) and the
    backward (512) with ragged ends (the forward's online rescale of the output columns), an Ev
    that is not a multiple of the 6-row micro-kernel, E = 1 and E = 65 (two panels of K), a v that
    our kernels must first copy, Nq = 2,100: three backward chunks of 1,024 queries, each
    in 256-row blocks, with the partial dQ of the key-block groups summed, and E = 200 (the
    non-local / OCR modules' wider keys): S = Q Kᵀ with K > 128 takes the GEMM's row-blocks-outer
    order, and dQ, dKᵀ and K's panels span four 64-wide panels, the last ragged. Few keys split
    the chunks' rows into parts with dKᵀ and dVᵀ of their own (Nk = 600: 2 parts; Nk = 19, as
    HRNet-OCR's object regions: 4 parts, and the second chunk's 76 rows leave two parts empty)."""
    _select(monkeypatch, "ATTNSEG_CPU_F32_KERNEL", F32_KERNELS, kernel)
    b, nq, nk, e, ev = shape
    g = torch.Generator().manual_seed(11)
    leaves = [_channel_first(b, nq, e, g), _channel_first(b, nk, e, g), _channel_first(b, nk, ev, g)]
    if v_layout == "contiguous":
        leaves[2] = leaves[2].contiguous()
    _compare_native_to_reference(leaves, _contiguous_views, e**-0.5)


@requires_native
def test_f32_auto_takes_own_kernel_for_channel_first_v(monkeypatch):
    """`auto` runs our kernel for a channel-first v, the AVX-512 one where the CPU has AVX-512, else
    the AVX2 one (bitwise its forced result, and not the ATen kernel's), and the ATen kernel for a
    row-major v."""
    own = next((name for name in OWN_F32_KERNELS if F32_KERNELS[name]() is True), None)
    if own is None:
        pytest.skip("needs AVX-512F/DQ or AVX2 with FMA")
    g = torch.Generator().manual_seed(3)
    q, k, v = _channel_first(1, 300, 64, g), _channel_first(1, 600, 64, g), _channel_first(1, 600, 96, g)

    def run(kernel, v_):
        monkeypatch.setenv("ATTNSEG_CPU_F32_KERNEL", kernel)
        return torch.ops.attnseg.attention_fwd(q, k, v_, 0.125)[0]

    assert torch.equal(run("auto", v), run(own, v))
    assert not torch.equal(run("auto", v), run("aten", v)), "the two kernels agree bitwise: the test cannot tell them apart"
    assert torch.equal(run("auto", v.contiguous()), run("aten", v.contiguous()))


@requires_native
@pytest.mark.parametrize("kernel", list(F32_KERNELS))
def test_f32_kernels_special_values(monkeypatch, kernel):
    """NaN, ±inf and all -inf logit columns give what the reference gives, in both kernels: a NaN
    logit poisons its query (also when another key block of that query holds +inf), a +inf logit
    gives NaN output and lse = +inf, a query whose logits are all -inf has NaN output (0/0) and
    lse = -inf, a -inf logit among finite ones is a zero probability."""
    _select(monkeypatch, "ATTNSEG_CPU_F32_KERNEL", F32_KERNELS, kernel)
    g = torch.Generator().manual_seed(7)
    b, nq, nk, e, ev = 1, 70, 300, 4, 9
    q, k, v = _channel_first(b, nq, e, g), _channel_first(b, nk, e, g), _channel_first(b, nk, ev, g)
    q, k = q.clone(), k.clone()  # row-major copies to poke values into; v stays channel-first
    k[0, 5, :] = float("nan")        # every query sees a NaN logit in key block 0 ...
    q[0, 1:3, :] = 0.0               # ... except that q = 0 gives 0 · NaN = NaN too: all NaN rows
    k[0, 290, 0] = float("inf")      # +inf·q: +inf or -inf logits in key block 1
    q[0, 10, :] = float("-inf")      # q of -inf: NaN / ±inf logits throughout
    q, k = q.transpose(1, 2).contiguous().transpose(1, 2), k.transpose(1, 2).contiguous().transpose(1, 2)
    out, lse = torch.ops.attnseg.attention_fwd(q, k, v, 1.0)
    s = q.double() @ k.double().transpose(1, 2)
    expected_lse = torch.logsumexp(s, -1)
    expected_out = torch.softmax(s, -1) @ v.double()
    assert torch.equal(torch.isnan(out), torch.isnan(expected_out)), "NaN pattern of out differs"
    assert torch.equal(torch.isnan(lse), torch.isnan(expected_lse)), "NaN pattern of lse differs"
    finite = torch.isfinite(expected_lse)
    assert torch.equal(lse[~finite & ~torch.isnan(lse)], expected_lse[~finite & ~torch.isnan(lse)].float())
    torch.testing.assert_close(lse[finite], expected_lse[finite].float(), rtol=1e-5, atol=1e-5)

    # A finite problem with whole -inf columns and -inf entries (through the scale: 0 · inf is NaN,
    # so the -inf logits come from a -inf key row times a positive query row).
    q = _channel_first(1, 33, 3, g).abs() + 0.1
    k = _channel_first(1, 290, 3, g)
    k[0, 270:, :] = float("-inf")     # the last key block's logits all -inf: zero probability
    v = _channel_first(1, 290, 5, g)
    out, lse = torch.ops.attnseg.attention_fwd(q, k, v, 0.5)
    s = 0.5 * q.double() @ k.double().transpose(1, 2)
    torch.testing.assert_close(out, (torch.softmax(s, -1) @ v.double()).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1).float(), rtol=1e-5, atol=1e-5)
    k[0, :, :] = float("-inf")        # every logit -inf: out is NaN (0/0), lse = -inf
    out, lse = torch.ops.attnseg.attention_fwd(q, k, v, 0.5)
    expected = torch.softmax(0.5 * q.double() @ k.double().transpose(1, 2), -1) @ v.double()
    assert torch.equal(torch.isnan(out), torch.isnan(expected))
    assert torch.equal(lse, torch.full_like(lse, float("-inf")))


@requires_native
def test_f32_kernel_override_errors_are_clear(monkeypatch):
    """An unknown ATTNSEG_CPU_F32_KERNEL is an error naming the variable and its choices."""
    monkeypatch.setenv("ATTNSEG_CPU_F32_KERNEL", "bogus")
    q = torch.randn(1, 8, 4)
    with pytest.raises(RuntimeError, match="ATTNSEG_CPU_F32_KERNEL must be auto, avx512, avx2 or aten, got 'bogus'"):
        torch.ops.attnseg.attention_fwd(q, q, q, 0.5)


@requires_native
@pytest.mark.parametrize("kernel", OWN_F32_KERNELS)
@pytest.mark.parametrize("layout", ["channel_first", "row_major"])
@pytest.mark.parametrize("shape", [(2, 2100, 1300, 24, 40), (1, 700, 300, 3, 40)], ids=["chunks-groups", "one-group"])
def test_f32_own_backward_writes_every_gradient_element(monkeypatch, kernel, layout, shape):
    """Our fp32 backward (AVX-512 or AVX2) allocates its gradients, partial dQ and dQ row buffer uninitialized and
    writes each element before adding to it (dKᵀ, dVᵀ: the first query block; dQ: each task's first
    key block). With deterministic algorithms on, PyTorch fills uninitialized memory with NaN, so an
    element added to before it was written would come out NaN (checked by assert_matches_reference).
    Shapes: three query chunks of up to 1,024 rows, the last ragged, and three key-block groups at
    B = 2; one chunk and one group with E = 3. Channel-first inputs take the dQ row buffer and write
    dKᵀ, dVᵀ in place; row-major ones write dq directly and dKᵀ, dVᵀ through buffers."""
    _select(monkeypatch, "ATTNSEG_CPU_F32_KERNEL", F32_KERNELS, kernel)
    assert torch.utils.deterministic.fill_uninitialized_memory
    g = torch.Generator().manual_seed(12)
    b, nq, nk, e, ev = shape
    make = (lambda n, w: _channel_first(b, n, w, g)) if layout == "channel_first" else (
        lambda n, w: torch.randn(b, n, w, generator=g))
    q, k, v, grad_out = make(nq, e), make(nk, e), make(nk, ev), make(nq, ev)
    out, lse = torch.ops.attnseg.attention_fwd(q, k, v, 0.2)
    was = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.isnan(torch.empty(64)).all(), "uninitialized memory is not NaN-filled here"
        grads = torch.ops.attnseg.attention_bwd(grad_out, None, q, k, v, out, lse, 0.2)
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])
    no_lse_grad = torch.zeros_like(lse)
    grads64 = helpers.reference_attention_grads(q.double(), k.double(), v.double(), 0.2, grad_out, no_lse_grad)[2:]
    grads32 = helpers.reference_attention_grads(q, k, v, 0.2, grad_out, no_lse_grad)[2:]
    for name, grad, g64, g32 in zip("qkv", grads, grads64, grads32):
        assert_matches_reference(f"d{name}", grad, g64, g32, reduction=max(nq, nk, ev))


@requires_native
@pytest.mark.parametrize("kernel", OWN_F32_KERNELS)
@pytest.mark.parametrize("do_layout", ["channel_first", "row_major", "strided"])
@pytest.mark.parametrize("q_layout", ["channel_first", "row_major", "strided"])
def test_f32_own_backward_operand_layouts(monkeypatch, kernel, q_layout, do_layout):
    """Our fp32 backward (AVX-512 or AVX2) reads q's and dO's rows or transposed rows where the layout gives them
    and lays out the other per chunk (a step slice, with neither inner stride 1, reaches it as a
    contiguous copy made by the op's gemm_ready). Every combination gives the fp64 reference's
    gradients (criterion of helpers.assert_matches_reference), into gradients of the inputs' layouts."""
    _select(monkeypatch, "ATTNSEG_CPU_F32_KERNEL", F32_KERNELS, kernel)
    g = torch.Generator().manual_seed(9)
    b, nq, nk, e, ev = 2, 1100, 530, 64, 80

    def make(n, width, layout):
        if layout == "channel_first":
            return torch.randn(b, width, n, generator=g).transpose(1, 2)
        if layout == "row_major":
            return torch.randn(b, n, width, generator=g)
        return torch.randn(b, n, 2 * width, generator=g)[..., ::2]  # neither stride is 1

    q, grad_out = make(nq, e, q_layout), make(nq, ev, do_layout)
    k, v = _channel_first(b, nk, e, g), _channel_first(b, nk, ev, g)
    out, lse = torch.ops.attnseg.attention_fwd(q, k, v, 0.125)
    grads = torch.ops.attnseg.attention_bwd(grad_out, None, q, k, v, out, lse, 0.125)
    no_lse_grad = torch.zeros_like(lse)
    grads64 = helpers.reference_attention_grads(q.double(), k.double(), v.double(), 0.125, grad_out, no_lse_grad)[2:]
    grads32 = helpers.reference_attention_grads(q, k, v, 0.125, grad_out, no_lse_grad)[2:]
    for name, x, grad, g64, g32 in zip("qkv", (q, k, v), grads, grads64, grads32):
        assert grad.stride() == torch.empty_like(x).stride(), f"d{name} is not in {name}'s layout"
        assert_matches_reference(f"d{name}", grad, g64, g32, reduction=max(nq, nk, ev))
