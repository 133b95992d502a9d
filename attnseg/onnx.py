"""ONNX export of attnseg's modules.

``torch.onnx.export`` cannot translate attnseg's fused ops (``torch.ops.attnseg.*``, custom ops
with no ONNX counterpart). So while an export traces the model, and only then, every attnseg
module (PositionAttention, ChannelAttention, DANetHead, ObjectContextAttention, NonLocal2d and
the modules :func:`attnseg.convert_model` builds) computes with the pure-PyTorch reference
math of :mod:`attnseg.reference`, whatever its ``backend``. The exported graph is made of
standard ONNX operators (MatMul, Softmax, ReduceMax, Reshape, Transpose, Mul, Add, ...): the
attention map is materialised inside the ONNX graph, as the official code does. Both exporters
are covered (the TorchScript-based one, ``dynamo=False``, and ``dynamo=True``), with dynamic
batch, height and width.

Outside an export nothing changes: a module runs the backend it was given. The switch is
:func:`torch.onnx.is_in_onnx_export`, which both exporters set while they trace. Code that calls
:mod:`attnseg.functional` directly picks its ``backend=`` itself (pass ``"reference"`` to export).
"""

from __future__ import annotations

import torch

__all__ = ["module_backend"]


def module_backend(backend: str) -> str:
    """The backend an attnseg module computes with: ``backend``, except ``"reference"`` while
    ``torch.onnx.export`` traces the model."""
    return "reference" if torch.onnx.is_in_onnx_export() else backend
