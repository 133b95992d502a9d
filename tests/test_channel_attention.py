"""Channel attention (CAM): torch.ops.attnseg.channel_attention_fwd / _bwd through
attnseg.channel_attention(backend="native") against attnseg.reference.channel_attention,
both variants ("official": softmax(rowmax(E) - E), "paper": softmax(E)), E = X Xᵀ.

Shapes: a covering set of C in {1, 3, 17, 64}, N = H·W in {1, 7, 97, 1024}, B in {1, 3}.
Tolerances: see helpers.py; the logits of CAM are the energies, so ``logit_max`` is
2·max|E| (rowmax(E) − E spans up to twice the largest energy).
"""

from __future__ import annotations

import math

import pytest
import torch

import attnseg
from attnseg import reference
from helpers import assert_matches_reference

requires_native = pytest.mark.requires_native
VARIANTS = ["official", "paper"]
DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])

# (B, C, H, W)
SHAPES = [
    (1, 1, 1, 1),
    (3, 3, 7, 1),
    (1, 17, 1, 97),
    (3, 64, 32, 32),
    (3, 17, 32, 32),
    (1, 64, 7, 1),
    (3, 1, 97, 1),
    (1, 3, 1, 1),
]


def _shape_id(shape):
    b, c, h, w = shape
    return f"B{b}-C{c}-N{h * w}"


def _moderate_input(shape, dtype):
    """Energies of O(1..10): softmax rows that are neither uniform nor one-hot, both variants."""
    b, c, h, w = shape
    return torch.randn(b, c, h, w, dtype=dtype) * (2.0 / math.sqrt(h * w))


def _run(x, gamma, variant, backend, grad_out):
    x = x.detach().clone().requires_grad_(True)
    gamma = gamma.detach().clone().requires_grad_(True)
    out = attnseg.channel_attention(x, gamma, variant=variant, backend=backend)
    dx, dgamma = torch.autograd.grad(out, (x, gamma), grad_out.to(out.dtype))
    return out.detach(), dx, dgamma


def _compare_native_to_reference(x, variant, gamma_value=0.75):
    dtype = x.dtype
    b, c, h, w = x.shape
    gamma = torch.tensor([gamma_value], dtype=dtype)
    grad_out = torch.randn(b, c, h, w, dtype=torch.float64)
    energy = torch.bmm(x.double().flatten(2), x.double().flatten(2).transpose(1, 2))
    tol = {"reduction": max(h * w, c), "logit_max": 2.0 * float(energy.abs().max())}

    native = _run(x, gamma, variant, "native", grad_out)
    ref64 = _run(x.double(), gamma.double(), variant, "reference", grad_out)
    same = _run(x, gamma, variant, "reference", grad_out) if dtype != torch.float64 else (None,) * 3
    for name, a, r, s in zip(("out", "dx", "dgamma"), native, ref64, same):
        assert_matches_reference(name, a, r, s, expected_dtype=dtype, **tol)


@requires_native
@DTYPES
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_matches_reference(shape, variant, dtype):
    _compare_native_to_reference(_moderate_input(shape, dtype), variant)


@requires_native
@DTYPES
@pytest.mark.parametrize("variant", VARIANTS)
def test_channels_last_input(variant, dtype):
    """A channels_last map reaches the op as a strided [B, C, N] view (no copy in functional)."""
    x = _moderate_input((3, 17, 9, 11), dtype).to(memory_format=torch.channels_last)
    assert not x.flatten(2).is_contiguous()
    _compare_native_to_reference(x, variant, gamma_value=-1.25)


@requires_native
@DTYPES
@pytest.mark.parametrize("variant", VARIANTS)
def test_large_post_relu_features(variant, dtype):
    """Post-ReLU features as in the DANet head: energies in the thousands, so the official
    softmax(rowmax - E) rows (and the paper's softmax(E) rows) are nearly one-hot. Finite and
    correct, no overflow in exp."""
    x = torch.relu(torch.randn(2, 64, 32, 32, dtype=dtype)) * 3.0
    energy = torch.bmm(x.double().flatten(2), x.double().flatten(2).transpose(1, 2))
    assert energy.max() > 1000, "inputs do not produce large energies"
    _, attn = torch.ops.attnseg.channel_attention_fwd(x.flatten(2), variant == "official")
    assert (attn.amax(-1) > 0.9).float().mean() > 0.5, "rows are not nearly one-hot; test inputs too small"
    _compare_native_to_reference(x, variant)


@requires_native
@DTYPES
@pytest.mark.parametrize("variant", VARIANTS)
def test_raw_op_returns_row_softmax(variant, dtype):
    """channel_attention_fwd(x, official) -> (y = attn @ x, attn): attn rows are a softmax."""
    x = _moderate_input((3, 17, 5, 7), dtype).flatten(2)
    y, attn = torch.ops.attnseg.channel_attention_fwd(x, variant == "official")
    assert attn.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert attn.shape == (3, 17, 17) and y.shape == x.shape and y.dtype == dtype
    assert (attn >= 0).all()
    eps = torch.finfo(attn.dtype).eps
    torch.testing.assert_close(attn.sum(-1), torch.ones(3, 17, dtype=attn.dtype), rtol=0, atol=64 * eps)
    expected_y = torch.bmm(attn.double(), x.double())
    torch.testing.assert_close(y.double(), expected_y, rtol=0, atol=64 * torch.finfo(dtype).eps * float(expected_y.abs().max()))
    # and it is the attention the module computes: gamma = 1 gives out - x = attn @ x
    ref = reference.channel_attention(x.double().unflatten(2, (5, 7)), torch.ones(1, dtype=torch.float64), variant)
    torch.testing.assert_close(expected_y, (ref - x.double().unflatten(2, (5, 7))).flatten(2),
                               rtol=0, atol=1e3 * torch.finfo(dtype).eps)


@requires_native
@pytest.mark.parametrize("variant", VARIANTS)
def test_bfloat16_accumulates_in_fp32(variant):
    """bf16 in, bf16 out, and as close to the fp32 result as bf16 output rounding allows.

    Correlated channels (a shared pattern plus noise) give energies of ~100 whose row-wise
    spread is O(1), so neither variant's softmax is one-hot: a Gram matrix rounded to bf16
    (ulp 0.5 at 100) would move the attention weights by tens of percent.
    """
    shared = torch.randn(1, 1, 32, 32)
    x = ((shared + 0.2 * torch.randn(2, 24, 32, 32)) * 0.31).to(torch.bfloat16)
    energy = torch.bmm(x.double().flatten(2), x.double().flatten(2).transpose(1, 2))
    assert energy.min() > 32, "energies too small to expose bf16 accumulation"
    attn64 = torch.softmax(-energy if variant == "official" else energy, dim=-1)
    assert attn64.amax(-1).median() < 0.9, "attention rows nearly one-hot: insensitive to the energies"
    # a module converted with .to(torch.bfloat16) has a bf16 gamma (0.75 is exact in bf16)
    gamma = torch.tensor([0.75], dtype=torch.bfloat16)
    out = attnseg.channel_attention(x, gamma, variant=variant, backend="native")
    assert out.dtype == torch.bfloat16
    # an fp32 gamma (autocast keeps parameters fp32) promotes the result, as the official gamma * out + x does
    assert attnseg.channel_attention(x, gamma.float(), variant=variant, backend="native").dtype == torch.float32
    expected = reference.channel_attention(x.float(), gamma.float(), variant)  # x.float() is exact
    # out = round_bf16(x + gamma * round_bf16(y)): two roundings of 2^-9 relative each.
    bound = 2.0**-8 * (expected.abs() + (expected - x.float()).abs()) + 2.0**-12 * float(expected.abs().max())
    err = (out.float() - expected).abs()
    assert bool((err <= bound).all()), f"max err {float(err.max()):.3e}, worst excess {float((err - bound).max()):.3e}"

    # The op's attention map is fp32 and equals the one from the exactly upcast input.
    _, attn16 = torch.ops.attnseg.channel_attention_fwd(x.flatten(2), variant == "official")
    _, attn32 = torch.ops.attnseg.channel_attention_fwd(x.float().flatten(2), variant == "official")
    assert attn16.dtype == torch.float32
    torch.testing.assert_close(attn16, attn32, rtol=1e-5, atol=1e-6)

    # Backward in bf16: gradient in bf16, close to fp32's (the grad_out is exactly representable).
    grad_out = torch.randn(x.shape).to(torch.bfloat16)
    dx16, _ = _run(x, gamma, variant, "native", grad_out)[1:]
    dx32 = _run(x.float(), gamma, variant, "reference", grad_out.float())[1]
    assert dx16.dtype == torch.bfloat16
    torch.testing.assert_close(dx16.float(), dx32, rtol=2.0**-7, atol=2.0**-7 * float(dx32.abs().max()))


@requires_native
@pytest.mark.parametrize("variant", VARIANTS)
def test_float16_gram_beyond_fp16_range(variant):
    """DESIGN.md: never form the Gram matrix in half precision. Here E exceeds fp16's 65504, so
    a half-precision Gram matrix would be inf; the op must give the fp32 result."""
    x = (torch.relu(torch.randn(1, 16, 32, 32)) * 12.0).half()
    energy = torch.bmm(x.double().flatten(2), x.double().flatten(2).transpose(1, 2))
    assert energy.max() > torch.finfo(torch.float16).max
    gamma = torch.tensor([0.5], dtype=torch.float16)  # a module in fp16; 0.5 is exact
    out = attnseg.channel_attention(x, gamma, variant=variant, backend="native")
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    expected = reference.channel_attention(x.float(), gamma.float(), variant)
    bound = 2.0**-10 * (expected.abs() + (expected - x.float()).abs()) + 2.0**-14 * float(expected.abs().max())
    assert bool(((out.float() - expected).abs() <= bound).all()), f"max err {float((out.float() - expected).abs().max()):.3e}"


# ---------------------------------------------------------------------------------------------
# gradcheck (float64, small shapes)
# ---------------------------------------------------------------------------------------------


@requires_native
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", [(2, 3, 2, 3), (1, 1, 1, 1), (1, 5, 1, 7)], ids=_shape_id)
def test_gradcheck_channel_attention(shape, variant, channels_last):
    x = torch.randn(shape, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    gamma = torch.tensor([0.6], dtype=torch.float64, requires_grad=True)

    def fn(x, gamma):
        return attnseg.channel_attention(x, gamma, variant=variant, backend="native")

    assert torch.autograd.gradcheck(fn, (x, gamma), eps=1e-6, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Without the extension: the two variants of the reference differ, and "official" is the default.
# ---------------------------------------------------------------------------------------------


def test_variants_differ_and_official_is_default():
    x = _moderate_input((2, 5, 4, 4), torch.float64)
    gamma = torch.ones(1, dtype=torch.float64)
    official = attnseg.channel_attention(x, gamma, variant="official", backend="reference")
    paper = attnseg.channel_attention(x, gamma, variant="paper", backend="reference")
    default = attnseg.channel_attention(x, gamma, backend="reference")
    assert not torch.allclose(official, paper)
    assert torch.equal(default, official)
