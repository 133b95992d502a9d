"""Triton autotune results measured on a GPU, for the launcher to read instead of autotuning.

``benchmarks/gpu_check.py`` autotunes the Triton kernels at the DANet shapes on a GPU and writes
what ``@triton.autotune`` chose into ``attnseg/triton/tuned/<gpu>.json`` (``<gpu>``: the device
name in lower case, runs of other characters as "-", e.g. ``nvidia-h200``)::

    {"gpu": "NVIDIA H200", "arch": "sm_90", "triton": "3.6.0", "source": "...",
     "entries": [{"kernel": "_attn_fwd", "dtypes": ["float16", "float16", "float16", "float16", "float32"],
                  "key": {"TUNE_NQ": 16384, "TUNE_NK": 16384, "E": 64, "EV": 512},
                  "config": {"kwargs": {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_EV": 128},
                             "num_warps": 8, "num_stages": 2}}, ...]}

``key`` holds the autotune key's arguments by name and ``dtypes`` the dtypes of the kernel's tensor
arguments in argument order (the autotuner keys on both). :func:`best_config` looks a launch up: the
file of that GPU first, else any file of the same architecture. Importing this module imports
neither triton nor torch.cuda state; files are read once.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

__all__ = ["TUNED_DIR", "best_config", "gpu_kind", "load_entries", "narrow", "signature"]

TUNED_DIR = Path(__file__).resolve().parent / "tuned"


def gpu_kind(name: str) -> str:
    """The file stem for a GPU called ``name``: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@functools.lru_cache(maxsize=None)
def load_entries(folder: str) -> tuple[tuple[str, str, tuple[dict, ...]], ...]:
    """Every file of ``folder``: (file stem, architecture, entries), in file-name order."""
    found = []
    for path in sorted(Path(folder).glob("*.json")):
        with open(path) as f:
            data = json.load(f)
        found.append((path.stem, data.get("arch", ""), tuple(data.get("entries", ()))))
    return tuple(found)


def _device_identity(device) -> tuple[str, str]:
    """(gpu kind, architecture "sm_XY") of a CUDA device, or of a ("name", "sm_XY") pair."""
    if isinstance(device, tuple):
        return gpu_kind(device[0]), device[1]
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return "", ""
    index = torch.cuda.current_device() if device.index is None else device.index
    major, minor = torch.cuda.get_device_capability(index)
    return gpu_kind(torch.cuda.get_device_name(index)), f"sm_{major}{minor}"


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def best_config(kernel_name: str, key_dict: dict, device, folder: str | Path | None = None) -> dict | None:
    """The measured best config of ``kernel_name`` for a launch, or None where none was measured.

    Args:
        kernel_name: the kernel function's name, e.g. ``"_attn_fwd"``.
        key_dict: the launch's arguments by name (at least the autotune key's), and ``"dtypes"``:
            the dtypes (torch dtypes or names) of its tensor arguments in argument order.
        device: a CUDA ``torch.device``, or a (GPU name, "sm_XY") pair.
        folder: where the files are (default :data:`TUNED_DIR`).

    Returns ``{"kwargs": {...}, "num_warps": w, "num_stages": s}``: from the file of this GPU if it
    has an entry, else from another GPU of the same architecture (file-name order).
    """
    kind, arch = _device_identity(device)
    if not kind:
        return None
    dtypes = [_dtype_name(d) for d in key_dict.get("dtypes", ())]
    files = load_entries(str(folder or TUNED_DIR))
    ordered = [f for f in files if f[0] == kind] + [f for f in files if f[0] != kind and arch and f[1] == arch]
    for _, _, entries in ordered:
        for entry in entries:
            if entry.get("kernel") != kernel_name or list(entry.get("dtypes", ())) != dtypes:
                continue
            if all(key_dict.get(name) == value for name, value in entry.get("key", {}).items()):
                return entry["config"]
    return None


def signature(config) -> tuple:
    """(sorted block sizes, warps, stages) of a ``triton.Config`` or of a :func:`best_config` dict."""
    if isinstance(config, dict):
        return tuple(sorted(config["kwargs"].items())), config["num_warps"], config["num_stages"]
    return tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages


def narrow(configs: list, kernel_name: str, args: dict, device, folder: str | Path | None = None) -> list:
    """``configs`` narrowed to the measured best one for this launch where it is among them, else
    ``configs`` unchanged: what an ``early_config_prune`` returns to skip autotuning. ``args``:
    the launch's arguments by name, in the kernel's argument order (as the prune receives them)."""
    dtypes = [value.dtype for value in args.values() if hasattr(value, "dtype")]  # as the autotuner keys
    best = best_config(kernel_name, {**args, "dtypes": dtypes}, device, folder)
    if best is None:
        return configs
    chosen = [config for config in configs if signature(config) == signature(best)]
    return chosen or configs
