"""attnseg: fused position and channel attention (DANet) for PyTorch."""

from . import reference
from ._backends import check_backend
from ._ops import DoubleBackwardError, native_available, native_unavailable_reason
from .checkpoints import load_mmseg_dahead, load_official_danet_head
from .context import NonLocal2d, ObjectContextAttention
from .convert import ConversionReport, convert_model
from .functional import (
    BACKENDS,
    BackendUnavailableError,
    attention,
    available_backends,
    channel_attention,
    explain,
    position_attention,
    resolve_backend,
)
from .modules import ChannelAttention, DANetHead, PositionAttention

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "ChannelAttention",
    "ConversionReport",
    "DANetHead",
    "DoubleBackwardError",
    "NonLocal2d",
    "ObjectContextAttention",
    "PositionAttention",
    "attention",
    "available_backends",
    "channel_attention",
    "check_backend",
    "convert_model",
    "explain",
    "load_mmseg_dahead",
    "load_official_danet_head",
    "native_available",
    "native_unavailable_reason",
    "position_attention",
    "reference",
    "resolve_backend",
]
