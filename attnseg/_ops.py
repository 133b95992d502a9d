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

import glob
import os
import struct
import sys
import warnings

import torch

from ._fatbin import fatbin_architectures  # noqa: F401  (re-exported: attnseg._ops.fatbin_architectures)

_native_error: str | None = None


def _running_as_cli() -> bool:
    """True while ``python -m attnseg`` imports the package: its report prints the reason itself."""
    argv = list(getattr(sys, "orig_argv", []))
    return any(a == "-m" and b in ("attnseg", "attnseg.__main__") for a, b in zip(argv, argv[1:]))


def _has_extension(folder: str) -> bool:
    return bool(glob.glob(os.path.join(folder, "_C*.so")) or glob.glob(os.path.join(folder, "_C*.pyd")))


def _installed_copy_elsewhere(package_dir: str) -> str | None:
    """Another ``attnseg`` package on sys.path, with a compiled extension, than ``package_dir``."""
    source_parent = os.path.realpath(os.path.dirname(package_dir))
    for entry in sys.path:
        folder = os.path.realpath(entry or os.getcwd())
        if folder == source_parent:
            continue
        candidate = os.path.join(folder, "attnseg")
        if _has_extension(candidate):
            return candidate
    return None


def _load_failure_message(exc: BaseException) -> str:
    """What went wrong and what to do, for the usual causes of a missing attnseg._C."""
    package_dir = os.path.dirname(os.path.abspath(__file__))
    built = _has_extension(package_dir)
    source_tree = os.path.isfile(os.path.join(os.path.dirname(package_dir), "setup.py"))
    if not built and source_tree:
        installed = _installed_copy_elsewhere(package_dir)
        where = (f"the installed copy is at {installed}, but the source folder comes first on sys.path"
                 if installed else "no installed copy was found on sys.path")
        return (f"attnseg was imported from the source folder {package_dir}, which has no compiled extension "
                f"(attnseg._C); {where}. Run from another folder (Python puts the current folder or the "
                "script's folder first on sys.path), or install in place for development with "
                "`pip install -e .` (docs/develop.md)")
    if not built:
        return (f"{package_dir} has no compiled extension attnseg._C ({type(exc).__name__}: {exc}); "
                "reinstall attnseg with `pip install .` from its source")
    rebuild = "pip install --no-build-isolation -e ." if source_tree else "pip install --no-build-isolation ."
    return (f"{type(exc).__name__}: {exc}. If attnseg was built against another torch (or Python) than the one "
            f"installed ({torch.__version__}), rebuild against it: `{rebuild}`")


try:  # the compiled library registers torch.ops.attnseg.* as a side effect of loading
    from . import _C  # noqa: F401
except Exception as exc:  # ImportError, or OSError for a library built against another torch
    _native_error = _load_failure_message(exc)
    if os.environ.get("ATTNSEG_QUIET") != "1" and not _running_as_cli():
        warnings.warn(
            "attnseg: the compiled extension attnseg._C could not be loaded, so the 'native' backend is "
            f"unavailable and 'auto' uses the reference backend. {_native_error}.",
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


def check_attention_inputs(fn: str, q, k, v) -> None:
    """The guards of every attention op on direct calls (functional.py validates user input):
    3-D q, k, v of one dtype whose shapes fit q[B,Nq,E], k[B,Nk,E], v[B,Nk,Ev]."""
    torch._check(q.dim() == 3 and k.dim() == 3 and v.dim() == 3,
                 lambda: f"{fn}: q, k, v must be 3-D, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    torch._check(q.dtype == k.dtype == v.dtype, lambda: f"{fn}: dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    torch._check(q.shape[0] == k.shape[0] == v.shape[0] and q.shape[2] == k.shape[2] and k.shape[1] == v.shape[1],
                 lambda: f"{fn}: shapes do not fit q[B,Nq,E], k[B,Nk,E], v[B,Nk,Ev]: "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")


# ---------------------------------------------------------------------------------------------
# Autograd, shared by every backend's op pair.
# ---------------------------------------------------------------------------------------------


class DoubleBackwardError(RuntimeError):
    """A second-order gradient was asked of a fused op whose backward is not differentiable."""


class _FirstOrderOnly(torch.autograd.Function):
    """Identity on the gradients a fused backward returns under ``create_graph=True``.

    The fused backward kernels are not themselves differentiable (their results would have no
    grad_fn and a second-order gradient would silently be zero, or torch would fail deep inside
    an op). This node makes the gradients differentiable *on paper* and raises the moment a
    double backward reaches it, naming the op and what to use instead.
    """

    @staticmethod
    def forward(ctx, op_name: str, num_grads: int, *tensors):
        # tensors: the gradients, then the op's inputs and incoming gradients: the outputs need
        # those as inputs of this node, or autograd would not connect them to anything.
        ctx.op_name = op_name
        return tuple(g.clone() if g is not None else None for g in tensors[:num_grads])

    @staticmethod
    def backward(ctx, *unused):
        users = ("attnseg.channel_attention, ChannelAttention and DANetHead" if "channel" in ctx.op_name else
                 "attnseg.attention, position_attention and the modules on them: PositionAttention, DANetHead, "
                 "ObjectContextAttention, NonLocal2d")
        raise DoubleBackwardError(
            f"attnseg: a double backward (second-order gradient) went through {ctx.op_name} (the fused op "
            f"behind {users}), whose kernels compute first-order gradients only. For second-order gradients (gradient penalties, "
            "torch.autograd.gradgradcheck) use backend=\"reference\" on that call or module, which is "
            "differentiable twice (it materialises the attention map)."
        )


def _first_order_only(op_name: str, grads, sources):
    """``grads`` unchanged in a plain backward; under ``create_graph=True`` they are outputs of a
    :class:`_FirstOrderOnly` node over ``sources`` (what they were computed from)."""
    if not torch.is_grad_enabled():
        return grads
    return _FirstOrderOnly.apply(op_name, len(grads), *grads, *sources)


def register_attention_autograd(fwd_name: str, bwd_op) -> None:
    """Wire ``fwd_name`` (q, k, v, scale, *options) -> (out, lse) to ``bwd_op`` for autograd;
    ``bwd_op`` takes (grad_out, grad_lse, q, k, v, out, lse, scale, *options). The options are
    non-tensor arguments (the chunked op's budget)."""

    def setup_context(ctx, inputs, output):
        q, k, v, scale, *options = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        ctx.options = tuple(options)

    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        create_graph = torch.is_grad_enabled()
        with torch.no_grad():  # the kernels are not differentiable: never record them
            grads = bwd_op(grad_out, grad_lse, q, k, v, out, lse, ctx.scale, *ctx.options)
        with torch.set_grad_enabled(create_graph):
            sources = (grad_out, q, k, v) + ((grad_lse,) if grad_lse is not None else ())
            dq, dk, dv = _first_order_only(fwd_name, grads, sources)
        return (dq, dk, dv, None) + (None,) * len(ctx.options)

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
        create_graph = torch.is_grad_enabled()
        with torch.no_grad():
            grad_x = bwd_op(grad_y, x, attn, ctx.official)
        with torch.set_grad_enabled(create_graph):
            (grad_x,) = _first_order_only(fwd_name, (grad_x,), (grad_y, x))
        return grad_x, None

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


# ---------------------------------------------------------------------------------------------
# What the CUDA kernels were compiled for: read from the library's fatbinary (attnseg/_fatbin.py),
# not from the build flags, so it is what the GPU will actually find.
# ---------------------------------------------------------------------------------------------

def native_cuda_architectures() -> dict[str, list[str]] | None:
    """The GPU architectures compiled into attnseg._C (None without the extension's CUDA kernels,
    or when the library's fatbinary cannot be read)."""
    if not native_cuda_built():
        return None
    try:
        return fatbin_architectures(_C.__file__)
    except (OSError, struct.error, ValueError):
        return None


_arch_verdicts: dict[tuple[int, int], str | None] = {}


def cuda_architecture_mismatch(capability: tuple[int, int]) -> str | None:
    """None if attnseg's CUDA kernels run on a GPU of ``capability`` (SASS of the same major and a
    minor at most the device's, or PTX of at most its version to JIT), else why not."""
    if capability not in _arch_verdicts:
        archs = native_cuda_architectures()
        major, minor = capability
        if archs is None:  # unreadable: let the launch decide (CUDA names a missing image)
            verdict = None
        else:
            sass = [int(a[3:]) for a in archs["sass"]]
            ptx = [int(a[8:]) for a in archs["ptx"]]
            runs = any(a // 10 == major and a % 10 <= minor for a in sass) or any(a <= major * 10 + minor for a in ptx)
            verdict = None if runs else (
                f"attnseg's CUDA kernels were compiled for {', '.join(archs['sass'] + archs['ptx'])}, which cannot run "
                f"on this sm_{major}{minor} GPU; rebuild with TORCH_CUDA_ARCH_LIST including {major}.{minor}")
        _arch_verdicts[capability] = verdict
    return _arch_verdicts[capability]
