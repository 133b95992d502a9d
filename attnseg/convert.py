"""Put attnseg's fused attention into a model that already exists: :func:`convert_model`.

Recognised modules (by class name, then by the exact structure their forward uses), and what
replaces each:

* ``PAM_Module`` (junfu1115/DANet ``encoding/nn/da_att.py``) -> :class:`attnseg.PositionAttention`
* ``CAM_Module`` (the same file) -> :class:`attnseg.ChannelAttention` (variant "official")
* ``PAM`` (mmsegmentation ``decode_heads/da_head.py``, a ``SelfAttentionBlock``) -> :class:`FusedMMSegPAM`
* ``CAM`` (the same file) -> :class:`FusedMMSegCAM`
* ``_ObjectAttentionBlock`` / ``ObjectAttentionBlock2D`` with scale=1 (HRNet-OCR
  ``lib/models/seg_hrnet_ocr.py``) -> :class:`FusedObjectAttentionBlock`
* ``NonLocal2d`` with mode="embedded_gaussian" (mmcv ``cnn/bricks/non_local.py``; ``sub_sample``
  and a ``norm_cfg`` on ``conv_out`` included) -> :class:`FusedNonLocal2d`

What a replacement keeps: the very Parameter and buffer objects of the original (an optimizer
built before the conversion keeps training the model), its submodules (the projections are
called as they are, so a ConvModule, a norm or mmcv's ``sub_sample`` pooling inside them are
kept), every state_dict key in the same order, and the train/eval mode. What changes: the
attention in the middle runs on :func:`attnseg.functional.attention` /
:func:`attnseg.functional.channel_attention`, without the N×N map.

How a module is recognised, in order; the first check that fails leaves it as it is and is
reported as the reason:

1. its class name is in the list above, and its ``forward`` is the one of that class (or of
   the upstream base class: ``SelfAttentionBlock``, ``_NonLocalNd``, ``_ObjectAttentionBlock``),
   not overridden by a subclass;
2. no forward or backward hooks are registered on it (a replacement would drop them);
3. the attributes and options its forward reads (``matmul_norm``, ``query_downsample``,
   ``out_project``, ``mode``, ``scale``, ``key_channels``, ...) have the values of the upstream
   module, and its projections are the 1×1 convolutions of the right shapes;
4. a probe: on a small random input (float64, random parameters substituted through
   :func:`torch.func.functional_call`, the reference backend, eval mode, under ``no_grad``,
   with a private random generator) the original and the replacement give the same output.
   This catches a fork whose forward differs in ways no attribute shows (say, the paper's
   softmax(E) in place of the official softmax(rowmax(E) - E) in a ``CAM_Module``). The probe
   changes nothing in the model (no BatchNorm statistics, no RNG state).

Use it before anything wraps the model: convert, then build the optimizer (or keep the one
you have), then ``DistributedDataParallel`` (DDP records the module structure when it is
constructed), then ``torch.compile``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .context import _non_local, _object_attention
from ._backends import check_backend
from .modules import (ChannelAttention, PositionAttention, _attend_channels, _attend_positions, backend_repr)

__all__ = [
    "ConversionReport",
    "Converted",
    "FusedMMSegCAM",
    "FusedMMSegPAM",
    "FusedNonLocal2d",
    "FusedObjectAttentionBlock",
    "Skipped",
    "convert_model",
]


# ---------------------------------------------------------------------------------------------
# Replacements for modules attnseg has no class of its own for (their state_dict layout differs)
# ---------------------------------------------------------------------------------------------


class FusedMMSegPAM(nn.Module):
    """mmsegmentation's DAHead ``PAM`` on the fused op: query_project, key_project,
    value_project (1×1 convs) and gamma (mmcv ``Scale``, a 0-dim parameter), as upstream."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gamma = self.gamma.scale.reshape(1)
        return _attend_positions(x, self.query_project(x), self.key_project(x), self.value_project(x), gamma,
                                 self.backend)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, {backend_repr(self.backend)}"


class FusedMMSegCAM(nn.Module):
    """mmsegmentation's DAHead ``CAM`` (the official softmax(rowmax(E) - E)) on the fused op."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _attend_channels(x, self.gamma.scale.reshape(1), "official", self.backend)

    def extra_repr(self) -> str:
        return backend_repr(self.backend)


class FusedObjectAttentionBlock(nn.Module):
    """HRNet-OCR's ``_ObjectAttentionBlock`` / ``ObjectAttentionBlock2D`` (scale=1) on the fused op.

    ``forward(x, proxy)``: x [B, C, H, W] pixel features, proxy [B, C, K, 1] region features
    (``SpatialGather_Module``'s output); returns f_up(context), [B, C, H, W].
    """

    def forward(self, x: torch.Tensor, proxy: torch.Tensor) -> torch.Tensor:
        return _object_attention(self, x, proxy, self.key_channels, float(self.key_channels) ** -0.5, self.backend)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, key_channels={self.key_channels}, {backend_repr(self.backend)}"


class FusedNonLocal2d(nn.Module):
    """mmcv's ``NonLocal2d`` (mode="embedded_gaussian") on the fused op: g, theta, phi, conv_out
    kept as they are (with ``sub_sample``, g and phi include mmcv's max pooling)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = float(self.inter_channels) ** -0.5 if self.use_scale else 1.0
        return _non_local(x, self.theta, self.phi, self.g, self.conv_out, self.inter_channels, scale, self.backend)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, inter_channels={self.inter_channels}, use_scale={self.use_scale}, "
                f"{backend_repr(self.backend)}")


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Converted:
    name: str  # qualified name in the model ("" for the model itself)
    original: str  # class name of the module that was there
    replacement: str  # class name of what is there now


@dataclasses.dataclass(frozen=True)
class Skipped:
    name: str
    original: str
    reason: str  # why it was left as it is


@dataclasses.dataclass
class ConversionReport:
    """What :func:`convert_model` did: ``converted`` and ``skipped`` (look-alikes: a recognised
    class name whose structure differs), each a list in the model's module order.
    ``str(report)`` is a readable table (what ``verbose=True`` prints)."""

    converted: List[Converted] = dataclasses.field(default_factory=list)
    skipped: List[Skipped] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"attnseg.convert_model: {len(self.converted)} converted, {len(self.skipped)} left as they are"]
        lines += [f"  converted {c.name or '<model>'}: {c.original} -> {c.replacement}" for c in self.converted]
        lines += [f"  skipped   {s.name or '<model>'}: {s.original}: {s.reason}" for s in self.skipped]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Structure checks: each returns None (fits) or the reason it does not
# ---------------------------------------------------------------------------------------------


def _forward_owner(module: nn.Module, method: str = "forward") -> str:
    """Name of the class in module's MRO that defines ``method``."""
    for cls in type(module).__mro__:
        if method in vars(cls):
            return cls.__name__
    return "?"


def _expect_forward(module: nn.Module, owners: Tuple[str, ...], method: str = "forward") -> Optional[str]:
    owner = _forward_owner(module, method)
    if owner not in owners:
        return f"{method} is defined by {owner}, not by upstream's {' / '.join(owners)}"
    return None


def _pointwise_conv(module, name: str, in_channels: int, out_channels: Optional[int], bias: bool) -> Optional[str]:
    """None if ``module`` is a 1×1, stride-1 Conv2d in_channels -> out_channels (any when None)."""
    if type(module) is not nn.Conv2d:
        return f"{name} is a {type(module).__name__}, not an nn.Conv2d"
    shape = (module.kernel_size, module.stride, module.padding, module.dilation, module.groups)
    if shape != ((1, 1), (1, 1), (0, 0), (1, 1), 1):
        return (f"{name} is not a plain 1x1 convolution (kernel {module.kernel_size}, stride {module.stride}, "
                f"padding {module.padding}, dilation {module.dilation}, groups {module.groups})")
    if module.in_channels != in_channels or (out_channels is not None and module.out_channels != out_channels):
        want = f"{in_channels} -> {out_channels if out_channels is not None else 'any'}"
        return f"{name} maps {module.in_channels} -> {module.out_channels} channels, expected {want}"
    if (module.bias is not None) != bias:
        return f"{name} has {'a' if module.bias is not None else 'no'} bias; upstream's has {'one' if bias else 'none'}"
    return None


def _softmax_last_dim(module, name: str) -> Optional[str]:
    if type(module) is not nn.Softmax or module.dim not in (-1, 2):
        return f"{name} is {module!r}, not nn.Softmax(dim=-1)"
    return None


def _scale_module(module, name: str) -> Optional[str]:
    """mmcv's ``Scale``: one parameter ``scale`` holding one number, x * scale."""
    if type(module).__name__ != "Scale" or _forward_owner(module) != "Scale":
        return f"{name} is a {type(module).__name__}, not mmcv's Scale"
    params = dict(module.named_parameters())
    if list(params) != ["scale"] or params["scale"].numel() != 1 or list(module.buffers()):
        return f"{name} does not hold exactly one one-element parameter 'scale'"
    return None


def _first_of(*reasons: Optional[str]) -> Optional[str]:
    return next((r for r in reasons if r is not None), None)


def _channel_count(module: nn.Module, attr: str) -> Optional[int]:
    value = getattr(module, attr, None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


def _check_official_pam(m) -> Optional[str]:
    for attr in ("query_conv", "key_conv", "value_conv", "gamma", "softmax"):
        if not hasattr(m, attr):
            return f"has no {attr}"
    c = m.value_conv.in_channels if isinstance(m.value_conv, nn.Conv2d) else -1
    width = m.query_conv.out_channels if isinstance(m.query_conv, nn.Conv2d) else None
    return _first_of(
        _pointwise_conv(m.value_conv, "value_conv", c, c, True),  # first: it defines C
        _pointwise_conv(m.query_conv, "query_conv", c, width, True),
        _pointwise_conv(m.key_conv, "key_conv", c, width, True),
        None if isinstance(m.gamma, nn.Parameter) and m.gamma.shape == (1,) else "gamma is not a Parameter of shape [1]",
        _softmax_last_dim(m.softmax, "softmax"),
    )


def _check_official_cam(m) -> Optional[str]:
    for attr in ("gamma", "softmax"):
        if not hasattr(m, attr):
            return f"has no {attr}"
    return _first_of(
        None if isinstance(m.gamma, nn.Parameter) and m.gamma.shape == (1,) else "gamma is not a Parameter of shape [1]",
        _softmax_last_dim(m.softmax, "softmax"),
    )


# what mmseg's DAHead passes to SelfAttentionBlock for its PAM
_MMSEG_PAM_OPTIONS = {"share_key_query": False, "query_downsample": None, "key_downsample": None,
                      "matmul_norm": False, "out_project": None}


def _check_mmseg_pam(m) -> Optional[str]:
    if "SelfAttentionBlock" not in [cls.__name__ for cls in type(m).__mro__]:
        return "is not an mmseg SelfAttentionBlock"
    for attr in ("query_project", "key_project", "value_project", "gamma", "channels", *_MMSEG_PAM_OPTIONS):
        if not hasattr(m, attr):
            return f"has no {attr}"
    for attr, want in _MMSEG_PAM_OPTIONS.items():
        got = getattr(m, attr)
        if got is not want and got != want:
            return f"{attr}={got!r}; mmseg's PAM has {attr}={want!r}"
    for name in ("key_in_channels", "query_in_channels", "out_channels"):
        if _channel_count(m, name) is None:
            return f"{name} is not a positive int"
    c = m.key_in_channels
    if m.query_in_channels != c or m.out_channels != c:
        return (f"key_in_channels, query_in_channels, out_channels = {c}, {m.query_in_channels}, {m.out_channels}; "
                "mmseg's PAM has all three equal")
    forwards = [cls.__name__ for cls in type(m).__mro__ if "forward" in vars(cls)]
    return _first_of(
        None if forwards[:2] == ["PAM", "SelfAttentionBlock"] else
        f"the forwards in its class hierarchy are {forwards}, not mmseg's PAM -> SelfAttentionBlock",
        _pointwise_conv(m.query_project, "query_project", c, m.channels, True),
        _pointwise_conv(m.key_project, "key_project", c, m.channels, True),
        _pointwise_conv(m.value_project, "value_project", c, c, True),
        _scale_module(m.gamma, "gamma"),
    )


def _check_mmseg_cam(m) -> Optional[str]:
    if not hasattr(m, "gamma"):
        return "has no gamma"
    return _scale_module(m.gamma, "gamma")


def _check_pointwise_stack(seq, name: str, in_channels: int, out_channels: int) -> Optional[str]:
    """HRNet's conv-BN-ReLU stacks: Sequentials whose convolutions are 1×1, in -> ... -> out."""
    if not isinstance(seq, nn.Sequential):
        return f"{name} is a {type(seq).__name__}, not an nn.Sequential"
    convs = [mod for mod in seq.modules() if isinstance(mod, nn.modules.conv._ConvNd)]
    if not convs:
        return f"{name} has no convolution"
    channels = in_channels
    for i, conv in enumerate(convs):
        out = out_channels if i == len(convs) - 1 else None
        reason = _pointwise_conv(conv, f"{name}'s convolution {i}", channels, out, conv.bias is not None)
        if reason:
            return reason
        channels = conv.out_channels
    return None


def _check_ocr_block(m) -> Optional[str]:
    for attr in ("f_pixel", "f_object", "f_down", "f_up", "scale", "in_channels", "key_channels"):
        if not hasattr(m, attr):
            return f"has no {attr}"
    if m.scale != 1:
        return f"scale={m.scale!r} (pools the pixels first); only scale=1 is converted"
    c, key = _channel_count(m, "in_channels"), _channel_count(m, "key_channels")
    if c is None or key is None:
        return "in_channels / key_channels are not positive ints"
    return _first_of(
        _check_pointwise_stack(m.f_pixel, "f_pixel", c, key),
        _check_pointwise_stack(m.f_object, "f_object", c, key),
        _check_pointwise_stack(m.f_down, "f_down", c, key),
        _check_pointwise_stack(m.f_up, "f_up", key, c),
    )


def _convs_of(module: nn.Module) -> List[nn.Module]:
    return [mod for mod in module.modules() if isinstance(mod, nn.modules.conv._ConvNd)]


def _check_mmcv_non_local(m) -> Optional[str]:
    for attr in ("g", "theta", "phi", "conv_out", "mode", "use_scale", "in_channels", "inter_channels"):
        if not hasattr(m, attr):
            return f"has no {attr}"
    if m.mode != "embedded_gaussian":
        return f"mode={m.mode!r}; only mode='embedded_gaussian' is converted"
    if not isinstance(m.use_scale, bool):
        return f"use_scale={m.use_scale!r} is not a bool"
    reason = _expect_forward(m, ("_NonLocalNd",), "embedded_gaussian")
    if reason:
        return reason
    c, inter = _channel_count(m, "in_channels"), _channel_count(m, "inter_channels")
    if c is None or inter is None:
        return "in_channels / inter_channels are not positive ints"
    for name in ("g", "theta", "phi"):
        convs = _convs_of(getattr(m, name))
        if len(convs) != 1:
            return f"{name} has {len(convs)} convolutions; upstream's has one"
        reason = _pointwise_conv(convs[0], f"{name}'s convolution", c, inter, convs[0].bias is not None)
        if reason:
            return reason
    convs = _convs_of(m.conv_out)
    if len(convs) != 1:
        return f"conv_out has {len(convs)} convolutions; upstream's has one"
    return _pointwise_conv(convs[0], "conv_out's convolution", inter, c, convs[0].bias is not None)


# ---------------------------------------------------------------------------------------------
# Building replacements from the original's own objects
# ---------------------------------------------------------------------------------------------


def _adopt(cls, original: nn.Module, names: Tuple[str, ...], backend: str, **attributes) -> nn.Module:
    """An instance of ``cls`` holding ``original``'s own submodules / parameters / buffers
    ``names`` (in the original's order) and ``attributes``; no new tensor is allocated."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for store in ("_parameters", "_buffers", "_modules"):
        for key, value in getattr(original, store).items():
            if key in names:
                getattr(new, store)[key] = value
    new._non_persistent_buffers_set = set(original._non_persistent_buffers_set) & set(new._buffers)
    new.training = original.training
    for key, value in attributes.items():
        setattr(new, key, value)
    new.backend = backend
    return new


def _build_official_pam(m, backend):
    width = m.query_conv.out_channels
    c = m.value_conv.in_channels
    extra = {"chanel_in": m.chanel_in} if hasattr(m, "chanel_in") else {}
    return _adopt(PositionAttention, m, ("query_conv", "key_conv", "value_conv", "gamma"), backend,
                  in_channels=c, reduction=max(1, c // width), key_channels=width, **extra)


def _build_official_cam(m, backend):
    # the official forward never reads chanel_in: any channel count runs, so no check here either
    extra = {"chanel_in": m.chanel_in} if hasattr(m, "chanel_in") else {}
    return _adopt(ChannelAttention, m, ("gamma",), backend, in_channels=None, variant="official", **extra)


def _build_mmseg_pam(m, backend):
    return _adopt(FusedMMSegPAM, m, ("key_project", "query_project", "value_project", "gamma"), backend,
                  channels=m.channels, in_channels=m.key_in_channels)


def _build_mmseg_cam(m, backend):
    return _adopt(FusedMMSegCAM, m, ("gamma",), backend)


def _build_ocr_block(m, backend):
    return _adopt(FusedObjectAttentionBlock, m, ("f_pixel", "f_object", "f_down", "f_up"), backend,
                  in_channels=m.in_channels, key_channels=m.key_channels, scale=1)


def _build_mmcv_non_local(m, backend):
    extra = {k: getattr(m, k) for k in ("reduction", "sub_sample") if hasattr(m, k)}
    return _adopt(FusedNonLocal2d, m, ("g", "theta", "phi", "conv_out"), backend, in_channels=m.in_channels,
                  inter_channels=m.inter_channels, use_scale=m.use_scale, mode=m.mode, **extra)


@dataclasses.dataclass(frozen=True)
class _Kind:
    forward_owners: Tuple[str, ...]  # classes whose forward is upstream's
    check: Callable[[nn.Module], Optional[str]]
    build: Callable[[nn.Module, str], nn.Module]
    probe_inputs: Callable[[nn.Module, torch.Generator], Tuple[torch.Tensor, ...]]


def _feature_probe(m, generator, channels: int):
    return (torch.randn(2, channels, 4, 4, generator=generator, dtype=torch.float64),)


def _ocr_probe(m, generator):
    x = torch.randn(2, m.in_channels, 4, 4, generator=generator, dtype=torch.float64)
    proxy = torch.randn(2, m.in_channels, 3, 1, generator=generator, dtype=torch.float64)
    return x, proxy


_KINDS: Dict[str, _Kind] = {
    "PAM_Module": _Kind(("PAM_Module",), _check_official_pam, _build_official_pam,
                        lambda m, g: _feature_probe(m, g, m.value_conv.in_channels)),
    "CAM_Module": _Kind(("CAM_Module",), _check_official_cam, _build_official_cam,
                        lambda m, g: _feature_probe(m, g, 5)),
    "PAM": _Kind(("PAM",), _check_mmseg_pam, _build_mmseg_pam,
                 lambda m, g: _feature_probe(m, g, m.key_in_channels)),
    "CAM": _Kind(("CAM",), _check_mmseg_cam, _build_mmseg_cam, lambda m, g: _feature_probe(m, g, 5)),
    "_ObjectAttentionBlock": _Kind(("_ObjectAttentionBlock",), _check_ocr_block, _build_ocr_block, _ocr_probe),
    "ObjectAttentionBlock2D": _Kind(("_ObjectAttentionBlock", "ObjectAttentionBlock2D"), _check_ocr_block,
                                    _build_ocr_block, _ocr_probe),
    "NonLocal2d": _Kind(("_NonLocalNd",), _check_mmcv_non_local, _build_mmcv_non_local,
                        lambda m, g: _feature_probe(m, g, m.in_channels)),
}


def _hooks_reason(m: nn.Module) -> Optional[str]:
    for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
        if getattr(m, attr, None):
            return f"has {attr.strip('_').replace('_', ' ')} registered (a replacement would drop them)"
    return None


def _probe_mismatch(original: nn.Module, replacement: nn.Module, kind: _Kind) -> Optional[str]:
    """Compare the two forwards on a random float64 input with random parameters (see the module
    docstring). Nothing of the model changes: parameters and buffers are substituted, not written."""
    generator = torch.Generator().manual_seed(0)
    device = next((t.device for t in original.state_dict().values()), torch.device("cpu"))
    tensors = {}
    for name, p in original.named_parameters():
        # weights scaled by 1/sqrt(fan-in): logits of order one, whatever the channel count
        std = p[0].numel() ** -0.5 if p.dim() > 1 else 0.5
        tensors[name] = (std * torch.randn(p.shape, generator=generator, dtype=torch.float64)).to(device)
    for name, b in original.named_buffers():
        tensors[name] = b.to(torch.float64) if b.is_floating_point() else b
    inputs = tuple(t.to(device) for t in kind.probe_inputs(original, generator))
    modes = [(m, m.training) for m in (*original.modules(), replacement)]  # each its own (a frozen BN stays eval)
    saved_backend = replacement.backend
    try:
        for m, _ in modes:
            m.training = False
        replacement.backend = "reference"
        with torch.no_grad():
            expected = torch.func.functional_call(original, tensors, inputs)
            got = torch.func.functional_call(replacement, tensors, inputs)
    except Exception as exc:  # a forward that cannot even run on the probe is not the upstream one
        return f"its forward failed on a probe input ({type(exc).__name__}: {exc})"
    finally:
        for m, training in modes:
            m.training = training
        replacement.backend = saved_backend
    if not isinstance(expected, torch.Tensor) or expected.shape != got.shape:
        return "its forward returns something other than what upstream's returns on a probe input"
    if not torch.allclose(expected, got, rtol=1e-7, atol=1e-9):
        diff = (expected - got).abs().max().item()
        return f"its forward computes something else than upstream's (probe output differs by {diff:.3g})"
    return None


def _same_state(original: nn.Module, replacement: nn.Module) -> Optional[str]:
    before, after = original.state_dict(keep_vars=True), replacement.state_dict(keep_vars=True)
    if list(before) != list(after) or any(before[k] is not after[k] for k in before):
        return "its state_dict keys or tensors could not all be carried over"
    if {id(p) for p in original.parameters()} != {id(p) for p in replacement.parameters()}:
        return "its parameters could not all be carried over"
    return None


def _try_convert(module: nn.Module, backend: str) -> Tuple[Optional[nn.Module], Optional[str]]:
    kind = _KINDS[type(module).__name__]
    reason = _first_of(_expect_forward(module, kind.forward_owners), _hooks_reason(module), kind.check(module))
    if reason:
        return None, reason
    replacement = kind.build(module, backend)
    reason = _first_of(_same_state(module, replacement), _probe_mismatch(module, replacement, kind))
    return (None, reason) if reason else (replacement, None)


def _is_attnseg_module(module: nn.Module) -> bool:
    return type(module).__module__.split(".")[0] == "attnseg"


def convert_model(model: nn.Module, backend: str = "auto", verbose: bool = False, return_report: bool = False):
    """Replace, in place, every recognised attention module of ``model`` by attnseg's fused one.

    Args:
        model: any ``nn.Module`` (a whole segmentor, a head, or one attention module).
        backend: given to every replacement: "auto", "native", "triton", "chunked" or "reference".
        verbose: print the :class:`ConversionReport` (what was converted, what was left and why).
        return_report: return ``(model, report)`` instead of ``model``.

    Returns:
        ``model`` (converted in place), or ``(model, ConversionReport)``. When ``model`` itself
        is a recognised module, the replacement is returned instead (use the return value).

    See the module docstring for what is recognised and what a replacement keeps. Convert
    before wrapping the model in ``DistributedDataParallel`` or ``torch.compile``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_model: model must be an nn.Module, got {type(model).__name__}")
    backend = check_backend(backend)
    if not isinstance(verbose, bool) or not isinstance(return_report, bool):
        raise TypeError(f"convert_model: verbose and return_report must be bools, got {verbose!r}, {return_report!r}")
    report = ConversionReport()
    # id -> (module, what replaces it): a module shared by two parents is visited once; holding
    # the module keeps its id from being reused by an object created during the walk
    done: Dict[int, Tuple[nn.Module, nn.Module]] = {}

    def visit(module: nn.Module, name: str) -> nn.Module:
        if id(module) in done:
            return done[id(module)][1]
        result = module
        if _is_attnseg_module(module):
            pass  # already attnseg's (its own NonLocal2d shares a class name with mmcv's)
        elif type(module).__name__ in _KINDS:
            replacement, reason = _try_convert(module, backend)
            if replacement is not None:
                report.converted.append(Converted(name, type(module).__name__, type(replacement).__name__))
                result = replacement
            else:
                report.skipped.append(Skipped(name, type(module).__name__, reason))
        if result is module:
            for child_name, child in list(module._modules.items()):
                if child is not None:
                    new_child = visit(child, f"{name}.{child_name}" if name else child_name)
                    if new_child is not child:
                        module._modules[child_name] = new_child
        done[id(module)] = (module, result)
        return result

    converted = visit(model, "")
    if verbose:
        print(report)
    return (converted, report) if return_report else converted
