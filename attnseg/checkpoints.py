"""Load pretrained DANet head weights from other codebases into :class:`attnseg.DANetHead`.

Two layouts are supported:

* :func:`load_official_danet_head`: a whole junfu1115/DANet checkpoint (``head.*`` keys, the
  same names attnseg uses, plus the backbone's ``pretrained.*`` keys, which are ignored).
* :func:`load_mmseg_dahead`: an mmsegmentation ``DAHead`` checkpoint (``decode_head.*`` keys),
  renamed to attnseg's names.

Both accept the checkpoint as saved: the state_dict itself, or a dict wrapping it under
``"state_dict"`` (as mmseg and many training scripts save it), with or without the
``"module."`` key prefix that ``nn.DataParallel`` / ``DistributedDataParallel`` adds.

Both check everything before copying anything: a strict load that fails leaves the head
untouched. Errors:

* ``ValueError`` when a checkpoint tensor's shape does not fit the head (always, as
  ``nn.Module.load_state_dict`` does, strict or not), naming the checkpoint key, its shape,
  the head parameter and the head's shape;
* ``RuntimeError`` when ``strict=True`` and keys are missing or unexpected, listing all of
  them, sorted, in one message.

With ``strict=False`` the keys present are loaded and a ``torch`` ``_IncompatibleKeys``
named tuple ``(missing_keys, unexpected_keys)`` is returned: missing keys in attnseg's names,
unexpected keys in the checkpoint's names (without the wrapper/``module.`` prefix).

``num_batches_tracked`` buffers absent from a checkpoint (checkpoints from PyTorch < 0.4.1
have none) are not reported missing, as ``nn.BatchNorm2d`` itself tolerates; the head keeps
its own value for them.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Tuple

import torch
from torch import Tensor
from torch.nn.modules.module import _IncompatibleKeys

from .modules import DANetHead

__all__ = ["load_official_danet_head", "load_mmseg_dahead"]

_DATA_PARALLEL_PREFIX = "module."


def _unwrap(state_dict: Mapping) -> Dict[str, object]:
    """The flat state_dict: out of a ``{"state_dict": ...}`` wrapper, ``module.`` stripped."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    inner = state_dict.get("state_dict")
    if isinstance(inner, Mapping):
        state_dict = inner
    flat: Dict[str, object] = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"state_dict keys must be str, got {key!r}")
        name = key[len(_DATA_PARALLEL_PREFIX):] if key.startswith(_DATA_PARALLEL_PREFIX) else key
        if name in flat:
            raise ValueError(f"state_dict has both {name!r} and {key!r} (with and without 'module.')")
        flat[name] = value
    return flat


def _select(flat: Mapping[str, object], prefix: str) -> Dict[str, object]:
    """The keys under ``prefix``, with it stripped; every other key is ignored."""
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {prefix!r}")
    return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}


def _shape(t) -> Tuple[int, ...]:
    return tuple(t.shape)


def _check_head(loader: str, head) -> None:
    if not isinstance(head, DANetHead):
        hint = ""
        if isinstance(head, Mapping):
            hint = " (the arguments are (head, state_dict): the head comes first)"
        elif isinstance(head, torch.nn.Module):
            hint = (" (to run an existing model's own DANet/mmseg attention modules on attnseg's kernels, "
                    "use attnseg.convert_model(model) instead)")
        raise TypeError(
            f"{loader}: head must be an attnseg.DANetHead (e.g. DANetHead(in_channels, out_channels, "
            f"channels=..., pam_channels=...)), got {type(head).__name__}{hint}"
        )


def _select_under_prefix(loader: str, flat: Mapping[str, object], prefix: str, head_keys) -> Dict[str, object]:
    """:func:`_select`, refusing a prefix that matches nothing (a head-only state_dict, most often)."""
    selected = _select(flat, prefix)
    if selected or not flat:
        return selected
    head_only = sorted(k for k in flat if k in head_keys)
    if head_only:
        raise ValueError(
            f"{loader}: no key of the state_dict starts with prefix={prefix!r}, but it has head keys such as "
            f"{head_only[0]!r}: it looks like a head-only state_dict; pass prefix=\"\""
        )
    sample = ", ".join(repr(k) for k in sorted(flat)[:3])
    raise ValueError(
        f"{loader}: no key of the state_dict starts with prefix={prefix!r} (its keys start: {sample}); "
        f"pass the prefix the head's keys have in the checkpoint (prefix=\"\" for a head-only state_dict)"
    )


def _check_and_load(
    head: DANetHead,
    mapped: Dict[str, Tuple[str, Tensor]],
    unexpected: List[str],
    strict: bool,
    source: str,
    shape_hint: str = "",
) -> _IncompatibleKeys:
    """Check ``mapped`` (attnseg key -> (checkpoint key, tensor)) against the head, then load.

    Nothing is copied before every check passed.
    """
    expected = head.state_dict()

    to_load: Dict[str, Tensor] = {}
    shape_errors: List[str] = []
    unexpected = list(unexpected)
    for target, (src_key, value) in sorted(mapped.items()):
        if target not in expected:  # e.g. a head built with a norm_layer without running stats
            unexpected.append(src_key)
            continue
        if not isinstance(value, Tensor):
            raise TypeError(f"{source} checkpoint entry {src_key!r} is a {type(value).__name__}, not a Tensor")
        want = expected[target]
        if value.shape != want.shape:
            if target.endswith("gamma") and value.numel() == want.numel() == 1:
                value = value.reshape(want.shape)  # mmcv Scale: 0-dim; attnseg/official: [1]
            else:
                shape_errors.append(
                    f"{src_key!r}: checkpoint shape {list(value.shape)} does not fit head parameter "
                    f"{target!r} of shape {list(want.shape)}"
                )
                continue
        to_load[target] = value
    if shape_errors:
        msg = f"{source} checkpoint does not fit this DANetHead:\n  " + "\n  ".join(shape_errors)
        raise ValueError(msg + (f"\n{shape_hint}" if shape_hint else ""))

    missing = sorted(
        k for k in expected if k not in to_load and not k.endswith("num_batches_tracked")
    )
    unexpected = sorted(unexpected)
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): " + ", ".join(missing))
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
        raise RuntimeError(
            f"Error loading a {source} checkpoint into DANetHead (strict=True); nothing was loaded.\n  "
            + "\n  ".join(parts)
        )

    with torch.no_grad():
        result = head.load_state_dict(to_load, strict=False)
    # Every key of to_load is a head key with a checked shape: torch reports none unexpected.
    assert not result.unexpected_keys, result.unexpected_keys
    return _IncompatibleKeys(missing, unexpected)


def _head_hint(head: DANetHead) -> str:
    return (
        f"This head was built as DANetHead(in_channels={head.in_channels}, out_channels={head.out_channels}, "
        f"channels={head.channels}, pam_channels={head.pam_channels}); build it with the checkpoint's sizes."
    )


def load_official_danet_head(
    head: DANetHead,
    state_dict: Mapping[str, Tensor],
    prefix: str = "head.",
    strict: bool = True,
) -> _IncompatibleKeys:
    """Load a junfu1115/DANet checkpoint's head into an attnseg :class:`DANetHead`.

    Args:
        head: the attnseg head to load into (built with the checkpoint's in_channels and
            out_channels); anything else is a TypeError.
        state_dict: the whole DANet model's state_dict, optionally wrapped as
            ``{"state_dict": ...}`` and/or with ``module.`` key prefixes.
        prefix: the head's key prefix in the checkpoint ("head." in DANet; "" for a head-only
            state_dict). A prefix that no key has is a ValueError (hinting at ``prefix=""``
            when the keys are the head's own).
        strict: raise on missing or unexpected keys under ``prefix``.

    Key layout (after ``prefix``), identical to attnseg's names::

        conv5a.0.weight, conv5a.1.{weight,bias,running_mean,running_var,num_batches_tracked}
        conv5c.*, conv51.*, conv52.*          (same: 3x3 conv without bias, BN, ReLU)
        sa.query_conv.{weight,bias}  [C/8, C, 1, 1], [C/8]
        sa.key_conv.{weight,bias}    [C/8, C, 1, 1], [C/8]
        sa.value_conv.{weight,bias}  [C, C, 1, 1],   [C]
        sa.gamma, sc.gamma           [1]
        conv6.1.*, conv7.1.*, conv8.1.*       (1x1 classifiers after Dropout2d: PAM, CAM, fused)

    Keys outside ``prefix`` (the backbone's ``pretrained.*``, an auxiliary head) are ignored.

    Returns:
        ``_IncompatibleKeys(missing_keys, unexpected_keys)`` (both empty after a strict load).

    Raises:
        TypeError: head is not an attnseg DANetHead.
        ValueError: no key has ``prefix`` (hinting at ``prefix=""`` for a head-only state_dict).
        ValueError: a tensor's shape does not fit the head (names key and both shapes).
        RuntimeError: strict and keys missing/unexpected (all listed, sorted); nothing loaded.
    """
    loader = "load_official_danet_head"
    _check_head(loader, head)
    expected = set(head.state_dict())
    selected = _select_under_prefix(loader, _unwrap(state_dict), prefix, expected)
    mapped = {k: (prefix + k, v) for k, v in selected.items() if k in expected}
    unexpected = [prefix + k for k in selected if k not in expected]
    return _check_and_load(head, mapped, unexpected, strict, "official DANet", _head_hint(head))


def _mmseg_key_map() -> Dict[str, str]:
    """mmseg DAHead key (after the prefix) -> attnseg DANetHead key."""
    table: Dict[str, str] = {}
    for src, dst in (("pam_in_conv", "conv5a"), ("cam_in_conv", "conv5c"),
                     ("pam_out_conv", "conv51"), ("cam_out_conv", "conv52")):
        table[f"{src}.conv.weight"] = f"{dst}.0.weight"
        for buf in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            table[f"{src}.bn.{buf}"] = f"{dst}.1.{buf}"
    for proj in ("query", "key", "value"):
        for p in ("weight", "bias"):
            # mmseg builds these as plain nn.Conv2d (key_query_norm=value_out_norm=False, one
            # conv): "pam.query_project.weight". A ConvModule-wrapped variant ("...conv.weight")
            # is accepted too.
            table[f"pam.{proj}_project.{p}"] = f"sa.{proj}_conv.{p}"
            table[f"pam.{proj}_project.conv.{p}"] = f"sa.{proj}_conv.{p}"
    table["pam.gamma.scale"] = "sa.gamma"
    table["cam.gamma.scale"] = "sc.gamma"
    for src, dst in (("pam_conv_seg", "conv6"), ("cam_conv_seg", "conv7"), ("conv_seg", "conv8")):
        for p in ("weight", "bias"):
            table[f"{src}.{p}"] = f"{dst}.1.{p}"
    return table


_MMSEG_KEY_MAP = _mmseg_key_map()


def load_mmseg_dahead(
    head: DANetHead,
    state_dict: Mapping[str, Tensor],
    prefix: str = "decode_head.",
    strict: bool = True,
) -> _IncompatibleKeys:
    """Load an mmsegmentation ``DAHead`` (mmseg/models/decode_heads/da_head.py) into an attnseg
    :class:`DANetHead`.

    mmseg's ``DAHead(in_channels, channels, pam_channels, num_classes)``, any sizes, fits
    ``DANetHead(in_channels, num_classes, channels=channels, pam_channels=pam_channels)``
    (mmseg's DANet configs: 2048, 512, 64, which are also DANetHead's defaults). A head of
    other sizes raises ValueError naming the first key that does not fit.

    Args:
        head: the attnseg head to load into.
        state_dict: the whole mmseg segmentor's state_dict, optionally wrapped as
            ``{"state_dict": ...}`` (mmseg's checkpoint files) and/or with ``module.`` prefixes.
        prefix: the DAHead's key prefix ("decode_head." in mmseg's EncoderDecoder; "" for a
            head-only state_dict). A prefix that no key has is a ValueError (hinting at
            ``prefix=""`` when the keys are DAHead's own).
        strict: raise on missing or unexpected keys under ``prefix``.

    Key mapping (after ``prefix``; ConvModule = 3x3 conv without bias + BN + ReLU)::

        pam_in_conv.conv.weight        -> conv5a.0.weight
        pam_in_conv.bn.<b>             -> conv5a.1.<b>  (<b>: weight, bias, running_mean,
                                                          running_var, num_batches_tracked)
        cam_in_conv.*                  -> conv5c.*   (same sub-keys)
        pam_out_conv.*                 -> conv51.*
        cam_out_conv.*                 -> conv52.*
        pam.query_project.{weight,bias} -> sa.query_conv.{weight,bias}  [pam_channels, channels, 1, 1]
        pam.key_project.{weight,bias}   -> sa.key_conv.{weight,bias}
        pam.value_project.{weight,bias} -> sa.value_conv.{weight,bias}  [channels, channels, 1, 1]
            (mmseg's PAM builds these as plain Conv2d; "pam.<x>_project.conv.<p>" is accepted too)
        pam.gamma.scale                -> sa.gamma   (mmcv Scale: shape [] -> [1])
        cam.gamma.scale                -> sc.gamma   (shape [] -> [1])
        pam_conv_seg.{weight,bias}     -> conv6.1.*  (PAM-branch logits)
        cam_conv_seg.{weight,bias}     -> conv7.1.*  (CAM-branch logits)
        conv_seg.{weight,bias}         -> conv8.1.*  (fused logits)

    mmseg's forward returns ``(pam_cam_out, pam_out, cam_out)``: the same order as attnseg's
    ``(fused, pam, cam)``. Keys outside ``prefix`` (``backbone.*``, ``auxiliary_head.*``) are
    ignored; keys under ``prefix`` not in the table are unexpected.

    Returns:
        ``_IncompatibleKeys(missing_keys, unexpected_keys)``: missing in attnseg's names,
        unexpected in the checkpoint's (prefix included).

    Raises:
        TypeError: head is not an attnseg DANetHead.
        ValueError: no key has ``prefix`` (hinting at ``prefix=""`` for a head-only state_dict).
        ValueError: a tensor's shape does not fit the head (names key and both shapes), or
            two checkpoint keys map onto the same head parameter.
        RuntimeError: strict and keys missing/unexpected (all listed, sorted); nothing loaded.
    """
    loader = "load_mmseg_dahead"
    _check_head(loader, head)
    selected = _select_under_prefix(loader, _unwrap(state_dict), prefix, _MMSEG_KEY_MAP)
    mapped: Dict[str, Tuple[str, Tensor]] = {}
    unexpected: List[str] = []
    for key, value in selected.items():
        target = _MMSEG_KEY_MAP.get(key)
        if target is None:
            unexpected.append(prefix + key)
            continue
        if target in mapped:
            raise ValueError(
                f"mmseg checkpoint keys {mapped[target][0]!r} and {prefix + key!r} both map to "
                f"DANetHead parameter {target!r}"
            )
        mapped[target] = (prefix + key, value)
    hint = _head_hint(head) + (
        " An mmseg DAHead(in_channels, channels, pam_channels, num_classes=n) fits "
        "DANetHead(in_channels, n, channels=channels, pam_channels=pam_channels)."
    )
    return _check_and_load(head, mapped, unexpected, strict, "mmseg DAHead", hint)
