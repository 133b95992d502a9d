"""attnseg: fused position and channel attention (DANet) for PyTorch."""

from . import reference
from ._ops import native_available, native_unavailable_reason
from .functional import (
    BACKENDS,
    BackendUnavailableError,
    attention,
    available_backends,
    channel_attention,
    position_attention,
    resolve_backend,
)
from .modules import ChannelAttention, DANetHead, PositionAttention

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "ChannelAttention",
    "DANetHead",
    "PositionAttention",
    "attention",
    "available_backends",
    "channel_attention",
    "native_available",
    "native_unavailable_reason",
    "position_attention",
    "reference",
    "resolve_backend",
]
