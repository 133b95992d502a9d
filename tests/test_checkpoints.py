"""attnseg.checkpoints: official DANet and mmsegmentation DAHead checkpoints into DANetHead.

The official layout comes from tests/test_modules.py's OfficialDANetHead stand-in; the mmseg
layout from a plain-PyTorch stand-in of mmseg's DAHead below (mmcv/mmseg are not needed).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnseg import DANetHead
from attnseg.checkpoints import load_mmseg_dahead, load_official_danet_head
from helpers import randomize_batchnorm
from test_modules import OfficialDANetHead, _relu_features, _trained_looking_state


# ---------------------------------------------------------------------------------------------
# Stand-in for mmseg's DAHead (mmseg/models/decode_heads/da_head.py) with mmcv's ConvModule,
# Scale and mmseg's SelfAttentionBlock as DAHead configures them: same module names, so the
# same state_dict keys, and the same forward computation (eval mode).
# ---------------------------------------------------------------------------------------------


class ConvModule(nn.Module):  # mmcv ConvModule(3x3, norm_cfg=BN, act_cfg=ReLU): conv bias='auto' -> False
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU()

    def forward(self, x):
        return self.activate(self.bn(self.conv(x)))


class Scale(nn.Module):  # mmcv.cnn.Scale: a 0-dim parameter
    def __init__(self, scale=1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale, dtype=torch.float))

    def forward(self, x):
        return x * self.scale


class MMSegPAM(nn.Module):
    """SelfAttentionBlock(key_query_num_convs=1, key_query_norm=False, value_out_num_convs=1,
    value_out_norm=False, matmul_norm=False, with_out=False): the projections are plain
    Conv2d (build_project returns convs[0]), then gamma(out) + x."""

    def __init__(self, in_channels, channels):
        super().__init__()
        self.key_project = nn.Conv2d(in_channels, channels, 1)
        self.query_project = nn.Conv2d(in_channels, channels, 1)
        self.value_project = nn.Conv2d(in_channels, in_channels, 1)
        self.gamma = Scale(0)

    def forward(self, x):
        b = x.size(0)
        query = self.query_project(x).reshape(b, self.query_project.out_channels, -1).permute(0, 2, 1)
        key = self.key_project(x).reshape(b, self.key_project.out_channels, -1)
        value = self.value_project(x).reshape(b, self.value_project.out_channels, -1).permute(0, 2, 1)
        sim = F.softmax(torch.matmul(query, key), dim=-1)
        context = torch.matmul(sim, value).permute(0, 2, 1).reshape(b, -1, *x.shape[2:])
        return self.gamma(context) + x


class MMSegCAM(nn.Module):
    def __init__(self):
        super().__init__()
        self.gamma = Scale(0)

    def forward(self, x):
        b, c, h, w = x.size()
        q = x.view(b, c, -1)
        energy = torch.bmm(q, q.permute(0, 2, 1))
        energy_new = torch.max(energy, -1, keepdim=True)[0].expand_as(energy) - energy
        attention = F.softmax(energy_new, dim=-1)
        out = torch.bmm(attention, q).view(b, c, h, w)
        return self.gamma(out) + x


class MMSegDAHead(nn.Module):
    def __init__(self, in_channels, channels, pam_channels, num_classes):
        super().__init__()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)  # BaseDecodeHead
        self.dropout = nn.Dropout2d(0.1)
        self.pam_in_conv = ConvModule(in_channels, channels)
        self.pam = MMSegPAM(channels, pam_channels)
        self.pam_out_conv = ConvModule(channels, channels)
        self.pam_conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.cam_in_conv = ConvModule(in_channels, channels)
        self.cam = MMSegCAM()
        self.cam_out_conv = ConvModule(channels, channels)
        self.cam_conv_seg = nn.Conv2d(channels, num_classes, 1)

    def cls_seg(self, feat):
        return self.conv_seg(self.dropout(feat))

    def forward(self, x):
        pam_feat = self.pam_out_conv(self.pam(self.pam_in_conv(x)))
        pam_out = self.pam_conv_seg(self.dropout(pam_feat))
        cam_feat = self.cam_out_conv(self.cam(self.cam_in_conv(x)))
        cam_out = self.cam_conv_seg(self.dropout(cam_feat))
        return self.cls_seg(pam_feat + cam_feat), pam_out, cam_out


def _mmseg_trained_state(module: nn.Module) -> dict:
    with torch.no_grad():
        module.pam.gamma.scale.fill_(0.6)
        module.cam.gamma.scale.fill_(-0.8)
        randomize_batchnorm(module)
    return module.state_dict()


def _mmseg_checkpoint(mmseg_head, extra=None):
    """An mmseg checkpoint file's layout: {"meta": ..., "state_dict": {backbone, decode_head,
    auxiliary_head}}."""
    state = {"decode_head." + k: v for k, v in _mmseg_trained_state(mmseg_head).items()}
    state["backbone.conv1.weight"] = torch.randn(8, 3, 7, 7)
    state["auxiliary_head.conv_seg.weight"] = torch.randn(3, 8, 1, 1)
    state["auxiliary_head.convs.0.conv.weight"] = torch.randn(8, 32, 3, 3)
    state.update(extra or {})
    return {"meta": {"mmseg_version": "x"}, "state_dict": state}


def _official_checkpoint(in_channels=64, num_classes=5, data_parallel=False):
    official = OfficialDANetHead(in_channels, num_classes, nn.BatchNorm2d)
    state = {"head." + k: v for k, v in _trained_looking_state(official).items()}
    state["pretrained.conv1.weight"] = torch.randn(8, 3, 7, 7)
    state["pretrained.bn1.running_mean"] = torch.randn(8)
    state["auxlayer.conv5.0.weight"] = torch.randn(4, 16, 3, 3)
    if data_parallel:
        state = {"module." + k: v for k, v in state.items()}
    return official, {"state_dict": state}


def _assert_outputs_match(ours, theirs, x):
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        got, expected = ours(x), theirs(x)
    assert isinstance(got, tuple) and len(got) == len(expected) == 3
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5, msg=lambda m: f"output {i}: {m}")


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _assert_unchanged(module, before):
    after = module.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), f"{k} changed by a failed load"


# ---------------------------------------------------------------------------------------------
# Official DANet
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("data_parallel", [False, True], ids=["plain", "module-prefix"])
def test_official_checkpoint_loads_and_matches(data_parallel):
    official, ckpt = _official_checkpoint(data_parallel=data_parallel)
    ours = DANetHead(64, 5)
    result = load_official_danet_head(ours, ckpt)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert ours.sa.gamma.item() == pytest.approx(0.6) and ours.sc.gamma.item() == pytest.approx(-0.8)
    _assert_outputs_match(ours, official, _relu_features(2, 64, 9, 11))


def test_official_unwrapped_state_dict_loads():
    official, ckpt = _official_checkpoint()
    ours = DANetHead(64, 5)
    load_official_danet_head(ours, dict(ckpt["state_dict"]))  # no {"state_dict": ...} wrapper
    _assert_outputs_match(ours, official, _relu_features(1, 64, 6, 7))


def test_official_missing_keys_all_listed_and_nothing_loaded():
    _, ckpt = _official_checkpoint()
    state = ckpt["state_dict"]
    del state["head.sa.gamma"], state["head.conv5a.0.weight"]
    ours = DANetHead(64, 5)
    before = _snapshot(ours)
    with pytest.raises(RuntimeError, match=r"missing keys \(2\): conv5a\.0\.weight, sa\.gamma") as info:
        load_official_danet_head(ours, ckpt)
    assert "unexpected" not in str(info.value)
    _assert_unchanged(ours, before)


def test_official_unexpected_key_under_prefix():
    _, ckpt = _official_checkpoint()
    ckpt["state_dict"]["head.sa.extra"] = torch.zeros(1)
    ckpt["state_dict"]["head.conv9.weight"] = torch.zeros(1)
    del ckpt["state_dict"]["head.sc.gamma"]
    ours = DANetHead(64, 5)
    before = _snapshot(ours)
    with pytest.raises(RuntimeError) as info:
        load_official_danet_head(ours, ckpt)
    msg = str(info.value)
    assert "missing keys (1): sc.gamma" in msg
    assert "unexpected keys (2): head.conv9.weight, head.sa.extra" in msg
    assert "pretrained" not in msg and "auxlayer" not in msg  # outside the prefix: ignored
    _assert_unchanged(ours, before)

    result = load_official_danet_head(ours, ckpt, strict=False)
    assert result.missing_keys == ["sc.gamma"]
    assert result.unexpected_keys == ["head.conv9.weight", "head.sa.extra"]
    assert ours.sa.gamma.item() == pytest.approx(0.6)  # the rest was loaded
    assert ours.sc.gamma.item() == 0.0  # missing: left as it was


def test_official_wrong_shape_names_key_and_shapes():
    _, ckpt = _official_checkpoint(num_classes=5)
    ours = DANetHead(64, 3)  # num_classes differs
    before = _snapshot(ours)
    with pytest.raises(ValueError, match=r"'head\.conv6\.1\.weight': checkpoint shape \[5, 16, 1, 1\] "
                                         r"does not fit head parameter 'conv6\.1\.weight' of shape \[3, 16, 1, 1\]"):
        load_official_danet_head(ours, ckpt, strict=False)  # shape errors raise even when not strict
    _assert_unchanged(ours, before)


def test_official_custom_prefix_and_missing_num_batches_tracked_tolerated():
    official, ckpt = _official_checkpoint()
    state = {k.replace("head.", "decoder.", 1): v for k, v in ckpt["state_dict"].items()
             if not k.endswith("num_batches_tracked")}  # as in checkpoints from PyTorch < 0.4.1
    ours = DANetHead(64, 5)
    result = load_official_danet_head(ours, state, prefix="decoder.")
    assert result.missing_keys == []
    _assert_outputs_match(ours, official, _relu_features(1, 64, 5, 6))


# ---------------------------------------------------------------------------------------------
# mmsegmentation DAHead
# ---------------------------------------------------------------------------------------------


def test_mmseg_checkpoint_loads_and_all_three_outputs_match():
    mmseg = MMSegDAHead(64, 16, 2, 3)
    ckpt = _mmseg_checkpoint(mmseg)
    assert ckpt["state_dict"]["decode_head.pam.gamma.scale"].dim() == 0  # mmcv Scale
    assert "decode_head.pam.query_project.weight" in ckpt["state_dict"]
    ours = DANetHead(64, 3)
    result = load_mmseg_dahead(ours, ckpt)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert ours.sa.gamma.shape == (1,) and ours.sa.gamma.item() == pytest.approx(0.6)
    assert ours.sc.gamma.shape == (1,) and ours.sc.gamma.item() == pytest.approx(-0.8)
    assert ours.conv5a[1].num_batches_tracked.item() == 100
    _assert_outputs_match(ours, mmseg, _relu_features(2, 64, 9, 11))


def test_mmseg_convmodule_wrapped_projection_keys_and_module_prefix_accepted():
    mmseg = MMSegDAHead(64, 16, 2, 3)
    ckpt = _mmseg_checkpoint(mmseg)
    state = {}
    for k, v in ckpt["state_dict"].items():
        for proj in ("query", "key", "value"):
            k = k.replace(f"pam.{proj}_project.", f"pam.{proj}_project.conv.")
        state["module." + k] = v
    ours = DANetHead(64, 3)
    load_mmseg_dahead(ours, state)
    _assert_outputs_match(ours, mmseg, _relu_features(1, 64, 7, 5))


def test_mmseg_missing_and_unexpected_listed_together_nothing_loaded():
    mmseg = MMSegDAHead(64, 16, 2, 3)
    ckpt = _mmseg_checkpoint(mmseg, extra={"decode_head.pam.out_project.weight": torch.zeros(16, 16, 1, 1)})
    state = ckpt["state_dict"]
    del state["decode_head.cam.gamma.scale"], state["decode_head.pam_in_conv.bn.running_var"]
    ours = DANetHead(64, 3)
    before = _snapshot(ours)
    with pytest.raises(RuntimeError) as info:
        load_mmseg_dahead(ours, ckpt)
    msg = str(info.value)
    assert "missing keys (2): conv5a.1.running_var, sc.gamma" in msg
    assert "unexpected keys (1): decode_head.pam.out_project.weight" in msg
    assert "auxiliary_head" not in msg and "backbone" not in msg
    _assert_unchanged(ours, before)

    result = load_mmseg_dahead(ours, ckpt, strict=False)
    assert result.missing_keys == ["conv5a.1.running_var", "sc.gamma"]
    assert result.unexpected_keys == ["decode_head.pam.out_project.weight"]
    assert ours.sa.gamma.item() == pytest.approx(0.6)


@pytest.mark.parametrize(
    "channels, pam_channels, key, ckpt_shape, head_shape",
    [
        (32, 4, "decode_head.pam_in_conv.conv.weight", [32, 64, 3, 3], [16, 64, 3, 3]),  # channels != 64 // 4
        (16, 4, "decode_head.pam.query_project.weight", [4, 16, 1, 1], [2, 16, 1, 1]),  # pam_channels != 16 // 8
    ],
    ids=["channels", "pam_channels"],
)
def test_mmseg_shape_mismatch_raises_value_error(channels, pam_channels, key, ckpt_shape, head_shape):
    ckpt = _mmseg_checkpoint(MMSegDAHead(64, channels, pam_channels, 3))
    ours = DANetHead(64, 3)
    before = _snapshot(ours)
    with pytest.raises(ValueError) as info:
        load_mmseg_dahead(ours, ckpt)
    msg = str(info.value)
    assert f"{key!r}: checkpoint shape {ckpt_shape}" in msg and f"of shape {head_shape}" in msg
    assert f"DANetHead(in_channels, n, channels=channels, pam_channels=pam_channels)" in msg
    _assert_unchanged(ours, before)


@pytest.mark.parametrize("in_channels, channels, pam_channels", [(64, 32, 4), (64, 16, 4), (48, 20, 3), (24, 24, 1)])
def test_every_mmseg_dahead_config_loads_and_matches(in_channels, channels, pam_channels):
    """mmseg lets channels and pam_channels be set freely; each config loads into the head
    built with the same sizes and gives mmseg's three outputs."""
    mmseg = MMSegDAHead(in_channels, channels, pam_channels, 3)
    ours = DANetHead(in_channels, 3, channels=channels, pam_channels=pam_channels)
    result = load_mmseg_dahead(ours, _mmseg_checkpoint(mmseg))
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert ours.sa.query_conv.weight.shape == (pam_channels, channels, 1, 1)
    _assert_outputs_match(ours, mmseg, _relu_features(2, in_channels, 5, 7))


@pytest.mark.parametrize("in_channels", [100, 60, 36])
def test_official_head_any_in_channels_positional_order(in_channels):
    """The official DANetHead(in_channels, out_channels, norm_layer) for channel counts whose
    inter channels are not multiples of 8 (PAM width = (in_channels // 4) // 8, rounding down)."""
    official, ckpt = _official_checkpoint(in_channels=in_channels, num_classes=3)
    ours = DANetHead(in_channels, 3, nn.BatchNorm2d)
    assert ours.sa.key_channels == (in_channels // 4) // 8
    load_official_danet_head(ours, ckpt)
    _assert_outputs_match(ours, official, _relu_features(1, in_channels, 6, 5))


def test_head_out_channels_keyword_and_num_classes_alias():
    assert DANetHead(64, out_channels=19).conv8[1].out_channels == 19
    assert DANetHead(64, num_classes=19).conv8[1].out_channels == 19
    assert DANetHead(64, 19, num_classes=19).out_channels == 19
    with pytest.raises(TypeError, match="out_channels"):
        DANetHead(64)


def test_head_only_state_dict_hints_at_empty_prefix_and_loads_with_it():
    official = OfficialDANetHead(64, 3, nn.BatchNorm2d)
    state = _trained_looking_state(official)
    ours = DANetHead(64, 3)
    with pytest.raises(ValueError, match='prefix=""'):
        load_official_danet_head(ours, state)
    load_official_danet_head(ours, state, prefix="")
    _assert_outputs_match(ours, official, _relu_features(1, 64, 4, 4))


def test_loader_given_another_module_kind_is_a_type_error_naming_danethead():
    with pytest.raises(TypeError, match=r"attnseg\.DANetHead.*got MMSegDAHead.*convert_model"):
        load_mmseg_dahead(MMSegDAHead(64, 16, 2, 3), {})


def test_mmseg_duplicate_mapping_rejected():
    ckpt = _mmseg_checkpoint(MMSegDAHead(64, 16, 2, 3))
    state = ckpt["state_dict"]
    state["decode_head.pam.key_project.conv.weight"] = state["decode_head.pam.key_project.weight"]
    with pytest.raises(ValueError, match="both map to DANetHead parameter 'sa.key_conv.weight'"):
        load_mmseg_dahead(DANetHead(64, 3), ckpt)


def test_non_mapping_rejected():
    with pytest.raises(TypeError):
        load_mmseg_dahead(DANetHead(64, 3), [("decode_head.conv_seg.weight", torch.zeros(1))])
