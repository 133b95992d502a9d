"""Property-based tests (hypothesis): drawn shapes, strides and values, every backend against
the fp64 reference, forward and all gradients.

Drawn: B; Nq, Nk and C from 1 up, biased to primes and to sizes just below, at and above every
kernel's tiles (helpers.EDGE_SIZES); E, Ev (helpers.WIDTHS); the layout of each input
(contiguous, channel-first, sliced with no unit stride, batch-major); the softmax scale (0 for
uniform attention up to nearly one-hot rows); the values' seed.

Profiles (set with ATTNSEG_HYPOTHESIS_PROFILE; registered in conftest.py):
  ci        (default) derandomized, a bounded number of examples: the same cases on every run
  thorough  random, many more examples, for a run by hand (counts in README.md)
The emulated-CUDA tests draw smaller shapes and fewer examples: the emulator runs each CUDA
thread as a fiber. The Triton backend's property tests live in test_triton.py (they must run in
its TRITON_INTERPRET=1 subprocess).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

import emulator
import helpers
from conftest import examples

attention_cases, cam_cases = helpers.hypothesis_strategies()


_native_attention = helpers.autograd_attention(lambda *a: torch.ops.attnseg.attention_fwd(*a))
_native_cam = helpers.autograd_cam(lambda *a: torch.ops.attnseg.channel_attention_fwd(*a))


@pytest.mark.requires_native
@settings(max_examples=examples(100))
@given(case=attention_cases())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
def test_native_attention_matches_reference(case, dtype):
    result = helpers.check_attention_backend(_native_attention, *helpers.attention_case_inputs(case, dtype),
                                             case["scale"])
    assert result[0].is_contiguous()


@pytest.mark.requires_native
@settings(max_examples=examples(100))
@given(case=cam_cases())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_native_channel_attention_matches_reference(case, dtype):
    helpers.check_cam_backend(_native_cam, helpers.cam_case_input(case, dtype), case["official"])


@pytest.fixture(scope="module")
def emu():
    return emulator.load()


@pytest.mark.emulator
@settings(max_examples=examples(25))
@given(case=attention_cases(max_n=97, max_width=65, max_batch=2))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_emulated_cuda_attention_matches_reference(emu, case, dtype):
    helpers.check_attention_backend(helpers.emulated_attention(emu), *helpers.attention_case_inputs(case, dtype), case["scale"])


@pytest.mark.emulator
@settings(max_examples=examples(25))
@given(case=cam_cases(max_c=70, max_n=129))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_emulated_cuda_channel_attention_matches_reference(emu, case, dtype):
    helpers.check_cam_backend(helpers.emulated_cam(emu), helpers.cam_case_input(case, dtype), case["official"])
