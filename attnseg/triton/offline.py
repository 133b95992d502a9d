"""Ahead-of-time compilation of the Triton kernels for an NVIDIA architecture, without a GPU.

Triton compiles to a cubin offline; these helpers record the launches an op would make (with
the arguments a real launch gets), ask a kernel's autotune prune filter what it keeps on a
given architecture, compile one config and read registers and spills from the cubin. Used by
``tests/test_triton.py`` (compile checks and its config sweep) and ``benchmarks/kernel_report.py``
(the Triton section of the static kernel report). Importing this module imports neither triton
nor the kernels; every function does, when called, in the mode (interpreter or not) of the process.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

__all__ = ["SHARED_MEMORY", "compile_config", "count_opcode", "cuobjdump", "danet_launches", "kept_configs",
           "record_launches", "resource_usage", "sass"]

# Opt-in shared memory per block (bytes) of an A100 (sm_80) and an H100 (sm_90): what the
# prune filters read from the device on a GPU.
SHARED_MEMORY = {80: 166912, 90: 232448}

_PTR_TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64"}


def nvidia_tool(name: str) -> str | None:
    """An NVIDIA binary tool (cuobjdump, nvdisasm, cu++filt, ...): the one on PATH, else the copy
    that ships in Triton's NVIDIA backend, else None."""
    found = shutil.which(name)
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(bundled) if bundled.exists() else None


def cuobjdump() -> Path:
    """The cuobjdump that ships in Triton's NVIDIA backend."""
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def record_launches(op, *args):
    """The (LazyKernel, args, kwargs) launches ``op(*args)`` makes, without running them."""
    import attnseg.triton.attention as ta
    import attnseg.triton.channel_attention as tc

    calls = []

    def record(kernel, grid, *a, **kw):
        calls.append((kernel, a, kw))

    saved = ta.launch, tc.launch
    ta.launch = tc.launch = record
    try:
        op(*args)
    finally:
        ta.launch, tc.launch = saved
    return calls


def danet_launches(dtype, n=9409, batch=2, e=64, ev=512, c=512):
    """Every kernel launch of the four ops at DANet-head sizes, on the layouts PAM / CAM pass
    (channel-first views for q, k, v; a contiguous B x C x N map for CAM)."""
    import attnseg.triton.attention as ta
    import attnseg.triton.channel_attention as tc

    q = torch.empty(batch, e, n, dtype=dtype).transpose(1, 2)
    v = torch.empty(batch, ev, n, dtype=dtype).transpose(1, 2)
    out, lse = torch.empty(batch, n, ev, dtype=dtype), torch.empty(batch, n)
    x = torch.empty(batch, c, n, dtype=dtype)
    return (
        record_launches(ta.attention_fwd, q, q, v, 1.0)
        + record_launches(ta.attention_bwd, out, lse, q, q, v, out, lse, 1.0)
        + record_launches(tc.channel_attention_fwd, x, True)
        + record_launches(tc.channel_attention_bwd, x, x, torch.empty(batch, c, c), True)
    )


def kept_configs(kernel, args, kwargs, arch: int, shared_memory: dict[int, int] | None = None):
    """What the kernel's prune filter keeps on sm_<arch> ([a default config] if not autotuned).
    ``shared_memory`` (arch -> bytes) overrides :data:`SHARED_MEMORY`."""
    import triton

    import attnseg.triton

    if kernel.configs is None:
        return [triton.Config({}, num_warps=4, num_stages=2)]
    limit = (shared_memory or SHARED_MEMORY)[arch]
    named = dict(zip(kernel.compiled_jit_function().arg_names, args))
    saved = attnseg.triton.device_limits
    attnseg.triton.device_limits = lambda device: (limit, arch // 10)  # the filter asks the GPU
    try:
        return kernel.prune(kernel.configs, named, **kwargs)
    finally:
        attnseg.triton.device_limits = saved


def compile_config(kernel, args, kwargs, config, arch: int):
    """Compile one launch for sm_<arch>, specialising arguments as a launch would."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jit_fn = kernel.compiled_jit_function()
    values = {**dict(zip(jit_fn.arg_names, args)), **kwargs, **config.kwargs}
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(jit_fn.params):
        value = values[param.name]
        if param.is_constexpr or (type(value) is int and value == 1):  # Triton specialises 1
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = _PTR_TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if abs(value) < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[param.name] = "fp32"
    source = ASTSource(jit_fn, signature, constexprs, attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def sass(compiled) -> str:
    """The SASS of a compiled kernel (``cuobjdump -sass`` of its cubin)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([str(cuobjdump()), "-sass", f.name], capture_output=True, text=True, check=True).stdout


def count_opcode(sass_text: str, opcode: str) -> int:
    """How many instructions of ``sass_text`` have the opcode ``opcode`` (``HGMMA`` counts
    ``HGMMA.64x128x16.F32`` and the like; predicated instructions included)."""
    return len(re.findall(rf"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?{opcode}(?:\.|\s)", sass_text, re.MULTILINE))


def resource_usage(compiled) -> tuple[int, int]:
    """(registers per thread, stack bytes: spills or local arrays) of a compiled kernel, read from its cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(cuobjdump()), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
    return int(re.search(r"REG:(\d+)", usage).group(1)), int(re.search(r"STACK:(\d+)", usage).group(1))
