"""Loading of the compiled extension, fake (meta) kernels and autograd wiring for attnseg ops.

Every fused op comes as a forward/backward pair of custom ops:

    attnseg::attention_fwd(q[B,Nq,E], k[B,Nk,E], v[B,Nk,Ev], float scale) -> (out[B,Nq,Ev], lse[B,Nq])
    attnseg::attention_bwd(grad_out, grad_lse?, q, k, v, out, lse, scale) -> (dq, dk, dv)
    attnseg::channel_attention_fwd(x[B,C,N], bool official) -> (y[B,C,N], attn[B,C,C])
    attnseg::channel_attention_bwd(grad_y, x, attn, bool official) -> grad_x

``lse`` and ``attn`` are float64 for float64 inputs and float32 otherwise. Autograd is
registered once here (``register_attention_autograd`` / ``register_channel_autograd``), and the
Triton backend registers its ops through the same two functions.
"""

from __future__ import annotations

import os
import warnings

import torch

_native_error: str | None = None
try:  # the compiled library registers torch.ops.attnseg.* as a side effect of loading
    from . import _C  # noqa: F401
except Exception as exc:  # ImportError, or OSError for a library built against another torch
    _native_error = f"{type(exc).__name__}: {exc}"
    if os.environ.get("ATTNSEG_QUIET") != "1":
        warnings.warn(
            "attnseg: the compiled extension attnseg._C could not be loaded, so the 'native' "
            f"backend is unavailable and 'auto' uses the reference backend. Reason: {_native_error}. "
            "Rebuild against the installed torch with `pip install --no-build-isolation .`.",
            RuntimeWarning,
            stacklevel=2,
        )


def native_available() -> bool:
    return _native_error is None


def native_unavailable_reason() -> str | None:
    return _native_error


def native_cuda_built() -> bool:
    """Whether attnseg._C carries its CUDA kernels (TORCH_LIBRARY_IMPL(attnseg, CUDA)). They are
    compiled in when the build finds nvcc and a CUDA build of torch (see setup.py); no GPU is
    needed for this to be true."""
    return native_available() and all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"attnseg::{op}", "CUDA")
        for op in ("attention_fwd", "attention_bwd", "channel_attention_fwd", "channel_attention_bwd")
    )


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Autograd, shared by every backend's op pair.
# ---------------------------------------------------------------------------------------------


def register_attention_autograd(fwd_name: str, bwd_op) -> None:
    """Wire ``fwd_name`` (q, k, v, scale) -> (out, lse) to ``bwd_op`` for autograd."""

    def setup_context(ctx, inputs, output):
        q, k, v, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale

    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv = bwd_op(grad_out, grad_lse, q, k, v, out, lse, ctx.scale)
        return dq, dk, dv, None

    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)


def register_channel_autograd(fwd_name: str, bwd_op) -> None:
    """Wire ``fwd_name`` (x, official) -> (y, attn) to ``bwd_op`` for autograd.

    ``attn`` is treated as non-differentiable (it is returned for the backward only).
    """

    def setup_context(ctx, inputs, output):
        x, official = inputs
        _, attn = output
        ctx.save_for_backward(x, attn)
        ctx.official = official
        ctx.mark_non_differentiable(attn)

    def backward(ctx, grad_y, grad_attn):
        x, attn = ctx.saved_tensors
        if grad_y is None:
            return None, None
        return bwd_op(grad_y, x, attn, ctx.official), None

    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)


# ---------------------------------------------------------------------------------------------
# Fake kernels for the native ops (torch.compile, opcheck).
# ---------------------------------------------------------------------------------------------

if native_available():

    @torch.library.register_fake("attnseg::attention_fwd")
    def _attention_fwd_fake(q, k, v, scale):
        b, nq, _ = q.shape
        out = q.new_empty((b, nq, v.shape[-1]))
        lse = q.new_empty((b, nq), dtype=_lse_dtype(q.dtype))
        return out, lse

    @torch.library.register_fake("attnseg::attention_bwd")
    def _attention_bwd_fake(grad_out, grad_lse, q, k, v, out, lse, scale):
        # the kernels return gradients in the inputs' layouts (torch.empty_like's rules)
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    @torch.library.register_fake("attnseg::channel_attention_fwd")
    def _channel_attention_fwd_fake(x, official):
        b, c, _ = x.shape
        return x.new_empty(x.shape), x.new_empty((b, c, c), dtype=_lse_dtype(x.dtype))

    @torch.library.register_fake("attnseg::channel_attention_bwd")
    def _channel_attention_bwd_fake(grad_y, x, attn, official):
        return x.new_empty(x.shape)

    register_attention_autograd("attnseg::attention_fwd", torch.ops.attnseg.attention_bwd)
    register_channel_autograd("attnseg::channel_attention_fwd", torch.ops.attnseg.channel_attention_bwd)
