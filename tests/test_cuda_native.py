"""The native CUDA ops (csrc/cuda) as the extension registers them.

Here without a GPU: the build carries the CUDA kernels (CI builds with ATTNSEG_FORCE_CUDA=1 and
sets ATTNSEG_REQUIRE_CUDA_BUILD=1, so a build that silently dropped them fails). The kernels'
arithmetic is tested on the CPU through the SIMT emulator (test_cuda_emulated.py); the tests
below that need a device skip with "needs a CUDA GPU".
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import attnseg
import helpers
from attnseg import _ops, reference

OPS = ("attention_fwd", "attention_bwd", "channel_attention_fwd", "channel_attention_bwd")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_cuda_build = pytest.mark.skipif(
    not _ops.native_cuda_built() and os.environ.get("ATTNSEG_REQUIRE_CUDA_BUILD") != "1",
    reason="attnseg was built without its CUDA kernels (no nvcc or a CPU-only torch at build time)",
)


@pytest.mark.requires_native
@needs_cuda_build
@pytest.mark.parametrize("op", OPS)
def test_cuda_kernels_are_registered(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"attnseg::{op}", "CUDA"), (
        f"attnseg::{op} has no CUDA kernel: the extension was built without csrc/cuda"
    )


@pytest.mark.requires_native
@needs_cuda_build
def test_native_backend_is_offered_on_cuda_exactly_when_a_device_is_there():
    reason = attnseg.available_backends("cuda")["native"]
    if torch.cuda.is_available():
        assert reason is None
        assert attnseg.resolve_backend("native", "cuda") == "native"
    else:  # built in, but nothing to run on: never reported as available
        assert "no CUDA device is available" in reason
        with pytest.raises(attnseg.BackendUnavailableError, match="no CUDA device"):
            attnseg.resolve_backend("native", "cuda")


# ---- on a GPU ---------------------------------------------------------------------------------


@needs_gpu
@needs_cuda_build
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("nq, nk, e, ev", [(37, 130, 16, 96), (130, 37, 64, 512), (1, 1, 64, 64)])
def test_cuda_attention_matches_reference(nq, nk, e, ev, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, n, w, device="cuda", generator=g).to(dtype) for n, w in ((nq, e), (nk, e), (nk, ev)))
    scale = 1 / math.sqrt(e)

    def run(fn, *inputs):
        inputs = [t.detach().clone().requires_grad_() for t in inputs]
        out, lse = fn(*inputs, scale)
        go = torch.ones_like(out)
        return (out, lse, *torch.autograd.grad(out, inputs, go))

    native = run(torch.ops.attnseg.attention_fwd, q, k, v)
    ref64 = run(reference.attention_with_lse, q.double(), k.double(), v.double())
    same = run(reference.attention_with_lse, q, k, v)
    logits = (q.double() @ k.double().transpose(1, 2)).abs().max().item() * scale
    for name, a, r, s in zip(("out", "lse", "dq", "dk", "dv"), native, ref64, same):
        helpers.assert_matches_reference(name, a.cpu(), r.cpu(), s.cpu(), reduction=max(nk, ev),
                                         logit_max=logits if name.startswith("d") else 0.0)


@needs_gpu
@needs_cuda_build
@pytest.mark.parametrize("variant", ["official", "paper"])
def test_cuda_position_and_channel_modules(variant):
    torch.manual_seed(0)
    x = torch.randn(2, 32, 9, 11, device="cuda")
    pairs = [
        (attnseg.PositionAttention(32, backend="native"), attnseg.PositionAttention(32, backend="reference")),
        (attnseg.ChannelAttention(variant=variant, backend="native"),
         attnseg.ChannelAttention(variant=variant, backend="reference")),
    ]
    for native, ref in pairs:
        native, ref = native.cuda(), ref.cuda()
        with torch.no_grad():
            native.gamma.fill_(0.5)
        ref.load_state_dict(native.state_dict())
        torch.testing.assert_close(native(x), ref(x), rtol=1e-4, atol=1e-4)
