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

import math

import torch

FP64_TOL = 1e-10
ATOL_ULPS = 8.0


def magnitude(t: torch.Tensor) -> float:
    finite = t[torch.isfinite(t)]
    return max(float(finite.abs().max()) if finite.numel() else 0.0, 1.0)


def max_abs_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).abs().max()) if actual.numel() else 0.0


def assert_matches_reference(
    name: str,
    actual: torch.Tensor,
    ref64: torch.Tensor,
    ref_same_dtype: torch.Tensor | None = None,
    *,
    reduction: int = 1,
    logit_max: float = 0.0,
    expected_dtype: torch.dtype | None = None,
) -> None:
    """Check ``actual`` against the fp64 reference ``ref64`` (see the module docstring).

    ``ref_same_dtype`` is PyTorch's own result in ``actual``'s precision; it is required for
    any dtype other than float64. ``reduction``: the longest sum behind the result;
    ``logit_max``: the largest |logit| of the softmax behind it (0 if none).
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
        tol = FP64_TOL * mag
        assert err <= tol, f"{name} (float64): max abs err {err:.3e} > {tol:.3e} (magnitude {mag:.3e})"
        return
    assert ref_same_dtype is not None, f"{name}: a same-dtype PyTorch result is needed for {actual.dtype}"
    err_torch = max_abs_err(ref_same_dtype, ref64)
    atol = torch.finfo(actual.dtype).eps * mag * max(ATOL_ULPS * math.sqrt(max(reduction, 1)), 2.0 * logit_max)
    tol = 2.0 * err_torch + atol
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
