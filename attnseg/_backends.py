"""The backends, in one registry, and the rule by which ``backend="auto"`` chooses among them.

Each backend is a :class:`Backend`: its name, why it cannot run on given inputs
(:meth:`Backend.unavailable_reason`), and its entry points (attention, position attention,
channel attention). :mod:`attnseg.functional` validates arguments and calls them; the modules,
``convert_model`` and the integrations check names with :func:`check_backend`.

``"auto"`` (:func:`choose`) reads the measured table ``attnseg/backend_table.json``, written by
``benchmarks/backend_table.py`` on the CPU and by ``benchmarks/gpu_check.py`` on a GPU:

1. The candidates are the backends that can run the call, and the math itself (the reference)
   where the map is small (step 3; never for CAM in fp16 / bf16, whose math forms the Gram
   matrix in half precision).
2. The key is the op (``attention`` or ``channel_attention``), the device kind (``cpu:avx2``,
   ``cpu:avx512``, ``cuda:sm_90``, ...: the CPU kernels' instruction set, the GPU
   architecture), the dtype and the mode (``forward``, or ``training`` when an input requires
   grad under grad mode). Within a key the row taken is the measured size nearest in map size
   (B·Nq·Nk elements for attention, B·C²·N work for CAM), if one lies within a factor of
   :data:`SIZE_FACTOR`.
3. That size must have a row for every candidate; then the choice is the fastest candidate whose
   peak memory is at most :data:`MEMORY_BOUND` of the math's at that size, or the fastest of all,
   the math included, when the call's own map (B·Nq·Nk, or B·C·C for CAM, in its dtype) is at
   most :data:`SMALL_MAP_MIB` (where the map is small, speed decides). If none is within the
   bound, the one with the least memory.
4. Otherwise the documented default (:func:`default_backend`).

:func:`explain` returns the choice and its reason; ``available_backends()`` shows it too.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import json
import math
import os
from typing import Optional

import torch

from . import _ops, reference
from . import config

__all__ = [
    "BACKEND_NAMES",
    "BackendUnavailableError",
    "Choice",
    "MEMORY_BOUND",
    "SIZE_FACTOR",
    "SMALL_MAP_MIB",
    "auto_candidates",
    "check_backend",
    "choose",
    "default_backend",
    "device_kind",
    "get",
    "table_rows",
]

# A fused or chunked backend is eligible where its measured peak is at most this share of the
# math's at the same size: the memory a user swaps attnseg in for.
MEMORY_BOUND = 0.25
# ... unless the call's own attention map is at most this many MiB (the math holds two or three
# of them): then the map is small, every candidate is eligible and the fastest wins.
SMALL_MAP_MIB = 16.0
# A measured size serves calls whose size (row_size) is within this factor of it.
SIZE_FACTOR = 4.0

TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "backend_table.json")


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot run on the given inputs."""


# ---------------------------------------------------------------------------------------------
# The backends
# ---------------------------------------------------------------------------------------------


class Backend(abc.ABC):
    """One backend: ``name``, availability, and its entry points.

    ``attention(q, k, v, scale)`` returns ``(out, lse)`` through a custom-op pair whose autograd
    is registered once (:mod:`attnseg._ops`); ``channel_product(x3, official)`` returns A X for
    x3 [B, C, N]. The position- and channel-attention entry points add gamma · (...) + x.
    ``chunk_budget_mib`` is the chunked backend's; the others have no chunks and take no notice.
    """

    name = ""
    summary = ""

    @abc.abstractmethod
    def unavailable_reason(self, device: torch.device, dtype: Optional[torch.dtype] = None) -> Optional[str]:
        """None if the backend can run on tensors of ``device`` (and ``dtype``), else why not."""

    @abc.abstractmethod
    def attention(self, q, k, v, scale: float, *, need_lse: bool = True, chunk_budget_mib: Optional[float] = None):
        """(out, lse) of softmax(q kᵀ · scale) v; lse may be None where ``need_lse`` is False."""

    @abc.abstractmethod
    def channel_product(self, x3: torch.Tensor, official: bool) -> torch.Tensor:
        """A X of CAM for x3 [B, C, N]."""

    def position_attention(self, x, query, key, value, gamma, *, chunk_budget_mib: Optional[float] = None):
        b, c, h, w = x.shape
        # [B, C, H, W] -> [B, N, C] views: strides (C·N, 1, N); the kernels read them without a copy.
        q = query.flatten(2).transpose(1, 2)
        k = key.flatten(2).transpose(1, 2)
        v = value.flatten(2).transpose(1, 2)
        out, _ = self.attention(q, k, v, 1.0, need_lse=False, chunk_budget_mib=chunk_budget_mib)
        attended = out.transpose(1, 2).view(b, c, h, w)
        # gamma · attended + x with the official code's type promotion (fp32 gamma, bf16 x -> fp32)
        return torch.addcmul(x, gamma, attended)

    def channel_attention(self, x, gamma, official: bool):
        return torch.addcmul(x, gamma, self.channel_product(x.flatten(2), official).view(x.shape))

    def __repr__(self) -> str:
        return f"<attnseg backend {self.name!r}>"


class NativeBackend(Backend):
    name = "native"
    summary = "the compiled C++/CUDA ops: fused, tiled, online softmax"

    def unavailable_reason(self, device, dtype=None):
        if not _ops.native_available():
            return f"the compiled extension did not load ({_ops.native_unavailable_reason()})"
        if device.type == "cpu":
            return None
        if device.type == "cuda":
            if not _ops.native_cuda_built():
                return "attnseg was built without its CUDA kernels (no nvcc or a CPU-only torch at build time)"
            missing = _torch_device_unavailable(device)
            if missing is not None:
                return f"the CUDA kernels are built in, but {missing}"
            index = torch.cuda.current_device() if device.index is None else device.index
            return _ops.cuda_architecture_mismatch(torch.cuda.get_device_capability(index))
        return f"no native kernels for device type {device.type!r}"

    def attention(self, q, k, v, scale, *, need_lse=True, chunk_budget_mib=None):
        return torch.ops.attnseg.attention_fwd(q, k, v, scale)

    def channel_product(self, x3, official):
        return torch.ops.attnseg.channel_attention_fwd(x3, official)[0]


class TritonBackend(Backend):
    name = "triton"
    summary = "the Triton kernels (CUDA; the CPU only under TRITON_INTERPRET=1)"

    def unavailable_reason(self, device, dtype=None):
        try:
            from . import triton as attnseg_triton
        except Exception as exc:  # triton missing or broken
            return f"attnseg.triton could not be imported ({type(exc).__name__}: {exc})"
        return attnseg_triton.unavailable_reason(device)

    def attention(self, q, k, v, scale, *, need_lse=True, chunk_budget_mib=None):
        from .triton import attention as triton_attention

        return triton_attention.attention_fwd(q, k, v, scale)

    def channel_product(self, x3, official):
        from .triton import channel_attention as triton_channel

        return triton_channel.channel_attention_fwd(x3, official)[0]


class ChunkedBackend(Backend):
    name = "chunked"
    summary = ("queries in chunks, every product a library GEMM through torch (cuBLAS, MKL, oneDNN): "
               "O(B·chunk·Nk) memory, any device")

    def unavailable_reason(self, device, dtype=None):
        return _torch_device_unavailable(device)  # torch's own GEMMs: wherever torch has the device

    def attention(self, q, k, v, scale, *, need_lse=True, chunk_budget_mib=None):
        from . import chunked

        return chunked.attention_fwd(q, k, v, scale, *config.chunk_policy(q.device, chunk_budget_mib))

    def channel_product(self, x3, official):
        from . import chunked

        return chunked.channel_attention(x3, official)


_device_verdicts: dict[str, Optional[str]] = {}


def _torch_device_unavailable(device: torch.device) -> Optional[str]:
    """None if torch can make tensors on ``device``, else why not (checked once per device)."""
    device = torch.device(device)
    if device.type in ("cpu", "meta"):
        return None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device is available (torch.cuda.is_available() is False)"
        index = torch.cuda.current_device() if device.index is None else device.index
        if not 0 <= index < torch.cuda.device_count():
            return f"there is no CUDA device {index} ({torch.cuda.device_count()} visible)"
        return None
    name = str(device)
    if name not in _device_verdicts:
        try:
            torch.empty(0, device=device)
            _device_verdicts[name] = None
        except Exception as exc:  # torch has no such device here
            _device_verdicts[name] = f"torch cannot make tensors on {name} ({type(exc).__name__}: {exc})"
    return _device_verdicts[name]


class ReferenceBackend(Backend):
    name = "reference"
    summary = "the official math in pure PyTorch (materialises the maps; differentiable twice)"

    def unavailable_reason(self, device, dtype=None):
        return None

    def attention(self, q, k, v, scale, *, need_lse=True, chunk_budget_mib=None):
        if not need_lse:  # the logsumexp is another pass over the materialised Nq x Nk map
            return reference.attention(q, k, v, scale), None
        out, lse = reference.attention_with_lse(q, k, v, scale)
        return out, lse.to(_ops._lse_dtype(q.dtype))

    def position_attention(self, x, query, key, value, gamma, *, chunk_budget_mib=None):
        return reference.position_attention(x, query, key, value, gamma)

    def channel_product(self, x3, official):
        return reference.channel_attention_product(x3, "official" if official else "paper")

    def channel_attention(self, x, gamma, official):
        return reference.channel_attention(x, gamma, "official" if official else "paper")


_REGISTRY = {backend.name: backend for backend in (NativeBackend(), TritonBackend(), ChunkedBackend(),
                                                   ReferenceBackend())}
BACKEND_NAMES = ("auto",) + tuple(_REGISTRY)


def check_backend(backend) -> str:
    """``backend`` if it names a backend (or "auto"), else a ValueError listing the names."""
    if not isinstance(backend, str) or backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
    return backend


def get(name: str) -> Backend:
    """The :class:`Backend` called ``name`` (a concrete backend, not "auto")."""
    check_backend(name)
    if name == "auto":
        raise ValueError("get() takes a concrete backend; use choose() for what 'auto' picks")
    return _REGISTRY[name]


def concrete_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def auto_candidates(device: torch.device, dtype: Optional[torch.dtype] = None) -> tuple[str, ...]:
    """The backends ``"auto"`` may pick on ``device``: all that can run there but the reference."""
    return tuple(name for name, backend in _REGISTRY.items()
                 if name != "reference" and backend.unavailable_reason(device, dtype) is None)


# ---------------------------------------------------------------------------------------------
# The measured table and auto's rule
# ---------------------------------------------------------------------------------------------


def device_kind(device: torch.device) -> str:
    """The table's device key: ``cuda:sm_XY`` (the GPU architecture), ``cpu:<torch's CPU
    capability>`` (``avx2``, ``avx512``, ...: what the CPU kernels run on), or the device type."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        index = torch.cuda.current_device() if device.index is None else device.index
        major, minor = torch.cuda.get_device_capability(index)
        return f"cuda:sm_{major}{minor}"
    if device.type == "cpu":
        return f"cpu:{torch.backends.cpu.get_cpu_capability().lower()}"
    return device.type


@functools.lru_cache(maxsize=None)
def _load_table(path: str) -> tuple[dict, ...]:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return ()
    return tuple(data.get("rows", ()))


def table_rows(path: Optional[str] = None) -> tuple[dict, ...]:
    """The rows of the measured table (``attnseg/backend_table.json`` unless ``path``)."""
    return _load_table(path or TABLE_PATH)


def row_size(row: dict) -> float:
    """A row's (or a call's) size for matching: B·Nq·Nk map elements for attention (time and
    memory grow with the map), B·C²·N work for CAM."""
    if row["op"] == "attention":
        return float(row["B"]) * row["Nq"] * row["Nk"]
    return float(row["B"]) * row["C"] * row["C"] * row["N"]


def map_mib(op: str, sizes: dict, dtype: torch.dtype) -> float:
    """The call's attention map in MiB: B·Nq·Nk (B·C·C for CAM) elements of ``dtype``."""
    elements = sizes["B"] * (sizes["Nq"] * sizes["Nk"] if op == "attention" else sizes["C"] * sizes["C"])
    return elements * torch.empty((), dtype=dtype).element_size() / 2**20


@dataclasses.dataclass(frozen=True)
class Choice:
    """What ``backend="auto"`` picks for a call, and why."""

    backend: str
    reason: str
    key: dict
    rows: tuple = ()

    def __str__(self) -> str:
        return f"{self.backend}: {self.reason}"


def default_backend(op: str, device: torch.device, mode: str, size: float, available: tuple[str, ...]) -> tuple[str, str]:
    """The documented default where the table has no complete row: (backend, why).

    * CUDA: chunked, for both ops and modes. In the H200 run of 2026-12-04 the math on cuBLAS
      was faster than every fused kernel for CAM, and for PAM in 7 of 8 forward rows and every
      training row; chunked runs the math's GEMMs (plus one recomputed product in training) in
      bounded memory. Predicted, not yet measured on a GPU.
    * CPU: native; for attention maps of at most :data:`CPU_SMALL_MAP` elements, the math itself
      (the reference: on the AVX2 rows of the table the math is fastest at N = 256, native from
      N = 1,024 on).
    * Any other device: chunked (torch's GEMMs are all there is).
    """
    if device.type == "cuda":
        choice, why = "chunked", "the default on CUDA (the math's cuBLAS GEMMs in bounded memory)"
    elif device.type == "cpu":
        if op == "attention" and size <= CPU_SMALL_MAP:
            choice, why = "reference", f"the default on the CPU for maps of at most {CPU_SMALL_MAP:,} elements: the math"
            return choice, why
        choice, why = "native", "the default on the CPU"
    else:
        choice, why = "chunked", f"the default on {device.type} (torch's GEMMs)"
    if choice not in available:
        fallback = next((name for name in ("chunked", "native", "triton") if name in available), "reference")
        return fallback, f"{why} is {choice}, unavailable here; {fallback} instead"
    return choice, why


# The CPU default's small-map threshold, B·Nq·Nk elements: B = 2, N = 512, between the table's
# N = 256 (the math fastest) and N = 1,024 (native fastest) at B = 2.
CPU_SMALL_MAP = 2 * 512 * 512


def _mode(training: bool) -> str:
    return "training" if training else "forward"


def choose(op: str, device, dtype: torch.dtype, training: bool, sizes: dict, *,
           table: Optional[tuple] = None, candidates: Optional[tuple] = None, kind: Optional[str] = None) -> Choice:
    """What ``backend="auto"`` picks (see the module docstring for the rule).

    ``op``: "attention" or "channel_attention"; ``sizes``: B, Nq, Nk, E, Ev (attention) or B, C, N.
    ``table``, ``candidates`` and ``kind`` replace the shipped table, the backends available on
    ``device`` and its device kind (for tests and for reading another machine's rows).
    """
    device = torch.device(device)
    key = {"op": op, "device": kind or device_kind(device), "dtype": str(dtype).replace("torch.", ""),
           "mode": _mode(training)}
    available = tuple(candidates) if candidates is not None else auto_candidates(device, dtype)
    table = table if table is not None else table_rows()
    # the same call shape meets the same choice: memoised per table (a call's lookup is Python work)
    memo_key = (id(table), *key.values(), *sorted(sizes.items()), available)
    memo = _CHOICES.get(memo_key)
    if memo is not None and memo[0] is table:
        return memo[1]
    choice = _choose(op, device, dtype, key, available, sizes, table)
    if len(_CHOICES) > 4096:
        _CHOICES.clear()
    _CHOICES[memo_key] = (table, choice)
    return choice


_CHOICES: dict[tuple, tuple] = {}


def _choose(op: str, device: torch.device, dtype: torch.dtype, key: dict, available: tuple, sizes: dict,
            table: tuple) -> Choice:
    size = row_size({"op": op, **sizes})
    small = map_mib(op, sizes, dtype) <= SMALL_MAP_MIB
    rows = [row for row in table if all(row.get(field) == value for field, value in key.items())]
    if rows:
        nearest = min(rows, key=lambda row: abs(math.log(row_size(row) / size)))
        if abs(math.log(row_size(nearest) / size)) <= math.log(SIZE_FACTOR):
            fields = ("B", "Nq", "Nk", "E", "Ev") if op == "attention" else ("B", "C", "N")
            at_size = [row for row in rows if all(row[f] == nearest[f] for f in fields)]
            measured = {row["backend"]: row for row in at_size}
            missing = [name for name in available if name not in measured]
            if not missing:
                return _measured_choice(key, available, measured, tuple(at_size), small)
            backend, why = default_backend(op, device, key["mode"], size, available)
            return Choice(backend, f"{why}; the table's nearest size has no row for {', '.join(missing)}",
                          key, tuple(at_size))
    backend, why = default_backend(op, device, key["mode"], size, available)
    return Choice(backend, f"{why}; no measured row within {SIZE_FACTOR:g}x of this size", key, ())


def _measured_choice(key: dict, available: tuple[str, ...], measured: dict, rows: tuple, small: bool) -> Choice:
    math_row = measured.get("math")
    small = small or math_row is None
    candidates = list(available)
    if small and math_row is not None and _math_is_safe(key):
        # a small map: the math itself may be fastest (no kernel's fixed costs), and its memory is small
        measured = {**measured, "reference": math_row}
        candidates.append("reference")
    eligible = [name for name in candidates
                if small or measured[name]["peak_mib"] <= MEMORY_BOUND * math_row["peak_mib"]]
    size = rows[0]
    where = (f"B={size['B']}, Nq={size['Nq']}, Nk={size['Nk']}" if key["op"] == "attention"
             else f"B={size['B']}, C={size['C']}, N={size['N']}")
    times = ", ".join(f"{name} {row['median_ms']:.3g} ms / {row['peak_mib']:.3g} MiB"
                      for name, row in sorted(measured.items(), key=lambda item: item[1]["median_ms"])
                      if name != "reference")
    source = f"; {size['source']}" if size.get("source") else ""
    if not eligible:  # nothing within the bound: the least memory
        best = min(candidates, key=lambda name: measured[name]["peak_mib"])
        return Choice(best, f"no candidate within {MEMORY_BOUND:g} of the math's peak at {where}; "
                            f"the least memory ({times}{source})", key, rows)
    best = min(eligible, key=lambda name: measured[name]["median_ms"])
    bound = ("the map is small, speed decides" if small
             else f"peak at most {MEMORY_BOUND:g} of the math's")
    return Choice(best, f"fastest measured at {where} ({bound}; {times}{source})", key, rows)


def _math_is_safe(key: dict) -> bool:
    """Whether the reference computes what the official math does at no risk auto should take:
    always for attention; for CAM only in fp32 / fp64 (in half it forms the Gram matrix in half)."""
    return key["op"] == "attention" or key["dtype"] in ("float32", "float64")
