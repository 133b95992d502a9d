"""attnseg.convert_model: existing models' attention modules swapped for attnseg's, in place.

The stand-ins below follow the structure of the published modules (class names, attribute
names, options, parameter shapes and the forward's steps): junfu1115/DANet
encoding/nn/da_att.py (PAM_Module, CAM_Module: imported from test_modules), mmsegmentation
decode_heads/da_head.py (PAM on utils/self_attention_block.py's SelfAttentionBlock, CAM),
HRNet-OCR lib/models/seg_hrnet_ocr.py (_ObjectAttentionBlock, ObjectAttentionBlock2D) and mmcv
cnn/bricks/non_local.py (_NonLocalNd, NonLocal2d). Nothing is downloaded.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnseg
from attnseg import ChannelAttention, PositionAttention, convert_model
from attnseg.convert import FusedMMSegCAM, FusedMMSegPAM, FusedNonLocal2d, FusedObjectAttentionBlock
from helpers import randomize_batchnorm
from test_checkpoints import Scale
from test_modules import CAM_Module, OfficialDANetHead, PAM_Module

TOL = dict(rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# mmsegmentation: SelfAttentionBlock, DAHead's PAM and CAM
# ---------------------------------------------------------------------------------------------


class SelfAttentionBlock(nn.Module):
    def __init__(self, key_in_channels, query_in_channels, channels, out_channels, share_key_query,
                 query_downsample, key_downsample, key_query_num_convs, value_out_num_convs, key_query_norm,
                 value_out_norm, matmul_norm, with_out, conv_cfg, norm_cfg, act_cfg):
        super().__init__()
        assert not key_query_norm and not value_out_norm  # DAHead's PAM: plain convolutions
        self.key_in_channels, self.query_in_channels = key_in_channels, query_in_channels
        self.out_channels, self.channels, self.share_key_query = out_channels, channels, share_key_query
        self.conv_cfg, self.norm_cfg, self.act_cfg = conv_cfg, norm_cfg, act_cfg
        self.key_project = self.build_project(key_in_channels, channels, key_query_num_convs)
        self.query_project = self.key_project if share_key_query else self.build_project(
            query_in_channels, channels, key_query_num_convs)
        self.value_project = self.build_project(key_in_channels, channels if with_out else out_channels,
                                                value_out_num_convs)
        self.out_project = self.build_project(channels, out_channels, value_out_num_convs) if with_out else None
        self.query_downsample, self.key_downsample = query_downsample, key_downsample
        self.matmul_norm = matmul_norm

    def build_project(self, in_channels, channels, num_convs):
        convs = [nn.Conv2d(in_channels, channels, 1)] + [nn.Conv2d(channels, channels, 1) for _ in range(num_convs - 1)]
        return nn.Sequential(*convs) if len(convs) > 1 else convs[0]

    def forward(self, query_feats, key_feats):
        batch_size = query_feats.size(0)
        query = self.query_project(query_feats)
        if self.query_downsample is not None:
            query = self.query_downsample(query)
        query = query.reshape(*query.shape[:2], -1).permute(0, 2, 1).contiguous()
        key = self.key_project(key_feats)
        value = self.value_project(key_feats)
        if self.key_downsample is not None:
            key, value = self.key_downsample(key), self.key_downsample(value)
        key = key.reshape(*key.shape[:2], -1)
        value = value.reshape(*value.shape[:2], -1).permute(0, 2, 1).contiguous()
        sim_map = torch.matmul(query, key)
        if self.matmul_norm:
            sim_map = (self.channels ** -.5) * sim_map
        sim_map = F.softmax(sim_map, dim=-1)
        context = torch.matmul(sim_map, value).permute(0, 2, 1).contiguous()
        context = context.reshape(batch_size, -1, *query_feats.shape[2:])
        if self.out_project is not None:
            context = self.out_project(context)
        return context


class PAM(SelfAttentionBlock):
    def __init__(self, in_channels, channels, matmul_norm=False, query_downsample=None):
        super().__init__(key_in_channels=in_channels, query_in_channels=in_channels, channels=channels,
                         out_channels=in_channels, share_key_query=False, query_downsample=query_downsample,
                         key_downsample=None, key_query_num_convs=1, key_query_norm=False, value_out_num_convs=1,
                         value_out_norm=False, matmul_norm=matmul_norm, with_out=False, conv_cfg=None,
                         norm_cfg=None, act_cfg=None)
        self.gamma = Scale(0)

    def forward(self, x):
        return self.gamma(super().forward(x, x)) + x


class CAM(nn.Module):
    def __init__(self):
        super().__init__()
        self.gamma = Scale(0)

    def forward(self, x):
        batch_size, channels, height, width = x.size()
        proj_query = x.view(batch_size, channels, -1)
        energy = torch.bmm(proj_query, x.view(batch_size, channels, -1).permute(0, 2, 1))
        energy_new = torch.max(energy, -1, keepdim=True)[0].expand_as(energy) - energy
        attention = F.softmax(energy_new, dim=-1)
        out = torch.bmm(attention, x.view(batch_size, channels, -1)).view(batch_size, channels, height, width)
        return self.gamma(out) + x


# ---------------------------------------------------------------------------------------------
# HRNet-OCR: _ObjectAttentionBlock / ObjectAttentionBlock2D (BNReLU = Sequential(BN, ReLU))
# ---------------------------------------------------------------------------------------------


def _bn_relu(channels):
    return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU())


class _ObjectAttentionBlock(nn.Module):
    def __init__(self, in_channels, key_channels, scale=1, bn_type=None):
        super().__init__()
        self.scale, self.in_channels, self.key_channels = scale, in_channels, key_channels
        self.pool = nn.MaxPool2d(kernel_size=(scale, scale))
        self.f_pixel = nn.Sequential(nn.Conv2d(in_channels, key_channels, 1, bias=False), _bn_relu(key_channels),
                                     nn.Conv2d(key_channels, key_channels, 1, bias=False), _bn_relu(key_channels))
        self.f_object = nn.Sequential(nn.Conv2d(in_channels, key_channels, 1, bias=False), _bn_relu(key_channels),
                                      nn.Conv2d(key_channels, key_channels, 1, bias=False), _bn_relu(key_channels))
        self.f_down = nn.Sequential(nn.Conv2d(in_channels, key_channels, 1, bias=False), _bn_relu(key_channels))
        self.f_up = nn.Sequential(nn.Conv2d(key_channels, in_channels, 1, bias=False), _bn_relu(in_channels))

    def forward(self, x, proxy):
        batch_size, h, w = x.size(0), x.size(2), x.size(3)
        if self.scale > 1:
            x = self.pool(x)
        query = self.f_pixel(x).view(batch_size, self.key_channels, -1).permute(0, 2, 1)
        key = self.f_object(proxy).view(batch_size, self.key_channels, -1)
        value = self.f_down(proxy).view(batch_size, self.key_channels, -1).permute(0, 2, 1)
        sim_map = F.softmax((self.key_channels ** -.5) * torch.matmul(query, key), dim=-1)
        context = torch.matmul(sim_map, value).permute(0, 2, 1).contiguous()
        context = self.f_up(context.view(batch_size, self.key_channels, *x.size()[2:]))
        if self.scale > 1:
            context = F.interpolate(input=context, size=(h, w), mode="bilinear", align_corners=False)
        return context


class ObjectAttentionBlock2D(_ObjectAttentionBlock):
    pass


# ---------------------------------------------------------------------------------------------
# mmcv: ConvModule (conv [+ norm], no activation here), _NonLocalNd, NonLocal2d
# ---------------------------------------------------------------------------------------------


class ConvModule(nn.Module):
    def __init__(self, in_channels, out_channels, norm=False):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=not norm)  # bias="auto"
        if norm:
            self.bn = nn.BatchNorm2d(out_channels)
        self.with_norm = norm

    def forward(self, x):
        x = self.conv(x)
        return self.bn(x) if self.with_norm else x


class _NonLocalNd(nn.Module):
    def __init__(self, in_channels, reduction=2, use_scale=True, norm=False, mode="embedded_gaussian"):
        super().__init__()
        self.in_channels, self.reduction, self.use_scale = in_channels, reduction, use_scale
        self.inter_channels = max(in_channels // reduction, 1)
        self.mode = mode
        self.g = ConvModule(in_channels, self.inter_channels)
        self.conv_out = ConvModule(self.inter_channels, in_channels, norm=norm)
        self.theta = ConvModule(in_channels, self.inter_channels)
        self.phi = ConvModule(in_channels, self.inter_channels)

    def embedded_gaussian(self, theta_x, phi_x):
        pairwise_weight = torch.matmul(theta_x, phi_x)
        if self.use_scale:
            pairwise_weight /= theta_x.shape[-1] ** 0.5
        return pairwise_weight.softmax(dim=-1)

    def dot_product(self, theta_x, phi_x):
        pairwise_weight = torch.matmul(theta_x, phi_x)
        return pairwise_weight / pairwise_weight.shape[-1]

    def forward(self, x):
        n = x.size(0)
        g_x = self.g(x).view(n, self.inter_channels, -1).permute(0, 2, 1)
        theta_x = self.theta(x).view(n, self.inter_channels, -1).permute(0, 2, 1)
        phi_x = self.phi(x).view(n, self.inter_channels, -1)
        y = torch.matmul(getattr(self, self.mode)(theta_x, phi_x), g_x)
        y = y.permute(0, 2, 1).contiguous().reshape(n, self.inter_channels, *x.size()[2:])
        return x + self.conv_out(y)


class NonLocal2d(_NonLocalNd):
    def __init__(self, in_channels, sub_sample=False, **kwargs):
        super().__init__(in_channels, **kwargs)
        self.sub_sample = sub_sample
        if sub_sample:
            pool = nn.MaxPool2d(kernel_size=(2, 2))
            self.g = nn.Sequential(self.g, pool)
            self.phi = nn.Sequential(self.phi, pool)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _trained(module: nn.Module) -> nn.Module:
    """float64, every parameter random (gammas and zero-initialised outputs included), BN stats too."""
    module = module.double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.4 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        randomize_batchnorm(module)
    return module


def _inputs(kind, channels):
    gen = torch.Generator().manual_seed(2)
    x = torch.relu(torch.randn(2, channels, 5, 6, generator=gen, dtype=torch.float64))
    if kind == "ocr":
        return x, torch.randn(2, channels, 4, 1, generator=gen, dtype=torch.float64)
    return (x,)


def _run(module, inputs):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    torch.manual_seed(3)  # dropout, where a model has one, draws the same masks in both runs
    out = module(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    sum(o.pow(2).sum() for o in outs).backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters()}
    for p in module.parameters():
        p.grad = None
    return outs, [t.grad for t in inputs], grads


def _assert_same_computation(converted, original, inputs):
    for train in (True, False):
        converted.train(train)
        original.train(train)
        outs, input_grads, grads = _run(converted, inputs)
        ref_outs, ref_input_grads, ref_grads = _run(original, inputs)
        for a, b in zip(outs, ref_outs):
            torch.testing.assert_close(a, b, **TOL)
        for a, b in zip(input_grads, ref_input_grads):
            torch.testing.assert_close(a, b, **TOL)
        assert list(grads) == list(ref_grads)
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")


# kind: (make the upstream module, replacement class, channels, input kind)
UPSTREAM = {
    "official_pam": (lambda: PAM_Module(24), PositionAttention, 24, "x"),
    "official_pam_odd_width": (lambda: PAM_Module(20), PositionAttention, 20, "x"),  # width 20 // 8 = 2
    "official_cam": (lambda: CAM_Module(24), ChannelAttention, 24, "x"),
    "mmseg_pam": (lambda: PAM(24, 5), FusedMMSegPAM, 24, "x"),
    "mmseg_cam": (lambda: CAM(), FusedMMSegCAM, 24, "x"),
    "hrnet_ocr_block": (lambda: _ObjectAttentionBlock(12, 6), FusedObjectAttentionBlock, 12, "ocr"),
    "hrnet_ocr_block_2d": (lambda: ObjectAttentionBlock2D(12, 6), FusedObjectAttentionBlock, 12, "ocr"),
    "mmcv_nonlocal": (lambda: NonLocal2d(12), FusedNonLocal2d, 12, "x"),
    "mmcv_nonlocal_no_scale_bn": (lambda: NonLocal2d(12, use_scale=False, norm=True), FusedNonLocal2d, 12, "x"),
    "mmcv_nonlocal_sub_sample": (lambda: NonLocal2d(12, sub_sample=True, reduction=4), FusedNonLocal2d, 12, "x"),
}


class Holder(nn.Module):
    """A model around the module: the module sits two levels down, inside a Sequential."""

    def __init__(self, inner):
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 1)
        self.blocks = nn.Sequential(nn.Identity(), inner)


@pytest.mark.parametrize("kind", list(UPSTREAM))
def test_upstream_module_converted_in_place_same_outputs_and_gradients(kind):
    make, replacement_cls, channels, input_kind = UPSTREAM[kind]
    torch.manual_seed(0)
    model = Holder(_trained(make()))
    original = copy.deepcopy(model.blocks[1])
    params_before = {name: p for name, p in model.named_parameters()}
    buffers_before = {name: b for name, b in model.named_buffers()}
    keys_before = list(model.state_dict())
    checkpoint = copy.deepcopy(model.state_dict())

    result, report = convert_model(model, return_report=True)
    assert result is model
    converted = model.blocks[1]
    assert type(converted) is replacement_cls
    assert [(c.name, c.original) for c in report.converted] == [("blocks.1", type(original).__name__)]
    assert report.skipped == []
    # the same Parameter and buffer objects under the same names, the same state_dict keys in order
    assert {n: id(p) for n, p in model.named_parameters()} == {n: id(p) for n, p in params_before.items()}
    assert {n: id(b) for n, b in model.named_buffers()} == {n: id(b) for n, b in buffers_before.items()}
    assert list(model.state_dict()) == keys_before
    model.load_state_dict(checkpoint, strict=True)  # a checkpoint saved before loads after

    _assert_same_computation(converted, original, _inputs(input_kind, channels))


def test_official_danet_head_converted_optimizer_keeps_training_it():
    torch.manual_seed(0)
    model = _trained(OfficialDANetHead(64, 3, nn.BatchNorm2d))
    original = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built before the conversion
    convert_model(model)
    assert isinstance(model.sa, PositionAttention) and isinstance(model.sc, ChannelAttention)
    assert model.sa.key_channels == 2 and model.sc.in_channels is None
    x = _inputs("x", 64)
    _assert_same_computation(model, original, x)

    model.train()
    gamma_before = model.sa.gamma.detach().clone()
    for p in model.parameters():
        p.grad = None
    sum(o.sum() for o in model(*x)).backward()
    assert model.sa.gamma.grad is not None and model.sa.gamma.grad.abs().item() > 0
    optimizer.step()
    assert not torch.equal(model.sa.gamma.detach(), gamma_before)  # the optimizer's tensor is the model's


class ScaledPAM_Module(PAM_Module):
    """A fork that scales the logits: same parameters, different forward."""

    def forward(self, x):
        return super().forward(x / 8.0 ** 0.5)


def _renamed(cls, name):
    return type(name, (cls,), {})


class PaperCAM(nn.Module):  # a fork with the paper's softmax(E) under the official class name
    def __init__(self, in_dim):
        super().__init__()
        self.chanel_in = in_dim
        self.gamma = nn.Parameter(torch.zeros(1))
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x):
        b, c, h, w = x.size()
        q = x.view(b, c, -1)
        attention = self.softmax(torch.bmm(q, q.permute(0, 2, 1)))
        return self.gamma * torch.bmm(attention, q).view(b, c, h, w) + x


PaperCAM.__name__ = "CAM_Module"
PaperCAM.forward.__qualname__ = "CAM_Module.forward"


def _pam_without_query_conv():
    m = PAM_Module(16)
    del m.query_conv
    return m


def _cam_with_plain_gamma():
    """A class named CAM, with the official forward and a Parameter gamma (not mmcv's Scale)."""
    cls = type("CAM", (nn.Module,), {"forward": lambda self, x: CAM_Module.forward(self, x)})
    m = cls()
    m.gamma = nn.Parameter(torch.zeros(1))
    m.softmax = nn.Softmax(dim=-1)
    return m


def _pam_softmax_dim1():
    m = PAM_Module(16)
    m.softmax = nn.Softmax(dim=1)
    return m


def _pam_without_bias():
    m = PAM_Module(16)
    m.query_conv = nn.Conv2d(16, 2, 1, bias=False)
    return m


def _pam_with_hook():
    m = PAM_Module(16)
    m.register_forward_hook(lambda *args: None)
    return m


def _pam_3x3_value():
    m = PAM_Module(16)
    m.value_conv = nn.Conv2d(16, 16, 3, padding=1)
    return m


# kind: (make the look-alike, words the reason must contain)
LOOK_ALIKES = {
    "official_pam_softmax_dim1": (_pam_softmax_dim1, "softmax"),
    "official_pam_conv_without_bias": (_pam_without_bias, "query_conv has no bias"),
    "official_pam_3x3_value_conv": (_pam_3x3_value, "value_conv is not a plain 1x1"),
    "official_pam_forward_hook": (_pam_with_hook, "forward hooks"),
    "official_pam_forward_overridden": (lambda: _renamed(ScaledPAM_Module, "PAM_Module")(16),
                                        "forward is defined by ScaledPAM_Module"),
    "official_cam_paper_softmax": (lambda: PaperCAM(16), "computes something else"),
    "mmseg_pam_matmul_norm": (lambda: PAM(16, 4, matmul_norm=True), "matmul_norm=True"),
    "mmseg_pam_query_downsample": (lambda: PAM(16, 4, query_downsample=nn.MaxPool2d(2)), "query_downsample"),
    "mmseg_cam_plain_gamma": (_cam_with_plain_gamma, "gamma is a Parameter, not mmcv's Scale"),
    "hrnet_ocr_scale_2": (lambda: ObjectAttentionBlock2D(12, 6, scale=2), "scale=2"),
    "mmcv_nonlocal_dot_product": (lambda: NonLocal2d(12, mode="dot_product"), "mode='dot_product'"),
    "official_pam_without_query_conv": (_pam_without_query_conv, "has no query_conv"),
    "other_class_named_pam": (lambda: _renamed(nn.Identity, "PAM")(), "forward is defined by Identity"),
}


@pytest.mark.parametrize("kind", list(LOOK_ALIKES))
def test_look_alike_left_alone_and_reported_with_reason(kind):
    make, words = LOOK_ALIKES[kind]
    module = make()
    model = Holder(module)
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    rng_before = torch.get_rng_state()
    _, report = convert_model(model, return_report=True)
    assert model.blocks[1] is module
    assert report.converted == []
    assert len(report.skipped) == 1 and report.skipped[0].name == "blocks.1"
    assert words in report.skipped[0].reason, report.skipped[0].reason
    # the probe changed nothing: parameters, BN statistics, the global RNG
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state_before.items())
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_attnseg_modules_untouched_and_not_reported():
    model = nn.Sequential(attnseg.NonLocal2d(8), attnseg.ObjectContextAttention(8, 4, 8), PositionAttention(16))
    before = list(model)
    _, report = convert_model(model, return_report=True)
    assert list(model) == before and report.converted == [] and report.skipped == []


def test_shared_module_replaced_once_root_module_returned_and_verbose_report(capsys):
    pam = _trained(PAM(16, 2))
    model = nn.ModuleDict({"a": pam, "b": pam, "look_alike": _pam_softmax_dim1().double()})
    _, report = convert_model(model, verbose=True, return_report=True)
    assert model["a"] is model["b"] and isinstance(model["a"], FusedMMSegPAM)
    assert len(report.converted) == 1
    printed = capsys.readouterr().out
    assert "1 converted, 1 left as they are" in printed and "look_alike: PAM_Module: softmax" in printed
    assert str(report) in printed

    root = convert_model(PAM_Module(16))
    assert isinstance(root, PositionAttention)


def test_backend_reaches_replacements_and_bad_arguments_named():
    model = convert_model(Holder(PAM_Module(16)), backend="reference")
    assert model.blocks[1].backend == "reference"
    with pytest.raises(ValueError, match="backend"):
        convert_model(Holder(PAM_Module(16)), backend="cuda")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        convert_model({"sa": PAM_Module(16)})


def test_probe_leaves_batchnorm_statistics_and_training_mode():
    block = _trained(ObjectAttentionBlock2D(12, 6))
    block.train()
    block.f_up[1][0].eval()  # a frozen BatchNorm inside a training model stays frozen
    stats = {k: v.clone() for k, v in block.state_dict().items()}
    converted = convert_model(block)
    assert isinstance(converted, FusedObjectAttentionBlock)
    modes = {name: m.training for name, m in converted.named_modules()}
    assert modes.pop("f_up.1.0") is False and all(modes.values()), modes
    assert all(torch.equal(v, converted.state_dict()[k]) for k, v in stats.items())
