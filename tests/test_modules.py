"""PositionAttention / ChannelAttention / DANetHead: native vs reference, gradients of every
parameter, gradcheck, official-checkpoint compatibility, backend choice and output layout."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

import attnseg
from attnseg import ChannelAttention, DANetHead, PositionAttention
from helpers import assert_matches_reference, randomize_batchnorm

requires_native = pytest.mark.requires_native


# ---------------------------------------------------------------------------------------------
# Stand-ins for the official DANet modules (junfu1115/DANet, encoding/nn/da_att.py and
# encoding/models/sseg/danet.py): same parameter names, shapes and forward computation, to
# produce checkpoints in their layout and the outputs they give.
# ---------------------------------------------------------------------------------------------


class PAM_Module(nn.Module):
    """ Position attention module"""
    #Ref from SAGAN
    def __init__(self, in_dim):
        super(PAM_Module, self).__init__()
        self.chanel_in = in_dim

        self.query_conv = nn.Conv2d(in_channels=in_dim, out_channels=in_dim//8, kernel_size=1)
        self.key_conv = nn.Conv2d(in_channels=in_dim, out_channels=in_dim//8, kernel_size=1)
        self.value_conv = nn.Conv2d(in_channels=in_dim, out_channels=in_dim, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))

        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x):
        m_batchsize, C, height, width = x.size()
        proj_query = self.query_conv(x).view(m_batchsize, -1, width*height).permute(0, 2, 1)
        proj_key = self.key_conv(x).view(m_batchsize, -1, width*height)
        energy = torch.bmm(proj_query, proj_key)
        attention = self.softmax(energy)
        proj_value = self.value_conv(x).view(m_batchsize, -1, width*height)

        out = torch.bmm(proj_value, attention.permute(0, 2, 1))
        out = out.view(m_batchsize, C, height, width)

        out = self.gamma*out + x
        return out


class CAM_Module(nn.Module):
    """ Channel attention module"""
    def __init__(self, in_dim):
        super(CAM_Module, self).__init__()
        self.chanel_in = in_dim

        self.gamma = nn.Parameter(torch.zeros(1))
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x):
        m_batchsize, C, height, width = x.size()
        proj_query = x.view(m_batchsize, C, -1)
        proj_key = x.view(m_batchsize, C, -1).permute(0, 2, 1)
        energy = torch.bmm(proj_query, proj_key)
        energy_new = torch.max(energy, -1, keepdim=True)[0].expand_as(energy)-energy
        attention = self.softmax(energy_new)
        proj_value = x.view(m_batchsize, C, -1)

        out = torch.bmm(attention, proj_value)
        out = out.view(m_batchsize, C, height, width)

        out = self.gamma*out + x
        return out


class OfficialDANetHead(nn.Module):  # "DANetHead" in danet.py
    def __init__(self, in_channels, out_channels, norm_layer):
        super(OfficialDANetHead, self).__init__()
        inter_channels = in_channels // 4
        self.conv5a = nn.Sequential(nn.Conv2d(in_channels, inter_channels, 3, padding=1, bias=False),
                                    norm_layer(inter_channels),
                                    nn.ReLU())

        self.conv5c = nn.Sequential(nn.Conv2d(in_channels, inter_channels, 3, padding=1, bias=False),
                                    norm_layer(inter_channels),
                                    nn.ReLU())

        self.sa = PAM_Module(inter_channels)
        self.sc = CAM_Module(inter_channels)
        self.conv51 = nn.Sequential(nn.Conv2d(inter_channels, inter_channels, 3, padding=1, bias=False),
                                    norm_layer(inter_channels),
                                    nn.ReLU())
        self.conv52 = nn.Sequential(nn.Conv2d(inter_channels, inter_channels, 3, padding=1, bias=False),
                                    norm_layer(inter_channels),
                                    nn.ReLU())

        self.conv6 = nn.Sequential(nn.Dropout2d(0.1, False), nn.Conv2d(inter_channels, out_channels, 1))
        self.conv7 = nn.Sequential(nn.Dropout2d(0.1, False), nn.Conv2d(inter_channels, out_channels, 1))

        self.conv8 = nn.Sequential(nn.Dropout2d(0.1, False), nn.Conv2d(inter_channels, out_channels, 1))

    def forward(self, x):
        feat1 = self.conv5a(x)
        sa_feat = self.sa(feat1)
        sa_conv = self.conv51(sa_feat)
        sa_output = self.conv6(sa_conv)

        feat2 = self.conv5c(x)
        sc_feat = self.sc(feat2)
        sc_conv = self.conv52(sc_feat)
        sc_output = self.conv7(sc_conv)

        feat_sum = sa_conv+sc_conv

        sasc_output = self.conv8(feat_sum)

        output = [sasc_output]
        output.append(sa_output)
        output.append(sc_output)
        return tuple(output)


def _trained_looking_state(module: nn.Module) -> dict:
    """Non-default values for everything: gamma != 0 (it is zero-initialised, which would
    hide the attention branch), BatchNorm statistics away from (0, 1)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("gamma"):
                p.fill_(-0.8 if name.startswith("sc.") else 0.6)
        randomize_batchnorm(module)
    return module.state_dict()


def _relu_features(b, c, h, w, dtype=torch.float32):
    return torch.relu(torch.randn(b, c, h, w, dtype=dtype))


# ---------------------------------------------------------------------------------------------
# Native vs reference: outputs and every parameter's gradient
# ---------------------------------------------------------------------------------------------


def _outputs_and_grads(module, x, grad_outs):
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    outs = module(x)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, grad_outs)])
    grads = {"x": x.grad}
    grads.update({name: p.grad for name, p in module.named_parameters()})
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    return [o.detach() for o in outs], grads


def _attention_sizes(module, x):
    """(longest reduction, largest |logit|) over the attention modules inside ``module``, from
    their actual inputs: the tolerance inputs of helpers.assert_matches_reference."""
    found = []

    def record(m, args):
        (inp,) = args
        inp = inp.detach().double()
        b, c, h, w = inp.shape
        if isinstance(m, PositionAttention):
            with torch.no_grad():
                q = nn.functional.conv2d(inp, m.query_conv.weight.double(), m.query_conv.bias.double()).flatten(2)
                k = nn.functional.conv2d(inp, m.key_conv.weight.double(), m.key_conv.bias.double()).flatten(2)
            found.append((max(h * w, c), float(torch.bmm(q.transpose(1, 2), k).abs().max())))
        else:
            energy = torch.bmm(inp.flatten(2), inp.flatten(2).transpose(1, 2))
            found.append((max(h * w, c), 2.0 * float(energy.abs().max())))

    handles = [m.register_forward_pre_hook(record) for m in module.modules()
               if isinstance(m, (PositionAttention, ChannelAttention))]
    with torch.no_grad():
        module(x)
    for h in handles:
        h.remove()
    assert found, "no attention module ran"
    return max(r for r, _ in found), max(s for _, s in found)


def _compare_module_backends(make_module, x, n_outputs=1):
    """The same weights under backend='native' and 'reference': outputs and all gradients,
    fp64 exactly-ish, fp32 by the fp64-anchored criterion of helpers.py."""
    dtype = x.dtype
    native = make_module("native").to(dtype)
    state = _trained_looking_state(native)
    ref64 = make_module("reference").double()
    ref64.load_state_dict(state)
    same = make_module("reference").to(dtype)
    same.load_state_dict(state)
    for m in (native, ref64, same):
        m.eval()  # BatchNorm with running statistics, no dropout: deterministic
    with torch.no_grad():
        probe = native(x)
    probe = probe if isinstance(probe, tuple) else (probe,)
    grad_outs = [torch.randn(p.shape, dtype=torch.float64) for p in probe]

    outs, grads = _outputs_and_grads(native, x, grad_outs)
    outs64, grads64 = _outputs_and_grads(ref64, x.double(), grad_outs)
    outs_same, grads_same = _outputs_and_grads(same, x, grad_outs) if dtype != torch.float64 else (None, None)
    assert len(outs) == n_outputs
    reduction, logit_max = _attention_sizes(ref64, x.double())
    tol = {"reduction": reduction, "logit_max": logit_max, "expected_dtype": dtype}
    for i, (o, o64) in enumerate(zip(outs, outs64)):
        assert_matches_reference(f"output[{i}]", o, o64, outs_same[i] if outs_same else None, **tol)
    assert grads.keys() == grads64.keys()
    for name in grads:
        assert_matches_reference(f"grad {name}", grads[name], grads64[name], grads_same[name] if grads_same else None, **tol)


@requires_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_position_attention_native_matches_reference(dtype):
    x = _relu_features(2, 64, 13, 11, dtype)  # E = 8, N = 143
    _compare_module_backends(lambda backend: PositionAttention(64, backend=backend), x)


@requires_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("variant", ["official", "paper"])
def test_channel_attention_native_matches_reference(variant, dtype):
    x = _relu_features(2, 24, 9, 10, dtype) * 0.3
    _compare_module_backends(lambda backend: ChannelAttention(24, variant=variant, backend=backend), x)


@requires_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_danet_head_native_matches_reference(dtype):
    x = _relu_features(2, 64, 9, 11, dtype)  # inter_channels 16, PAM E = 2, N = 99
    _compare_module_backends(lambda backend: DANetHead(64, 5, backend=backend), x, n_outputs=3)


# ---------------------------------------------------------------------------------------------
# gradcheck of the modules (every parameter as a gradcheck input, via functional_call)
# ---------------------------------------------------------------------------------------------


def _gradcheck_module(module, x):
    module = module.double()
    names = [n for n, _ in module.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for _, p in module.named_parameters())
    x = x.double().requires_grad_(True)

    def fn(x, *params):
        return functional_call(module, dict(zip(names, params)), (x,))

    return torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5)


@requires_native
def test_gradcheck_position_attention_module():
    module = PositionAttention(8, reduction=4, backend="native")  # E = 2
    with torch.no_grad():
        module.gamma.fill_(0.7)
    assert _gradcheck_module(module, torch.randn(1, 8, 2, 3))


@requires_native
@pytest.mark.parametrize("variant", ["official", "paper"])
def test_gradcheck_channel_attention_module(variant):
    module = ChannelAttention(4, variant=variant, backend="native")
    with torch.no_grad():
        module.gamma.fill_(-0.7)
    assert _gradcheck_module(module, torch.randn(2, 4, 2, 3))


# ---------------------------------------------------------------------------------------------
# Official checkpoint layout
# ---------------------------------------------------------------------------------------------


def _backends_to_check():
    return ["reference", pytest.param("native", marks=requires_native)]


@pytest.mark.parametrize("backend", _backends_to_check())
def test_official_danet_head_state_dict_loads_strict_and_matches(backend):
    official = OfficialDANetHead(64, 5, nn.BatchNorm2d)
    state = _trained_looking_state(official)
    ours = DANetHead(64, 5, backend=backend)
    ours.load_state_dict(state, strict=True)  # raises on any missing or unexpected key
    assert set(ours.state_dict()) == set(state)
    official.eval()
    ours.eval()
    x = _relu_features(2, 64, 9, 11)
    with torch.no_grad():
        expected = official(x)
        got = ours(x)
    assert isinstance(got, tuple) and len(got) == 3  # (fused, pam, cam) like the official head
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g.shape == e.shape == (2, 5, 9, 11)
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5, msg=lambda m: f"output {i}: {m}")


@pytest.mark.parametrize("backend", _backends_to_check())
def test_official_pam_and_cam_state_dicts_load_strict_and_match(backend):
    x = _relu_features(2, 32, 7, 9)
    pam, cam = PAM_Module(32), CAM_Module(32)
    pam_state, cam_state = _trained_looking_state(pam), _trained_looking_state(cam)
    ours_pam = PositionAttention(32, backend=backend)
    ours_cam = ChannelAttention(32, backend=backend)
    ours_pam.load_state_dict(pam_state, strict=True)
    ours_cam.load_state_dict(cam_state, strict=True)
    assert ours_pam.gamma.detach().item() != 0.0 and ours_cam.gamma.detach().item() != 0.0
    with torch.no_grad():
        torch.testing.assert_close(ours_pam(x), pam(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours_cam(x), cam(x), rtol=1e-4, atol=1e-5)


def test_parameters_have_official_names_and_zero_gamma():
    pam = PositionAttention(64)
    assert {n: tuple(p.shape) for n, p in pam.named_parameters()} == {
        n: tuple(p.shape) for n, p in PAM_Module(64).named_parameters()
    }
    assert pam.gamma.detach().item() == 0.0 and ChannelAttention().gamma.detach().item() == 0.0
    assert pam.query_conv.out_channels == 8  # C / 8 like the official module


# ---------------------------------------------------------------------------------------------
# Backends: visible, explicit ones never fall back, "auto" on the CPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda b: PositionAttention(16, backend=b), lambda b: ChannelAttention(16, backend=b)],
                         ids=["PositionAttention", "ChannelAttention"])
def test_backend_visible_in_repr(make):
    assert "backend='reference'" in repr(make("reference"))
    assert "backend='native'" in repr(make("native"))
    assert "backend='auto'" in repr(make("auto"))  # chosen per call: attnseg.explain says what
    head = repr(DANetHead(64, 3, backend="reference"))
    assert head.count("backend='reference'") == 2  # sa and sc


@requires_native
def test_auto_resolves_to_native_on_cpu():
    backends = attnseg.available_backends("cpu")
    assert backends["native"] is None
    assert backends["auto"] == "native"
    assert attnseg.resolve_backend("auto", "cpu") == "native"
    # the DANet head at N = 32,768: beyond the measured table, the CPU's default for a large map
    x, q = torch.randn(1, 512, 128, 256), torch.randn(1, 64, 128, 256)
    choice = attnseg.explain(x, q, q, x)
    assert choice.backend == "native" and choice.rows == (), choice


def test_auto_uses_chunked_without_extension(monkeypatch):
    monkeypatch.setattr(attnseg._ops, "_native_error", "ImportError: simulated missing extension")
    assert attnseg.available_backends("cpu")["auto"] == "chunked"
    assert "simulated" in attnseg.available_backends("cpu")["native"]
    calls = []
    chunked = attnseg._backends.get("chunked")
    original = type(chunked).attention
    monkeypatch.setattr(type(chunked), "attention", lambda self, *a, **kw: calls.append(1) or original(self, *a, **kw))
    monkeypatch.setattr(attnseg._backends, "table_rows", lambda path=None: ())  # the default rule alone
    module = PositionAttention(16)  # auto
    with torch.no_grad():
        module(torch.randn(1, 16, 80, 80))  # a map above the CPU's small-map default (the math)
    assert calls, "auto did not use the chunked backend"


def test_native_named_without_extension_raises(monkeypatch):
    monkeypatch.setattr(attnseg._ops, "_native_error", "ImportError: simulated missing extension")
    x = torch.randn(1, 16, 3, 3)
    with pytest.raises(attnseg.BackendUnavailableError, match="simulated missing extension"):
        PositionAttention(16, backend="native")(x)
    with pytest.raises(attnseg.BackendUnavailableError, match="native"):
        ChannelAttention(backend="native")(x)
    with pytest.raises(attnseg.BackendUnavailableError):
        attnseg.attention(torch.randn(1, 2, 3), torch.randn(1, 2, 3), torch.randn(1, 2, 3), backend="native")


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = attnseg.available_backends("cpu")["triton"]
    if reason is None:
        pytest.skip("the Triton interpreter is active in this process (TRITON_INTERPRET read at import), "
                    "so triton legitimately runs on CPU tensors here")
    x = torch.randn(1, 16, 3, 3)
    with pytest.raises(attnseg.BackendUnavailableError, match="triton"):
        PositionAttention(16, backend="triton")(x)
    with pytest.raises(attnseg.BackendUnavailableError, match="triton"):
        ChannelAttention(backend="triton")(x)
    with pytest.raises(attnseg.BackendUnavailableError, match="triton"):
        attnseg.attention(torch.randn(1, 2, 3), torch.randn(1, 2, 3), torch.randn(1, 2, 3), backend="triton")


def test_native_on_meta_device_raises():
    """No native kernels for the meta device: named explicitly, that is an error, not a fallback."""
    x = torch.empty(1, 4, 3, 3, device="meta")
    gamma = torch.zeros(1, device="meta")
    with pytest.raises(attnseg.BackendUnavailableError, match="meta|native"):
        attnseg.channel_attention(x, gamma, backend="native")


# ---------------------------------------------------------------------------------------------
# Output layout: like x
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", _backends_to_check())
@pytest.mark.parametrize("make", [lambda b: PositionAttention(16, backend=b), lambda b: ChannelAttention(16, backend=b)],
                         ids=["PositionAttention", "ChannelAttention"])
def test_output_layout_follows_x(make, backend):
    module = make(backend)
    with torch.no_grad():
        module.gamma.fill_(0.5)
        x = torch.randn(2, 16, 5, 7)
        out = module(x)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert out.is_contiguous(), f"contiguous x gave strides {out.stride()}"
        if backend == "reference":
            return  # the reference follows the official code: gamma * out + x, layout not promised
        x_cl = x.to(memory_format=torch.channels_last)
        out_cl = module(x_cl)
        assert out_cl.is_contiguous(memory_format=torch.channels_last), f"channels_last x gave strides {out_cl.stride()}"
        torch.testing.assert_close(out_cl, out, rtol=1e-5, atol=1e-5)


@requires_native
def test_native_module_in_train_mode_backpropagates_into_gamma():
    """gamma starts at 0: the attention branch must still get a gradient (that is how it trains)."""
    module = PositionAttention(16, backend="native")
    x = torch.randn(2, 16, 4, 5)
    module(x).square().sum().backward()
    assert module.gamma.grad is not None and module.gamma.grad.abs().item() > 0
    # with gamma = 0 the convolutions get no gradient yet: exactly zero, not NaN
    assert torch.count_nonzero(module.value_conv.weight.grad) == 0


@requires_native
def test_torch_compile_fullgraph_matches_eager():
    """The functional layer and the op's fake kernels trace without graph breaks (fullgraph=True);
    aot_eager runs the traced graph, forward and backward, without needing a C++ compiler."""
    pam = PositionAttention(16, backend="native")
    cam = ChannelAttention(16, backend="native")
    with torch.no_grad():
        pam.gamma.fill_(0.5)
        cam.gamma.fill_(-0.5)

    def both(x):
        return pam(x) + cam(x)

    x = torch.randn(2, 16, 5, 7, requires_grad=True)
    compiled = torch.compile(both, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    (grad_x,) = torch.autograd.grad(out.square().sum(), x)
    expected = both(x)
    (expected_grad_x,) = torch.autograd.grad(expected.square().sum(), x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grad_x, expected_grad_x)


@pytest.mark.parametrize("in_channels", [60, 9, 1])
def test_position_attention_any_in_channels_matches_official(in_channels):
    """The official PAM_Module(in_dim) runs for any in_dim >= 8 (query width in_dim // 8, e.g.
    7 for 60); PositionAttention takes the same range, and reduction=1 reaches in_channels=1."""
    reduction = 8 if in_channels >= 8 else 1
    ours = PositionAttention(in_channels, reduction=reduction).double()
    assert ours.query_conv.out_channels == in_channels // reduction
    if reduction == 8:
        official = PAM_Module(in_channels).double()
        official.load_state_dict(_trained_looking_state(official))
        ours.load_state_dict(official.state_dict(), strict=True)
        x = _relu_features(2, in_channels, 5, 3, torch.float64)
        torch.testing.assert_close(ours(x), official(x), rtol=1e-10, atol=1e-10)
    else:
        assert ours(torch.randn(1, 1, 2, 3, dtype=torch.float64)).shape == (1, 1, 2, 3)


def test_position_attention_width_zero_names_minimum_in_channels():
    with pytest.raises(ValueError, match=r"in_channels must be at least 8 \(= reduction\)"):
        PositionAttention(7)


# ---------------------------------------------------------------------------------------------
# PAM's 1×1 projections on the CPU: one GEMM on x's [B, C, N] view, no convolution
# ---------------------------------------------------------------------------------------------


class _OpNames(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _module_ops(module, x):
    with _OpNames() as seen:
        module(x).sum().backward()
    return seen.names


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("batch", [1, 3])
def test_projections_are_gemms_and_match_the_convolutions(batch, memory_format):
    """The GEMM path gives the convolutions' outputs and gradients (fp64, to rounding), runs no
    convolution forward or backward, and copies no [B, C, N] operand into another layout."""
    torch.manual_seed(0)
    module = PositionAttention(16, reduction=4, backend="chunked").double()
    with torch.no_grad():
        module.gamma.fill_(0.5)
    x = torch.randn(batch, 16, 5, 6, dtype=torch.float64).to(memory_format=memory_format).requires_grad_()
    names = _module_ops(module, x)
    assert not [n for n in names if n.startswith("convolution") or n == "clone"], names
    got = {n: p.grad.clone() for n, p in module.named_parameters()}, x.grad.clone()
    module.zero_grad(set_to_none=True)
    x.grad = None
    reference = PositionAttention(16, reduction=4, backend="reference").double()
    reference.load_state_dict(module.state_dict())
    assert "convolution.default" in _module_ops(reference, x)  # the official code's convolutions
    expected = {n: p.grad for n, p in reference.named_parameters()}, x.grad
    for name in expected[0]:
        torch.testing.assert_close(got[0][name], expected[0][name], rtol=1e-10, atol=1e-12, msg=name)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-10, atol=1e-12)


def test_projections_use_the_convolution_where_they_must():
    """Hooks see their call, a subclass or a strided convolution runs as itself, and so does a
    bias-free one on the GEMM path without a bias."""
    x = torch.randn(1, 16, 4, 4)
    module = PositionAttention(16, backend="chunked")
    calls = []
    handle = module.value_conv.register_forward_hook(lambda *args: calls.append("value_conv"))
    names = _module_ops(module, x)
    assert calls == ["value_conv"] and names.count("convolution.default") == 1
    handle.remove()

    class MyConv(nn.Conv2d):
        pass

    module.key_conv = MyConv(16, 2, 1)
    assert _module_ops(module, x).count("convolution.default") == 1
    module.key_conv = nn.Conv2d(16, 2, 1, bias=False)
    with torch.no_grad():
        expected = attnseg.reference.position_attention(x, module.query_conv(x), module.key_conv(x),
                                                        module.value_conv(x), module.gamma)
    assert "convolution.default" not in _module_ops(module, x)
    with torch.no_grad():
        torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-5)
