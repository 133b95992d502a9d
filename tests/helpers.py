"""Comparison helpers shared by the attnseg tests (imported as ``helpers``; conftest puts
tests/ on sys.path).

Tolerances, and why
-------------------
fp64: the native kernels accumulate in fp64 for fp64 inputs, exactly like the reference, so
the only differences are summation order: a few ulps (2.2e-16) times a reduction length of at
most ~10^4 and a condition factor that grows with |logits| (exp amplifies an absolute logit
error of eps·|S|). ``FP64_TOL = 1e-10`` relative to the tensor's magnitude leaves >1000×
headroom over that and is still ~10^8 times tighter than any real bug (a wrong term, a dropped
key, a missing rescale), which shows up at 1e-3 or more.

fp32 and lower, the flash-attention criterion: both the kernel and PyTorch in the *same* dtype
(the reference backend on the low-precision inputs) are compared against the fp64 reference
on the same (exactly upcast) inputs, and
    err_kernel <= 2 * err_torch + atol,
    atol = eps(dtype) * magnitude * max(ATOL_ULPS * sqrt(n), 2 * max|logits|),
with ``n`` the longest reduction of the problem. The factor 2 allows a different but equally
sound summation order. ``atol`` covers two things the ratio alone does not:
  * outputs PyTorch gets (nearly) exactly right for structural reasons (e.g. dq = 0 when
    Nk = 1, where the kernel's dP - delta cancels only to rounding): ~eps·sqrt(n) per sum;
  * large logits: a logit is only known to ~eps·|S| in fp32, exp turns that into a relative
    error of P, and which of two equally sound summation orders lands closer to fp64 is then a
    coin toss. Measured over seeds at |S| ~ 5000: err_kernel/err_torch ranges 0.9..90 while
    err_kernel/(eps·|S|max·magnitude) stays below 0.6, hence the 2·|S|max term.
Both terms are ~1e-3 relative or less: a real bug (a dropped key, a missing rescale, a wrong
sign) is O(1e-2..1) relative. Magnitudes are floored at 1 because every input is O(1) or larger.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import torch

FP64_TOL = 1e-10
ATOL_ULPS = 8.0


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(name: str):
    """benchmarks/<name>.py imported as module ``name`` (benchmarks/ is not a package; its
    scripts import _common beside them, so benchmarks/ goes on sys.path)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def magnitude(t: torch.Tensor) -> float:
    finite = t[torch.isfinite(t)]
    return max(float(finite.abs().max()) if finite.numel() else 0.0, 1.0)


def max_abs_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.detach().double() - expected.detach().double()).abs().max()) if actual.numel() else 0.0


def assert_matches_reference(
    name: str,
    actual: torch.Tensor,
    ref64: torch.Tensor,
    ref_same_dtype: torch.Tensor | None = None,
    *,
    reduction: int = 1,
    logit_max: float = 0.0,
    expected_dtype: torch.dtype | None = None,
    extra_atol: float = 0.0,
) -> None:
    """Check ``actual`` against the fp64 reference ``ref64`` (see the module docstring).

    ``ref_same_dtype`` is PyTorch's own result in ``actual``'s precision; it is required for
    any dtype other than float64. ``reduction``: the longest sum behind the result;
    ``logit_max``: the largest |logit| of the softmax behind it (0 if none); ``extra_atol``: an
    absolute term the caller justifies (see check_attention_backend).
    """
    assert actual.shape == ref64.shape, f"{name}: shape {tuple(actual.shape)} != reference {tuple(ref64.shape)}"
    if expected_dtype is not None:
        assert actual.dtype == expected_dtype, f"{name}: dtype {actual.dtype}, expected {expected_dtype}"
    assert torch.isfinite(ref64).all(), f"{name}: the fp64 reference is not finite; the test inputs are wrong"
    assert torch.isfinite(actual).all(), (
        f"{name}: {int((~torch.isfinite(actual)).sum())} non-finite values where the reference is finite"
    )
    mag = magnitude(ref64)
    err = max_abs_err(actual, ref64)
    if actual.dtype == torch.float64:
        tol = FP64_TOL * mag + extra_atol
        assert err <= tol, f"{name} (float64): max abs err {err:.3e} > {tol:.3e} (magnitude {mag:.3e})"
        return
    assert ref_same_dtype is not None, f"{name}: a same-dtype PyTorch result is needed for {actual.dtype}"
    err_torch = max_abs_err(ref_same_dtype, ref64)
    atol = torch.finfo(actual.dtype).eps * mag * max(ATOL_ULPS * math.sqrt(max(reduction, 1)), 2.0 * logit_max)
    tol = 2.0 * err_torch + atol + extra_atol
    assert err <= tol, (
        f"{name} ({actual.dtype}): kernel err {err:.3e} > 2 * torch err {err_torch:.3e} + atol {atol:.3e} "
        f"(magnitude {mag:.3e})"
    )


def randomize_batchnorm(module) -> None:
    """Move every BatchNorm2d's statistics and affine parameters away from (0, 1), in place, so
    that a checkpoint test notices a swapped or dropped BN tensor."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
                m.num_batches_tracked.fill_(100)


# ---------------------------------------------------------------------------------------------
# Property-based cases (hypothesis), shared by the native, emulated-CUDA and Triton tests.
# ---------------------------------------------------------------------------------------------

# Sizes around every kernel's tiles: CUDA 32-row / 32-key tiles and 64-wide chunks, Triton
# blocks of 16..128, the CPU kernel's 256-wide tiles; plus primes.
EDGE_SIZES = (1, 2, 3, 5, 7, 13, 31, 32, 33, 37, 63, 64, 65, 97, 127, 128, 129, 255, 256, 257)
WIDTHS = (1, 2, 3, 7, 15, 16, 17, 31, 32, 33, 63, 64, 65, 96)
LAYOUTS = ("contiguous", "channel_first", "sliced", "batch_major")


def strided_randn(b: int, n: int, width: int, layout: str, dtype: torch.dtype, gen: torch.Generator,
                  std: float = 1.0) -> torch.Tensor:
    """A [b, n, width] tensor of N(0, std²) values in one of LAYOUTS:
    contiguous; channel_first (the [b, width, n] conv output transposed: unit stride along n);
    sliced (an offset, every other column of a wider tensor: no unit stride at all);
    batch_major (an [n, b, width] tensor transposed: the batch stride is the smallest but one)."""
    if layout == "contiguous":
        t = torch.randn(b, n, width, generator=gen)
    elif layout == "channel_first":
        t = torch.randn(b, width, n, generator=gen).transpose(1, 2)
    elif layout == "sliced":
        t = torch.randn(b, n + 3, 2 * width + 1, generator=gen)[:, 2 : n + 2, 1::2]
    elif layout == "batch_major":
        t = torch.randn(n, b, width, generator=gen).transpose(0, 1)
    else:
        raise ValueError(layout)
    return (t * std).to(dtype)


def hypothesis_strategies():
    """(attention_cases, cam_cases) strategy factories; imported lazily so that helpers stays
    importable without hypothesis."""
    from hypothesis import strategies as st

    def sizes(max_n):
        return st.sampled_from([s for s in EDGE_SIZES if s <= max_n]) | st.integers(1, max_n)

    @st.composite
    def attention_cases(draw, max_n=257, max_width=96, max_batch=3):
        widths = st.sampled_from([w for w in WIDTHS if w <= max_width])
        e, ev = draw(widths), draw(widths)
        return {
            "b": draw(st.integers(1, max_batch)),
            "nq": draw(sizes(max_n)),
            "nk": draw(sizes(max_n)),
            "e": e,
            "ev": ev,
            "layouts": tuple(draw(st.sampled_from(LAYOUTS)) for _ in range(3)),
            # 0: uniform attention; E^-0.5: the usual; 3: |S| ~ 3·sqrt(E), nearly one-hot rows
            "scale": draw(st.sampled_from([0.0, 0.05, 1.0 / math.sqrt(e), 1.0, 3.0])),
            "seed": draw(st.integers(0, 2**16)),
        }

    @st.composite
    def cam_cases(draw, max_c=97, max_n=257, max_batch=2):
        return {
            "b": draw(st.integers(1, max_batch)),
            "c": draw(sizes(max_c)),
            "n": draw(sizes(max_n)),
            "layout": draw(st.sampled_from(LAYOUTS)),
            "official": draw(st.booleans()),
            "magnitude": draw(st.sampled_from([0.05, 0.3, 1.0])),
            "seed": draw(st.integers(0, 2**16)),
        }

    return attention_cases, cam_cases


def attention_case_inputs(case: dict, dtype: torch.dtype):
    g = torch.Generator().manual_seed(case["seed"])
    lq, lk, lv = case["layouts"]
    b, nq, nk, e, ev = (case[key] for key in ("b", "nq", "nk", "e", "ev"))
    return (strided_randn(b, nq, e, lq, dtype, g), strided_randn(b, nk, e, lk, dtype, g),
            strided_randn(b, nk, ev, lv, dtype, g))


def cam_case_input(case: dict, dtype: torch.dtype) -> torch.Tensor:
    """Post-ReLU-like features [B, C, N] (as DANet's CAM sees them) in the drawn layout."""
    g = torch.Generator().manual_seed(case["seed"])
    x = strided_randn(case["b"], case["c"], case["n"], case["layout"], torch.float64, g)
    return (torch.relu(x) * case["magnitude"] + 0.01 * x).to(dtype)


def reference_attention_grads(q, k, v, scale, grad_out, grad_lse):
    """(out, lse, dq, dk, dv) of attnseg.reference in q's dtype, by autograd."""
    from attnseg import reference

    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = reference.attention_with_lse(q, k, v, scale)
    grads = torch.autograd.grad((out, lse), (q, k, v), (grad_out.to(out.dtype), grad_lse.to(lse.dtype)))
    return (out.detach(), lse.detach(), *grads)


def check_attention_backend(run, q, k, v, scale, *, check_layout=True, baseline: torch.dtype | None = None):
    """Compare ``run(q, k, v, scale, grad_out, grad_lse) -> (out, lse, dq, dk, dv)`` with the
    fp64 reference (and PyTorch in q's dtype as the yardstick), by assert_matches_reference.
    ``baseline``: compute the yardstick in this dtype instead, rounded to q's dtype (fp32 for fp16
    inputs whose logits would overflow or lose all precision in fp16)."""
    g = torch.Generator().manual_seed(12345)
    b, nq, nk, e, ev = q.shape[0], q.shape[1], k.shape[1], q.shape[2], v.shape[2]
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    grad_out = torch.randn(b, nq, ev, generator=g, dtype=torch.float64).to(q.dtype)
    grad_lse = torch.randn(b, nq, generator=g, dtype=torch.float64).to(lse_dtype)
    result = run(q, k, v, scale, grad_out, grad_lse)
    ref64 = reference_attention_grads(q.double(), k.double(), v.double(), scale, grad_out.double(),
                                      grad_lse.double())
    same = None
    if q.dtype != torch.float64:
        b_dtype = baseline or q.dtype
        same = reference_attention_grads(q.to(b_dtype), k.to(b_dtype), v.to(b_dtype), scale, grad_out.to(b_dtype),
                                         grad_lse)
        same = tuple(t.to(lse_dtype if i == 1 else q.dtype) for i, t in enumerate(same))
    logits = float(torch.bmm(q.double(), k.double().transpose(1, 2)).abs().amax()) * abs(scale) if q.numel() else 0.0
    extra = _delta_cancellation_atol(q, k, v, scale, grad_out)
    for i, name in enumerate(("out", "lse", "dq", "dk", "dv")):
        if check_layout and i >= 2:
            ref_input = (q, k, v)[i - 2]
            assert result[i].shape == ref_input.shape, f"{name}: shape {tuple(result[i].shape)}"
        assert_matches_reference(name, result[i], ref64[i], None if same is None else same[i],
                                 reduction=max(nk, e, ev, nq), logit_max=logits if name.startswith("d") else 0.0,
                                 expected_dtype=lse_dtype if name == "lse" else q.dtype,
                                 extra_atol=extra.get(name, 0.0))
    return result


def _delta_cancellation_atol(q, k, v, scale, grad_out) -> dict:
    """The flash-attention backward forms dS = P ∘ (dP − delta) with delta = rowsum(dO ∘ O),
    two independently rounded dot products over Ev whose difference cancels (to zero when
    Nk = 1). PyTorch subtracts rowsum(P ∘ dP), made from the same rounded dP, so its rounding
    errors cancel too and its error can be far smaller; the factor-2 criterion alone then
    demands more than fp32 can give. Each term carries up to eps·‖dO_i‖·‖v_j‖ (Cauchy–Schwarz on
    the rounding of a dot product), so
        |err dQ_i| <= 2·eps·|scale|·max‖dO‖·max‖v‖ · Σ_j P_ij·|k_j|      (Σ_j P_ij = 1)
        |err dK_j| <= 2·eps·|scale|·max‖dO‖·max‖v‖ · Σ_i P_ij·|q_i|      (column sums of P)
    with eps of the accumulation type (fp32 for fp16/bf16 inputs: dP and delta are fp32)."""
    if q.numel() == 0 or k.numel() == 0:
        return {}
    eps = torch.finfo(torch.float64 if q.dtype == torch.float64 else torch.float32).eps
    qd, kd, vd, god = q.double(), k.double(), v.double(), grad_out.double()
    p = torch.softmax(torch.bmm(qd, kd.transpose(1, 2)) * scale, -1)
    dp_size = float(god.norm(dim=-1).amax()) * float(vd.norm(dim=-1).amax()) if v.shape[-1] else 0.0
    base = 2 * eps * abs(scale) * dp_size
    return {"dq": base * float(kd.abs().amax()),
            "dk": base * float(qd.abs().amax()) * float(p.sum(1).amax())}


def reference_cam_grads(x, official, grad_y):
    """(y, dx) of y = A X by attnseg.reference (the official code's steps; official or paper)."""
    from attnseg import reference

    x = x.detach().clone().requires_grad_()
    y = reference.channel_attention_product(x, "official" if official else "paper")
    (grad_x,) = torch.autograd.grad(y, x, grad_y.to(y.dtype))
    return y.detach(), grad_x


def check_cam_backend(run, x, official):
    """Compare ``run(x, official, grad_y) -> (y, dx)`` with the fp64 reference. The yardstick for
    fp16/bf16 is PyTorch in fp32 rounded to x's dtype: PyTorch in fp16 forms the Gram matrix in
    fp16, which the kernels never do (and which overflows for large N)."""
    grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(x.dtype)
    result = run(x, official, grad_y)
    ref64 = reference_cam_grads(x.double(), official, grad_y.double())
    same = None if x.dtype == torch.float64 else reference_cam_grads(x.float(), official, grad_y.float())
    for i, name in enumerate(("y", "dx")):
        assert_matches_reference(name, result[i], ref64[i], None if same is None else same[i].to(x.dtype),
                                 reduction=x.shape[-1], expected_dtype=x.dtype)
    return result


# ---------------------------------------------------------------------------------------------
# Backends as the check_* functions above call them
# ---------------------------------------------------------------------------------------------


def autograd_attention(fwd):
    """run(q, k, v, scale, grad_out, grad_lse) for an op fwd(q, k, v, scale) -> (out, lse) with
    autograd registered (native and Triton): (out, lse, dq, dk, dv)."""

    def run(q, k, v, scale, grad_out, grad_lse):
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        out, lse = fwd(q, k, v, scale)
        return (out, lse, *torch.autograd.grad((out, lse), (q, k, v), (grad_out, grad_lse)))

    return run


def autograd_cam(fwd):
    """run(x, official, grad_y) for an op fwd(x, official) -> (y, attn) with autograd: (y, dx)."""

    def run(x, official, grad_y):
        x = x.detach().requires_grad_()
        y = fwd(x, official)[0]
        return (y, *torch.autograd.grad(y, x, grad_y))

    return run


def emulated_attention(emu):
    """run(...) for the CUDA attention kernels in the SIMT emulator (forward, then backward op)."""

    def run(q, k, v, scale, grad_out, grad_lse):
        out, lse = emu.attention_fwd(q, k, v, scale)
        return (out, lse, *emu.attention_bwd(grad_out, grad_lse, q, k, v, out, lse, scale))

    return run


def emulated_cam(emu):
    """run(...) for the CUDA channel-attention kernels in the SIMT emulator; run.attn keeps the
    last attention map."""

    def run(x, official, grad_y):
        y, run.attn = emu.channel_attention_fwd(x, official)
        return y, emu.channel_attention_bwd(grad_y, x, run.attn, official)

    return run


NONFINITE_CASES = ("nan_in_q", "nan_in_k", "nan_in_v", "inf_in_q", "inf_in_v", "-inf_logits")


def nonfinite_attention_inputs(where: str, dtype: torch.dtype, b=1, nq=37, nk=40, e=8, ev=12):
    """q, k, v (std 0.3, so no P underflows: an fp16 P = 0 would turn inf · P into NaN where
    the fp64 reference has inf) with one NaN/inf placed as ``where`` says; "-inf_logits" makes
    every logit of query row 4 -inf."""
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(b, n, e, generator=g, dtype=torch.float64) * 0.3 for n in (nq, nk))
    v = torch.randn(b, nk, ev, generator=g, dtype=torch.float64)
    if where == "nan_in_q":
        q[0, 5, 3] = math.nan
    elif where == "nan_in_k":
        k[0, 7, 0] = math.nan
    elif where == "nan_in_v":
        v[0, 9, 4] = math.nan
    elif where == "inf_in_q":
        q[0, 2, 1] = math.inf
    elif where == "inf_in_v":
        v[0, 3, 2] = math.inf
    elif where == "-inf_logits":  # every key has k[:, 0] > 0 and q[row, 0] = -inf
        k[..., 0] = k[..., 0].abs() + 0.5
        q[0, 4, 0] = -math.inf
    else:
        raise ValueError(where)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def assert_nonfinite_like_reference(run, q, k, v, finite_rtol: float):
    """``run``'s outputs and gradients are NaN / +inf / -inf exactly where the fp64 reference's
    are, and the finite ones agree to ``finite_rtol`` (relative to their magnitude)."""
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(q.shape[0], q.shape[1], v.shape[2], generator=g).to(q.dtype)
    grad_lse = torch.randn(q.shape[0], q.shape[1], generator=g)
    result = run(q, k, v, 1.0, grad_out, grad_lse)
    ref = reference_attention_grads(q.double(), k.double(), v.double(), 1.0, grad_out.double(), grad_lse.double())
    for name, a, r in zip(("out", "lse", "dq", "dk", "dv"), result, ref):
        for kind, test in (("nan", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
            fa, fr = test(a), test(r)
            assert torch.equal(fa, fr), f"{name}: {kind} at {int(fa.sum())} places, the reference at {int(fr.sum())}"
        finite = torch.isfinite(r)
        if finite.any():
            err = (a.detach().double()[finite] - r[finite]).abs().max().item()
            bound = finite_rtol * max(1.0, r[finite].abs().max().item())
            assert err <= bound, f"{name}: finite part off by {err:.3g} > {bound:.3g}"
