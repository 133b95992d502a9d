"""Every setting attnseg reads from the environment, in one place.

Read by Python (here, at call time, so a test or a user can change them between calls):

=============================  ====================================================================
``ATTNSEG_CHUNK_BUDGET_MIB``   the chunked backend's memory budget for one chunk's temporaries, in
                               MiB (a positive number); overrides the default below. The
                               ``chunk_budget_mib=`` argument of a call overrides both.
``ATTNSEG_QUIET=1``            no warning when the compiled extension fails to load.
=============================  ====================================================================

Read by the compiled CPU kernels (``csrc/cpu``), for tests and comparisons:

=============================  ====================================================================
``ATTNSEG_CPU_F32_KERNEL``     auto (default), avx512, avx2 or aten: the fp32 kernels' instruction set.
``ATTNSEG_CPU_LOWP_GEMM``      auto (default), brgemm, ...: the bf16/fp16 kernels' GEMM (see
                               ``csrc/cpu/lowp_gemm.h``).
``ATTNSEG_CPU_PLAN_THREADS``   a thread count (1-4096) the fp32 kernels split their work for instead
                               of ``torch.get_num_threads()`` (docs/cpu_kernels.md: the split for
                               the thread count).
=============================  ====================================================================

Build switches (``MAX_JOBS``, ``ATTNSEG_SKIP_CUDA``, ``ATTNSEG_FORCE_CUDA``,
``TORCH_CUDA_ARCH_LIST``, ...) are read by ``setup.py`` and listed in the README.

The chunked backend's default budget is ``max(floor, whole / MAX_DEFAULT_CHUNKS)``: ``whole`` is
what the temporaries of the whole map would take, so a map whose temporaries fit the floor is one
chunk and no call takes more than :data:`MAX_DEFAULT_CHUNKS` chunks; the floor is
:data:`DEFAULT_CHUNK_BUDGET_MIB` per device type. An explicit budget (argument or environment) is a
cap: the chunks are as large as fit it.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

__all__ = ["DEFAULT_CHUNK_BUDGET_MIB", "MAX_DEFAULT_CHUNKS", "chunk_budget_mib", "chunk_policy"]

# The default floor of the chunk budget, MiB, per device type (docs/chunked.md: how it was chosen).
DEFAULT_CHUNK_BUDGET_MIB = {"cpu": 64.0, "cuda": 128.0}
_OTHER_DEVICE_BUDGET_MIB = 128.0
# With the default budget a call takes at most this many chunks (each chunk's launches and
# Python cost are fixed; past 16 they add more than their memory saves).
MAX_DEFAULT_CHUNKS = 16

_MIB = 1 << 20


def _positive_mib(value, what: str) -> float:
    try:
        mib = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a positive number of MiB, got {value!r}") from None
    if not mib > 0 or mib == float("inf"):
        raise ValueError(f"{what} must be a positive, finite number of MiB, got {value!r}")
    return mib


def chunk_budget_mib(budget_mib: Optional[float] = None) -> Optional[float]:
    """The explicit chunk budget in MiB: ``budget_mib`` if given, else ``ATTNSEG_CHUNK_BUDGET_MIB``
    if set, else None (the default rule)."""
    if budget_mib is not None:
        if isinstance(budget_mib, bool) or not isinstance(budget_mib, (int, float)):
            raise TypeError(f"chunk_budget_mib must be a number of MiB or None, got {type(budget_mib).__name__}")
        return _positive_mib(budget_mib, "chunk_budget_mib")
    env = os.environ.get("ATTNSEG_CHUNK_BUDGET_MIB")
    if env is None or env == "":
        return None
    return _positive_mib(env, "ATTNSEG_CHUNK_BUDGET_MIB")


def chunk_policy(device: torch.device, budget_mib: Optional[float] = None) -> tuple[int, int]:
    """``(budget_bytes, max_chunks)`` for the chunked op on ``device``: the explicit budget with no
    limit on the number of chunks (0), else the default floor and :data:`MAX_DEFAULT_CHUNKS`."""
    explicit = chunk_budget_mib(budget_mib)
    if explicit is not None:
        return int(explicit * _MIB), 0
    floor = DEFAULT_CHUNK_BUDGET_MIB.get(torch.device(device).type, _OTHER_DEVICE_BUDGET_MIB)
    return int(floor * _MIB), MAX_DEFAULT_CHUNKS
