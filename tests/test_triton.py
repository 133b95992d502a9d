"""Tests of the Triton backend (attnseg.triton) against attnseg.reference.

How this module runs
--------------------
Triton reads TRITON_INTERPRET when it decorates a function, and it decorates its own standard
library (tl.max, tl.sum, ...) when ``triton`` is first imported: with triton 3.8.0, setting the
flag after that import gives "Cannot call @triton.jit'd outside of the scope of a kernel".
Setting it at the top of this module would work only if no earlier test module imported
triton, and it would leak into every other module of the pytest session (a GPU run of the
Triton kernels there would then be interpreted, or fail). So the module has two roles:

* In an ordinary pytest process, ``test_interpreter_suite`` runs this file in a subprocess that
  has TRITON_INTERPRET=1 from its start (launched in the background when this module's first
  test starts, so it uses the second core while the parent compiles kernels); the interpreter
  tests are skipped in the parent, and any failure in the child fails ``test_interpreter_suite``
  with the child's report. The ahead-of-time compile checks (no GPU needed: Triton compiles to
  cubin offline) and the GPU tests run in the parent.
* In a process started with TRITON_INTERPRET=1 (that subprocess, or
  ``TRITON_INTERPRET=1 pytest tests/test_triton.py``), the interpreter tests run on CPU tensors.

Criterion (flash-attention's): the kernel and PyTorch in the same dtype are both compared with
a float64 reference computed on the same (rounded) inputs, and the kernel must satisfy
``err_kernel <= 2 * err_torch + atol * max(1, |ref|max)``; see ``_ATOL`` for the per-dtype atol.

bf16
----
Triton 3.8.0's interpreter keeps bf16 as uint16 bits and its tl.dot multiplies those bits (the
ops refuse bf16 under such an interpreter, see ``test_bfloat16_refused_by_plain_interpreter``).
The bf16 tests therefore widen bf16 tl.dot operands to fp32 in the interpreter (exact; then fp32
accumulation, which is what bf16 tensor cores compute) through the ``interpreter_bf16_dot``
fixture; every other bf16 step of the kernels (loads, stores, the casts of P / dS / A to bf16,
bf16 -> fp32 upcasts) runs as the interpreter implements it. bf16 is also compiled for sm_90
(``test_kernels_compile_for_gpus``), which type-checks the real bf16 dot operands.

Not covered here
----------------
* bf16 arithmetic as a GPU does it: the interpreter's fp32 -> bf16 cast truncates where the GPU
  rounds to nearest even, and the bf16 tl.dot is the test's emulation, not tensor-core hardware.
* TF32: the interpreter's tl.dot is exact fp32 whatever input_precision says.
* Autotuning and speed: the interpreter runs one small config per kernel. The GPU configs are
  only compiled (the smallest kept one per kernel here; all of them by the sweep in ``__main__``,
  ``python tests/test_triton.py [arch] [dtype] [N]``, which prints registers, spills and shared
  memory next to the prune filters' verdicts), never run or timed.
* torch.compile / AOT dispatch of the Triton ops: interpreted kernels cannot be traced, so the
  full ``opcheck`` runs only on a GPU.
"""

import math
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("ATTNSEG_QUIET", "1")

import attnseg  # noqa: E402
import helpers  # noqa: E402
import attnseg.triton.attention  # noqa: E402
import attnseg.triton.channel_attention  # noqa: E402
from attnseg import reference  # noqa: E402
from attnseg.triton import unavailable_reason  # noqa: E402

# Whether this process runs the Triton interpreter (flag set before triton was imported).
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1" and unavailable_reason("cpu") is None

interpreter_only = pytest.mark.skipif(
    not INTERPRETER,
    reason="runs in the TRITON_INTERPRET=1 subprocess of test_interpreter_suite",
)
compiled_mode_only = pytest.mark.skipif(INTERPRETER, reason="needs triton imported without the interpreter")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# atol (relative to max(1, |reference|max)) per dtype, added to 2 * err_torch:
# * float32: eps = 6e-8; the kernels sum up to a few hundred terms in a blocked order (online
#   softmax rescaling, split reductions) unlike torch's, which gives a few 1e-6 relative.
# * float16: the kernels round P / dS / A to fp16 for tl.dot (relative 2^-11 = 4.9e-4) and round
#   the result to fp16 once more; torch's fp16 error does not always include the first rounding.
# * float64: torch in float64 *is* the reference (err_torch = 0); blocked sums give ~1e-15.
# * bfloat16 (interpreter with the widened tl.dot of ``interpreter_bf16_dot``): like fp16 with
#   an 8-bit significand, 2^-8 = 3.9e-3 relative per rounding, and the interpreter's fp32 -> bf16
#   casts truncate instead of rounding to nearest (up to 2^-7 = 7.8e-3).
_ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10}


def _assert_close(name, value, torch_value, ref64, dtype, extra_rtol=0.0):
    scale = max(1.0, ref64.abs().max().item())
    err_kernel = (value.double() - ref64).abs().max().item()
    err_torch = (torch_value.double() - ref64).abs().max().item()
    if not math.isfinite(err_torch):
        err_torch = 0.0  # torch overflowed (fp16 Gram); the kernel must then meet atol alone
    bound = 2 * err_torch + (_ATOL[dtype] + extra_rtol) * scale
    assert math.isfinite(err_kernel) and err_kernel <= bound, (
        f"{name} ({dtype}): kernel error {err_kernel:.3g} > bound {bound:.3g} "
        f"(torch error {err_torch:.3g}, |ref| max {scale:.3g})"
    )


# ---------------------------------------------------------------------------------------------
# Generic attention
# ---------------------------------------------------------------------------------------------


def _attention_inputs(b, nq, nk, e, ev, dtype, logit_scale=1.0, channel_first=False, seed=0):
    """q [B,Nq,E], k [B,Nk,E], v [B,Nk,Ev]; channel_first: the strided views PAM passes."""
    g = torch.Generator().manual_seed(seed)

    def make(n, width, scale):
        if channel_first:  # conv(x).flatten(2).transpose(1, 2): strides (width·n, 1, n)
            return (torch.randn(b, width, n, generator=g) * scale).to(dtype).transpose(1, 2)
        return (torch.randn(b, n, width, generator=g) * scale).to(dtype)

    # |S| ~ logit_scale · sqrt(E) for unit-normal q, k scaled by sqrt(logit_scale) each.
    s = math.sqrt(logit_scale)
    return make(nq, e, s), make(nk, e, s), make(nk, ev, 1.0)


def _attention_losses(q, k, v, scale, fn, seed=1):
    """Run fn(q, k, v, scale) -> (out, lse); gradients of a random projection of out and lse."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v, scale)
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(out.shape, generator=g).to(out)
    grad_lse = torch.randn(lse.shape, generator=g).to(lse)
    grads = torch.autograd.grad((out, lse), (q, k, v), (grad_out, grad_lse))
    return (out, lse, *grads)


def _check_attention(q, k, v, scale, names=("out", "lse", "dq", "dk", "dv"), baseline_dtype=None):
    """Kernel vs float64 reference, within 2x torch's error in ``baseline_dtype`` (q's by default)."""
    dtype = q.dtype
    kernel = _attention_losses(q, k, v, scale, attnseg.triton.attention.attention_fwd)
    b = baseline_dtype or dtype
    same_dtype = _attention_losses(q.to(b), k.to(b), v.to(b), scale, reference.attention_with_lse)
    ref64 = _attention_losses(q.double(), k.double(), v.double(), scale, reference.attention_with_lse)
    assert kernel[0].dtype == dtype and kernel[0].is_contiguous()
    assert kernel[1].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # The backward recomputes P = exp(S·scale − lse) from the stored lse, as FlashAttention does;
    # a logit of size |S| carries ulp(|S|) of rounding in fp32 (S and lse), so P is only known to
    # a relative 2·eps·|S|max (1.2e-3 at |S| = 1e4). torch renormalises P from the same S and can
    # be exact where the kernel cannot (a one-hot row has P = 1 exactly in torch).
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    logits = torch.bmm(q.double(), k.double().transpose(1, 2)).abs().max().item() * abs(scale)
    for name, value, torch_value, r in zip(names, kernel, same_dtype, ref64):
        assert value.shape == r.shape, f"{name}: shape {tuple(value.shape)} != {tuple(r.shape)}"
        extra = 2 * eps * logits if name.startswith("d") else 0.0
        _assert_close(name, value, torch_value, r, dtype, extra_rtol=extra)
    return kernel


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "b, nq, nk, e, ev, scale",
    [
        (2, 37, 130, 16, 96, 1.0),  # Nq != Nk, ragged blocks, Ev split in two slices
        (1, 130, 37, 64, 64, 0.125),  # Nq > Nk, Ev in one tile (fused dK/dV), scale = E^-0.5
        (1, 37, 37, 16, 512, 1.0),  # DANet's Ev = 512: forward Ev slices, fused dK/dV (one 512 tile), dQ slices
        (2, 50, 33, 5, 512, 0.7),  # odd E, Nq > Nk not a multiple of the block, fused dK/dV at Ev = 512
        (1, 1, 37, 64, 64, 1.0),  # one query
        (2, 37, 1, 16, 96, 1.0),  # one key: P = 1
    ],
)
def test_attention_matches_reference(b, nq, nk, e, ev, scale, dtype):
    _check_attention(*_attention_inputs(b, nq, nk, e, ev, dtype), scale)


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_strided_channel_first_inputs(dtype):
    """PAM's views (strides (E·N, 1, N)) give bit-identical results to contiguous copies."""
    q, k, v = _attention_inputs(2, 37, 37, 20, 40, dtype, channel_first=True)
    assert q.stride(1) == 1 and not q.is_contiguous()
    strided = _check_attention(q, k, v, 1.0)
    contiguous = _attention_losses(q.contiguous(), k.contiguous(), v.contiguous(), 1.0,
                                   attnseg.triton.attention.attention_fwd)
    for a, c in zip(strided, contiguous):
        assert torch.equal(a, c)


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("logits", ["spread-1e3", "spread-1e4", "offset-1e3", "offset-1e4"])
def test_attention_large_logits(logits, dtype):
    """|S| ~ 1e3..1e4, finite and as accurate as torch computing in fp32.

    spread: |S| up to the size, so each row's softmax is nearly one-hot.
    offset: S = size + O(1), a non-trivial softmax whose logits lose ulp(size) to rounding.
    The baseline is torch in fp32 for fp16 inputs too: torch rounds S to fp16 (ulp 8 at 1e4),
    the kernel keeps S in fp32, so torch-fp16 would be a much too lenient yardstick.
    """
    kind, size = logits.split("-")
    size = float(size)
    if kind == "spread":
        q, k, v = _attention_inputs(1, 37, 50, 16, 24, dtype, logit_scale=size / 16)  # std(S) = size / 4
    else:
        q, k, v = (t.clone() for t in _attention_inputs(1, 37, 50, 16, 24, dtype))
        q[..., 0] = k[..., 0] = math.sqrt(size)
    s = torch.bmm(q.double(), k.double().transpose(1, 2))
    assert size / 2 < s.abs().max() < 4 * size
    _check_attention(q, k, v, 1.0, baseline_dtype=torch.float32)


@interpreter_only
def test_attention_float64_and_gradcheck():
    q, k, v = _attention_inputs(2, 37, 33, 5, 7, torch.float64, channel_first=True)
    _check_attention(q, k, v, 0.3)
    q, k, v = (t.requires_grad_() for t in _attention_inputs(1, 3, 4, 4, 5, torch.float64))
    assert torch.autograd.gradcheck(
        lambda *a: attnseg.triton.attention.attention_fwd(*a, 0.7), (q, k, v), fast_mode=True
    )


def _launched(monkeypatch):
    """The names of the kernels the Triton attention ops launch from now on."""
    import attnseg.triton.attention as ta

    names, real = [], ta.launch

    def spy(kernel, grid, *args, **kwargs):
        names.append((kernel.__name__, {k: v for k, v in kwargs.items() if isinstance(v, bool)}))
        return real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(ta, "launch", spy)
    return names


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("b, nq, nk, e, ev", [(1, 37, 600, 16, 64), (2, 20, 300, 64, 96)])
def test_attention_split_kv_forward_matches_reference(b, nq, nk, e, ev, dtype, monkeypatch):
    """The split-KV forward (keys in splits of 256, the last ragged; partial (out, lse) in fp32,
    then the combine kernel), forced on by pretending to run on 132 SMs; its lse feeds the backward."""
    import attnseg.triton.attention as ta

    monkeypatch.setattr(ta, "multiprocessor_count", lambda device: 132)
    splits, split_len = ta.kv_splits(b, nq, nk, ev, 132)
    assert splits == -(-nk // 256) and split_len == 256
    names = _launched(monkeypatch)
    _check_attention(*_attention_inputs(b, nq, nk, e, ev, dtype), 0.5)
    assert ("_attn_fwd", {"SPLIT_KV": True}) in names and ("_attn_fwd_combine", {}) in names


@interpreter_only
def test_attention_split_kv_nonfinite_like_unsplit(monkeypatch):
    """+inf, -inf and NaN logits give the split forward the unsplit forward's out and lse."""
    import attnseg.triton.attention as ta

    q, k, v = (t.clone() for t in _attention_inputs(1, 6, 600, 16, 24, torch.float32))
    q[0, 1, 0], q[0, 1, 1:] = float("inf"), 0.0  # ±inf logits, +inf in two splits (NaN softmax, lse = +inf)
    q[0, 2, 0] = float("nan")
    k[0, 300:, 0] = float("-inf")  # row 3: -inf logits in two of the three splits
    q[0, 3, 0], q[0, 3, 1:] = 1.0, 0.0
    monkeypatch.setattr(ta, "multiprocessor_count", lambda device: 132)
    names = _launched(monkeypatch)
    # NaN and inf are the point: numpy's invalid-value warnings (errors in the interpreter subprocess)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        split = ta.attention_fwd(q, k, v, 1.0)
        monkeypatch.setattr(ta, "multiprocessor_count", lambda device: None)
        unsplit = ta.attention_fwd(q, k, v, 1.0)
    assert ("_attn_fwd_combine", {}) in names
    for a, c in zip(split, unsplit):
        assert torch.equal(a.isnan(), c.isnan()) and torch.equal(a.isinf(), c.isinf())
        finite = a.isfinite()
        torch.testing.assert_close(a[finite], c[finite], rtol=1e-5, atol=1e-6)
    assert split[1][0, 1] == float("inf") and split[1][0, 3].isfinite()


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("ev", [96, 512])
def test_attention_split_dkdv_path_matches_reference(ev, dtype, monkeypatch):
    """The split dK/dV path (a dK launch looping over Ev slices, a dV launch per Ev slice: what Ev
    wider than the fused limit takes), forced on by lowering the fused limit."""
    import attnseg.triton.attention as ta

    monkeypatch.setattr(ta, "_DKDV_FUSED_EV", 32)
    names = _launched(monkeypatch)
    _check_attention(*_attention_inputs(1, 45, 70, 16, ev, dtype), 0.3)
    modes = [flags for name, flags in names if name == "_attn_bwd_dkdv"]
    assert {"COMPUTE_DK": True, "COMPUTE_DV": False} in modes and {"COMPUTE_DK": False, "COMPUTE_DV": True} in modes


@interpreter_only
def test_attention_fused_dkdv_path_is_one_launch(monkeypatch):
    """Ev = 512 (DANet's width) runs the fused dK/dV path: one launch computing both."""
    names = _launched(monkeypatch)
    _check_attention(*_attention_inputs(1, 40, 70, 64, 512, torch.float32), 1.0)
    modes = [flags for name, flags in names if name == "_attn_bwd_dkdv"]
    assert modes == [{"COMPUTE_DK": True, "COMPUTE_DV": True}]


@interpreter_only
def test_attention_gradcheck_split_paths(monkeypatch):
    """gradcheck in fp64 through the split-KV forward and the split dK/dV backward."""
    import attnseg.triton.attention as ta

    monkeypatch.setattr(ta, "multiprocessor_count", lambda device: 132)
    monkeypatch.setattr(ta, "_DKDV_FUSED_EV", 4)
    names = _launched(monkeypatch)
    q, k, v = (t.requires_grad_() for t in _attention_inputs(1, 3, 300, 4, 5, torch.float64))
    assert torch.autograd.gradcheck(lambda *a: ta.attention_fwd(*a, 0.7), (q, k, v), fast_mode=True)
    assert ("_attn_fwd_combine", {}) in names
    assert ("_attn_bwd_dkdv", {"COMPUTE_DK": False, "COMPUTE_DV": True}) in names


def test_kv_split_rule():
    """Split the keys only where the forward's grid (B · ceil(Nq/128) · ceil(Ev/128)) is below
    two waves of the SMs; never on the CPU / interpreter (sms None)."""
    from attnseg.triton.attention import kv_splits

    # DANet at 132 SMs (H100 / H200): 72 · 4 = 288 programs at B = 1, N = 9,216: enough
    for b, n in [(1, 9216), (8, 9216), (1, 32768), (8, 32768)]:
        assert kv_splits(b, n, n, 512, 132) == (1, n)
    assert kv_splits(1, 9216, 9216, 512, 200) == (2, 4608)  # 288 < 400
    assert kv_splits(1, 4096, 4096, 512, 132) == (3, 1536)  # 128 programs < 264: 3 splits
    assert kv_splits(1, 4096, 19, 512, 132) == (1, 19)  # OCR's 19 regions: too few keys to split
    assert kv_splits(1, 37, 600, 64, None) == (1, 600)
    for b, nq, nk, ev, sms in [(1, 37, 100000, 64, 132), (1, 1, 257, 16, 108), (2, 500, 5000, 96, 132)]:
        splits, split_len = kv_splits(b, nq, nk, ev, sms)
        assert 2 <= splits <= 16 and split_len % 256 == 0
        assert (splits - 1) * split_len < nk <= splits * split_len  # every split holds keys


@interpreter_only
def test_attention_backward_without_lse_gradient():
    """grad_lse = None in the backward op equals grad_lse = 0."""
    q, k, v = _attention_inputs(1, 20, 30, 16, 24, torch.float32)
    out, lse = attnseg.triton.attention.attention_fwd(q, k, v, 1.0)
    grad_out = torch.randn_like(out)
    bwd = torch.ops.attnseg.triton_attention_bwd
    without = bwd(grad_out, None, q, k, v, out, lse, 1.0)
    with_zero = bwd(grad_out, torch.zeros_like(lse), q, k, v, out, lse, 1.0)
    for a, z in zip(without, with_zero):
        assert torch.equal(a, z)


# ---------------------------------------------------------------------------------------------
# Channel attention
# ---------------------------------------------------------------------------------------------


def _cam_losses(x, official, fn, seed=2):
    """y = fn(x) and the gradient of a random projection of y."""
    x = x.detach().requires_grad_()
    y = fn(x, official)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y)
    (grad_x,) = torch.autograd.grad(y, x, grad_y)
    return y, grad_x


def _cam_kernel(x, official):
    return attnseg.triton.channel_attention.channel_attention_fwd(x, official)[0]


def _cam_reference(x, official):
    """y = A X from reference.channel_attention with gamma = 1, minus its residual."""
    b, c, n = x.shape
    x4 = x.reshape(b, c, n, 1)
    one = torch.ones(1, dtype=x.dtype, device=x.device)
    return (reference.channel_attention(x4, one, "official" if official else "paper") - x4).reshape(b, c, n)


def _check_cam(x, official):
    dtype = x.dtype
    kernel = _cam_losses(x, official, _cam_kernel)
    same_dtype = _cam_losses(x, official, _cam_reference)
    ref64 = _cam_losses(x.double(), official, _cam_reference)
    assert kernel[0].dtype == dtype and kernel[0].is_contiguous()
    for name, value, torch_value, r in zip(("y", "dx"), kernel, same_dtype, ref64):
        _assert_close(name, value, torch_value, r, dtype)
    return kernel


def _cam_input(b, c, n, dtype, magnitude=0.3, channel_first_view=True, seed=3):
    """Post-ReLU-like features [B, C, N]; by default the strided view of a [B, N, C] tensor."""
    g = torch.Generator().manual_seed(seed)
    if channel_first_view:
        x = torch.randn(b, n, c, generator=g).transpose(1, 2)
    else:
        x = torch.randn(b, c, n, generator=g)
    return (torch.relu(x) * magnitude + 0.01 * x).to(dtype)


@interpreter_only
@pytest.mark.parametrize("official", [True, False], ids=["official", "paper"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b, c, n", [(2, 37, 130), (1, 64, 37), (1, 5, 1)])
def test_channel_attention_matches_reference(b, c, n, dtype, official):
    x = _cam_input(b, c, n, dtype)
    _check_cam(x, official)
    if dtype == torch.float32:  # attn is the softmax y was made with: rows sum to 1, A X = y
        y, attn = attnseg.triton.channel_attention.channel_attention_fwd(x, official)
        assert attn.dtype == torch.float32 and attn.shape == (b, c, c)
        torch.testing.assert_close(attn.sum(-1), torch.ones(b, c), rtol=0, atol=1e-5)
        torch.testing.assert_close(torch.bmm(attn, x), y, rtol=1e-5, atol=1e-6)


@interpreter_only
def test_channel_attention_strided_input_is_bitwise_equal_to_contiguous():
    x = _cam_input(2, 37, 70, torch.float32, channel_first_view=True)
    assert not x.is_contiguous()
    for a, c in zip(_cam_losses(x, True, _cam_kernel), _cam_losses(x.contiguous(), True, _cam_kernel)):
        assert torch.equal(a, c)


@interpreter_only
@pytest.mark.parametrize("official", [True, False], ids=["official", "paper"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_channel_attention_large_logits(dtype, official):
    """Post-ReLU Gram entries ~1e3..1e4 (fp32), and beyond fp16's range for fp16 inputs."""
    magnitude = 8.0 if dtype == torch.float32 else 40.0
    x = _cam_input(1, 20, 130, dtype, magnitude=magnitude)
    gram = torch.bmm(x.double(), x.double().transpose(1, 2))
    assert gram.abs().max() > (1e3 if dtype == torch.float32 else 65504)
    if dtype == torch.float32:
        _check_cam(x, official)
        return
    # torch in fp16 overflows here (inf − inf = nan); compare with torch in fp32 instead.
    kernel = _cam_losses(x, official, _cam_kernel)
    fp32 = _cam_losses(x.float(), official, _cam_reference)
    ref64 = _cam_losses(x.double(), official, _cam_reference)
    for name, value, torch_value, r in zip(("y", "dx"), kernel, fp32, ref64):
        assert torch.isfinite(value).all(), name
        _assert_close(name, value, torch_value, r, dtype)


@interpreter_only
def test_channel_attention_float64_and_gradcheck():
    for official in (True, False):
        _check_cam(_cam_input(2, 37, 70, torch.float64), official)
        x = _cam_input(1, 3, 4, torch.float64).requires_grad_()
        assert torch.autograd.gradcheck(lambda t: _cam_kernel(t, official), (x,), fast_mode=True)


# ---------------------------------------------------------------------------------------------
# bf16 (interpreter with a widened tl.dot, see the module docstring)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def interpreter_bf16_dot(monkeypatch):
    """Let the interpreter's tl.dot multiply bf16: widen bf16 operands to fp32 (exact), fp32 accumulation."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def widen(handle):
        if handle.dtype != tl.bfloat16:
            return handle
        bits = handle.data.astype(np.uint32) << 16  # bf16 is the top half of an fp32
        return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)


@interpreter_only
def test_bfloat16_refused_by_plain_interpreter():
    q = torch.randn(1, 4, 16, dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match="no bfloat16 tl.dot"):
        attnseg.triton.attention.attention_fwd(q, q, q, 1.0)
    with pytest.raises(NotImplementedError, match="no bfloat16 tl.dot"):
        attnseg.triton.channel_attention.channel_attention_fwd(q, True)


@interpreter_only
@pytest.mark.usefixtures("interpreter_bf16_dot")
@pytest.mark.parametrize("ev", [64, 96, 512])  # fused dK/dV; dQ resident (64, 96) and sliced (512)
def test_attention_bfloat16(ev):
    _check_attention(*_attention_inputs(2, 37, 45, 16, ev, torch.bfloat16, channel_first=True), 1.0)


@interpreter_only
@pytest.mark.usefixtures("interpreter_bf16_dot")
@pytest.mark.parametrize("official", [True, False], ids=["official", "paper"])
def test_channel_attention_bfloat16(official):
    _check_cam(_cam_input(2, 37, 70, torch.bfloat16), official)


# ---------------------------------------------------------------------------------------------
# Functional API, op registration, availability
# ---------------------------------------------------------------------------------------------


@interpreter_only
def test_functional_attention():
    q, k, v = _attention_inputs(2, 30, 45, 16, 24, torch.float32)
    kernel = _attention_losses(q, k, v, 0.25, lambda *a: attnseg.attention(*a, backend="triton", return_lse=True))
    ref64 = _attention_losses(q.double(), k.double(), v.double(), 0.25, reference.attention_with_lse)
    for value, r in zip(kernel, ref64):
        torch.testing.assert_close(value.double(), r, rtol=1e-5, atol=1e-5)


def _pam_inputs(dtype=torch.float32, b=2, c=32, e=4, h=5, w=7):
    g = torch.Generator().manual_seed(4)
    return [
        torch.randn(b, ch, h, w, generator=g).to(dtype).requires_grad_()
        for ch in (c, e, e, c)
    ] + [torch.tensor([0.7], dtype=dtype, requires_grad=True)]


def _value_and_grads(fn, inputs):
    out = fn(*inputs)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out)
    return (out, *torch.autograd.grad(out, inputs, grad))


@interpreter_only
def test_functional_position_attention():
    inputs = _pam_inputs()
    kernel = _value_and_grads(lambda *a: attnseg.position_attention(*a, backend="triton"), inputs)
    ref64 = _value_and_grads(reference.position_attention, [t.detach().double().requires_grad_() for t in inputs])
    for value, r in zip(kernel, ref64):
        torch.testing.assert_close(value.double(), r, rtol=1e-5, atol=1e-5)


@interpreter_only
@pytest.mark.parametrize("variant", ["official", "paper"])
def test_functional_channel_attention(variant):
    x = _pam_inputs()[0].detach().relu().contiguous(memory_format=torch.channels_last).requires_grad_()
    gamma = torch.tensor([0.7], requires_grad=True)
    kernel = _value_and_grads(lambda *a: attnseg.channel_attention(*a, variant=variant, backend="triton"), [x, gamma])
    ref64 = _value_and_grads(lambda *a: reference.channel_attention(*a, variant),
                             [t.detach().double().requires_grad_() for t in (x, gamma)])
    for value, r in zip(kernel, ref64):
        torch.testing.assert_close(value.double(), r, rtol=1e-5, atol=1e-5)


@interpreter_only
def test_empty_batch_gives_empty_results_and_gradients():
    q, k, v = (torch.randn(0, n, w, requires_grad=True) for n, w in ((5, 4), (6, 4), (6, 3)))
    out = attnseg.attention(q, k, v, backend="triton")
    out.sum().backward()
    assert out.shape == (0, 5, 3) and q.grad.shape == q.shape and v.grad.shape == v.shape
    x = torch.randn(0, 16, 3, 4, requires_grad=True)
    for module in (attnseg.PositionAttention(16, backend="triton"), attnseg.ChannelAttention(backend="triton")):
        y = module(x)
        y.sum().backward()
        assert y.shape == x.shape and x.grad.shape == x.shape


@interpreter_only
def test_double_backward_raises_a_clear_error():
    q, k, v = (t.detach().requires_grad_() for t in _attention_inputs(1, 5, 6, 4, 3, torch.float32))
    (dq,) = torch.autograd.grad(attnseg.attention(q, k, v, backend="triton").square().sum(), q, create_graph=True)
    with pytest.raises(attnseg.DoubleBackwardError, match='triton_attention_fwd.*backend="reference"'):
        dq.sum().backward()
    x = torch.randn(1, 4, 2, 3, requires_grad=True)
    cam = attnseg.ChannelAttention(backend="triton")
    (dx,) = torch.autograd.grad(cam(x).square().sum(), x, create_graph=True)
    with pytest.raises(attnseg.DoubleBackwardError, match="triton_channel_attention_fwd"):
        dx.sum().backward()


@interpreter_only
def test_ops_pass_opcheck_without_tracing():
    """Schema, autograd registration and fake (meta) kernels; AOT tracing needs a GPU (see below)."""
    from torch.library import opcheck

    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    q, k, v = (t.requires_grad_() for t in _attention_inputs(1, 20, 17, 16, 24, torch.float32))
    opcheck(torch.ops.attnseg.triton_attention_fwd, (q, k, v, 1.0), test_utils=utils)
    out, lse = torch.ops.attnseg.triton_attention_fwd(q, k, v, 1.0)
    for grad_lse in (None, torch.randn_like(lse)):
        args = (torch.randn_like(out), grad_lse, q, k, v, out.detach(), lse.detach(), 1.0)
        opcheck(torch.ops.attnseg.triton_attention_bwd, args, test_utils=utils[::2])
    x = _cam_input(1, 8, 20, torch.float32).requires_grad_()
    opcheck(torch.ops.attnseg.triton_channel_attention_fwd, (x, True), test_utils=utils)
    y, attn = torch.ops.attnseg.triton_channel_attention_fwd(x, False)
    args = (torch.randn_like(y), x, attn, False)
    opcheck(torch.ops.attnseg.triton_channel_attention_bwd, args, test_utils=utils[::2])


@interpreter_only
def test_unavailable_reason_under_interpreter():
    assert unavailable_reason("cpu") is None
    assert attnseg.available_backends("cpu")["triton"] is None
    assert "device type 'meta'" in unavailable_reason("meta")


@compiled_mode_only
def test_unavailable_reason_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET=1" in unavailable_reason("cpu")
    with pytest.raises(attnseg.BackendUnavailableError, match="TRITON_INTERPRET"):
        attnseg.resolve_backend("triton", "cpu")
    # Setting the flag after triton was imported is caught rather than failing inside a kernel.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "before importing triton" in unavailable_reason("cpu")


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation for NVIDIA GPUs (no GPU needed: Triton compiles to cubin offline)
# ---------------------------------------------------------------------------------------------

from attnseg.triton.offline import (  # noqa: E402
    SHARED_MEMORY as _SHARED_MEMORY,
    compile_config as _compile,
    danet_launches as _danet_launches,
    kept_configs as _kept_configs_for,
    record_launches as _record_launches,
    resource_usage as _resource_usage,
)


def _kept_configs(kernel, args, kwargs, arch):
    """What the prune filter keeps on sm_<arch>, with this module's (patchable) shared memory limits."""
    return _kept_configs_for(kernel, args, kwargs, arch, _SHARED_MEMORY)


def test_dot_precision_follows_allow_tf32():
    from attnseg.triton import dot_precision

    # Not monkeypatch: allow_tf32 is served by the module's __getattr__, which pytest 9's
    # monkeypatch cannot restore (it tries delattr), leaking TF32 into later tests.
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        assert dot_precision(torch.float32) == "ieee"
        matmul.allow_tf32 = True
        assert dot_precision(torch.float32) == "tf32"
        assert dot_precision(torch.float16) == dot_precision(torch.float64) == "ieee"
    finally:
        matmul.allow_tf32 = saved


@interpreter_only
def test_interpreter_uses_one_config_per_kernel():
    for kernel in (attnseg.triton.attention._fwd_kernel, attnseg.triton.channel_attention._grad_x_kernel):
        assert len(kernel.get().configs) == 1


@compiled_mode_only
def test_prune_filters_fit_problem_and_device():
    """Caps from the problem sizes, FMA-path limits for fp32-IEEE, shared memory from the device."""
    import attnseg.triton.attention as ta

    q = torch.empty(1, 9409, 64, dtype=torch.bfloat16)
    v = torch.empty(1, 19, 64, dtype=torch.bfloat16)  # OCR-like: 19 regions, Ev = 64
    (kernel, args, kwargs), = _record_launches(ta.attention_fwd, q, v[..., :64], v, 1.0)
    kept = _kept_configs(kernel, args, kwargs, 90)
    assert kept and all(c.kwargs["BLOCK_EV"] <= 64 and c.kwargs["BLOCK_N"] <= 32 for c in kept)
    (kernel, args, kwargs), = _record_launches(ta.attention_fwd, q.float(), q.float(), q.float(), 1.0)
    kept = _kept_configs(kernel, args, kwargs, 80)
    assert kept and all(c.num_warps == 8 and c.num_stages == 2 for c in kept)
    saved = _SHARED_MEMORY[90]
    try:  # N = 9409: not the measured table's alignment, so the estimates decide
        _SHARED_MEMORY[90] = 20 * 1024
        kept = _kept_configs(kernel, (q, *args[1:]), kwargs, 90)
        assert all(ta._shared_fwd(c.kwargs, c.num_stages, {"Q": q, **kwargs}) <= 20 * 1024 for c in kept)
    finally:
        _SHARED_MEMORY[90] = saved


@compiled_mode_only
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_calibrated_prune_keeps_only_measured_clean_configs(arch, dtype):
    """At DANet sizes in fp16, bf16 and IEEE fp32 the prune keeps configs of the measured table
    (attnseg/triton/calibration.py) only: each one compiled there without spilling, its measured
    shared memory within the device's, at most 16, and (fp16/bf16) FA2's 128 x 64 forward tiles
    among them."""
    from attnseg.triton import _MAX_CALIBRATED, config_signature
    from attnseg.triton.calibration import CLEAN_CONFIGS

    covered = 0
    name = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    for kernel, args, kwargs in _danet_launches(dtype, n=9216, batch=1):
        if kernel.configs is None:
            continue
        kept = _kept_configs(kernel, args, kwargs, arch)
        tables = [t for key, t in CLEAN_CONFIGS.items() if key[:3] == (arch, name, kernel.__name__)]
        if not tables:
            continue
        covered += 1
        clean = {sig: shared for t in tables for sig, shared in t.items()}
        assert 1 <= len(kept) <= _MAX_CALIBRATED
        for config in kept:
            sig = config_signature(config)
            assert sig in clean and clean[sig] <= _SHARED_MEMORY[arch], (kernel.__name__, sig)
        if kernel.__name__ == "_attn_fwd" and dtype != torch.float32:
            assert any(c.kwargs["BLOCK_M"] == 128 and c.kwargs["BLOCK_N"] >= 64 for c in kept)
    assert covered >= 6  # fwd, the fused dK/dV, dQ and the three autotuned CAM kernels


@compiled_mode_only
@pytest.mark.parametrize("dtype, resident", [(torch.float16, True), (torch.bfloat16, True), (torch.float32, False)])
def test_dq_keeps_the_do_tile_resident_at_danet_width(dtype, resident):
    """At Ev = 512 the fp16/bf16 dQ launch loads its dO tile once (EV_SINGLE, one 512-wide tile)
    and its calibrated configs are kept; fp32 (FMA dots: every 512-wide config spills) slices Ev."""
    (kernel, args, kwargs), = [launch for launch in _danet_launches(dtype, n=9216, batch=1)
                               if launch[0].__name__ == "_attn_bwd_dq"]
    assert kwargs["EV_SINGLE"] is resident
    assert kwargs["BLOCK_EV"] == (512 if resident else 128)
    for arch in (80, 90):
        assert _kept_configs(kernel, args, kwargs, arch)


@compiled_mode_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dkdv_is_fused_at_danet_width(dtype):
    """At DANet's Ev = 512 on the calibrated layout, dK and dV come from one launch (S and P once
    per key block, query block pair) with a 512-wide tile, and the prune keeps measured-clean configs
    of it on sm_80 and sm_90; on the unaligned N = 9,409 layout (estimates only) the split path runs."""
    launches = [(kw, a) for k, a, kw in _danet_launches(dtype, n=9216, batch=1) if k.__name__ == "_attn_bwd_dkdv"]
    (kwargs, args), = launches
    assert kwargs["COMPUTE_DK"] and kwargs["COMPUTE_DV"] and kwargs["BLOCK_EV"] == 512
    import attnseg.triton.attention as ta

    for arch in (80, 90):
        kept = _kept_configs(ta._dkdv_kernel, args, kwargs, arch)
        assert kept and all(c.num_warps == 8 for c in kept)
        assert all(c.kwargs["BLOCK_N"] <= (32 if arch == 80 else 64) for c in kept)
    unaligned = [kw for k, _, kw in _danet_launches(dtype, n=9409, batch=1) if k.__name__ == "_attn_bwd_dkdv"]
    assert [(kw["COMPUTE_DK"], kw["COMPUTE_DV"]) for kw in unaligned] == [(True, False), (False, True)]


@compiled_mode_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sm90_forward_issues_wgmma(dtype):
    """Compiled for sm_90 at the DANet shape, the forward's largest kept config uses wgmma (HGMMA)."""
    pytest.importorskip("triton.backends.nvidia")
    from attnseg.triton.offline import count_opcode, sass

    (kernel, args, kwargs), = [launch for launch in _danet_launches(dtype, n=9216, batch=1)
                               if launch[0].__name__ == "_attn_fwd"]
    kept = _kept_configs(kernel, args, kwargs, 90)
    config = max(kept, key=lambda c: (math.prod(c.kwargs.values()), c.num_stages))
    assert count_opcode(sass(_compile(kernel, args, kwargs, config, 90)), "HGMMA") > 0, config


@compiled_mode_only
def test_calibration_table_names_configs_of_the_kernels():
    """Every signature in the table is a config of its kernel (the table follows the config lists)."""
    import attnseg.triton.attention as ta
    import attnseg.triton.channel_attention as tc
    from attnseg.triton import config_signature
    from attnseg.triton.calibration import CLEAN_CONFIGS

    by_name = {lazy.fn.__name__: lazy for lazy in (
        ta._fwd_kernel, ta._dkdv_kernel, ta._dq_kernel, tc._nt_partial_kernel, tc._apply_kernel, tc._grad_x_kernel)}
    for key, table in CLEAN_CONFIGS.items():
        signatures = {config_signature(c) for c in by_name[key[2]].configs}
        assert set(table) <= signatures, key


@compiled_mode_only
@pytest.mark.parametrize("dtype, arch", [(torch.bfloat16, 90), (torch.float32, 80)])
def test_kernels_compile_for_gpus(dtype, arch):
    """Every kernel compiles to a cubin for sm_<arch>, with the smallest config its prune filter
    keeps at DANet sizes (on the unaligned N = 9409 layouts), without spilling registers."""
    pytest.importorskip("triton.backends.nvidia")
    seen = set()
    for kernel, args, kwargs in _danet_launches(dtype):
        mode = (kernel.__name__, *sorted((k, v) for k, v in kwargs.items() if isinstance(v, bool)))
        if mode in seen:
            continue
        seen.add(mode)
        kept = _kept_configs(kernel, args, kwargs, arch)
        config = min(kept, key=lambda c: (math.prod(c.kwargs.values()), c.num_stages))
        compiled = _compile(kernel, args, kwargs, config, arch)
        regs, spill = _resource_usage(compiled)
        assert spill == 0 and compiled.metadata.shared <= _SHARED_MEMORY[arch], (
            mode, config, regs, spill, compiled.metadata.shared)


# ---------------------------------------------------------------------------------------------
# GPU tests
# ---------------------------------------------------------------------------------------------


@needs_gpu
@compiled_mode_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("b, nq, nk, e, ev", [(2, 1025, 997, 64, 512), (1, 97, 19, 256, 256), (1, 4096, 4096, 64, 64)])
def test_gpu_attention_matches_reference(b, nq, nk, e, ev, dtype):
    q, k, v = (t.cuda() for t in _attention_inputs(b, nq, nk, e, ev, dtype, channel_first=True))
    _check_attention(q, k, v, e**-0.5)


@needs_gpu
@compiled_mode_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("official", [True, False])
def test_gpu_channel_attention_matches_reference(dtype, official):
    _check_cam(_cam_input(2, 512, 9409, dtype).cuda(), official)


@needs_gpu
@compiled_mode_only
def test_gpu_opcheck_and_compile():
    from torch.library import opcheck

    q, k, v = (t.cuda().requires_grad_() for t in _attention_inputs(1, 300, 200, 64, 96, torch.float16))
    opcheck(torch.ops.attnseg.triton_attention_fwd, (q, k, v, 1.0))
    x = _cam_input(2, 64, 300, torch.float16).cuda().requires_grad_()
    opcheck(torch.ops.attnseg.triton_channel_attention_fwd, (x, True))

    def attend(q, k, v):
        return torch.ops.attnseg.triton_attention_fwd(q, k, v, 1.0)[0]

    compiled = torch.compile(attend, fullgraph=True)
    out = compiled(q, k, v)
    torch.testing.assert_close(out, attend(q, k, v))
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    expected = torch.autograd.grad(attend(q, k, v).float().square().sum(), (q, k, v))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)


# ---------------------------------------------------------------------------------------------
# The interpreter tests, run in a TRITON_INTERPRET=1 subprocess (see the module docstring)
# ---------------------------------------------------------------------------------------------

_CHILD_FLAG = "ATTNSEG_TRITON_INTERPRETER_CHILD"
_child: dict = {}


# ---------------------------------------------------------------------------------------------
# Reliability (issue: property-based fuzzing, extremes, determinism), through the interpreter
# ---------------------------------------------------------------------------------------------


_triton_attention = helpers.autograd_attention(lambda *a: attnseg.triton.attention.attention_fwd(*a))
_triton_cam = helpers.autograd_cam(lambda *a: attnseg.triton.channel_attention.channel_attention_fwd(*a))


if INTERPRETER:  # hypothesis draws in the subprocess only (the parent skips these tests)
    from hypothesis import given, settings

    from conftest import examples

    _attention_cases, _cam_cases = helpers.hypothesis_strategies()

    @settings(max_examples=examples(10))
    @given(case=_attention_cases(max_n=70, max_width=65, max_batch=2))
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
    def test_attention_property_matches_reference(case, dtype):
        helpers.check_attention_backend(_triton_attention, *helpers.attention_case_inputs(case, dtype), case["scale"])

    @settings(max_examples=examples(10))
    @given(case=_cam_cases(max_c=70, max_n=130))
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
    def test_channel_attention_property_matches_reference(case, dtype):
        helpers.check_cam_backend(_triton_cam, helpers.cam_case_input(case, dtype), case["official"])


@interpreter_only
@pytest.mark.parametrize("where", helpers.NONFINITE_CASES)
def test_attention_nonfinite_propagates_like_reference(where):
    """NaN/inf inputs give NaN/±inf exactly where the fp64 reference does."""
    q, k, v = helpers.nonfinite_attention_inputs(where, torch.float32)
    # NaN and inf are the point here: numpy's invalid-value warnings (errors in the interpreter
    # subprocess, see _start_interpreter_suite) are expected
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        helpers.assert_nonfinite_like_reference(_triton_attention, q, k, v, finite_rtol=1e-4)


@interpreter_only
@pytest.mark.parametrize("case", ["all_equal_logits", "tile_33x1", "tile_1x33", "tile_65x31", "subnormal"])
def test_attention_extremes(case):
    """As tests/test_reliability.py does for the CPU and CUDA kernels: all-equal logits (uniform
    attention), tiles that are all padding but one row or key, subnormal fp32 inputs."""
    nq, nk = {"tile_33x1": (33, 1), "tile_1x33": (1, 33), "tile_65x31": (65, 31)}.get(case, (33, 65))
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, n, w, generator=g) for n, w in ((nq, 16), (nk, 16), (nk, 24)))
    if case == "all_equal_logits":
        q = torch.zeros_like(q)
    elif case == "subnormal":
        q, k, v = (t * 1e-40 for t in (q, k, v))
        assert (v.abs() < torch.finfo(torch.float32).tiny).any()
    result = helpers.check_attention_backend(_triton_attention, q, k, v, 1.0)
    if case == "all_equal_logits":
        torch.testing.assert_close(result[1], torch.full((2, nq), math.log(nk)), rtol=0, atol=1e-6)


@interpreter_only
def test_repeated_runs_are_bitwise_identical():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, w, generator=g) for n, w in ((45, 16), (70, 16), (70, 40)))
    grad_out, grad_lse = torch.randn(2, 45, 40, generator=g), torch.randn(2, 45, generator=g)
    x = torch.relu(torch.randn(1, 20, 130, generator=g))
    first = (*_triton_attention(q, k, v, 0.3, grad_out, grad_lse), *_triton_cam(x, True, torch.ones_like(x)))
    again = (*_triton_attention(q, k, v, 0.3, grad_out, grad_lse), *_triton_cam(x, True, torch.ones_like(x)))
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def _start_interpreter_suite():
    """Start (once) ``pytest`` on this file in a subprocess with TRITON_INTERPRET=1 from the start."""
    if "proc" not in _child:
        repo = Path(attnseg.__file__).resolve().parent.parent
        env = dict(os.environ, TRITON_INTERPRET="1", ATTNSEG_QUIET="1", **{_CHILD_FLAG: "1"})
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))
        cmd = [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-rs",
               "-p", "no:cacheprovider", "-o", "addopts=",
               # numpy's overflow / NaN warnings inside the interpreter point at kernel bugs
               "-W", "error:overflow encountered:RuntimeWarning",
               "-W", "error:invalid value encountered:RuntimeWarning"]
        log = tempfile.TemporaryFile(mode="w+")
        _child["log"] = log
        _child["proc"] = subprocess.Popen(cmd, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT)
    return _child["proc"], _child["log"]


@pytest.fixture(scope="module", autouse=True)
def _interpreter_suite_in_background(request):
    """Start the subprocess before this module's first test: it runs on one core while this
    process compiles kernels on another; ``test_interpreter_suite`` (last) collects it."""
    wanted = any(item.originalname == "test_interpreter_suite" for item in request.session.items)
    if wanted and not INTERPRETER and os.environ.get(_CHILD_FLAG) != "1":
        _start_interpreter_suite()
    yield
    proc = _child.pop("proc", None)
    if proc is not None and proc.poll() is None:  # the test was interrupted: stop our child
        proc.kill()
        proc.wait()
    if "log" in _child:
        _child.pop("log").close()


@compiled_mode_only
@pytest.mark.skipif(os.environ.get(_CHILD_FLAG) == "1", reason="this is the interpreter subprocess")
def test_interpreter_suite():
    """The interpreter tests of this file, run in a TRITON_INTERPRET=1 subprocess."""
    proc, log = _start_interpreter_suite()
    returncode = proc.wait(timeout=900)
    log.seek(0)
    report = log.read()
    summary = report.strip().splitlines()[-1] if report.strip() else ""
    assert returncode == 0, f"interpreter tests failed in the subprocess:\n{report[-8000:]}"
    assert " passed" in summary and "failed" not in summary and "error" not in summary, report[-8000:]
    print(f"TRITON_INTERPRET=1 subprocess: {summary}")


if __name__ == "__main__":
    # Sweep: compile every autotune config of every kernel at DANet sizes and print registers,
    # spills (stack bytes) and shared memory next to what the prune filters decide.
    #   python tests/test_triton.py [arch=90] [dtype=bfloat16] [n=9409]
    import triton

    arch = int(sys.argv[1]) if len(sys.argv) > 1 else 90
    dtype = getattr(torch, sys.argv[2]) if len(sys.argv) > 2 else torch.bfloat16
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 9409
    for kernel, args, kwargs in _danet_launches(dtype, n=n):
        configs = kernel.configs or [triton.Config({}, num_warps=4, num_stages=2)]
        kept = _kept_configs(kernel, args, kwargs, arch)
        mode = {k: v for k, v in kwargs.items() if isinstance(v, bool)}
        print(f"== {kernel.__name__} {mode}: {len(kept)} of {len(configs)} configs kept", flush=True)
        for config in configs:
            compiled = _compile(kernel, args, kwargs, config, arch)
            regs, stack = _resource_usage(compiled)
            shared = compiled.metadata.shared
            fits = shared <= _SHARED_MEMORY[arch] and stack == 0
            verdict = ("kept" if config in kept else "drop") + ("" if (config in kept) == fits else "  <-- mismatch")
            print(f"  {verdict:20s} {str(config.kwargs):55s} w{config.num_warps} s{config.num_stages} "
                  f"regs {regs:3d} spill {stack:5d} B shared {shared:6d} B", flush=True)


def test_prune_takes_the_config_a_gpu_run_measured(monkeypatch):
    """Where attnseg/triton/tuned holds a measured best config for a calibrated launch, the prune
    keeps only it (no autotuning); elsewhere it keeps what calibration keeps."""
    import triton

    import attnseg.triton as at

    configs = [triton.Config({"BLOCK_M": m}, num_warps=4, num_stages=2) for m in (32, 64, 128)]
    monkeypatch.setattr(at, "device_limits", lambda device: (200_000, 9))
    monkeypatch.setattr(at, "_calibrated_clean",
                        lambda calibration, args, major, dtype: {at.config_signature(c): 1_000 for c in configs})
    seen = []

    def narrow(kept, kernel_name, args, device):
        seen.append(kernel_name)
        return [c for c in kept if c.kwargs["BLOCK_M"] == 64] or kept

    monkeypatch.setattr(at.tuned, "narrow", narrow)
    prune = at.make_prune(lambda *a: 0, lambda *a: 1, 1 << 30, lambda args: {}, "q",
                          calibration=lambda args: ("_attn_fwd", "fwd"))
    args = {"q": torch.empty(2, 2, dtype=torch.float16), "DOT_PRECISION": "ieee"}
    kept = prune(configs, args)
    assert seen == ["_attn_fwd"] and [c.kwargs["BLOCK_M"] for c in kept] == [64]
    uncalibrated = at.make_prune(lambda *a: 0, lambda *a: 1, 1 << 30, lambda args: {}, "q")
    monkeypatch.setattr(at, "_calibrated_clean", lambda *a: None)
    assert len(uncalibrated(configs, args)) == 3 and seen == ["_attn_fwd"]
