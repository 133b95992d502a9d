"""Drop-in nn.Modules with the official DANet parameter names.

A ``PAM_Module`` / ``CAM_Module`` / ``DANetHead`` state_dict from junfu1115/DANet loads into
:class:`PositionAttention` / :class:`ChannelAttention` / :class:`DANetHead` with ``strict=True``.
"""

from __future__ import annotations

import torch
from torch import nn

from . import functional as F_attn
from ._backends import check_backend
from .onnx import module_backend

__all__ = ["PositionAttention", "ChannelAttention", "DANetHead"]


def backend_repr(backend: str) -> str:
    """How a module's extra_repr shows its backend ("auto" chooses per call: attnseg.explain)."""
    return f"backend={backend!r}"


def _attend_positions(x, query, key, value, gamma, backend: str):
    """gamma · attend(x) + x after PAM's projections (shared by PositionAttention and the modules
    :func:`attnseg.convert_model` builds)."""
    backend = module_backend(backend)
    if value.dtype != x.dtype and torch.is_autocast_enabled(x.device.type):
        # autocast ran the 1x1 convolutions in bf16/fp16: attend in that dtype (accumulating
        # in fp32) and return x's dtype, as the official module does under autocast
        attended = F_attn.position_attention(x.to(value.dtype), query, key, value, gamma, backend=backend)
        return attended.to(x.dtype)
    return F_attn.position_attention(x, query, key, value, gamma, backend=backend)


def _is_plain_pointwise(conv) -> bool:
    """A bare 1×1 nn.Conv2d (no subclass, no hooks, no stride/padding/dilation/groups)."""
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.dilation == (1, 1)
        and conv.groups == 1 and conv.padding in ((0, 0), "valid")
        and not (conv._forward_hooks or conv._forward_pre_hooks or conv._backward_hooks
                 or conv._backward_pre_hooks)
    )


def _project(conv: nn.Module, x: torch.Tensor, backend: str) -> torch.Tensor:
    """``conv(x)`` for PAM's query/key/value projections.

    On the CPU a bare 1×1 ``nn.Conv2d`` is computed as one GEMM on x's [B, C, N] view (baddbmm:
    bias + W x), which reads x where it lies and returns the NCHW output the kernels read without
    a copy. oneDNN's convolution copies its operands into a blocked layout: at N = 9,216, C = 512
    about 20 MiB per projection in the forward and 38 MiB in the backward, the largest temporaries
    of the module (``python benchmarks/module_memory.py``); the GEMM is as fast. The convolution
    runs as it is for the "reference" backend (the official code, the benchmarks' baseline),
    off the CPU, under tracing, scripting, export or compilation, with module hooks (they must
    see the call), and for any other module or convolution.
    """
    if (
        backend == "reference"
        or not isinstance(x, torch.Tensor) or type(x) is not torch.Tensor
        or x.device.type != "cpu" or x.dim() != 4
        or not _is_plain_pointwise(conv)
        or torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling()
        or torch.onnx.is_in_onnx_export()
        or nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks
        or nn.modules.module._global_backward_hooks or nn.modules.module._global_backward_pre_hooks
    ):
        return conv(x)
    b, _, h, w = x.shape
    weight = conv.weight.flatten(1)
    x3 = x.flatten(2)
    if conv.bias is None:
        out = torch.matmul(weight, x3)
    else:
        out = torch.baddbmm(conv.bias.view(1, -1, 1), weight.expand(b, -1, -1), x3)
    return out.view(b, weight.shape[0], h, w)


class PositionAttention(nn.Module):
    """DANet position attention (PAM): gamma · softmax(q kᵀ) v + x over all H·W pixel pairs.

    Args:
        in_channels: C of the [B, C, H, W] input (any C >= 1, as the official ``PAM_Module``).
        reduction: the query/key width is C // reduction (8 in DANet; the official
            ``PAM_Module(60)`` has width 60 // 8 = 7). A width of 0 is an error.
        backend: "auto", "native", "triton", "chunked" or "reference" (see :mod:`attnseg.functional`).
        key_channels: optional keyword, the query/key width itself (mmsegmentation's
            ``pam_channels``); when given, ``reduction`` is not used.

    Parameters (official names): query_conv, key_conv (1×1, C -> key_channels, bias),
    value_conv (1×1, C -> C, bias), gamma ([1], zero-initialised).
    """

    def __init__(self, in_channels: int, reduction: int = 8, backend: str = "auto", *,
                 key_channels: int | None = None):
        super().__init__()
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"PositionAttention: in_channels must be a positive int, got {in_channels!r}")
        if isinstance(reduction, bool) or not isinstance(reduction, int) or reduction < 1:
            raise ValueError(f"PositionAttention: reduction must be a positive int, got {reduction!r}")
        if key_channels is None:
            key_channels = in_channels // reduction
            if key_channels == 0:
                raise ValueError(
                    f"PositionAttention: the query/key width in_channels // reduction = {in_channels} // "
                    f"{reduction} is 0; in_channels must be at least {reduction} (= reduction), or pass a "
                    f"smaller reduction or key_channels="
                )
        elif isinstance(key_channels, bool) or not isinstance(key_channels, int) or key_channels < 1:
            raise ValueError(f"PositionAttention: key_channels must be a positive int or None, got {key_channels!r}")
        self.in_channels = in_channels
        self.reduction = reduction
        self.key_channels = key_channels
        self.backend = check_backend(backend)
        self.query_conv = nn.Conv2d(in_channels, key_channels, kernel_size=1)
        self.key_conv = nn.Conv2d(in_channels, key_channels, kernel_size=1)
        self.value_conv = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[1] != self.in_channels:
            raise ValueError(
                f"PositionAttention: x must have {self.in_channels} channels, got shape {tuple(x.shape)}"
            )
        return _attend_positions(x, _project(self.query_conv, x, self.backend),
                                 _project(self.key_conv, x, self.backend),
                                 _project(self.value_conv, x, self.backend), self.gamma, self.backend)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, key_channels={self.key_channels}, "
                f"{backend_repr(self.backend)}")


def _attend_channels(x, gamma, variant: str, backend: str):
    """gamma · A X + x (shared by ChannelAttention and the modules :func:`attnseg.convert_model` builds)."""
    return F_attn.channel_attention(x, gamma, variant=variant, backend=module_backend(backend))


class ChannelAttention(nn.Module):
    """DANet channel attention (CAM): gamma · A X + x with A a C×C softmax over channel pairs.

    Args:
        in_channels: optional, C of the input; checked in forward when given.
        variant: "official" (softmax(rowmax(E) − E), as DANet's code and checkpoints) or
            "paper" (softmax(E), as the paper writes it).
        backend: "auto", "native", "triton", "chunked" or "reference".

    Parameters: gamma ([1], zero-initialised), as the official ``CAM_Module``.
    """

    def __init__(self, in_channels: int | None = None, variant: str = "official", backend: str = "auto"):
        super().__init__()
        if variant not in F_attn.CAM_VARIANTS:
            raise ValueError(f"ChannelAttention: variant must be one of {F_attn.CAM_VARIANTS}, got {variant!r}")
        if in_channels is not None and (not isinstance(in_channels, int) or in_channels < 1):
            raise ValueError(f"ChannelAttention: in_channels must be a positive int or None, got {in_channels!r}")
        self.in_channels = in_channels
        self.variant = variant
        self.backend = check_backend(backend)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.in_channels is not None
            and isinstance(x, torch.Tensor)
            and x.dim() == 4
            and x.shape[1] != self.in_channels
        ):
            raise ValueError(f"ChannelAttention: x must have {self.in_channels} channels, got shape {tuple(x.shape)}")
        return _attend_channels(x, self.gamma, self.variant, self.backend)

    def extra_repr(self) -> str:
        channels = f"in_channels={self.in_channels}, " if self.in_channels is not None else ""
        return f"{channels}variant={self.variant!r}, {backend_repr(self.backend)}"


def _conv_bn_relu(in_channels: int, out_channels: int, norm_layer) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        norm_layer(out_channels),
        nn.ReLU(),
    )


def _classifier(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Dropout2d(0.1, False), nn.Conv2d(in_channels, out_channels, 1))


class DANetHead(nn.Module):
    """The DANet head: PAM and CAM branches on a dilated-FCN feature map, summed and classified.

    Args (the official ``DANetHead(in_channels, out_channels, norm_layer)`` order):
        in_channels: backbone channels (2048 for ResNet-50/101).
        out_channels: output classes (``num_classes=`` is accepted as an alias).
        norm_layer: normalisation layer class (``nn.BatchNorm2d``, or ``nn.SyncBatchNorm``).
        backend: passed to both attention modules.
        cam_variant: "official" or "paper" (see :class:`ChannelAttention`).
        channels: keyword, the inter channels of both branches (default in_channels // 4, as
            the official head; mmsegmentation's DAHead ``channels``).
        pam_channels: keyword, PAM's query/key width (default channels // 8; mmseg's
            ``pam_channels``).

    Returns ``(fused_logits, pam_logits, cam_logits)``, each [B, out_channels, H, W], like the
    official head. Submodule names match the official ones (conv5a, conv5c, sa, sc, conv51,
    conv52, conv6, conv7, conv8), so ``head.*`` checkpoint weights load strictly.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, norm_layer=nn.BatchNorm2d,
                 backend: str = "auto", cam_variant: str = "official", *, channels: int | None = None,
                 pam_channels: int | None = None, num_classes: int | None = None):
        super().__init__()
        if num_classes is not None:
            if out_channels is not None and out_channels != num_classes:
                raise ValueError(
                    f"DANetHead: out_channels ({out_channels!r}) and its alias num_classes ({num_classes!r}) "
                    "disagree; pass one of them"
                )
            out_channels = num_classes
        if out_channels is None:
            raise TypeError("DANetHead: missing the number of classes: pass out_channels (or num_classes)")
        if isinstance(out_channels, bool) or not isinstance(out_channels, int) or out_channels < 1:
            raise ValueError(f"DANetHead: out_channels must be a positive int, got {out_channels!r}")
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"DANetHead: in_channels must be a positive int, got {in_channels!r}")
        if channels is None:
            inter_channels = in_channels // 4
            if inter_channels == 0:
                raise ValueError(
                    f"DANetHead: inter channels in_channels // 4 = {in_channels} // 4 is 0; in_channels must be "
                    f"at least 4, or pass channels="
                )
        elif isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"DANetHead: channels must be a positive int or None, got {channels!r}")
        else:
            inter_channels = channels
        if pam_channels is None:
            pam_channels = inter_channels // 8
            if pam_channels == 0:
                source = f"channels = {inter_channels}" if channels is not None else (
                    f"in_channels // 4 = {inter_channels}; in_channels must be at least 32")
                raise ValueError(
                    f"DANetHead: PAM's query/key width (inter channels) // 8 is 0 with {source}; "
                    f"pass pam_channels= (or channels=)"
                )
        elif isinstance(pam_channels, bool) or not isinstance(pam_channels, int) or pam_channels < 1:
            raise ValueError(f"DANetHead: pam_channels must be a positive int or None, got {pam_channels!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.channels = inter_channels
        self.pam_channels = pam_channels
        self.conv5a = _conv_bn_relu(in_channels, inter_channels, norm_layer)
        self.conv5c = _conv_bn_relu(in_channels, inter_channels, norm_layer)
        self.sa = PositionAttention(inter_channels, backend=backend, key_channels=pam_channels)
        self.sc = ChannelAttention(inter_channels, variant=cam_variant, backend=backend)
        self.conv51 = _conv_bn_relu(inter_channels, inter_channels, norm_layer)
        self.conv52 = _conv_bn_relu(inter_channels, inter_channels, norm_layer)
        self.conv6 = _classifier(inter_channels, out_channels)
        self.conv7 = _classifier(inter_channels, out_channels)
        self.conv8 = _classifier(inter_channels, out_channels)

    def forward(self, x: torch.Tensor):
        sa_conv = self.conv51(self.sa(self.conv5a(x)))
        sc_conv = self.conv52(self.sc(self.conv5c(x)))
        return self.conv8(sa_conv + sc_conv), self.conv6(sa_conv), self.conv7(sc_conv)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, channels={self.channels}, "
                f"pam_channels={self.pam_channels}")
