"""Functional API: argument checks, layout, backend choice. Kernels never decide policy.

Backends (the ``backend=`` argument of every call; :mod:`attnseg._backends` is their registry):

* ``"native"``: the compiled C++/CUDA ops (``torch.ops.attnseg.*``): fused, tiled, online
  softmax; CPU kernels always, CUDA kernels (csrc/cuda) when the build had nvcc.
* ``"triton"``: the Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``).
* ``"chunked"``: queries in chunks, every product a library GEMM through torch (cuBLAS, MKL,
  oneDNN); O(B·chunk·Nk) memory, any device (:mod:`attnseg.chunked`).
* ``"reference"``: the pure-PyTorch code of :mod:`attnseg.reference` (materialises the maps).
* ``"auto"`` (default): chosen per call from the measured table (device kind, dtype, mode and
  size; the rule is in :mod:`attnseg._backends`). :func:`explain` says what it picks and why.

A backend named explicitly that cannot run raises :class:`BackendUnavailableError`; only
``"auto"`` ever chooses for you.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import _backends, config
from ._backends import BackendUnavailableError, Choice

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "attention",
    "available_backends",
    "channel_attention",
    "explain",
    "position_attention",
    "resolve_backend",
]

BACKENDS = _backends.BACKEND_NAMES
CAM_VARIANTS = ("official", "paper")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------


def available_backends(device: str | torch.device = "cpu") -> dict[str, str | None]:
    """Map every concrete backend to ``None`` (usable on ``device``) or the reason it is not.

    ``available_backends(device)["auto"]`` names what ``"auto"`` picks there for a large map in
    fp32 when the table has no row (:func:`attnseg._backends.default_backend`); the choice for
    a given call, which reads the measured table, is :func:`explain`'s.
    """
    device = torch.device(device)
    result: dict[str, str | None] = {
        name: _backends.get(name).unavailable_reason(device) for name in _backends.concrete_names()
    }
    result["auto"] = resolve_backend("auto", device)
    return result


def resolve_backend(backend: str, device: str | torch.device, dtype: Optional[torch.dtype] = None) -> str:
    """The concrete backend that ``backend`` means for tensors on ``device``.

    For ``"auto"`` without a call to look at, the default for a large map (see
    :func:`available_backends`; :func:`explain` takes the call's tensors). Raises
    :class:`BackendUnavailableError` if a backend named explicitly cannot run there.
    """
    _backends.check_backend(backend)
    device = torch.device(device)
    if backend == "auto":
        candidates = _backends.auto_candidates(device, dtype)
        return _backends.default_backend("attention", device, "forward", float("inf"), candidates)[0]
    reason = _backends.get(backend).unavailable_reason(device, dtype)
    if reason is not None:
        raise BackendUnavailableError(f"backend={backend!r} cannot run on {device.type} tensors: {reason}")
    return backend


def _training(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _choose(backend: str, op: str, tensors, sizes: dict) -> _backends.Backend:
    """The backend object a call runs on: ``backend`` checked, or auto's choice for these inputs."""
    first = tensors[0]
    if backend != "auto":
        return _backends.get(resolve_backend(backend, first.device, first.dtype))
    choice = _backends.choose(op, first.device, first.dtype, _training(*tensors), sizes)
    return _backends.get(choice.backend)


def explain(*tensors, op: str = "attention", training: Optional[bool] = None) -> Choice:
    """What ``backend="auto"`` picks for a call on these inputs, and why.

    ``explain(q, k, v)`` for :func:`attention` ([B, Nq, E], [B, Nk, E], [B, Nk, Ev]);
    ``explain(x, query, key, value)`` for :func:`position_attention` (4-D);
    ``explain(x, op="channel_attention")`` for :func:`channel_attention`.
    ``training`` defaults to what the call would see (grad mode and ``requires_grad``).
    Returns a :class:`attnseg._backends.Choice`: ``.backend``, ``.reason``, ``.key`` (the
    table's key) and ``.rows`` (the measured rows the choice read); ``str()`` reads as a sentence.
    """
    if op not in ("attention", "channel_attention"):
        raise ValueError(f"explain: op must be 'attention' or 'channel_attention', got {op!r}")
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise TypeError("explain: pass the call's tensors: (q, k, v), (x, query, key, value) or (x,)")
    if training is None:
        training = _training(*tensors)
    first = tensors[0]
    if op == "channel_attention":
        sizes = _channel_sizes(first)
    elif len(tensors) == 4 and first.dim() == 4:  # position_attention(x, query, key, value)
        sizes = _position_sizes(tensors[0], tensors[1])
    elif len(tensors) == 3:
        sizes = _attention_sizes(*tensors)
    else:
        raise TypeError("explain: pass (q, k, v) for attention or (x, query, key, value) for position_attention")
    return _backends.choose(op, first.device, first.dtype, training, sizes)


def _attention_sizes(q, k, v) -> dict:
    return {"B": q.shape[0], "Nq": q.shape[1], "Nk": k.shape[1], "E": q.shape[2], "Ev": v.shape[2]}


def _position_sizes(x, query) -> dict:
    """The sizes of position_attention's attention call (its [B, N, E] views)."""
    n = x.shape[2] * x.shape[3]
    return {"B": x.shape[0], "Nq": n, "Nk": n, "E": query.shape[1], "Ev": x.shape[1]}


def _check_budget(chunk_budget_mib) -> None:
    if chunk_budget_mib is not None:  # checked whichever backend runs: a bad value is never ignored
        config.chunk_budget_mib(chunk_budget_mib)


def _channel_sizes(x) -> dict:
    return {"B": x.shape[0], "C": x.shape[1], "N": math.prod(x.shape[2:])}


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


def attention(q, k, v, scale: float = 1.0, *, backend: str = "auto", return_lse: bool = False,
              chunk_budget_mib: Optional[float] = None):
    """Fused softmax(q kᵀ · scale) v without materialising the Nq×Nk map.

    Args:
        q: [B, Nq, E] queries. Any strides; ``conv(x).flatten(2).transpose(1, 2)`` needs no copy.
        k: [B, Nk, E] keys.
        v: [B, Nk, Ev] values (Ev may differ from E).
        scale: logits multiplier (1.0 for DANet's PAM, E ** -0.5 for OCR / transformers).
        backend: "auto", "native", "triton", "chunked" or "reference".
        return_lse: also return the row logsumexp of the scaled logits, [B, Nq] in fp32
            (fp64 for fp64 inputs).
        chunk_budget_mib: the chunked backend's budget for one chunk's temporaries, MiB
            (default: ``ATTNSEG_CHUNK_BUDGET_MIB``, else :mod:`attnseg.config`'s rule).

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
    _check_budget(chunk_budget_mib)
    chosen = _choose(backend, "attention", (q, k, v), _attention_sizes(q, k, v))
    out, lse = chosen.attention(q, k, v, scale, need_lse=return_lse, chunk_budget_mib=chunk_budget_mib)
    return (out, lse) if return_lse else out


def position_attention(x, query, key, value, gamma, *, backend: str = "auto",
                       chunk_budget_mib: Optional[float] = None):
    """DANet position attention after its 1×1 convolutions: gamma · attend(x) + x.

    Args:
        x: [B, C, H, W] input of the PAM module.
        query, key: [B, E, H, W] outputs of query_conv and key_conv (E = C / 8 in DANet).
        value: [B, C, H, W] output of value_conv.
        gamma: [1] residual weight.
        backend: "auto", "native", "triton", "chunked" or "reference".
        chunk_budget_mib: the chunked backend's chunk budget, MiB (see :func:`attention`).

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
    _check_budget(chunk_budget_mib)
    chosen = _choose(backend, "attention", (x, query, key, value, gamma), _position_sizes(x, query))
    return chosen.position_attention(x, query, key, value, gamma, chunk_budget_mib=chunk_budget_mib)


def channel_attention(x, gamma, *, variant: str = "official", backend: str = "auto"):
    """DANet channel attention: gamma · (A X) + x with A the C×C channel softmax.

    Args:
        x: [B, C, H, W].
        gamma: [1] residual weight.
        variant: "official" (A = softmax(rowmax(E) − E), what DANet checkpoints were trained
            with) or "paper" (A = softmax(E)); E = X Xᵀ, accumulated in fp32.
        backend: "auto", "native", "triton", "chunked" (the math through library GEMMs, Gram
            matrix and softmax in fp32) or "reference".
    """
    fn = "channel_attention"
    _check_tensor(fn, "x", x, 4, "[B, C, H, W]")
    _check_gamma(fn, gamma, x)
    if variant not in CAM_VARIANTS:
        raise ValueError(f"{fn}: variant must be one of {CAM_VARIANTS}, got {variant!r}")
    chosen = _choose(backend, "channel_attention", (x, gamma), _channel_sizes(x))
    return chosen.channel_attention(x, gamma, variant == "official")
