"""Triton backend (placeholder until the kernels land)."""

from __future__ import annotations

import torch


def unavailable_reason(device: torch.device) -> str | None:
    return "the Triton kernels are not implemented yet"
