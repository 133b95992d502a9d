"""ONNX export (attnseg/onnx.py): every attnseg module through both exporters (TorchScript-based
and dynamo=True), run by onnxruntime at another batch, height and width than exported, gives
PyTorch's result; the graph holds only standard ONNX operators; outside an export the modules
keep their backend."""

from __future__ import annotations

import warnings

import pytest
import torch

import attnseg
from attnseg import ChannelAttention, DANetHead, NonLocal2d, ObjectContextAttention, PositionAttention
from helpers import randomize_batchnorm

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def _trained(module):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
        randomize_batchnorm(module)
    return module.eval()


# name: (module, channels of x, whether forward takes coarse logits with K regions)
MODULES = {
    "PositionAttention": (lambda: PositionAttention(16), 16, None),
    "PositionAttention-chunked": (lambda: PositionAttention(16, backend="chunked"), 16, None),
    "ChannelAttention-chunked": (lambda: ChannelAttention(16, backend="chunked"), 16, None),
    "ChannelAttention": (lambda: ChannelAttention(16), 16, None),
    "DANetHead": (lambda: DANetHead(64, 3), 64, None),
    "ObjectContextAttention": (lambda: ObjectContextAttention(16, 8, 12), 16, 4),
    "NonLocal2d": (lambda: NonLocal2d(16, use_scale=True), 16, None),
}


def _inputs(channels, regions, b, h, w):
    gen = torch.Generator().manual_seed(b * 100 + h * 10 + w)
    x = torch.relu(torch.randn(b, channels, h, w, generator=gen))
    return (x,) if regions is None else (x, torch.randn(b, regions, h, w, generator=gen))


def _export(module, example, path, dynamo):
    names = ["x", "coarse_logits"][: len(example)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
            torch.onnx.export(module, example, path, dynamo=True, input_names=names,
                              dynamic_shapes=tuple(dims for _ in example), verbose=False)
        else:
            torch.onnx.export(module, example, path, dynamo=False, input_names=names,
                              dynamic_axes={n: {0: "batch", 2: "height", 3: "width"} for n in names})
    return names


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("name", list(MODULES))
def test_export_runs_in_onnxruntime_with_dynamic_batch_and_size(name, dynamo, tmp_path):
    make, channels, regions = MODULES[name]
    module = _trained(make())
    path = str(tmp_path / f"{name}.onnx")
    names = _export(module, _inputs(channels, regions, 2, 5, 6), path, dynamo)

    model = onnx.load(path)
    onnx.checker.check_model(model)
    domains = {node.domain for node in model.graph.node}
    assert domains <= {"", "ai.onnx"}, f"non-standard operator domains: {domains}"
    assert "Softmax" in {node.op_type for node in model.graph.node}  # the map, materialised in the graph

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for b, h, w in ((3, 7, 4), (1, 3, 9)):  # neither is the exported size
        inputs = _inputs(channels, regions, b, h, w)
        with torch.no_grad():
            expected = module(*inputs)  # the fused native op, not the reference
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            torch.testing.assert_close(torch.from_numpy(g), e, rtol=1e-4, atol=1e-5)


def test_outside_an_export_modules_keep_their_backend():
    assert not torch.onnx.is_in_onnx_export()
    for backend in attnseg.BACKENDS:
        assert attnseg.onnx.module_backend(backend) == backend


def test_converted_model_exports_too(tmp_path):
    from test_modules import PAM_Module

    model = attnseg.convert_model(torch.nn.Sequential(PAM_Module(16))).eval()
    with torch.no_grad():
        torch.nn.init.constant_(model[0].gamma, 0.7)
    path = str(tmp_path / "converted.onnx")
    _export(model, _inputs(16, None, 2, 5, 6), path, dynamo=False)
    x = _inputs(16, None, 3, 4, 7)[0]
    with torch.no_grad():
        expected = model(x)
    got = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-4, atol=1e-5)
