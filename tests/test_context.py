"""ObjectContextAttention (OCR) and NonLocal2d against plain-PyTorch versions of themselves
(same weights, materialised softmax), forward and gradients in fp64 and fp32, gradcheck,
native vs reference, checkpoint layout, argument checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

import attnseg
from attnseg import functional as F_attn
from attnseg.context import NonLocal2d, ObjectContextAttention
from helpers import assert_matches_reference

requires_native = pytest.mark.requires_native
BACKENDS = ["reference", pytest.param("native", marks=requires_native)]
DTYPES = [pytest.param(torch.float64, id="fp64"), pytest.param(torch.float32, id="fp32")]
# (dtype, train): BatchNorm in training mode normalises the region features over only B·K
# samples per channel (2 for K = 1), which amplifies rounding differences of equally sound
# summation orders far beyond the fp32 criterion of helpers.py; train-mode BN is therefore
# compared in fp64 (tight, 1e-10) and fp32 with running statistics (eval).
MODES = [
    pytest.param(torch.float64, True, id="fp64-train"),
    pytest.param(torch.float64, False, id="fp64-eval"),
    pytest.param(torch.float32, False, id="fp32-eval"),
]


@pytest.fixture(autouse=True)
def _one_thread():
    # The problems here are tiny: intra-op threads only add sync overhead, which on a busy
    # 2-core machine made these tests ~30x slower. Restored afterwards for the other modules.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Plain versions: HRNet-OCR's SpatialGather_Module / _ObjectAttentionBlock / SpatialOCR_Module
# (scale=1, BNReLU = Sequential(BatchNorm2d, ReLU)) and the AlexHex7/Non-local_pytorch
# embedded-Gaussian block, written out with the full attention map.
# ---------------------------------------------------------------------------------------------


def BNReLU(num_features):
    return nn.Sequential(nn.BatchNorm2d(num_features), nn.ReLU())


class PlainObjectAttentionBlock(nn.Module):
    def __init__(self, in_channels, key_channels):
        super().__init__()
        self.key_channels = key_channels
        self.f_pixel = nn.Sequential(
            nn.Conv2d(in_channels, key_channels, 1, bias=False), BNReLU(key_channels),
            nn.Conv2d(key_channels, key_channels, 1, bias=False), BNReLU(key_channels),
        )
        self.f_object = nn.Sequential(
            nn.Conv2d(in_channels, key_channels, 1, bias=False), BNReLU(key_channels),
            nn.Conv2d(key_channels, key_channels, 1, bias=False), BNReLU(key_channels),
        )
        self.f_down = nn.Sequential(nn.Conv2d(in_channels, key_channels, 1, bias=False), BNReLU(key_channels))
        self.f_up = nn.Sequential(nn.Conv2d(key_channels, in_channels, 1, bias=False), BNReLU(in_channels))

    def forward(self, x, proxy):
        batch_size, h, w = x.size(0), x.size(2), x.size(3)
        query = self.f_pixel(x).view(batch_size, self.key_channels, -1).permute(0, 2, 1)
        key = self.f_object(proxy).view(batch_size, self.key_channels, -1)
        value = self.f_down(proxy).view(batch_size, self.key_channels, -1).permute(0, 2, 1)
        sim_map = torch.matmul(query, key) * (self.key_channels ** -0.5)
        sim_map = torch.softmax(sim_map, dim=-1)
        context = torch.matmul(sim_map, value).permute(0, 2, 1).contiguous()
        context = context.view(batch_size, self.key_channels, h, w)
        return self.f_up(context)


class PlainSpatialOCR(nn.Module):
    def __init__(self, in_channels, key_channels, out_channels, dropout=0.0):
        super().__init__()
        self.object_context_block = PlainObjectAttentionBlock(in_channels, key_channels)
        self.conv_bn_dropout = nn.Sequential(
            nn.Conv2d(2 * in_channels, out_channels, kernel_size=1, padding=0, bias=False),
            BNReLU(out_channels),
            nn.Dropout2d(dropout),
        )

    @staticmethod
    def spatial_gather(feats, probs):
        batch_size, c = probs.size(0), probs.size(1)
        probs = probs.view(batch_size, c, -1)
        feats = feats.view(batch_size, feats.size(1), -1).permute(0, 2, 1)
        probs = torch.softmax(probs, dim=2)
        return torch.matmul(probs, feats).permute(0, 2, 1).unsqueeze(3)

    def forward(self, feats, coarse_logits):
        proxy = self.spatial_gather(feats, coarse_logits)
        context = self.object_context_block(feats, proxy)
        return self.conv_bn_dropout(torch.cat([context, feats], 1))


class PlainNonLocal(nn.Module):
    def __init__(self, in_channels, inter_channels, use_scale):
        super().__init__()
        self.inter_channels = inter_channels
        self.use_scale = use_scale
        self.g = nn.Conv2d(in_channels, inter_channels, 1)
        self.theta = nn.Conv2d(in_channels, inter_channels, 1)
        self.phi = nn.Conv2d(in_channels, inter_channels, 1)
        self.W = nn.Sequential(nn.Conv2d(inter_channels, in_channels, 1), nn.BatchNorm2d(in_channels))

    def forward(self, x):
        b = x.size(0)
        g_x = self.g(x).view(b, self.inter_channels, -1).permute(0, 2, 1)
        theta_x = self.theta(x).view(b, self.inter_channels, -1).permute(0, 2, 1)
        phi_x = self.phi(x).view(b, self.inter_channels, -1)
        f = torch.matmul(theta_x, phi_x)
        if self.use_scale:
            f = f / self.inter_channels ** 0.5
        y = torch.matmul(torch.softmax(f, dim=-1), g_x).permute(0, 2, 1).contiguous()
        y = y.view(b, self.inter_channels, *x.size()[2:])
        return self.W(y) + x


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _randomize(module: nn.Module) -> nn.Module:
    """Non-trivial weights everywhere (BN affine and running stats included, W not zero)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.2)
            elif p.dim() == 1:  # BN weight
                p.copy_(1.0 + torch.rand_like(p) * 0.5)
            else:
                p.copy_(torch.randn_like(p) * (1.5 / p.shape[1] ** 0.5))
        for name, buf in module.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn_like(buf) * 0.1)
            elif name.endswith("running_var"):
                buf.copy_(0.5 + torch.rand_like(buf))
    return module


def _forward_backward(module, inputs, grad_out):
    inputs = tuple(t.detach().clone().requires_grad_(True) for t in inputs)
    module.zero_grad(set_to_none=True)
    out = module(*inputs)
    (out * grad_out.to(out.dtype)).sum().backward()
    grads = {f"input{i}": t.grad for i, t in enumerate(inputs)}
    grads.update({name: p.grad for name, p in module.named_parameters()})
    return out.detach(), grads


def _compare(make_ours, make_plain, inputs, dtype, *, train=True, reduction=64, logit_max=4.0):
    """ours(dtype) vs plain(fp64) [and plain(dtype) for the fp32 criterion], same weights."""
    plain = _randomize(make_plain())
    state = plain.state_dict()
    ours = make_ours()
    ours.load_state_dict(state, strict=True)
    plain64 = make_plain().double()
    plain64.load_state_dict({k: (v.double() if v.is_floating_point() else v) for k, v in state.items()})
    for m in (ours, plain, plain64):
        m.train(train)
    ours.to(dtype)
    plain.to(dtype)
    with torch.no_grad():
        probe = plain64(*[t.double() for t in inputs])
    grad_out = torch.randn(probe.shape, dtype=torch.float64)

    out, grads = _forward_backward(ours, [t.to(dtype) for t in inputs], grad_out)
    out64, grads64 = _forward_backward(plain64, [t.double() for t in inputs], grad_out)
    same = None
    grads_same = {}
    if dtype != torch.float64:
        same, grads_same = _forward_backward(plain, [t.to(dtype) for t in inputs], grad_out)
    tol = dict(reduction=reduction, logit_max=logit_max)
    assert_matches_reference("output", out, out64, same, expected_dtype=dtype, **tol)
    assert grads.keys() == grads64.keys()
    for name in grads:
        assert grads[name] is not None, f"no gradient for {name}"
        assert_matches_reference(f"grad {name}", grads[name], grads64[name], grads_same.get(name), **tol)
    return ours


def _ocr_inputs(b, c, k, h, w):
    x = torch.relu(torch.randn(b, c, h, w)) + 0.1 * torch.randn(b, c, h, w)
    logits = torch.randn(b, k, h, w) * 2.0
    return x, logits


# ---------------------------------------------------------------------------------------------
# ObjectContextAttention
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, train", MODES)
@pytest.mark.parametrize("regions", [1, 5, 19])
def test_ocr_matches_plain(regions, dtype, train, backend):
    x, logits = _ocr_inputs(2, 12, regions, 7, 9)
    # dropout 0.3 is a no-op in eval; in train it is 0 so that both sides are deterministic
    dropout = 0.0 if train else 0.3
    _compare(
        lambda: ObjectContextAttention(12, 8, 10, dropout=dropout, backend=backend),
        lambda: PlainSpatialOCR(12, 8, 10, dropout=dropout),
        (x, logits),
        dtype,
        train=train,
        reduction=2 * 7 * 9 * regions,  # e.g. a bias gradient sums over B · Nq · Nk products
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("regions", [1, 3])
def test_gradcheck_ocr(regions, backend):
    module = _randomize(ObjectContextAttention(3, 2, 2, dropout=0.0, backend=backend)).double()
    x, logits = (t.double() for t in _ocr_inputs(2, 3, regions, 2, 3))
    names = [n for n, _ in module.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in module.parameters())

    def fn(x, logits, *params):
        return functional_call(module, dict(zip(names, params)), (x, logits))

    assert torch.autograd.gradcheck(
        fn, (x.requires_grad_(True), logits.requires_grad_(True), *params), eps=1e-6, atol=1e-6, rtol=1e-5
    )


@requires_native
@pytest.mark.parametrize("dtype", DTYPES)
def test_ocr_native_agrees_with_reference(dtype):
    x, logits = _ocr_inputs(2, 16, 19, 8, 8)
    ref = _randomize(ObjectContextAttention(16, 8, 12, dropout=0.0, backend="reference")).to(dtype)
    nat = ObjectContextAttention(16, 8, 12, dropout=0.0, backend="native").to(dtype)
    nat.load_state_dict(ref.state_dict())
    grad_out = torch.randn(2, 12, 8, 8, dtype=dtype)
    out_r, grads_r = _forward_backward(ref, (x.to(dtype), logits.to(dtype)), grad_out)
    out_n, grads_n = _forward_backward(nat, (x.to(dtype), logits.to(dtype)), grad_out)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out_n, out_r, **tol)
    for name in grads_r:
        torch.testing.assert_close(grads_n[name], grads_r[name], **tol, msg=lambda m, n=name: f"grad {n}: {m}")


def test_ocr_passes_channel_first_views_without_copies(monkeypatch):
    seen = {}
    real = F_attn.attention

    def spy(q, k, v, scale=1.0, **kwargs):
        seen.update(q=q, k=k, v=v, scale=scale, backend=kwargs.get("backend"))
        return real(q, k, v, scale, **kwargs)

    monkeypatch.setattr(F_attn, "attention", spy)
    module = ObjectContextAttention(6, 4, 5, backend="reference").eval()
    module(*_ocr_inputs(2, 6, 3, 4, 5))
    n = 4 * 5
    assert seen["q"].shape == (2, n, 4) and seen["q"].stride() == (4 * n, 1, n)  # a view of [B, 4, H, W]
    assert seen["k"].shape == (2, 3, 4) and seen["k"].stride() == (12, 1, 3)
    assert seen["v"].shape == (2, 3, 4) and seen["v"].stride() == (12, 1, 3)
    assert seen["scale"] == pytest.approx(4 ** -0.5)
    assert seen["backend"] == "reference"


def test_ocr_state_dict_layout_is_hrnet_spatial_ocr():
    ours = ObjectContextAttention(12, 8, 10)
    plain = PlainSpatialOCR(12, 8, 10)
    assert list(ours.state_dict()) == list(plain.state_dict())
    for key, value in plain.state_dict().items():
        assert ours.state_dict()[key].shape == value.shape, key


def test_ocr_dropout_and_repr():
    module = ObjectContextAttention(8, 4, 6, backend="reference")
    assert isinstance(module.conv_bn_dropout[-1], nn.Dropout2d) and module.conv_bn_dropout[-1].p == 0.05
    text = repr(module)
    assert "backend='reference'" in text and "key_channels=4" in text
    assert "backend='auto'" in repr(ObjectContextAttention(8, 4, 6))


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(in_channels=0, key_channels=4, out_channels=4), "in_channels"),
        (dict(in_channels=4, key_channels=2.0, out_channels=4), "key_channels"),
        (dict(in_channels=4, key_channels=4, out_channels=-1), "out_channels"),
        (dict(in_channels=4, key_channels=4, out_channels=4, dropout=1.5), "dropout"),
        (dict(in_channels=4, key_channels=4, out_channels=4, backend="cuda"), "backend"),
    ],
)
def test_ocr_bad_constructor_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        ObjectContextAttention(**kwargs)


def test_ocr_bad_inputs():
    module = ObjectContextAttention(6, 4, 5, backend="reference")
    x, logits = _ocr_inputs(2, 6, 3, 4, 5)
    with pytest.raises(ValueError, match="x must have 6 channels"):
        module(torch.randn(2, 7, 4, 5), logits)
    with pytest.raises(ValueError, match="x must be a 4-D"):
        module(x[0], logits)
    with pytest.raises(ValueError, match="coarse_logits must be a 4-D"):
        module(x, logits[0])
    with pytest.raises(ValueError, match="coarse_logits must have shape"):
        module(x, logits[:, :, :2])
    with pytest.raises(ValueError, match="coarse_logits must have shape"):
        module(x, logits[:1])
    with pytest.raises(ValueError, match="coarse_logits"):
        module(x, logits.double())


# ---------------------------------------------------------------------------------------------
# NonLocal2d
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, train", MODES)
@pytest.mark.parametrize("use_scale", [False, True], ids=["noscale", "scale"])
def test_nonlocal_matches_plain(use_scale, dtype, train, backend):
    x = torch.randn(2, 8, 9, 7)
    _compare(
        lambda: NonLocal2d(8, use_scale=use_scale, backend=backend),
        lambda: PlainNonLocal(8, 4, use_scale),
        (x,),
        dtype,
        train=train,
        reduction=2 * 63 * 63,  # e.g. g.bias's gradient sums over B · N · N products
        logit_max=20.0,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use_scale", [False, True], ids=["noscale", "scale"])
def test_gradcheck_nonlocal(use_scale, backend):
    module = _randomize(NonLocal2d(4, inter_channels=3, use_scale=use_scale, backend=backend)).double()
    x = torch.randn(2, 4, 2, 3, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in module.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in module.parameters())

    def fn(x, *params):
        return functional_call(module, dict(zip(names, params)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-5)


@requires_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("use_scale", [False, True], ids=["noscale", "scale"])
def test_nonlocal_native_agrees_with_reference(use_scale, dtype):
    x = torch.randn(2, 16, 11, 10, dtype=dtype)
    ref = _randomize(NonLocal2d(16, use_scale=use_scale, backend="reference")).to(dtype)
    nat = NonLocal2d(16, use_scale=use_scale, backend="native").to(dtype)
    nat.load_state_dict(ref.state_dict())
    grad_out = torch.randn_like(x)
    out_r, grads_r = _forward_backward(ref, (x,), grad_out)
    out_n, grads_n = _forward_backward(nat, (x,), grad_out)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out_n, out_r, **tol)
    for name in grads_r:
        torch.testing.assert_close(grads_n[name], grads_r[name], **tol, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("bn_layer", [True, False])
def test_nonlocal_starts_as_identity(bn_layer):
    module = NonLocal2d(6, bn_layer=bn_layer, backend="reference")
    x = torch.randn(2, 6, 3, 4)
    torch.testing.assert_close(module(x), x, rtol=0, atol=0)


def test_nonlocal_defaults_scale_and_repr():
    assert NonLocal2d(8).inter_channels == 4
    assert NonLocal2d(1).inter_channels == 1
    assert NonLocal2d(8).scale == 1.0
    assert NonLocal2d(8, inter_channels=16, use_scale=True).scale == pytest.approx(0.25)
    text = repr(NonLocal2d(8, backend="native"))
    assert "backend='native'" in text and "use_scale=False" in text


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(in_channels=0), "in_channels"),
        (dict(in_channels=4, inter_channels=0), "inter_channels"),
        (dict(in_channels=4, use_scale=1), "use_scale"),
        (dict(in_channels=4, backend="gpu"), "backend"),
    ],
)
def test_nonlocal_bad_constructor_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        NonLocal2d(**kwargs)


def test_nonlocal_bad_inputs():
    module = NonLocal2d(4, backend="reference")
    with pytest.raises(ValueError, match="x must have 4 channels"):
        module(torch.randn(1, 5, 2, 2))
    with pytest.raises(ValueError, match="x must be a 4-D"):
        module(torch.randn(4, 2, 2))


def test_backend_auto_resolves_like_the_library():
    assert attnseg.resolve_backend("auto", "cpu") in ("native", "chunked")
