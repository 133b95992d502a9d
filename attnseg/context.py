"""Other attention heads on attnseg's generic op: OCR object attention and the non-local block.

* :class:`ObjectContextAttention`: the OCR module of Yuan et al., "Object-Contextual
  Representations for Semantic Segmentation" (ECCV 2020), as HRNet-OCR's ``SpatialGather_Module``
  followed by ``SpatialOCR_Module``. Each pixel attends to K soft object regions: the generic op
  with Nq = H·W, Nk = K, scale = key_channels ** -0.5.
* :class:`NonLocal2d`: the embedded-Gaussian non-local block of Wang et al., "Non-local Neural
  Networks" (CVPR 2018): the generic op with Nq = Nk = H·W.

Both pass channel-first views (``conv(x).flatten(2).transpose(1, 2)``) to
:func:`attnseg.functional.attention`, so no projection is copied and the N×N (or N×K) map is
never materialised by the fused backends.
"""

from __future__ import annotations

import torch
from torch import nn

from . import functional as F_attn
from ._backends import check_backend
from .modules import backend_repr
from .onnx import module_backend

__all__ = ["ObjectContextAttention", "NonLocal2d"]


def _check_positive_int(owner: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    return value


def _check_feature_map(owner: str, name: str, t, channels: int | None, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{owner}: {name} must be a 4-D tensor {layout}, got shape {tuple(t.shape)}")
    if channels is not None and t.shape[1] != channels:
        raise ValueError(f"{owner}: {name} must have {channels} channels {layout}, got shape {tuple(t.shape)}")
    if any(size == 0 for size in t.shape[1:]):  # an empty batch is fine, as for torch's layers
        raise ValueError(f"{owner}: {name} has a zero-sized dimension, shape {tuple(t.shape)}; "
                         "every size but the batch must be >= 1")


def _object_attention(block: nn.Module, x, regions, key_channels: int, scale: float, backend: str):
    """HRNet-OCR's object attention (``_ObjectAttentionBlock.forward`` at scale 1) on the fused op.

    ``block`` has f_pixel (φ), f_object (ψ), f_down (δ), f_up (ρ); x: [B, C, H, W] pixels,
    regions: [B, C, K, 1] region features. Returns ρ(softmax(φ(x)ᵀ ψ(f) · scale) δ(f)), [B, C', H, W].
    """
    b, _, h, w = x.shape
    # channel-first [B, ch, ...] -> [B, n, ch] views, no copies
    query = block.f_pixel(x).flatten(2).transpose(1, 2)  # [B, N, key]
    key = block.f_object(regions).flatten(2).transpose(1, 2)  # [B, K, key]
    value = block.f_down(regions).flatten(2).transpose(1, 2)  # [B, K, key]
    context = F_attn.attention(query, key, value, scale, backend=module_backend(backend))  # [B, N, key]
    return block.f_up(context.transpose(1, 2).reshape(b, key_channels, h, w))


def _non_local(x, theta: nn.Module, phi: nn.Module, g: nn.Module, out: nn.Module, inter_channels: int,
               scale: float, backend: str):
    """Embedded-Gaussian non-local block on the fused op: x + out(softmax(θ(x)ᵀ φ(x) · scale) g(x)).

    φ and g may downsample (mmcv's ``sub_sample``): the op takes Nk ≠ Nq.
    """
    b, _, h, w = x.shape
    query = theta(x).flatten(2).transpose(1, 2)  # [B, N, inter] views, no copies
    key = phi(x).flatten(2).transpose(1, 2)  # [B, Nk, inter]
    value = g(x).flatten(2).transpose(1, 2)
    y = F_attn.attention(query, key, value, scale, backend=module_backend(backend))  # [B, N, inter]
    return x + out(y.transpose(1, 2).reshape(b, inter_channels, h, w))


def _bn_relu(channels: int, norm_layer) -> nn.Sequential:
    # HRNet-OCR's ModuleHelper.BNReLU: Sequential(BatchNorm2d, ReLU), hence the ".1.0." keys.
    return nn.Sequential(norm_layer(channels), nn.ReLU())


def _conv_bn_relu(in_channels: int, out_channels: int, norm_layer) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False), _bn_relu(out_channels, norm_layer)]


class _ObjectAttentionBlock(nn.Module):
    """HRNet-OCR's ``_ObjectAttentionBlock`` (scale=1): f_pixel, f_object, f_down, f_up."""

    def __init__(self, in_channels: int, key_channels: int, norm_layer):
        super().__init__()
        self.f_pixel = nn.Sequential(
            *_conv_bn_relu(in_channels, key_channels, norm_layer),
            *_conv_bn_relu(key_channels, key_channels, norm_layer),
        )
        self.f_object = nn.Sequential(
            *_conv_bn_relu(in_channels, key_channels, norm_layer),
            *_conv_bn_relu(key_channels, key_channels, norm_layer),
        )
        self.f_down = nn.Sequential(*_conv_bn_relu(in_channels, key_channels, norm_layer))
        self.f_up = nn.Sequential(*_conv_bn_relu(key_channels, in_channels, norm_layer))


class ObjectContextAttention(nn.Module):
    """OCR: pixel features augmented with object-contextual representations.

    Args:
        in_channels: C of the pixel features x [B, C, H, W].
        key_channels: width of the query/key/value projections (256 in HRNet-OCR).
        out_channels: channels of the output (512 in HRNet-OCR).
        norm_layer: normalisation layer class (``nn.BatchNorm2d``, or ``nn.SyncBatchNorm``).
        dropout: ``nn.Dropout2d`` probability after the output conv (0.05 in HRNet-OCR; 0 for none).
        backend: "auto", "native", "triton", "chunked" or "reference" (see :mod:`attnseg.functional`).

    ``forward(x, coarse_logits)`` with coarse_logits [B, K, H, W] (K soft object regions, e.g.
    the auxiliary head's class logits):

    1. spatial gather: M = softmax over the H·W pixels of each region's logits, region
       features f_k = Σ_i M[k, i] x_i ([B, K, C]; a plain matmul, K is small);
    2. object attention: w[i, k] = softmax_k(φ(x_i) · ψ(f_k) · key_channels ** -0.5),
       y_i = ρ(Σ_k w[i, k] δ(f_k)) through attnseg's fused op (Nq = H·W, Nk = K);
    3. output g(cat([y, x], dim=1)) -> [B, out_channels, H, W].

    Parameters (HRNet-OCR names, ``SpatialOCR_Module`` layout, so an ``ocr_distri_head.*``
    checkpoint slice loads with ``strict=True``):
    ``object_context_block.f_pixel`` (φ: two 1×1 conv-BN-ReLU, C -> key -> key),
    ``object_context_block.f_object`` (ψ: the same on the region features),
    ``object_context_block.f_down`` (δ: 1×1 conv-BN-ReLU, C -> key),
    ``object_context_block.f_up`` (ρ: 1×1 conv-BN-ReLU, key -> C),
    ``conv_bn_dropout`` (g: 1×1 conv-BN-ReLU 2C -> out_channels, then Dropout2d).
    Convolutions have no bias; each BN-ReLU is a ``Sequential(norm, ReLU)`` as HRNet's ``BNReLU``.
    Like the reference, the concatenation is ``[context ; x]`` (context first), which is what
    the pretrained conv_bn_dropout weights expect.
    """

    def __init__(self, in_channels: int, key_channels: int, out_channels: int, norm_layer=nn.BatchNorm2d,
                 dropout: float = 0.05, backend: str = "auto"):
        super().__init__()
        owner = "ObjectContextAttention"
        self.in_channels = _check_positive_int(owner, "in_channels", in_channels)
        self.key_channels = _check_positive_int(owner, "key_channels", key_channels)
        self.out_channels = _check_positive_int(owner, "out_channels", out_channels)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout <= 1.0:
            raise ValueError(f"{owner}: dropout must be a float in [0, 1], got {dropout!r}")
        if not callable(norm_layer):
            raise ValueError(f"{owner}: norm_layer must be a callable returning a module (e.g. nn.BatchNorm2d), got {norm_layer!r}")
        self.dropout = float(dropout)
        self.backend = check_backend(backend)
        self.scale = float(key_channels) ** -0.5
        self.object_context_block = _ObjectAttentionBlock(in_channels, key_channels, norm_layer)
        self.conv_bn_dropout = nn.Sequential(
            *_conv_bn_relu(2 * in_channels, out_channels, norm_layer),
            nn.Dropout2d(self.dropout),
        )

    def spatial_gather(self, x: torch.Tensor, coarse_logits: torch.Tensor) -> torch.Tensor:
        """Region features [B, C, K, 1] (HRNet's ``ocr_context`` layout) from x and the logits."""
        probs = torch.softmax(coarse_logits.flatten(2), dim=2)  # [B, K, N]
        regions = torch.bmm(probs, x.flatten(2).transpose(1, 2))  # [B, K, C]
        return regions.transpose(1, 2).unsqueeze(3)

    def forward(self, x: torch.Tensor, coarse_logits: torch.Tensor) -> torch.Tensor:
        owner = "ObjectContextAttention"
        _check_feature_map(owner, "x", x, self.in_channels, "[B, C, H, W]")
        _check_feature_map(owner, "coarse_logits", coarse_logits, None, "[B, K, H, W]")
        b, _, h, w = x.shape
        if coarse_logits.shape[0] != b or coarse_logits.shape[2:] != x.shape[2:]:
            raise ValueError(
                f"{owner}: coarse_logits must have shape [B, K, H, W] = [{b}, K, {h}, {w}] to match x, "
                f"got {tuple(coarse_logits.shape)} (resize the logits to x's resolution first)"
            )
        if coarse_logits.device != x.device or coarse_logits.dtype != x.dtype:
            raise ValueError(
                f"{owner}: coarse_logits ({coarse_logits.dtype}, {coarse_logits.device}) must share x's "
                f"dtype and device ({x.dtype}, {x.device})"
            )
        block = self.object_context_block
        regions = self.spatial_gather(x, coarse_logits)  # [B, C, K, 1]
        context = _object_attention(block, x, regions, self.key_channels, self.scale, self.backend)
        return self.conv_bn_dropout(torch.cat([context, x], dim=1))

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, key_channels={self.key_channels}, "
            f"out_channels={self.out_channels}, dropout={self.dropout}, {backend_repr(self.backend)}"
        )


class NonLocal2d(nn.Module):
    """Embedded-Gaussian non-local block: z = x + W(softmax(θ(x)ᵀ φ(x) · s) g(x)).

    Args:
        in_channels: C of the [B, C, H, W] input.
        inter_channels: width of θ, φ, g (default ``max(1, in_channels // 2)``).
        use_scale: False: s = 1, the paper's embedded Gaussian; True: s = inter_channels ** -0.5,
            as mmcv's ``NonLocal2d(use_scale=True)``.
        backend: "auto", "native", "triton", "chunked" or "reference".
        bn_layer: True: W = Sequential(1×1 conv, BatchNorm2d) with the BN's weight and bias
            zero-initialised (the paper's recipe); False: W = a 1×1 conv, zero-initialised.
            Either way the block starts as the identity.

    Parameters (names of the common PyTorch port, AlexHex7/Non-local_pytorch): g, theta, phi
    (1×1 convs C -> inter, with bias) and W (see bn_layer).
    """

    def __init__(self, in_channels: int, inter_channels: int | None = None, use_scale: bool = False,
                 backend: str = "auto", bn_layer: bool = True):
        super().__init__()
        owner = "NonLocal2d"
        self.in_channels = _check_positive_int(owner, "in_channels", in_channels)
        if inter_channels is None:
            inter_channels = max(1, in_channels // 2)
        self.inter_channels = _check_positive_int(owner, "inter_channels", inter_channels)
        if not isinstance(use_scale, bool):
            raise ValueError(f"{owner}: use_scale must be a bool, got {use_scale!r}")
        if not isinstance(bn_layer, bool):
            raise ValueError(f"{owner}: bn_layer must be a bool, got {bn_layer!r}")
        self.use_scale = use_scale
        self.bn_layer = bn_layer
        self.backend = check_backend(backend)
        self.scale = float(inter_channels) ** -0.5 if use_scale else 1.0
        self.g = nn.Conv2d(in_channels, inter_channels, kernel_size=1)
        self.theta = nn.Conv2d(in_channels, inter_channels, kernel_size=1)
        self.phi = nn.Conv2d(in_channels, inter_channels, kernel_size=1)
        if bn_layer:
            self.W = nn.Sequential(nn.Conv2d(inter_channels, in_channels, kernel_size=1), nn.BatchNorm2d(in_channels))
            nn.init.zeros_(self.W[1].weight)
            nn.init.zeros_(self.W[1].bias)
        else:
            self.W = nn.Conv2d(inter_channels, in_channels, kernel_size=1)
            nn.init.zeros_(self.W.weight)
            nn.init.zeros_(self.W.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_feature_map("NonLocal2d", "x", x, self.in_channels, "[B, C, H, W]")
        return _non_local(x, self.theta, self.phi, self.g, self.W, self.inter_channels, self.scale, self.backend)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, inter_channels={self.inter_channels}, "
            f"use_scale={self.use_scale}, bn_layer={self.bn_layer}, {backend_repr(self.backend)}"
        )
