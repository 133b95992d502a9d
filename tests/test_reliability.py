"""Reliability: numerical extremes, NaN/inf propagation, determinism, leaks, thread safety and
64-bit index arithmetic, for the native CPU kernels and the CUDA kernels (through the SIMT
emulator). The Triton kernels' extremes are in test_triton.py (large logits, both CAM variants).

Tolerances are those of helpers.assert_matches_reference (justified there): 2x PyTorch's own
error in the same dtype plus a few ulps per sqrt(reduction); in the backward, plus 2·eps·|S|max,
because P is recomputed from the stored lse as flash-attention does.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import attnseg
import emulator
import helpers
from attnseg import reference

# ---------------------------------------------------------------------------------------------
# The backends under test, as run(q, k, v, scale, grad_out, grad_lse) / run(x, official, grad_y)
# ---------------------------------------------------------------------------------------------


native_attention = helpers.autograd_attention(lambda *a: torch.ops.attnseg.attention_fwd(*a))
native_cam = helpers.autograd_cam(lambda *a: torch.ops.attnseg.channel_attention_fwd(*a))


def emulated_attention(*args):
    return helpers.emulated_attention(emulator.load())(*args)


def emulated_cam(*args):
    return helpers.emulated_cam(emulator.load())(*args)


ATTENTION = [
    pytest.param(native_attention, torch.float32, marks=pytest.mark.requires_native, id="native-fp32"),
    pytest.param(native_attention, torch.bfloat16, marks=pytest.mark.requires_native, id="native-bf16"),
    pytest.param(emulated_attention, torch.float32, marks=pytest.mark.emulator, id="cuda-emulated-fp32"),
    pytest.param(emulated_attention, torch.float16, marks=pytest.mark.emulator, id="cuda-emulated-fp16"),
]
CAM = [
    pytest.param(native_cam, torch.float32, marks=pytest.mark.requires_native, id="native-fp32"),
    pytest.param(native_cam, torch.float16, marks=pytest.mark.requires_native, id="native-fp16"),
    pytest.param(emulated_cam, torch.float32, marks=pytest.mark.emulator, id="cuda-emulated-fp32"),
    pytest.param(emulated_cam, torch.float16, marks=pytest.mark.emulator, id="cuda-emulated-fp16"),
]


def _qkv(b, nq, nk, e, ev, dtype, std=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple((torch.randn(b, n, w, generator=g, dtype=torch.float64) * s).to(dtype)
                 for n, w, s in ((nq, e, std), (nk, e, std), (nk, ev, 1.0)))


# ---------------------------------------------------------------------------------------------
# Numerical extremes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("run, dtype", ATTENTION)
@pytest.mark.parametrize("logits", [1e4, 1e5])
def test_attention_huge_logits(run, dtype, logits):
    """|S| up to ~logits (±): rows are one-hot or nearly; finite and as accurate as torch in fp32."""
    q, k, v = _qkv(1, 37, 45, 16, 24, torch.float64, std=math.sqrt(logits / 8))
    q, k, v = (t.to(dtype) for t in (q, k, v))
    s_max = torch.bmm(q.double(), k.double().transpose(1, 2)).abs().max().item()
    assert logits / 4 < s_max < 8 * logits
    # the yardstick is torch in fp32 (in fp16 these logits overflow or keep no fraction bits)
    helpers.check_attention_backend(run, q, k, v, 1.0, baseline=torch.float32)


@pytest.mark.parametrize("run, dtype", ATTENTION)
def test_attention_all_equal_logits(run, dtype):
    """Every logit equal (q = 0): uniform attention, out = mean of v, lse = log Nk."""
    _, k, v = _qkv(2, 33, 65, 16, 40, dtype)
    q = torch.zeros(2, 33, 16, dtype=dtype)
    result = helpers.check_attention_backend(run, q, k, v, 1.0)
    torch.testing.assert_close(result[1], torch.full((2, 33), math.log(65)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("run, dtype", ATTENTION)
@pytest.mark.parametrize("nq, nk", [(33, 1), (1, 33), (65, 31), (31, 65)])
def test_attention_mostly_padded_tiles(run, dtype, nq, nk):
    """Sizes one past (or short of) a tile: the last tile is almost all padding, which must not
    take part in any softmax row (a padded key with logit 0 would shift every row)."""
    helpers.check_attention_backend(run, *_qkv(2, nq, nk, 16, 24, dtype, std=2.0), 1.0)


@pytest.mark.parametrize("run, dtype", ATTENTION)
def test_attention_denormal_inputs(run, dtype):
    """Subnormal inputs (1e-40 in fp32 and bf16, 1e-6 in fp16): logits underflow to 0, uniform
    attention over subnormal values; finite and equal to the reference."""
    tiny = 1e-6 if dtype == torch.float16 else 1e-40
    q, k, v = _qkv(1, 20, 30, 8, 12, torch.float64)
    q, k, v = (t * tiny for t in (q, k, v))
    assert (v.to(dtype).abs() < torch.finfo(dtype).tiny).any()  # really subnormal
    out = helpers.check_attention_backend(run, q.to(dtype), k.to(dtype), v.to(dtype), 1.0)[0]
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("run, dtype", ATTENTION)
@pytest.mark.parametrize("where", helpers.NONFINITE_CASES)
def test_attention_nonfinite_propagates_like_reference(run, dtype, where):
    """NaN/inf in an input: the same outputs and gradients are NaN/±inf as in the reference (the
    official code on the same inputs), and the finite ones agree; never a crash or a hang."""
    q, k, v = helpers.nonfinite_attention_inputs(where, dtype)
    finite_rtol = {torch.float16: 5e-3, torch.bfloat16: 3e-2}.get(dtype, 1e-4)  # ~4 eps of the half types
    helpers.assert_nonfinite_like_reference(run, q, k, v, finite_rtol=finite_rtol)


@pytest.mark.parametrize("run, dtype", CAM)
@pytest.mark.parametrize("official", [True, False], ids=["official", "paper"])
def test_channel_attention_one_hot_rows_and_fp16_overflowing_gram(run, dtype, official):
    """Post-ReLU features of magnitude ~10 over N = 1500: Gram entries ~7e4 (beyond fp16's 65504),
    so the official CAM's rows are one-hot; accumulated in fp32, finite and equal to fp64."""
    g = torch.Generator().manual_seed(5)
    x = (torch.relu(torch.randn(1, 12, 1500, generator=g)) * 10.0).to(dtype)
    gram = torch.bmm(x.double(), x.double().transpose(1, 2))
    assert gram.max() > 65504
    y, grad_x = helpers.check_cam_backend(run, x, official)
    assert torch.isfinite(y).all() and torch.isfinite(grad_x).all()


@pytest.mark.parametrize("run, dtype", CAM)
def test_channel_attention_nan_propagates_like_reference(run, dtype):
    x = torch.relu(torch.randn(1, 9, 50, generator=torch.Generator().manual_seed(6))).to(dtype)
    x[0, 3, 17] = math.nan
    grad_y = torch.ones(1, 9, 50, dtype=dtype)
    y, grad_x = run(x, True, grad_y)
    ref_y, ref_dx = helpers.reference_cam_grads(x.double(), True, grad_y.double())
    assert torch.equal(torch.isnan(y), torch.isnan(ref_y)) and torch.equal(torch.isnan(grad_x), torch.isnan(ref_dx))


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("run, dtype", ATTENTION)
def test_attention_repeated_runs_are_bitwise_identical(run, dtype):
    q, k, v = _qkv(2, 70, 90, 16, 40, dtype)
    g = torch.Generator().manual_seed(2)
    grad_out, grad_lse = torch.randn(2, 70, 40, generator=g).to(dtype), torch.randn(2, 70, generator=g)
    first = run(q, k, v, 0.3, grad_out, grad_lse)
    for _ in range(2):
        for a, b in zip(first, run(q, k, v, 0.3, grad_out, grad_lse)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("run, dtype", CAM)
def test_channel_attention_repeated_runs_are_bitwise_identical(run, dtype):
    x = torch.relu(torch.randn(2, 37, 1100, generator=torch.Generator().manual_seed(3))).to(dtype)
    grad_y = torch.randn(2, 37, 1100, generator=torch.Generator().manual_seed(4)).to(dtype)
    first = run(x, True, grad_y)
    for a, b in zip(first, run(x, True, grad_y)):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Leaks and threads (native CPU kernels, through the public modules)
# ---------------------------------------------------------------------------------------------

LEAK_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import attnseg

    torch.manual_seed(0)
    torch.set_num_threads(2)
    pam = attnseg.PositionAttention(32, backend="native")
    cam = attnseg.ChannelAttention(backend="native")
    x = torch.randn(2, 32, 12, 13, requires_grad=True)

    def rss_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    samples = {}
    for i in range(1, int(sys.argv[1]) + 1):
        loss = pam(x).square().mean() + cam(x).square().mean()
        loss.backward()
        x.grad = None
        pam.zero_grad(set_to_none=True)
        if i in (500, 1000, 2000, 3000):
            samples[i] = rss_mib()
    print(json.dumps(samples))
    """
)


@pytest.mark.requires_native
def test_no_leak_over_thousands_of_calls():
    """3,000 forward+backward calls of PositionAttention and ChannelAttention (native) in a fresh
    process: resident memory after 3,000 calls is within 4 MiB of that after 500 (warm-up:
    allocator caches, thread pools). A leak of one 12x13x32 fp32 tensor per call (20 KiB) would
    add 50 MiB."""
    # the attnseg this process imported (installed or in place), not a source tree in the cwd
    root = os.path.dirname(os.path.dirname(os.path.abspath(attnseg.__file__)))
    env = dict(os.environ, ATTNSEG_QUIET="1", PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", LEAK_SCRIPT, "3000"], capture_output=True, text=True, env=env,
                         cwd=root, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    samples = {int(k): v for k, v in __import__("json").loads(out.stdout.strip().splitlines()[-1]).items()}
    growth = samples[3000] - samples[500]
    assert growth < 4.0, f"resident memory grew by {growth:.1f} MiB between call 500 and 3000: {samples}"


@pytest.mark.requires_native
def test_concurrent_calls_from_python_threads():
    """4 Python threads x 8 iterations of attention and channel attention forward+backward on
    different inputs give exactly the results of the same calls made one after another (the
    CPU kernels are deterministic, so any interference would show as a difference)."""
    cases = []
    for i in range(4):
        q, k, v = _qkv(2, 60 + 7 * i, 50 + 5 * i, 16, 24, torch.float32, seed=i)
        x = torch.relu(torch.randn(1, 20 + i, 300, generator=torch.Generator().manual_seed(10 + i)))
        cases.append((q, k, v, x))

    def work(case):
        q, k, v, x = case
        g = torch.Generator().manual_seed(3)
        attention = native_attention(q, k, v, 0.25, torch.randn(q.shape[0], q.shape[1], 24, generator=g),
                                     torch.randn(q.shape[0], q.shape[1], generator=g))
        cam = native_cam(x, True, torch.ones_like(x))
        return (*attention, *cam)

    expected = [work(c) for c in cases]
    results: dict[tuple[int, int], tuple] = {}
    errors: list[BaseException] = []

    def thread_main(t):
        try:
            for it in range(8):
                results[(t, it)] = work(cases[t])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=thread_main, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not errors, errors
    assert len(results) == 32
    for (t, it), result in results.items():
        for a, b in zip(result, expected[t]):
            assert torch.equal(a, b), f"thread {t}, iteration {it} differs from the sequential result"


# ---------------------------------------------------------------------------------------------
# 64-bit index arithmetic
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def far_apart_rows():
    """k [1, 70, 4] and v [1, 70, 8] as views into one 9.4 GB storage, 2^25 elements between
    rows, so the offset of the last row (2.3e9) exceeds 2^31. The storage is allocated lazily by
    the OS: only the pages the 70 rows touch become resident (a few hundred KiB)."""
    rows, stride = 70, 2**25
    storage = torch.empty(rows * stride + 64, dtype=torch.float32)
    assert storage.numel() > 2**31
    g = torch.Generator().manual_seed(0)
    k = storage.as_strided((1, rows, 4), (0, stride, 1), storage_offset=0)
    v = storage.as_strided((1, rows, 8), (0, stride, 1), storage_offset=8)
    k.copy_(torch.randn(1, rows, 4, generator=g))
    v.copy_(torch.randn(1, rows, 8, generator=g))
    assert (rows - 1) * stride + 8 > 2**31
    yield k, v
    del storage


@pytest.mark.parametrize("run", [
    pytest.param(native_attention, marks=pytest.mark.requires_native, id="native"),
    pytest.param(emulated_attention, marks=pytest.mark.emulator, id="cuda-emulated"),
])
def test_offsets_beyond_2_to_31_are_computed_correctly(run, far_apart_rows):
    """Offsets past 2^31 elements must not wrap: the kernels index with 64-bit arithmetic. Out,
    lse and every gradient equal those of the same values in a compact copy."""
    k, v = far_apart_rows
    q = torch.randn(1, 33, 4, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    grad_out, grad_lse = torch.randn(1, 33, 8, generator=g), torch.randn(1, 33, generator=g)
    far = run(q, k, v, 0.5, grad_out, grad_lse)
    near = run(q, k.contiguous(), v.contiguous(), 0.5, grad_out, grad_lse)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), far, near):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")
    ref = reference.attention_with_lse(q.double(), k.double(), v.double(), 0.5)
    torch.testing.assert_close(far[0].double(), ref[0], rtol=1e-5, atol=1e-5)
