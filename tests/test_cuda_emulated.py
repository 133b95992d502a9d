"""The CUDA kernels of csrc/cuda, run on the CPU by the SIMT emulator (tests/emu/simt.h).

The emulator compiles the same kernel headers and host launchers (csrc/cuda/host.h) as the
extension, with g++, and runs every CUDA thread as a fiber (see simt.h for the model). These
tests check what that can check: the kernels' arithmetic, indexing, masking of ragged tiles,
strides and barriers, against the fp64 reference. What it cannot check (speed, real tensor-core
rounding, memory-model effects beyond barriers) is stated in docs/cuda_kernels.md.

Tolerances: ``helpers.assert_matches_reference`` (the flash-attention criterion, justified in
helpers.py): the kernel's error against fp64 must be within 2x PyTorch's own error in the same
dtype plus a few ulps per sqrt(reduction length). The backward adds 2·eps·|S|max, because it
recomputes P from the stored lse as flash-attention does (see test_triton.py).
"""

from __future__ import annotations

import math
import os
import shutil
import contextlib
import subprocess

import pytest
import torch

import emulator
import helpers

pytestmark = pytest.mark.emulator


@pytest.fixture(scope="module")
def emu():
    module = emulator.load()
    module.set_schedule("forward", 0)
    yield module
    module.set_schedule("forward", 0)


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


def _attention_inputs(b, nq, nk, e, ev, dtype, channel_first=False, seed=0):
    g = torch.Generator().manual_seed(seed)

    def make(n, width):
        if channel_first:  # conv(x).flatten(2).transpose(1, 2): strides (width·n, 1, n)
            return torch.randn(b, width, n, generator=g).to(dtype).transpose(1, 2)
        return torch.randn(b, n, width, generator=g).to(dtype)

    return make(nq, e), make(nk, e), make(nk, ev)


def _emulated_attention(emu, q, k, v, scale):
    g = torch.Generator().manual_seed(1)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    grad_out = torch.randn(q.shape[0], q.shape[1], v.shape[2], generator=g).to(q.dtype)
    grad_lse = torch.randn(q.shape[0], q.shape[1], generator=g).to(lse_dtype)
    return helpers.emulated_attention(emu)(q, k, v, scale, grad_out, grad_lse)


def _check_attention(emu, q, k, v, scale):
    result = helpers.check_attention_backend(helpers.emulated_attention(emu), q, k, v, scale)
    assert result[0].is_contiguous()
    for grad, t in zip(result[2:], (q, k, v)):  # gradients come back in the layout of their input
        assert grad.stride() == t.stride()
    return result


SHAPES = [(n, n, e, ev) for n in (1, 37, 130) for e in (16, 64) for ev in (64, 96, 512)] + [
    (37, 130, 16, 96),  # Nq != Nk, ragged tiles on both sides
    (130, 37, 64, 64),
    (1, 130, 64, 512),
    (33, 31, 1, 3),  # one row / key past the 32-tile, tiny E and Ev
]


@pytest.mark.parametrize("nq, nk, e, ev", SHAPES, ids=[f"nq{a}-nk{b}-e{c}-ev{d}" for a, b, c, d in SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_attention_matches_reference(emu, nq, nk, e, ev, dtype):
    _check_attention(emu, *_attention_inputs(1 if ev == 512 else 2, nq, nk, e, ev, dtype), 1 / math.sqrt(e))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=["bf16", "fp64"])
@pytest.mark.parametrize("nq, nk, e, ev", [(37, 130, 16, 96), (130, 37, 64, 64)])
def test_attention_other_dtypes(emu, nq, nk, e, ev, dtype):
    _check_attention(emu, *_attention_inputs(2, nq, nk, e, ev, dtype), 0.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_attention_strided_inputs_bitwise_equal_contiguous(emu, dtype):
    """PAM's channel-first views reach the kernels through strides, with identical results."""
    q, k, v = _attention_inputs(2, 37, 45, 20, 40, dtype, channel_first=True)
    assert q.stride(1) == 1 and not q.is_contiguous()
    strided = _check_attention(emu, q, k, v, 0.5)
    contiguous = _check_attention(emu, q.contiguous(), k.contiguous(), v.contiguous(), 0.5)
    for a, c in zip(strided, contiguous):
        assert torch.equal(a, c)


def test_attention_large_logits(emu):
    """|S| up to ~4e3: nearly one-hot rows stay finite and accurate (online softmax rescaling)."""
    q, k, v = _attention_inputs(1, 37, 70, 16, 24, torch.float32)
    q = q * 16
    k = k * 16
    _check_attention(emu, q, k, v, 1.0)


def test_attention_without_lse_gradient_equals_zero_gradient(emu):
    q, k, v = _attention_inputs(1, 20, 30, 16, 24, torch.float32)
    out, lse = emu.attention_fwd(q, k, v, 1.0)
    grad_out = torch.randn_like(out)
    without = emu.attention_bwd(grad_out, None, q, k, v, out, lse, 1.0)
    with_zero = emu.attention_bwd(grad_out, torch.zeros_like(lse), q, k, v, out, lse, 1.0)
    for a, z in zip(without, with_zero):
        assert torch.equal(a, z)


def test_attention_no_keys_and_empty_widths(emu):
    q, k, v = _attention_inputs(2, 5, 0, 8, 6, torch.float32)
    out, lse = emu.attention_fwd(q, k, v, 1.0)
    assert torch.equal(out, torch.zeros(2, 5, 6)) and torch.equal(lse, torch.full((2, 5), -math.inf))
    q, k, v = _attention_inputs(1, 7, 9, 0, 5, torch.float32)  # E = 0: uniform attention
    out, lse = emu.attention_fwd(q, k, v, 1.0)
    torch.testing.assert_close(out, v.mean(1, keepdim=True).expand(1, 7, 5))
    torch.testing.assert_close(lse, torch.full((1, 7), math.log(9)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_empty_batch_launches_nothing_and_returns_empty_results(emu, dtype):
    q, k, v = (torch.randn(0, n, w, dtype=dtype) for n, w in ((5, 8), (6, 8), (6, 4)))
    out, lse = emu.attention_fwd(q, k, v, 1.0)
    assert out.shape == (0, 5, 4) and lse.shape == (0, 5)
    grads = emu.attention_bwd(out, None, q, k, v, out, lse, 1.0)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    x = torch.randn(0, 8, 15, dtype=dtype)
    y, attn = emu.channel_attention_fwd(x, True)
    assert y.shape == x.shape and attn.shape == (0, 8, 8)
    assert emu.channel_attention_bwd(y, x, attn, True).shape == x.shape


@pytest.mark.parametrize("dtype, slice_width", [(torch.float64, 32), (torch.float32, 256), (torch.float16, 256)],
                         ids=["fp64", "fp32", "fp16"])
def test_attention_grid_limit_is_a_clear_error(emu, dtype, slice_width):
    """Ev so wide that its slices (32 wide in the old fp64 kernel, 256 in the flash and FFMA forwards)
    exceed gridDim.y's 65535 is refused before any launch."""
    q, k, v = _attention_inputs(1, 1, 1, 1, 1, dtype)
    v = torch.zeros(1, 1, slice_width * 65536 + 1, dtype=dtype)
    with pytest.raises(RuntimeError, match="Ev needs 65537 thread blocks along one grid axis.*split v along its last"):
        emu.attention_fwd(q, k, v, 1.0)


# ---------------------------------------------------------------------------------------------
# Flash forward (fp16/bf16, flash_attention.cuh): kernel choice and load paths
# ---------------------------------------------------------------------------------------------


def _layout(t, channel_first):
    """t [B, N, W] as a contiguous tensor or as a channel-first view (strides W·N, 1, N)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2) if channel_first else t.contiguous()


def _flash_launch(emu, q, k, v, scale):
    """out, lse and the one launch line of the forward."""
    emu.launches()
    out, lse = emu.attention_fwd(q, k, v, scale)
    (line,) = emu.launches()
    return out, lse, line


# (id, dtype, nq, nk, e, ev, channel-first q/k/v, kernel template arguments, load paths)
FLASH_PATHS = [
    ("contiguous", torch.float16, 37, 45, 16, 40, (0, 0, 0), "16, 64, false", "q_keys_major=0 q_async=1 k_async=1 v_async=1"),
    # N multiple of 8: the channel-first views are copied by cp.async, keys-major smem tiles
    ("channel-first-aligned", torch.float16, 40, 48, 16, 40, (1, 1, 1), "16, 64, true", "q_keys_major=1 q_async=1 k_async=1 v_async=1"),
    # odd N (as mmsegmentation's 769 crop, N = 9409): element-wise loads, the same tiles
    ("channel-first-odd-n", torch.float16, 37, 45, 16, 40, (1, 1, 1), "16, 64, true", "q_keys_major=1 q_async=0 k_async=0 v_async=0"),
    # K channel-first decides the K/V tile layout; V contiguous then takes element-wise loads
    ("mixed", torch.float16, 37, 48, 32, 72, (0, 1, 0), "32, 128, true", "q_keys_major=0 q_async=1 k_async=1 v_async=0"),
    # E = 100 pads to 128 (rows of 100 elements: not 16-byte multiples), Ev = 136 in one 256 slice
    ("e100-ev136", torch.float16, 37, 45, 100, 136, (0, 0, 0), "128, 256, false", "q_keys_major=0 q_async=0 k_async=0 v_async=1"),
    ("bf16-channel-first-ev512", torch.bfloat16, 40, 40, 64, 512, (1, 1, 1), "64, 256, true", "q_keys_major=1 q_async=1 k_async=1 v_async=1"),
]


@pytest.mark.parametrize("dtype, nq, nk, e, ev, channel_first, template, paths", [p[1:] for p in FLASH_PATHS],
                         ids=[p[0] for p in FLASH_PATHS])
def test_flash_forward_load_paths(emu, dtype, nq, nk, e, ev, channel_first, template, paths):
    """fp16/bf16 with E <= 128 take flash_attention_fwd_kernel, on the load path the strides allow;
    every path matches the reference and is bitwise equal to the contiguous inputs' result (the
    same fragments reach the same MMAs whatever the smem layout)."""
    q, k, v = (_layout(t, cf) for t, cf in zip(_attention_inputs(1, nq, nk, e, ev, dtype), channel_first))
    out, lse, line = _flash_launch(emu, q, k, v, 0.3)
    type_name = "__half" if dtype == torch.float16 else "__nv_bfloat16"
    assert f"flash_attention_fwd_kernel<{type_name}, {template}>" in line and line.endswith(paths), line
    helpers.check_attention_backend(helpers.emulated_attention(emu), q, k, v, 0.3)
    out_c, lse_c, _ = _flash_launch(emu, q.contiguous(), k.contiguous(), v.contiguous(), 0.3)
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)


@pytest.mark.parametrize("dtype, e", [(torch.float64, 16), (torch.float16, 129), (torch.float32, 129),
                                      (torch.float16, 0), (torch.float32, 0)],
                         ids=["fp64", "fp16-e129", "fp32-e129", "fp16-e0", "fp32-e0"])
def test_old_forward_kernel_takes_the_rest(emu, dtype, e):
    """fp64, E > 128 and E = 0 stay on attention_fwd_kernel (host.h's dispatch rule)."""
    q, k, v = _attention_inputs(1, 5, 7, e, 8, dtype)
    emu.launches()
    emu.attention_fwd(q, k, v, 0.1)
    (line,) = emu.launches()
    assert "attention_fwd_kernel<" in line and "flash" not in line and "ffma" not in line, line


# (id, nq, nk, e, ev, channel-first q/k/v/dO, forward and dV template arguments and load axes,
# dK/dQ template arguments (None: E > 64, the old dQ and dK kernels))
FFMA_PATHS = [
    ("contiguous", 37, 45, 16, 40, (0, 0, 0, 0), "16, 64, false, false, false", "x_tokens_major=0",
     "16, 64, false, false, true", "x_tokens_major=0", "false, false, false"),
    # DANet's PAM: channel-first q/k/v, a contiguous dO (the gradient of the contiguous out)
    ("channel-first", 40, 48, 16, 40, (1, 1, 1, 0), "16, 64, true, true, false", "x_tokens_major=1",
     "16, 64, true, false, true", "x_tokens_major=1", "true, false, true"),
    # the forward loads V along K's axis; the backward loads each operand along its own
    ("mixed", 37, 48, 32, 72, (0, 1, 0, 1), "32, 128, true, true, false", "x_tokens_major=0",
     "32, 128, false, true, true", "x_tokens_major=1", "false, true, false"),
    ("e100-ev136", 37, 45, 100, 136, (0, 0, 0, 0), "128, 256, false, false, false", "x_tokens_major=0",
     "128, 256, false, false, true", "x_tokens_major=0", None),
    # the DANet shape's tiles: two 64-row blocks, three 32-row tiles, two 256-wide Ev tiles, eight
    # 64-wide chunks of dP, two key blocks in the ordered dQ accumulation
    ("channel-first-ev512", 70, 70, 64, 512, (1, 1, 1, 1), "64, 256, true, true, false", "x_tokens_major=1",
     "64, 256, true, true, true", "x_tokens_major=1", "true, true, true"),
    ("one-row-one-key", 1, 1, 3, 5, (0, 0, 0, 0), "16, 64, false, false, false", "x_tokens_major=0",
     "16, 64, false, false, true", "x_tokens_major=0", "false, false, false"),
]


@pytest.mark.parametrize("nq, nk, e, ev, channel_first, fwd_template, fwd_paths, dv_template, dv_paths, dkdq",
                         [p[1:] for p in FFMA_PATHS], ids=[p[0] for p in FFMA_PATHS])
def test_ffma_kernel_paths(emu, nq, nk, e, ev, channel_first, fwd_template, fwd_paths, dv_template, dv_paths,
                           dkdq):
    """fp32 with 1 <= E <= 128 takes the forward and dV from ffma_attention_kernel
    (ffma_attention.cuh), and with E <= 64 dK and dQ from ffma_attention_bwd_dkdq_kernel (the
    default atomic dQ accumulation, then the dQ conversion), with the tile sizes and load axes of
    host.h's rules;
    E > 64 takes dQ and dK from the old kernels (the dK/dV kernel for its dK slices). Every layout
    matches the fp64 reference, and the results are bitwise equal to the contiguous inputs' (the
    load axes change, the shared-memory tiles and the arithmetic do not)."""
    q, k, v = (_layout(t, cf) for t, cf in zip(_attention_inputs(1, nq, nk, e, ev, torch.float32), channel_first))
    out, lse, line = _flash_launch(emu, q, k, v, 0.3)
    assert f"ffma_attention_kernel<{fwd_template}>" in line and line.endswith(fwd_paths), line
    lines = []
    result = helpers.check_attention_backend(_flash_bwd_run(emu, channel_first[3], lines), q, k, v, 0.3)
    (dv_line,) = [line for line in lines if "ffma_attention_kernel<" in line]
    assert f"ffma_attention_kernel<{dv_template}>" in dv_line and dv_line.endswith(dv_paths), dv_line
    old = ("attention_bwd_dq_kernel<float>", "attention_bwd_dkv_kernel<float>")
    if dkdq is None:
        assert all(any(name in line for line in lines) for name in old), lines
        assert not any("dkdq" in line or "dq_convert" in line for line in lines), lines
    else:
        assert sum(f"ffma_attention_bwd_dkdq_kernel<{dkdq}, false>" in line for line in lines) == 1, lines
        assert sum("flash_attention_bwd_dq_convert_kernel<float>" in line for line in lines) == 1, lines
        assert not any(name in line for name in old for line in lines), lines
    out_c, lse_c, _ = _flash_launch(emu, q.contiguous(), k.contiguous(), v.contiguous(), 0.3)
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)
    contiguous = helpers.check_attention_backend(_flash_bwd_run(emu, False, []), q.contiguous(), k.contiguous(),
                                                 v.contiguous(), 0.3)
    for grad, t, grad_contiguous in zip(result[2:], (q, k, v), contiguous[2:]):
        assert grad.stride() == t.stride()
        assert torch.equal(grad, grad_contiguous)


FLASH_SCHEDULES = [  # (id, dtype, channel-first, nk, ev): 3-5 key tiles, so both ring stages are reused
    ("fp16-channel-first-async", torch.float16, True, 136, 80),
    ("fp16-channel-first-elementwise", torch.float16, True, 134, 80),
    ("bf16-contiguous", torch.bfloat16, False, 200, 80),
    ("fp16-ev-tile-256", torch.float16, False, 130, 264),  # 32-key tiles
]


@pytest.mark.parametrize("dtype, channel_first, nk, ev", [c[1:] for c in FLASH_SCHEDULES],
                         ids=[c[0] for c in FLASH_SCHEDULES])
def test_flash_forward_is_schedule_independent(emu, dtype, channel_first, nk, ev):
    """The cp.async ring gives bitwise-identical results under every schedule, over several key
    tiles and query blocks. Planted by hand: without the loop's cp_async_wait every cp.async case
    here fails (and the reference comparisons do); without its __syncthreads only the
    channel-first cp.async case fails (the emulator's warps run in near lockstep between
    collectives, so only the copies' visibility order exposes it)."""
    q, k, v = (_layout(t, channel_first) for t in _attention_inputs(2, 70, nk, 20, ev, dtype))
    results = _under_each_schedule(emu, lambda: emu.attention_fwd(q, k, v, 0.4))
    for (name, seed), result in zip(SCHEDULES[1:], results[1:]):
        for a, b in zip(results[0], result):
            assert torch.equal(a, b), f"differs between the forward and the {name}({seed}) schedule"


# ---------------------------------------------------------------------------------------------
# Flash backward (fp16/bf16, flash_attention_bwd.cuh): dV kernel choice and load paths
# ---------------------------------------------------------------------------------------------


def _flash_bwd_run(emu, do_channel_first, lines):
    """run(...) for check_attention_backend with grad_out laid out channel-first or contiguous
    (the same values), appending the backward's launch lines to ``lines``."""

    def run(q, k, v, scale, grad_out, grad_lse):
        out, lse = emu.attention_fwd(q, k, v, scale)
        emu.launches()
        grads = emu.attention_bwd(_layout(grad_out, do_channel_first), grad_lse, q, k, v, out, lse, scale)
        lines.extend(emu.launches())
        return (out, lse, *grads)

    return run


SM80_OPTIN = 163 * 1024  # sm_80's opt-in shared memory per block; the emulator's default is sm_86's 99 KiB


@contextlib.contextmanager
def _optin(emu, limit):
    """The emulated device's opt-in shared-memory limit set to ``limit`` (None: the default)."""
    if limit is None:
        yield
        return
    try:
        emu.set_max_dynamic_smem_optin(limit)
        yield
    finally:
        emu.set_max_dynamic_smem_optin(99 * 1024)


# (id, dtype, nq, nk, e, ev, channel-first q/k/v/dO, opt-in limit, dV kernel template arguments and
# load paths, dK/dQ kernel template arguments and load paths)
FLASH_BWD_PATHS = [
    ("contiguous", torch.float16, 37, 45, 16, 40, (0, 0, 0, 0), None,
     "64, 128, false", "k_keys_major=0 k_async=1 q_async=1 do_async=1",
     "64, 128, false", "v_async=1 k_keys_major=0 k_async=1 q_async=1 do_async=1"),
    # N multiple of 8: channel-first views copied by cp.async into queries-major smem tiles; the
    # dK/dQ kernel's resident K and V tiles are stored [keys][features], so they load element-wise
    ("channel-first-aligned", torch.float16, 40, 48, 16, 40, (1, 1, 1, 1), None,
     "64, 128, true", "k_keys_major=1 k_async=1 q_async=1 do_async=1",
     "64, 128, true", "v_async=0 k_keys_major=0 k_async=0 q_async=1 do_async=1"),
    # odd N: element-wise loads, the same tiles
    ("channel-first-odd-n", torch.float16, 37, 45, 16, 40, (1, 1, 1, 1), None,
     "64, 128, true", "k_keys_major=1 k_async=0 q_async=0 do_async=0",
     "64, 128, true", "v_async=0 k_keys_major=0 k_async=0 q_async=0 do_async=0"),
    # Q and dO tiles share one layout: with q channel-first and dO contiguous (the first GPU run's
    # case, whose element-wise dO loads went with a 7-16x slower backward) the narrower operand, q
    # (E = 64 < Ev), is copied into dO's layout, and both load by cp.async
    ("bf16-channel-first-contiguous-do-ev136", torch.bfloat16, 40, 48, 64, 136, (1, 1, 1, 0), None,
     "64, 256, false", "k_keys_major=1 k_async=1 q_async=1 do_async=1",
     "64, 256, false", "v_async=0 k_keys_major=0 k_async=0 q_async=1 do_async=1"),
    # ... and the other way round: E = 64 > Ev = 40, so the channel-first dO is copied into q's layout
    ("fp16-contiguous-q-channel-first-do-ev40", torch.float16, 40, 48, 64, 40, (0, 0, 0, 1), None,
     "64, 128, false", "k_keys_major=0 k_async=1 q_async=1 do_async=1",
     "64, 128, false", "v_async=1 k_keys_major=0 k_async=1 q_async=1 do_async=1"),
    # DANet's widths, Ev = 512 (dV in two 256 slices, V resident in 148 KiB), odd Nk
    ("bf16-contiguous-ev512", torch.bfloat16, 70, 67, 64, 512, (0, 0, 0, 0), SM80_OPTIN,
     "64, 256, false", "k_keys_major=0 k_async=1 q_async=1 do_async=1",
     "64, 512, false", "v_async=1 k_keys_major=0 k_async=1 q_async=1 do_async=1"),
    # DANet's layout and widths: the dK/dQ kernel's largest tiles (164 KiB)
    ("fp16-channel-first-ev512", torch.float16, 72, 80, 64, 512, (1, 1, 1, 1), SM80_OPTIN,
     "64, 256, true", "k_keys_major=1 k_async=1 q_async=1 do_async=1",
     "64, 512, true", "v_async=0 k_keys_major=0 k_async=0 q_async=1 do_async=1"),
    # Nq != Nk, E = 40 padded to 64 (cp.async zero-fills the columns past E), Ev = 136 padded to 256
    ("nq-ne-nk-e40", torch.float16, 100, 33, 40, 136, (0, 1, 0, 0), None,
     "64, 256, false", "k_keys_major=1 k_async=0 q_async=1 do_async=1",
     "64, 256, false", "v_async=1 k_keys_major=0 k_async=0 q_async=1 do_async=1"),
]


def _kernel_line(lines, name, type_name, template):
    (line,) = [line for line in lines if f"{name}<" in line]
    assert f"{name}<{type_name}, {template}>" in line, line
    return line


@pytest.mark.parametrize("dtype, nq, nk, e, ev, channel_first, optin, dv_template, dv_paths, dkdq_template, dkdq_paths",
                         [p[1:] for p in FLASH_BWD_PATHS], ids=[p[0] for p in FLASH_BWD_PATHS])
def test_flash_backward_load_paths(emu, dtype, nq, nk, e, ev, channel_first, optin, dv_template, dv_paths,
                                   dkdq_template, dkdq_paths):
    """fp16/bf16 with E <= 64 and Ev <= 512 take all three gradients from the flash kernels (dV
    kernel; dK/dQ kernel with the default atomic dQ accumulation, then the dQ conversion) on the load
    paths the strides allow, and none of the old kernels but the delta kernel; every path matches
    the fp64 reference, and the gradients are bitwise equal to the contiguous inputs' results."""
    q, k, v = (_layout(t, cf) for t, cf in zip(_attention_inputs(1, nq, nk, e, ev, dtype), channel_first))
    lines = []
    type_name = "__half" if dtype == torch.float16 else "__nv_bfloat16"
    with _optin(emu, optin):
        result = helpers.check_attention_backend(_flash_bwd_run(emu, channel_first[3], lines), q, k, v, 0.3)
        contiguous = helpers.check_attention_backend(_flash_bwd_run(emu, False, []), q.contiguous(), k.contiguous(),
                                                     v.contiguous(), 0.3)
    assert _kernel_line(lines, "flash_attention_bwd_dv_kernel", type_name, dv_template).endswith(dv_paths)
    dkdq_line = _kernel_line(lines, "flash_attention_bwd_dkdq_kernel", type_name, dkdq_template + ", false")
    assert dkdq_line.endswith(dkdq_paths), dkdq_line
    assert sum("flash_attention_bwd_dq_convert_kernel<" in line for line in lines) == 1, lines
    assert not any("attention_bwd_dkv_kernel<" in line or "attention_bwd_dq_kernel<" in line for line in lines), lines
    for grad, t, grad_contiguous in zip(result[2:], (q, k, v), contiguous[2:]):
        assert grad.stride() == t.stride()
        assert torch.equal(grad, grad_contiguous)


@pytest.mark.parametrize("dtype, e", [(torch.float64, 16), (torch.float16, 65), (torch.float32, 129),
                                      (torch.float16, 0), (torch.float32, 0)],
                         ids=["fp64", "fp16-e65", "fp32-e129", "fp16-e0", "fp32-e0"])
def test_old_backward_kernels_take_the_rest(emu, dtype, e):
    """fp64, E > 64 (fp16/bf16) or > 128 (fp32) and E = 0 compute all gradients in the old kernels
    (host.h's rule)."""
    q, k, v = _attention_inputs(1, 5, 7, e, 8, dtype)
    lines = []
    helpers.check_attention_backend(_flash_bwd_run(emu, False, lines), q, k, v, 0.1)
    assert not any("flash_attention_bwd" in line or "ffma" in line for line in lines), lines


@pytest.mark.parametrize("ev, optin", [(512, None), (520, SM80_OPTIN)], ids=["ev512-99KiB", "ev520-sm80"])
def test_dkdq_falls_back_where_v_does_not_fit(emu, ev, optin):
    """Where the dK/dQ kernel's resident V tile does not fit the device's opt-in shared memory
    (Ev = 512 on a 99 KiB sm_86 / sm_89) or Ev > 512, dK and dQ come from the old kernels (the
    dK/dV kernel for its dK slices only) and dV still from the flash dV kernel; all match."""
    q, k, v = _attention_inputs(1, 37, 41, 64, ev, torch.float16, channel_first=True)
    lines = []
    with _optin(emu, optin):
        helpers.check_attention_backend(_flash_bwd_run(emu, True, lines), q, k, v, 0.2)
    assert not any("flash_attention_bwd_dkdq_kernel" in line or "dq_convert" in line for line in lines), lines
    assert sum("flash_attention_bwd_dv_kernel<" in line for line in lines) == 1, lines
    assert sum("attention_bwd_dq_kernel<" in line for line in lines) == 1, lines
    assert sum("attention_bwd_dkv_kernel<" in line for line in lines) == 1, lines


@pytest.mark.parametrize("dtype, kernel", [(torch.float16, "flash_attention_bwd_dkdq_kernel"),
                                           (torch.float32, "ffma_attention_bwd_dkdq_kernel")], ids=["fp16", "fp32"])
def test_dkdq_counter_off_by_one_is_caught(emu, dtype, kernel):
    """The dK/dQ kernels' ordered dQ accumulation (under torch.use_deterministic_algorithms(True):
    key block j adds after blocks 0 .. j - 1). A planted off-by-one in its counter wait (block j
    waits for j + 1, or j - 1) is reported by the emulator, which runs that launch's blocks in
    linear order, as a wait that would deadlock: not a hang, not a silently different sum. The
    default atomic path has no counters, so the same plant changes nothing there. Several key
    blocks and query tiles, two batches."""
    q, k, v = _attention_inputs(2, 70, 150, 32, 48, dtype)
    out, lse = emu.attention_fwd(q, k, v, 0.3)
    grad_out = torch.randn(2, 70, 48, generator=torch.Generator().manual_seed(3)).to(dtype)
    emu.launches()
    with _deterministic():
        expected = emu.attention_bwd(grad_out, None, q, k, v, out, lse, 0.3)
    assert any(f"{kernel}<" in line and line.split(">(")[0].endswith("true") for line in emu.launches())
    try:
        for skew in (1, -1):
            emu.set_dq_counter_skew(skew)
            with _deterministic(), pytest.raises(RuntimeError, match="would deadlock"):
                emu.attention_bwd(grad_out, None, q, k, v, out, lse, 0.3)
        atomic = emu.attention_bwd(grad_out, None, q, k, v, out, lse, 0.3)  # skew still planted
    finally:
        emu.set_dq_counter_skew(0)
    with _deterministic():
        again = emu.attention_bwd(grad_out, None, q, k, v, out, lse, 0.3)
    for a, b in zip(expected, again):
        assert torch.equal(a, b)
    # dK and dV do not go through the accumulator: the same bits on both paths
    assert torch.equal(atomic[1], expected[1]) and torch.equal(atomic[2], expected[2])
    _assert_within_reorder_bound(atomic[0], expected[0], q, k, v, out, grad_out, 0.3)


# ---------------------------------------------------------------------------------------------
# dQ accumulation of the dK/dQ kernels: fp32 atomic reductions by default, key-block order under
# torch.use_deterministic_algorithms(True)
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _deterministic(enabled=True):
    """torch.use_deterministic_algorithms(enabled) for the block, restored after it."""
    before, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


def _ulp(x, dtype):
    """The spacing of `dtype`'s values at |x| (elementwise; the smallest subnormal's at 0)."""
    info = torch.finfo(dtype)
    _, exponent = torch.frexp(x.double().abs())  # |x| = m · 2^exponent, m in [0.5, 1)
    return torch.clamp(torch.ldexp(torch.full_like(x, info.eps, dtype=torch.float64), exponent - 1),
                       min=info.smallest_normal * info.eps)


def _assert_within_reorder_bound(dq, dq_other, q, k, v, out, grad_out, scale):
    """dq and dq_other: the same kernel's dq with its ceil(Nk / 64) fp32 partials per cell summed in
    two orders (atomic reductions in any order, or the ordered path's key-block order). Summing m
    terms recursively in fp32 errs by at most (m - 1)·u·Σ|term| (u = 2^-24), so two orders differ by
    at most 2(m - 1)·u·Σ_b|partial_b| <= 2(m - 1)·u·Σ_j |dS_ij|·|K_jf| (taken from the fp64 dS, with a
    factor 2 for dS's rounding to the input type and the partials' own fp32 error); the result is
    then multiplied by the scale and rounded once to dq's type, which may put the two on the two
    sides of a rounding boundary: one ulp of dq's type more. At the shapes here the fp32 term is
    a few ulp of fp32 times m, well below the fp16/bf16 rounding of the result, so the bound is
    in effect one fp16/bf16 ulp (and a few fp32 ulps for fp32)."""
    qd, kd, vd, od, god = (t.double() for t in (q, k, v, out, grad_out))
    p = torch.softmax(torch.bmm(qd, kd.transpose(1, 2)) * scale, -1)
    dp = torch.bmm(god, vd.transpose(1, 2))
    ds = p * (dp - (god * od).sum(-1, keepdim=True))
    partials = math.ceil(k.shape[1] / 64)
    fp32_term = 2 * 2 * (partials - 1) * 2.0**-24 * abs(scale) * torch.bmm(ds.abs(), kd.abs())
    bound = fp32_term + _ulp(torch.maximum(dq.abs(), dq_other.abs()), dq.dtype)
    excess = (dq.double() - dq_other.double()).abs() - bound
    assert (excess <= 0).all(), f"dq differs by {float(excess.max()):.3g} more than the reordering bound"
    return fp32_term


# (id, dtype, channel-first, nq, nk, e, ev, dK/dQ kernel, opt-in): Nk = 200 gives four key blocks,
# so each dq cell sums four partials, whose fp32 sum depends on the order (two commute exactly)
DQ_ORDER_CASES = [
    ("fp16-channel-first-ev512", torch.float16, True, 70, 200, 64, 512, "flash_attention_bwd_dkdq_kernel", SM80_OPTIN),
    ("bf16-contiguous-e40", torch.bfloat16, False, 70, 200, 40, 96, "flash_attention_bwd_dkdq_kernel", None),
    ("fp32-channel-first", torch.float32, True, 70, 200, 64, 96, "ffma_attention_bwd_dkdq_kernel", None),
]


@pytest.mark.parametrize("dtype, channel_first, nq, nk, e, ev, kernel, optin", [c[1:] for c in DQ_ORDER_CASES],
                         ids=[c[0] for c in DQ_ORDER_CASES])
def test_dq_accumulation_atomic_by_default_ordered_when_deterministic(emu, dtype, channel_first, nq, nk, e, ev,
                                                                      kernel, optin):
    """By default the dK/dQ kernel adds its dQ partials by fp32 atomic reductions (the kernel
    instantiated with kOrderedDq = false); under torch.use_deterministic_algorithms(True) in
    key-block order behind the counters (kOrderedDq = true). The emulator runs every launch's
    blocks in a fresh random order (the ordered launch excepted: its protocol needs in-order
    dispatch) and applies the reductions in a shuffled order; here each of two launches per path
    also gets its own launch-order seed and thread schedule.
    * The atomic path matches the fp64 reference (the backward's usual criterion) and the ordered
      path's dq within the reordering bound of _assert_within_reorder_bound; dK and dV do not go
      through the accumulator and are bitwise equal on both paths.
    * The ordered path is bitwise identical across the two launches. The atomic path may differ:
      in fp32 (dq is the accumulator times the scale) it does, which shows the emulator really
      reorders the sums; in fp16/bf16 the difference mostly vanishes in dq's rounding."""
    q, k, v = (_layout(t, channel_first) for t in _attention_inputs(1, nq, nk, e, ev, dtype))
    grad_out = _layout(torch.randn(1, nq, ev, generator=torch.Generator().manual_seed(5)).to(dtype), channel_first)
    out, lse = emu.attention_fwd(q, k, v, 0.3)

    def backward(seed, deterministic):
        emu.set_launch_order_seed(seed)
        emu.set_schedule("random", seed)
        emu.launches()
        try:
            with _deterministic(deterministic), _optin(emu, optin):
                grads = emu.attention_bwd(grad_out, None, q, k, v, out, lse, 0.3)
        finally:
            emu.set_schedule("forward", 0)
        (line,) = [line for line in emu.launches() if f"{kernel}<" in line]
        assert line.split(">(")[0].endswith("true" if deterministic else "false"), line
        return grads

    atomic = [backward(seed, False) for seed in (11, 12)]
    ordered = [backward(seed, True) for seed in (11, 12)]
    for a, b in zip(*ordered):
        assert torch.equal(a, b), "the ordered dQ accumulation is not bitwise reproducible"
    for grads in atomic:
        assert torch.equal(grads[1], ordered[0][1]) and torch.equal(grads[2], ordered[0][2])
        fp32_term = _assert_within_reorder_bound(grads[0], ordered[0][0], q, k, v, out, grad_out, 0.3)
    if dtype != torch.float32:  # a typical cell's reordering error is far below one ulp of the result
        assert float((fp32_term / _ulp(ordered[0][0], dtype)).median()) < 0.05
    else:
        assert not torch.equal(atomic[0][0], atomic[1][0]), "two launches summed every dq cell in the same order"
    with _optin(emu, optin):
        helpers.check_attention_backend(_flash_bwd_run(emu, channel_first, []), q, k, v, 0.3)  # the atomic path


def test_emulator_shuffles_block_and_reduction_order(emu):
    """Every launch runs its blocks in a fresh random order and applies the fp32 reductions
    (warp::red_add_f32) in a shuffled order at its end; set_launch_order_seed replays the sequence.
    A sum whose fp32 value depends on the order (2^24 absorbs a 1 added to it alone) takes
    different values across launches; a sum that is exact in any order does not; subnormals are
    flushed to zero, as red.global.add.f32 does."""
    order_sensitive = torch.tensor([2.0**24] + [1.0] * 20 + [-(2.0**24)])
    emu.set_launch_order_seed(7)
    first = [emu.red_sum(order_sensitive) for _ in range(6)]
    emu.set_launch_order_seed(7)
    replay = [emu.red_sum(order_sensitive) for _ in range(6)]
    for (sum_a, order_a), (sum_b, order_b) in zip(first, replay):
        assert torch.equal(sum_a, sum_b) and torch.equal(order_a, order_b)
    for _, order in first:
        assert sorted(order.tolist()) == list(range(22))
    assert len({tuple(order.tolist()) for _, order in first}) == 6
    assert len({float(total) for total, _ in first}) > 1
    exact = torch.arange(1.0, 33.0)
    assert all(float(emu.red_sum(exact)[0]) == 528.0 for _ in range(4))
    assert float(emu.red_sum(torch.tensor([1e-40, 1e-40]))[0]) == 0.0


FLASH_BWD_SCHEDULES = [  # (id, dtype, channel-first, nq, ev): 4 query tiles, so both ring stages are reused
    ("fp16-channel-first-async", torch.float16, True, 104, 80),
    ("fp16-channel-first-elementwise", torch.float16, True, 101, 80),
    ("bf16-contiguous", torch.bfloat16, False, 100, 80),
    ("fp16-ev-tile-256", torch.float16, False, 97, 264),
    ("bf16-channel-first-ev512", torch.bfloat16, True, 104, 512),
]


@pytest.mark.parametrize("dtype, channel_first, nq, ev", [c[1:] for c in FLASH_BWD_SCHEDULES],
                         ids=[c[0] for c in FLASH_BWD_SCHEDULES])
def test_flash_backward_is_schedule_independent(emu, dtype, channel_first, nq, ev):
    """The backward's flash kernels (dV; dK/dQ with its default atomic dQ accumulation: two key
    blocks, whose two partials a cell sum to the same fp32 value in either order) give
    bitwise-identical gradients under every schedule, over several query tiles and key blocks (as
    test_flash_forward_is_schedule_independent). Planted by hand: without the dV kernel's
    query-loop cp_async_wait the three cp.async cases here fail (and every case of
    test_flash_backward_load_paths does, through its contiguous comparison run); the element-wise
    case passes, as it should. The same holds for the dK/dQ kernel's wait."""
    q, k, v = (_layout(t, channel_first) for t in _attention_inputs(2, nq, 72, 20, ev, dtype))
    grad_out = _layout(torch.randn(2, nq, ev, generator=torch.Generator().manual_seed(4)).to(dtype), channel_first)
    out, lse = emu.attention_fwd(q, k, v, 0.4)
    emu.launches()
    with _optin(emu, SM80_OPTIN if ev > 256 else None):
        results = _under_each_schedule(emu, lambda: emu.attention_bwd(grad_out, None, q, k, v, out, lse, 0.4))
    lines = emu.launches()
    assert any("flash_attention_bwd_dv_kernel" in line for line in lines)
    assert any("flash_attention_bwd_dkdq_kernel" in line for line in lines)
    for (name, seed), result in zip(SCHEDULES[1:], results[1:]):
        for a, b in zip(results[0], result):
            assert torch.equal(a, b), f"differs between the forward and the {name}({seed}) schedule"


def test_ordered_counter_protocol_and_planted_off_by_one(emu):
    """warp.cuh's acquire/release counter primitives, in the ordered-accumulation protocol of the
    flash backward's dQ (block j waits for counter == j, adds, releases j + 1): the blocks add in
    order. Planted off-by-one (block j waits for j + 1, or j - 1): the emulator, which runs blocks
    in linear order, reports that the wait would deadlock instead of hanging or passing."""
    assert emu.ordered_counter(7, 0) == 28
    for skew in (1, -1):
        with pytest.raises(RuntimeError, match="would deadlock"):
            emu.ordered_counter(7, skew)


def test_emulated_opt_in_shared_memory_limit_is_configurable(emu):
    """The emulated device's opt-in limit defaults to 99 KiB (sm_86 / sm_89) and can emulate other
    GPUs; a kernel that opts in beyond it is refused, as cudaFuncSetAttribute refuses it."""
    assert emu.max_dynamic_smem_optin() == 99 * 1024
    q, k, v = _attention_inputs(1, 5, 7, 64, 300, torch.float16)  # flash forward, Ev tile 256: 59 KiB
    try:
        emu.set_max_dynamic_smem_optin(48 * 1024)
        assert emu.max_dynamic_smem_optin() == 48 * 1024
        with pytest.raises(RuntimeError, match="more than the emulated GPU offers"):
            emu.attention_fwd(q, k, v, 0.1)
    finally:
        emu.set_max_dynamic_smem_optin(99 * 1024)
    emu.attention_fwd(q, k, v, 0.1)


def test_host_launchers_check_arguments(emu):
    """The host launchers check what the device ops check (names, shapes, dtypes)."""
    q, k, v = _attention_inputs(1, 4, 5, 8, 6, torch.float32)
    with pytest.raises(RuntimeError, match="k has E = 7 but q has E = 8"):
        emu.attention_fwd(q, k[..., :7], v, 1.0)
    with pytest.raises(RuntimeError, match="v has dtype Half but q has Float"):
        emu.attention_fwd(q, k, v.half(), 1.0)
    with pytest.raises(RuntimeError, match=r"lse must have shape \[1, 4\]"):
        out, lse = emu.attention_fwd(q, k, v, 1.0)
        emu.attention_bwd(out, None, q, k, v, out, lse[:, :3], 1.0)


# ---------------------------------------------------------------------------------------------
# Channel attention
# ---------------------------------------------------------------------------------------------


def _cam_input(b, c, n, dtype, scale=0.3, seed=3):
    """Post-ReLU-like features [B, C, N], as the strided view of a [B, N, C] tensor."""
    x = torch.randn(b, n, c, generator=torch.Generator().manual_seed(seed)).transpose(1, 2)
    return (torch.relu(x) * scale + 0.01 * x).to(dtype)


def _check_cam(emu, x, official):
    run = helpers.emulated_cam(emu)
    y, grad_x = helpers.check_cam_backend(run, x, official)
    assert y.is_contiguous()
    assert run.attn.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    return y, run.attn, grad_x


@pytest.mark.parametrize("official", [True, False], ids=["official", "paper"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("b, c, n", [(2, 37, 130), (1, 64, 37), (1, 5, 1), (1, 70, 2100)])
def test_channel_attention_matches_reference(emu, b, c, n, dtype, official):
    _, attn, _ = _check_cam(emu, _cam_input(b, c, n, dtype), official)
    torch.testing.assert_close(attn.sum(-1), torch.ones(b, c), rtol=0, atol=1e-5)


@pytest.mark.parametrize("official", [True, False], ids=["official", "paper"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=["bf16", "fp64"])
def test_channel_attention_other_dtypes(emu, dtype, official):
    _check_cam(emu, _cam_input(2, 37, 130, dtype), official)


def test_channel_attention_fp16_gram_beyond_fp16_range(emu):
    """Post-ReLU features whose Gram matrix (~1e5) overflows fp16: accumulated in fp32, finite."""
    x = _cam_input(1, 8, 3000, torch.float16, scale=8.0)
    assert torch.bmm(x.float(), x.float().transpose(1, 2)).max() > 65504
    y, attn, grad_x = _check_cam(emu, x, True)
    assert torch.isfinite(attn).all() and torch.isfinite(y).all()


# ---------------------------------------------------------------------------------------------
# Schedules: a missing barrier changes results between thread orders
# ---------------------------------------------------------------------------------------------

SCHEDULES = [("forward", 0), ("reverse", 0), ("random", 1), ("random", 2)]


def _under_each_schedule(emu, fn):
    results = []
    try:
        for name, seed in SCHEDULES:
            emu.set_schedule(name, seed)
            results.append(fn())
    finally:
        emu.set_schedule("forward", 0)
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=["fp32", "fp16", "fp64"])
def test_every_kernel_is_schedule_independent(emu, dtype):
    """Attention forward/backward (4 kernels) and CAM forward/backward (5 kernels), on ragged
    shapes with several blocks, give bitwise-identical results under every schedule."""
    q, k, v = _attention_inputs(2, 45, 70, 20, 80, dtype)
    x = _cam_input(2, 37, 90, dtype)

    def run():
        attention = _emulated_attention(emu, q, k, v, 0.4)
        y, attn = emu.channel_attention_fwd(x, True)
        return (*attention, y, attn, emu.channel_attention_bwd(torch.ones_like(y), x, attn, True))

    results = _under_each_schedule(emu, run)
    for (name, seed), result in zip(SCHEDULES[1:], results[1:]):
        for i, (a, b) in enumerate(zip(results[0], result)):
            assert torch.equal(a, b), f"output {i} differs between the forward and the {name}({seed}) schedule"


def test_schedules_expose_a_missing_barrier(emu):
    """The racy kernel reads its neighbour's shared-memory slot without __syncthreads: the
    schedules disagree. With the barrier they agree, and on the right answer."""
    x = torch.arange(1, 65, dtype=torch.float32)
    racy = _under_each_schedule(emu, lambda: emu.racy_neighbour(x, False))
    assert any(not torch.equal(racy[0], r) for r in racy[1:])
    fixed = _under_each_schedule(emu, lambda: emu.racy_neighbour(x, True))
    for r in fixed:
        assert torch.equal(r, torch.roll(x, -1))


# ---------------------------------------------------------------------------------------------
# Fragment-level primitives (csrc/cuda/warp.cuh): a planted layout bug fails the self-tests
# ---------------------------------------------------------------------------------------------


def test_planted_fragment_layout_bug_fails_the_selftests(tmp_path):
    """tests/emu/selftest.cpp builds mma fragments from explicit matrices by the layout written
    in csrc/cuda/warp.cuh. Built with -DSIMT_PLANT_FRAGMENT_BUG=1 (the emulator's mma swaps the
    roles of A's registers a[1] and a[2]) its mma checks fail, and only those: the layout, not
    the build, is what they detect. ctest runs the build without the bug, which passes."""
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no C++ compiler ({cxx})")
    exe = tmp_path / "selftest_planted_fragment_bug"
    source = os.path.join(emulator.EMU_DIR, "selftest.cpp")
    build = [cxx, "-std=c++20", "-O1", "-DSIMT_PLANT_FRAGMENT_BUG=1", "-I", emulator.EMU_DIR, source, "-o", str(exe)]
    compiled = subprocess.run(build, capture_output=True, text=True, timeout=600)
    assert compiled.returncode == 0, compiled.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    failures = [line for line in run.stdout.splitlines() if line.startswith("FAIL")]
    assert run.returncode != 0, run.stdout
    assert any("fp16 mma:" in line for line in failures) and any("bf16 mma:" in line for line in failures), run.stdout
    assert all("mma" in line for line in failures), run.stdout
