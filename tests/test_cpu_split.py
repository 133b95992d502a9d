"""The fp32 CPU kernels' split for the thread count (csrc/cpu/schedule.h).

The forward takes smaller query blocks and splits the keys into parts whose (out, lse) are
combined; the backward splits each chunk's rows into parts. ``ATTNSEG_CPU_PLAN_THREADS`` runs the
split planned for another thread count here, so every split path is checked on any machine.
"""

from __future__ import annotations

import math

import pytest
import torch

import attnseg  # noqa: F401  (loads the ops)
import helpers

pytestmark = pytest.mark.requires_native

PLAN = "ATTNSEG_CPU_PLAN_THREADS"


def _plan(b, nq, nk, e, ev, threads):
    names = ("block_m", "key_parts", "fwd_idle", "fwd_idle_unsplit", "row_parts", "bwd_idle", "bwd_idle_unsplit")
    return dict(zip(names, torch.ops.attnseg.cpu_attention_plan(b, nq, nk, e, ev, threads)))


def _channel_first(b, n, width, g, scale=1.0):
    return (scale * torch.randn(b, width, n, generator=g)).transpose(1, 2)


def _own_f32_kernel_or_skip():
    caps = torch.backends.cpu.get_cpu_capability()
    if caps not in ("AVX2", "AVX512"):
        pytest.skip(f"the split is the fp32 kernels' on AVX2/AVX-512; this CPU's capability is {caps}")


@pytest.mark.parametrize("threads", [16, 64])
def test_modelled_idle_at_most_an_eighth_for_a_danet_crop(threads):
    """At B = 1, N = 9,216 (a 768 crop), E = 64, Ev = 512, the modelled idle share of the forward and
    of the backward is at most 1/8 at 16 and 64 threads, where the unsplit kernels' is above it."""
    plan = _plan(1, 9216, 9216, 64, 512, threads)
    assert plan["fwd_idle"] <= 1 / 8 and plan["bwd_idle"] <= 1 / 8, plan
    assert plan["fwd_idle_unsplit"] > 1 / 8 and (threads == 16 or plan["bwd_idle_unsplit"] > 1 / 8), plan


@pytest.mark.parametrize("threads", [1, 2])
def test_few_threads_keep_the_unsplit_kernels(threads):
    """On one or two threads nothing is split: 256-query blocks, the keys whole, one row part."""
    plan = _plan(1, 9216, 9216, 64, 512, threads)
    assert (plan["block_m"], plan["key_parts"], plan["row_parts"]) == (256, 1, 1), plan


# (shape, plan threads): each takes another split (forward query block / key parts; backward row parts)
SPLITS = [((1, 700, 1100, 64, 96), 5), ((2, 1300, 1029, 17, 70), 16), ((1, 2048, 777, 16, 48), 64)]


@pytest.mark.parametrize("shape, threads", SPLITS, ids=["128q-4parts-2rows", "64q-2parts-4rows", "128q-4parts-4rows"])
def test_split_kernels_match_reference(monkeypatch, shape, threads):
    """Each split meets the fp32 criterion against fp64 (forward, lse and all gradients, with a
    gradient into lse), on ragged query blocks, ragged key parts and ragged row parts."""
    _own_f32_kernel_or_skip()
    b, nq, nk, e, ev = shape
    plan = _plan(b, nq, nk, e, ev, threads)
    assert plan["key_parts"] > 1 and plan["block_m"] < 256 and plan["row_parts"] > 1, plan
    monkeypatch.setenv(PLAN, str(threads))
    g = torch.Generator().manual_seed(2)
    q, k, v = _channel_first(b, nq, e, g), _channel_first(b, nk, e, g), _channel_first(b, nk, ev, g)
    run = helpers.autograd_attention(lambda *a: torch.ops.attnseg.attention_fwd(*a))
    helpers.check_attention_backend(run, q, k, v, e ** -0.5)


def test_key_parts_combine_special_values(monkeypatch):
    """With the keys in 4 parts: a part whose logits are all -inf takes no weight (not 0 · NaN), a
    NaN logit poisons its query, a +inf logit gives NaN out and lse = +inf, and a query whose
    logits are all -inf has NaN out and lse = -inf, as in the reference."""
    _own_f32_kernel_or_skip()
    assert _plan(1, 70, 1100, 4, 9, 5)["key_parts"] == 4
    monkeypatch.setenv(PLAN, "5")
    g = torch.Generator().manual_seed(9)
    q = (_channel_first(1, 70, 4, g).abs() + 0.1).contiguous()
    k = _channel_first(1, 1100, 4, g).contiguous()
    v = _channel_first(1, 1100, 9, g)
    k[0, :256, :] = -math.inf       # the first key part's logits all -inf for every query (q > 0)
    q[0, 3, :] = math.nan           # a NaN query
    q[0, 7, 0] = math.inf           # +inf logits in every part where k[:, 0] > 0
    q[0, 9, :] = -0.0
    q[0, 9, 0] = 1.0                # query 9 sees -inf logits only where k[:, 0] = -inf ...
    k[0, 256:, 0] = k[0, 256:, 0].abs() + 0.5
    q[0, 11, :] = 0.0
    q[0, 11, 0] = -math.inf         # ... query 11 all -inf logits outside part 0 too, NaN inside
    out, lse = torch.ops.attnseg.attention_fwd(q, k, v, 1.0)
    s = q.double() @ k.double().transpose(1, 2)
    expected_out = torch.softmax(s, -1) @ v.double()
    expected_lse = torch.logsumexp(s, -1)
    for name, got, want in (("out", out, expected_out), ("lse", lse, expected_lse)):
        for test in (torch.isnan, torch.isposinf, torch.isneginf):
            assert torch.equal(test(got), test(want)), f"{name}: {test.__name__} pattern differs"
        finite = torch.isfinite(want)
        torch.testing.assert_close(got[finite], want[finite].float(), rtol=1e-5, atol=1e-5)


def test_deterministic_algorithms_make_the_split_the_one_thread_one(monkeypatch):
    """Under torch.use_deterministic_algorithms(True) the plan is the one-thread plan whatever the
    thread count, so the results' bits are the shape's alone; without it a split changes the
    order of the sums (the test would see a difference: it can tell the two apart)."""
    _own_f32_kernel_or_skip()
    shape, threads = SPLITS[1]
    b, nq, nk, e, ev = shape
    g = torch.Generator().manual_seed(4)
    q, k, v = _channel_first(b, nq, e, g), _channel_first(b, nk, e, g), _channel_first(b, nk, ev, g)
    grad = torch.randn(b, nq, ev, generator=g)

    def run(plan_threads):
        monkeypatch.setenv(PLAN, str(plan_threads))
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out, _ = torch.ops.attnseg.attention_fwd(*leaves, 0.25)
        return (out, *torch.autograd.grad(out, leaves, grad))

    split, unsplit = run(threads), run(1)
    assert not all(torch.equal(a, c) for a, c in zip(split, unsplit))
    assert all(torch.equal(a, c) for a, c in zip(split, run(threads))), "a split is not bitwise repeatable"
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert all(torch.equal(a, c) for a, c in zip(run(threads), unsplit))
    finally:
        torch.use_deterministic_algorithms(deterministic)


@pytest.mark.parametrize("value", ["0", "many", "-3", "5000"])
def test_plan_threads_errors_are_clear(monkeypatch, value):
    _own_f32_kernel_or_skip()
    monkeypatch.setenv(PLAN, value)
    g = torch.Generator().manual_seed(0)
    q = _channel_first(1, 300, 8, g)
    with pytest.raises(RuntimeError, match=f"ATTNSEG_CPU_PLAN_THREADS must be an integer from 1 to 4096.*got '{value}'"):
        torch.ops.attnseg.attention_fwd(q, q, q, 1.0)


def test_plan_op_checks_its_sizes():
    with pytest.raises(RuntimeError, match="every size and the thread count must be >= 1"):
        torch.ops.attnseg.cpu_attention_plan(1, 0, 10, 8, 8, 4)
