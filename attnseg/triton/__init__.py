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
import itertools
import math
import os

import torch

from . import tuned

__all__ = [
    "LazyKernel",
    "check_dtype",
    "configs",
    "dot_precision",
    "interpreting",
    "launch",
    "make_prune",
    "pow2",
    "unavailable_reason",
]


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
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction

        return isinstance(tl.standard.max, InterpretedFunction)
    except (ImportError, AttributeError):  # another triton layout: trust the flag
        return interpreting()


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
        flag = os.environ.get("TRITON_INTERPRET")
        mode = "compiled" if interpret else "interpreter"
        return (
            f"TRITON_INTERPRET is {flag!r} now but triton was imported in {mode} mode; Triton decorates "
            "its standard library when imported, so set (or unset) TRITON_INTERPRET=1 before importing triton"
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
        self.configs = _unique(configs) if configs is not None else None
        self.interpreter_config = interpreter_config
        self.key = list(key)
        self.prune = prune
        self._built: dict[bool, object] = {}
        self._compiled_jit = None

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
        """A compiled-mode ``JITFunction`` of the kernel, whatever the mode (for ahead-of-time compiles)."""
        if self._compiled_jit is None:
            from triton.runtime.jit import JITFunction

            self._compiled_jit = JITFunction(self.fn)
        return self._compiled_jit


def _is_traced(arg) -> bool:
    """A fake, functional or meta tensor: shapes only, no data for an interpreted kernel to read."""
    if not isinstance(arg, torch.Tensor):
        return False
    from torch._subclasses.fake_tensor import is_fake
    from torch._subclasses.functional_tensor import FunctionalTensor

    return arg.device.type == "meta" or is_fake(arg) or isinstance(arg, FunctionalTensor)


def _interpreter_multiplies_bf16() -> bool:
    """Whether the interpreter's tl.dot gives 1 · 1 = 1 for bf16 (triton 3.8.0's does not)."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime.interpreter import TensorHandle, interpreter_builder

        one = TensorHandle(np.full((1, 1), 0x3F80, dtype=np.uint16), tl.bfloat16)  # 1.0 in bf16 bits
        acc = TensorHandle(np.zeros((1, 1), dtype=np.float32), tl.float32)
        return float(interpreter_builder.create_dot(one, one, acc, None, 0).data[0, 0]) == 1.0
    except Exception:
        return False


def check_dtype(fn: str, dtype: torch.dtype) -> None:
    """Refuse bf16 under an interpreter without bf16 arithmetic rather than return garbage."""
    if dtype == torch.bfloat16 and interpreting() and not _interpreter_multiplies_bf16():
        raise NotImplementedError(
            f"{fn}: the Triton interpreter (TRITON_INTERPRET=1) has no bfloat16 tl.dot (it keeps bf16 "
            "as uint16 bits); use float16 or float32 on the CPU, or run on a GPU"
        )


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


# ---------------------------------------------------------------------------------------------
# Shared by the kernels' launchers
# ---------------------------------------------------------------------------------------------


def pow2(n: int, minimum: int = 16) -> int:
    """n rounded up to a power of two, at least ``minimum`` (every side of a tl.dot is >= 16)."""
    n = max(int(n), 1)
    return max(minimum, 1 << (n - 1).bit_length())


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision for fp32 operands: IEEE unless torch allows TF32 for matmuls."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def configs(num_warps, num_stages, **blocks):
    """``triton.Config`` for every combination of the block sizes, warps and stages given."""
    import triton

    names = list(blocks)
    return [
        triton.Config(dict(zip(names, values)), num_warps=w, num_stages=s)
        for values in itertools.product(*(blocks[n] for n in names))
        for w in num_warps
        for s in num_stages
    ]


def _unique(config_list):
    seen, unique = set(), []
    for c in config_list:
        key = (tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages)
        if key not in seen:
            seen.add(key)
            unique.append(c)
    return unique


def device_limits(device: torch.device) -> tuple[int, int]:
    """(shared memory a block may use, in bytes (opt-in maximum); compute capability major)."""
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", props.shared_memory_per_block), props.major


# tl.dot on fp32 operands with input_precision="ieee", and on fp64, runs on FMA units rather than
# tensor cores and needs far smaller tiles: compiled for sm_80, ptxas spilled (or fell back to
# 32 registers and kilobytes of stack) beyond about 44 live tile elements a thread, at 4 warps
# for most tile shapes, and with 3 pipeline stages for the backward kernels.
_FMA_BUDGET = 44
_FMA_WARPS = 8
_FMA_STAGES = 2
# Before Hopper (no wgmma) mma.sync keeps both operands and the accumulator in registers: on
# sm_80 the tensor-core budgets that fit sm_90 spilled, 0.6 of them did not.
_PRE_HOPPER_BUDGET_SCALE = 0.6
# At most this many measured-clean configs per launch (calibration.py), to bound autotuning time.
_MAX_CALIBRATED = 16


def _dot_uses_fma(dtype: torch.dtype, precision: str) -> bool:
    return dtype == torch.float64 or (dtype == torch.float32 and precision == "ieee")


def _calibrated_clean(calibration, args: dict, major: int, dtype: torch.dtype) -> dict | None:
    """{config signature: shared bytes} of the configs that compiled without spilling for this
    launch's kernel, mode and tile widths on this architecture class, or None where no table
    covers the launch (see :mod:`attnseg.triton.calibration`)."""
    from .calibration import CLEAN_CONFIGS, dtype_name

    name = dtype_name(dtype, args["DOT_PRECISION"])
    arch = 90 if major >= 9 else 80 if major == 8 else None
    if calibration is None or name is None or arch is None:
        return None
    key = calibration(args)
    if not specialises_as_calibrated(key[0], args):
        return None
    return CLEAN_CONFIGS.get((arch, name, *key))


def specialises_as_calibrated(kernel_name: str, args: dict) -> bool:
    """Whether a launch of ``kernel_name`` with these named arguments compiles to the code the
    calibration sweep measured. Triton specialises integer arguments equal to 1 or divisible by
    16; a launch whose classes differ from the swept one's (N = 9409 instead of 9216: strides of
    9409) compiles to other code, which can spill where the table's did not."""
    from .calibration import INT_CLASSES, int_class

    swept = INT_CLASSES.get(kernel_name)
    return swept is not None and all(int_class(v) == swept.get(k) for k, v in args.items() if type(v) is int)


def config_signature(config) -> tuple:
    """A config as the calibration table names it: (sorted block sizes, warps, stages)."""
    return (tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages)


def make_prune(shared_bytes, live_elements, budget: int, caps, operand: str, calibration=None):
    """An ``early_config_prune`` for ``@triton.autotune``.

    ``calibration(args) -> tuple`` names the launch in :data:`attnseg.triton.calibration.CLEAN_CONFIGS`
    (kernel, mode flags, tile widths). Where the table covers the launch (sm_8x / sm_9x+, a swept
    dtype, the calibrated kernel mode and widths) it replaces the estimates of (2) and (3): a config
    is kept iff it compiled there without spilling and its measured shared memory fits the device.
    Elsewhere the estimates below decide.

    Keeps the configs (1) whose block sizes do not exceed ``caps(args)`` (block name -> largest
    useful size for the problem, e.g. Ev rounded up to a power of two), (2) whose estimated
    shared memory ``shared_bytes(block, stages, args)`` fits the device, and (3) whose live tile
    elements ``live_elements(block, args)`` per thread stay within ``budget`` (tensor-core dots on
    sm_90; 0.6 of it before sm_90) or ``_FMA_BUDGET`` at 8 warps and 2 stages (fp32-IEEE and
    fp64 dots). The budgets are fitted to the registers and spills of every config compiled for
    sm_90 and sm_80 at DANet sizes (``python tests/test_triton.py [arch] [dtype] [N]`` prints them;
    the calibration table above is written by ``python benchmarks/kernel_report.py --triton-all
    --write-triton-calibration``: docs/triton.md). If nothing is left, the config with the
    smallest tiles is kept. ``operand`` names the kernel argument whose dtype the dots take.
    """

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        limit, major = device_limits(args[operand].device)
        largest = caps(args)
        fma = _dot_uses_fma(args[operand].dtype, args["DOT_PRECISION"])
        tile_budget = _FMA_BUDGET if fma else budget * (1.0 if major >= 9 else _PRE_HOPPER_BUDGET_SCALE)
        clean = _calibrated_clean(calibration, args, major, args[operand].dtype)
        kept = []
        for config in configs:
            block = config.kwargs
            if any(block[name] > size for name, size in largest.items()):
                continue
            if clean is not None:  # measured: kept iff it compiled clean and its shared memory fits
                shared = clean.get(config_signature(config))
                if shared is not None and shared <= limit:
                    kept.append(config)
                continue
            if shared_bytes(block, config.num_stages, args) > limit:
                continue
            live = live_elements(block, args) / (32 * config.num_warps)
            if live > tile_budget:
                continue
            if fma and (config.num_warps != _FMA_WARPS or config.num_stages != _FMA_STAGES):
                continue
            kept.append(config)
        if clean is not None and len(kept) > _MAX_CALIBRATED:
            # every kept config is compiled and timed by the first autotuned call: the largest tiles
            # (FA2's 128x64 and up; smaller problems are capped above), deepest pipelines first
            kept = sorted(kept, key=lambda c: (-math.prod(c.kwargs.values()), -c.num_stages, c.num_warps))
            kept = kept[:_MAX_CALIBRATED]
        if calibration is not None and kept:
            # a config benchmarks/gpu_check.py measured best on this GPU (attnseg/triton/tuned): no autotuning
            kept = tuned.narrow(kept, calibration(args)[0], args, args[operand].device)
        if not kept:
            kept = [min(configs, key=lambda c: (live_elements(c.kwargs, args) / c.num_warps, c.num_stages))]
        return kept

    return prune
