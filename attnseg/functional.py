"""Functional API: argument checks, layout, backend choice. Kernels never decide policy.

Backends (the ``backend=`` argument of every call):

* ``"native"``: the compiled C++/CUDA ops (``torch.ops.attnseg.*``): fused, tiled, online
  softmax; CPU kernels always, CUDA kernels (csrc/cuda) when the build had nvcc.
* ``"triton"``: the Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``).
* ``"reference"``: the pure-PyTorch code of :mod:`attnseg.reference` (materialises the maps).
* ``"auto"`` (default): on CUDA, triton if available, else native, else reference; on the CPU,
  native if the extension loaded, else reference. :func:`available_backends` shows the choice.
  Why triton first on CUDA: its kernels autotune their tile sizes per GPU and shape, while the
  CUDA C++ kernels use fixed 32-row tiles within 48 KiB of shared memory (portable, verified
  in the emulator). Neither has been timed on a GPU yet. The rule will follow the table of
  ``python benchmarks/gpu_check.py`` (docs/gpu_check.md: native, triton, SDPA's memory-efficient
  kernel and the official math, per dtype and size) once it has been run on a GPU.

A backend named explicitly that cannot run raises :class:`BackendUnavailableError`; only
``"auto"`` ever chooses for you.
"""

from __future__ import annotations

import torch

from . import _ops, reference

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "attention",
    "available_backends",
    "channel_attention",
    "position_attention",
    "resolve_backend",
]

BACKENDS = ("auto", "native", "triton", "reference")
CAM_VARIANTS = ("official", "paper")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot run on the given inputs."""


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------


def _native_unavailable(device: torch.device) -> str | None:
    if not _ops.native_available():
        return f"the compiled extension did not load ({_ops.native_unavailable_reason()})"
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if not _ops.native_cuda_built():
            return "attnseg was built without its CUDA kernels (no nvcc or a CPU-only torch at build time)"
        if not torch.cuda.is_available():
            return "the CUDA kernels are built in, but no CUDA device is available (torch.cuda.is_available() is False)"
        index = torch.cuda.current_device() if device.index is None else device.index
        if not 0 <= index < torch.cuda.device_count():
            return f"there is no CUDA device {index} ({torch.cuda.device_count()} visible)"
        return _ops.cuda_architecture_mismatch(torch.cuda.get_device_capability(index))
    return f"no native kernels for device type {device.type!r}"


def _triton_unavailable(device: torch.device) -> str | None:
    try:
        from . import triton as attnseg_triton
    except Exception as exc:  # triton missing or broken
        return f"attnseg.triton could not be imported ({type(exc).__name__}: {exc})"
    return attnseg_triton.unavailable_reason(device)


def _unavailable_reason(backend: str, device: torch.device) -> str | None:
    if backend == "reference":
        return None
    if backend == "native":
        return _native_unavailable(device)
    if backend == "triton":
        return _triton_unavailable(device)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def available_backends(device: str | torch.device = "cpu") -> dict[str, str | None]:
    """Map every concrete backend to ``None`` (usable on ``device``) or the reason it is not.

    ``available_backends("cpu")["auto"]`` names the backend that ``"auto"`` picks there.
    """
    device = torch.device(device)
    result: dict[str, str | None] = {
        name: _unavailable_reason(name, device) for name in ("native", "triton", "reference")
    }
    result["auto"] = resolve_backend("auto", device)
    return result


def resolve_backend(backend: str, device: str | torch.device) -> str:
    """The concrete backend that ``backend`` means for tensors on ``device``.

    Raises :class:`BackendUnavailableError` if a backend named explicitly cannot run there.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if backend == "auto":
        order = ("triton", "native", "reference") if device.type == "cuda" else ("native", "reference")
        for name in order:
            if _unavailable_reason(name, device) is None:
                return name
        return "reference"
    reason = _unavailable_reason(backend, device)
    if reason is not None:
        raise BackendUnavailableError(f"backend={backend!r} cannot run on {device.type} tensors: {reason}")
    return backend


# ---------------------------------------------------------------------------------------------
# Argument checks: every message names the argument, what it got and what it needs.
# ---------------------------------------------------------------------------------------------


def _check_tensor(fn: str, name: str, t, ndim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{fn}: {name} must be a {ndim}-D tensor {layout}, got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{fn}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}"
        )
    if t.is_sparse or t.layout != torch.strided:
        raise ValueError(f"{fn}: {name} must be a dense (strided) tensor, got layout {t.layout}")
    # An empty batch is fine (as for torch's layers: the result is empty); any other empty size is not.
    if any(size == 0 for size in t.shape[1:]):
        raise ValueError(
            f"{fn}: {name} has a zero-sized dimension, shape {tuple(t.shape)}; every size but the batch must be >= 1"
        )


def _check_same(fn: str, names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> None:
    first_name, first = names[0], tensors[0]
    for name, t in zip(names[1:], tensors[1:]):
        if t.device != first.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but {first_name} is on {first.device}; all inputs must share a device")
        if t.dtype != first.dtype:
            raise TypeError(f"{fn}: {name} has dtype {t.dtype} but {first_name} has {first.dtype}; all inputs must share a dtype")


def _check_gamma(fn: str, gamma, x: torch.Tensor) -> None:
    if not isinstance(gamma, torch.Tensor):
        raise TypeError(f"{fn}: gamma must be a torch.Tensor of shape [1], got {type(gamma).__name__}")
    if gamma.numel() != 1:
        raise ValueError(f"{fn}: gamma must have exactly one element (shape [1]), got shape {tuple(gamma.shape)}")
    if gamma.device != x.device:
        raise ValueError(f"{fn}: gamma is on {gamma.device} but x is on {x.device}")


def _scale_value(fn: str, scale) -> float:
    if isinstance(scale, torch.Tensor) or isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{fn}: scale must be a Python float, got {type(scale).__name__}")
    scale = float(scale)
    if scale != scale or scale in (float("inf"), float("-inf")):
        raise ValueError(f"{fn}: scale must be finite, got {scale}")
    return scale


# ---------------------------------------------------------------------------------------------
# Ops
# ---------------------------------------------------------------------------------------------


def _attention_op(backend: str):
    if backend == "native":
        return torch.ops.attnseg.attention_fwd
    from .triton import attention as triton_attention

    return triton_attention.attention_fwd


def _channel_op(backend: str):
    if backend == "native":
        return torch.ops.attnseg.channel_attention_fwd
    from .triton import channel_attention as triton_channel

    return triton_channel.channel_attention_fwd


def attention(q, k, v, scale: float = 1.0, *, backend: str = "auto", return_lse: bool = False):
    """Fused softmax(q kᵀ · scale) v without materialising the Nq×Nk map.

    Args:
        q: [B, Nq, E] queries. Any strides; ``conv(x).flatten(2).transpose(1, 2)`` needs no copy.
        k: [B, Nk, E] keys.
        v: [B, Nk, Ev] values (Ev may differ from E).
        scale: logits multiplier (1.0 for DANet's PAM, E ** -0.5 for OCR / transformers).
        backend: "auto", "native", "triton" or "reference".
        return_lse: also return the row logsumexp of the scaled logits, [B, Nq] in fp32
            (fp64 for fp64 inputs).

    All inputs share one device and one dtype (float16, bfloat16, float32 or float64);
    accumulation is in fp32 (fp64 for fp64). Returns out: [B, Nq, Ev], contiguous, q's dtype.
    """
    fn = "attention"
    _check_tensor(fn, "q", q, 3, "[B, Nq, E]")
    _check_tensor(fn, "k", k, 3, "[B, Nk, E]")
    _check_tensor(fn, "v", v, 3, "[B, Nk, Ev]")
    _check_same(fn, ("q", "k", "v"), (q, k, v))
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        raise ValueError(f"{fn}: batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"{fn}: k has E = {k.shape[2]} but q has E = {q.shape[2]}; q and k must share the last size")
    if v.shape[1] != k.shape[1]:
        raise ValueError(f"{fn}: v has Nk = {v.shape[1]} rows but k has Nk = {k.shape[1]}; they must match")
    scale = _scale_value(fn, scale)
    backend = resolve_backend(backend, q.device)
    if backend == "reference":
        if not return_lse:  # the logsumexp is another pass over the materialised Nq x Nk map
            return reference.attention(q, k, v, scale)
        out, lse = reference.attention_with_lse(q, k, v, scale)
        lse = lse.to(_ops._lse_dtype(q.dtype))
    else:
        out, lse = _attention_op(backend)(q, k, v, scale)
    return (out, lse) if return_lse else out


def position_attention(x, query, key, value, gamma, *, backend: str = "auto"):
    """DANet position attention after its 1×1 convolutions: gamma · attend(x) + x.

    Args:
        x: [B, C, H, W] input of the PAM module.
        query, key: [B, E, H, W] outputs of query_conv and key_conv (E = C / 8 in DANet).
        value: [B, C, H, W] output of value_conv.
        gamma: [1] residual weight.
        backend: "auto", "native", "triton" or "reference".

    Matches the official ``PAM_Module`` (no 1/sqrt(E) scale). Returns [B, C, H, W]; the fused
    backends keep x's memory format (the reference returns what the official code returns).
    """
    fn = "position_attention"
    _check_tensor(fn, "x", x, 4, "[B, C, H, W]")
    _check_tensor(fn, "query", query, 4, "[B, E, H, W]")
    _check_tensor(fn, "key", key, 4, "[B, E, H, W]")
    _check_tensor(fn, "value", value, 4, "[B, C, H, W]")
    _check_same(fn, ("x", "query", "key", "value"), (x, query, key, value))
    b, c, h, w = x.shape
    for name, t, channels in (("query", query, query.shape[1]), ("key", key, query.shape[1]), ("value", value, c)):
        if tuple(t.shape) != (b, channels, h, w):
            raise ValueError(f"{fn}: {name} must have shape {(b, channels, h, w)} to match x and query, got {tuple(t.shape)}")
    _check_gamma(fn, gamma, x)
    backend = resolve_backend(backend, x.device)
    if backend == "reference":
        return reference.position_attention(x, query, key, value, gamma)
    # [B, C, H, W] -> [B, N, C] views: strides (C·N, 1, N); the kernels read them without a copy.
    q = query.flatten(2).transpose(1, 2)
    k = key.flatten(2).transpose(1, 2)
    v = value.flatten(2).transpose(1, 2)
    out, _ = _attention_op(backend)(q, k, v, 1.0)
    attended = out.transpose(1, 2).view(b, c, h, w)
    # gamma · attended + x with the official code's type promotion (fp32 gamma, bf16 x -> fp32)
    return torch.addcmul(x, gamma, attended)


def channel_attention(x, gamma, *, variant: str = "official", backend: str = "auto"):
    """DANet channel attention: gamma · (A X) + x with A the C×C channel softmax.

    Args:
        x: [B, C, H, W].
        gamma: [1] residual weight.
        variant: "official" (A = softmax(rowmax(E) − E), what DANet checkpoints were trained
            with) or "paper" (A = softmax(E)); E = X Xᵀ, accumulated in fp32.
        backend: "auto", "native", "triton" or "reference".
    """
    fn = "channel_attention"
    _check_tensor(fn, "x", x, 4, "[B, C, H, W]")
    _check_gamma(fn, gamma, x)
    if variant not in CAM_VARIANTS:
        raise ValueError(f"{fn}: variant must be one of {CAM_VARIANTS}, got {variant!r}")
    backend = resolve_backend(backend, x.device)
    if backend == "reference":
        return reference.channel_attention(x, gamma, variant)
    y, _ = _channel_op(backend)(x.flatten(2), variant == "official")
    return torch.addcmul(x, gamma, y.view(x.shape))
