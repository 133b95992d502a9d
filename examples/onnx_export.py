"""Export a DANet head to ONNX and run it in onnxruntime.

    python examples/onnx_export.py [--exporter dynamo|torchscript] [--in-channels 512] [--out head.onnx]

While torch.onnx.export traces the model, attnseg's modules compute with the reference math, so
the file has standard ONNX operators only (the N x N attention map is materialised inside the
ONNX graph, as in the official code). Batch, height and width stay dynamic: the script runs the
file at two other sizes and compares with PyTorch (which uses the fused kernels).
Needs onnx, onnxscript and onnxruntime (pip install "attnseg[onnx]").
"""

from __future__ import annotations

import argparse
import os
import tempfile
import warnings

import numpy as np
import onnxruntime as ort
import torch

import attnseg


def export(model, path, exporter, in_channels):
    example = torch.randn(2, in_channels, 16, 20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
            torch.onnx.export(model, (example,), path, dynamo=True, input_names=["features"],
                              output_names=["fused", "pam", "cam"], dynamic_shapes=(dims,))
        else:
            torch.onnx.export(model, (example,), path, dynamo=False, input_names=["features"],
                              output_names=["fused", "pam", "cam"],
                              dynamic_axes={"features": {0: "batch", 2: "height", 3: "width"}})


def main(argv=None):
    parser = argparse.ArgumentParser(description="DANetHead -> ONNX -> onnxruntime")
    parser.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo")
    parser.add_argument("--in-channels", type=int, default=512)
    parser.add_argument("--out", default=None, help="where to write the .onnx file (default: a temporary file)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    head = attnseg.DANetHead(args.in_channels, 19).eval()
    with torch.no_grad():
        head.sa.gamma.fill_(0.5)
        head.sc.gamma.fill_(0.5)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.out or os.path.join(tmp, "danet_head.onnx")
        export(head, path, args.exporter, args.in_channels)
        runtime = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        print(f"exported {path} with the {args.exporter} exporter ({os.path.getsize(path) / 2**20:.1f} MiB)")
        worst = 0.0
        for b, h, w in ((1, 24, 24), (3, 12, 30)):
            x = torch.randn(b, args.in_channels, h, w)
            with torch.no_grad():
                expected = head(x)
            got = runtime.run(None, {"features": x.numpy()})
            diff = max(float(np.abs(g - e.numpy()).max()) for g, e in zip(got, expected))
            worst = max(worst, diff)
            print(f"  input {tuple(x.shape)}: outputs {[tuple(g.shape) for g in got]}, max |onnx - torch| = {diff:.2e}")
    return 0 if worst < 1e-3 else 1


if __name__ == "__main__":
    raise SystemExit(main())
