"""Triton backend: fused attention (:mod:`.attention`) and channel attention (:mod:`.channel_attention`).

The kernels run on CUDA tensors, and on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``, numpy underneath: slow, for tests). Triton reads that flag when it
decorates a function, and it decorates its own standard library (``tl.max``, ``tl.sum``, ...)
when ``triton`` is first imported. So the flag must be set before ``triton`` is imported, and
our kernels are decorated on first use (:class:`LazyKernel`), in the mode current at that
moment, rather than when this package is imported.

Importing this package does not import ``triton``; :func:`unavailable_reason` says whether the
backend can run, and never raises.
"""

from __future__ import annotations

import importlib
import os

import torch

__all__ = ["LazyKernel", "interpreting", "launch", "unavailable_reason"]


def interpreting() -> bool:
    """Whether Triton kernels run in the interpreter (``TRITON_INTERPRET=1``), read now."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_import_error() -> str | None:
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception as exc:  # ImportError, or a broken installation
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


def _triton_imported_interpreted() -> bool:
    """Whether ``triton`` decorated its standard library for the interpreter at import."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.standard.max, InterpretedFunction)


def unavailable_reason(device: torch.device | str) -> str | None:
    """``None`` if the Triton kernels can run on tensors of ``device``, else the reason why not.

    CUDA devices need an importable ``triton`` and a visible GPU; CPU tensors need
    ``TRITON_INTERPRET=1`` (checked now, at call time) set before ``triton`` was imported.
    """
    device = torch.device(device)
    if device.type not in ("cuda", "cpu"):
        return f"no Triton kernels for device type {device.type!r}"
    error = _triton_import_error()
    if error is not None:
        return error
    interpret = interpreting()
    if interpret != _triton_imported_interpreted():
        now, then = ("set", "unset") if interpret else ("unset", "set")
        return (
            f"TRITON_INTERPRET=1 is {now} now but was {then} when triton was imported; Triton "
            "decorates its standard library at import, so set or unset the flag before importing triton"
        )
    if device.type == "cpu":
        if not interpret:
            return (
                "Triton kernels run on CPU tensors only under the interpreter: set "
                "TRITON_INTERPRET=1 before importing triton (slow; meant for tests)"
            )
        return None
    if not interpret and not torch.cuda.is_available():
        return "CUDA is not available to torch"
    return None


class LazyKernel:
    """A Triton kernel decorated on first use, in the mode (compiled or interpreted) current then.

    Args:
        fn: the plain Python kernel function (not decorated).
        configs: ``triton.Config`` list for ``@triton.autotune`` on a GPU, or ``None`` for a
            plain ``@triton.jit`` kernel.
        interpreter_config: the single config used under the interpreter, where autotuning
            only costs time.
        key, prune: autotune key (argument names) and ``early_config_prune`` filter.
    """

    def __init__(self, fn, *, configs=None, interpreter_config=None, key=(), prune=None):
        self.fn = fn
        self.configs = configs
        self.interpreter_config = interpreter_config
        self.key = list(key)
        self.prune = prune
        self._built: dict[bool, object] = {}

    @property
    def __name__(self) -> str:
        return self.fn.__name__

    def get(self):
        """The kernel for the current mode: a ``JITFunction``/``InterpretedFunction``, maybe autotuned."""
        mode = interpreting()
        kernel = self._built.get(mode)
        if kernel is None:
            import triton

            kernel = triton.jit(self.fn)  # reads TRITON_INTERPRET now
            if mode and self.interpreter_config is not None:
                kernel = triton.autotune([self.interpreter_config], key=[])(kernel)
            elif not mode and self.configs is not None:
                prune = {"early_config_prune": self.prune} if self.prune is not None else None
                kernel = triton.autotune(self.configs, key=self.key, prune_configs_by=prune)(kernel)
            self._built[mode] = kernel
        return kernel

    def compiled_jit_function(self):
        """A compiled-mode ``JITFunction`` of the kernel (for ahead-of-time compile checks)."""
        from triton.runtime.jit import JITFunction

        return JITFunction(self.fn)


def _is_traced(arg) -> bool:
    """A fake, functional or meta tensor: shapes only, no data for an interpreted kernel to read."""
    if not isinstance(arg, torch.Tensor):
        return False
    from torch._subclasses.fake_tensor import is_fake
    from torch._subclasses.functional_tensor import FunctionalTensor

    return arg.device.type == "meta" or is_fake(arg) or isinstance(arg, FunctionalTensor)


def launch(kernel: LazyKernel, grid, *args, **kwargs) -> None:
    """Launch ``kernel`` through ``torch.library.wrap_triton`` (so torch.compile can trace it).

    Interpreted kernels cannot be traced: when the op runs on fake tensors (its fake kernel is
    the op body itself), the launch is skipped and only the output allocation counts.
    """
    from torch.library import wrap_triton

    triton_kernel = kernel.get()
    if interpreting() and any(_is_traced(a) for a in args):
        return
    wrap_triton(triton_kernel)[grid](*args, **kwargs)
