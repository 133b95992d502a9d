"""examples/: each script runs at a small size and says what it should."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import attnseg

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
# the attnseg this process tests (installed, or an in-place build), first on the child's path
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(attnseg.__file__)))


def _run(script, *args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [PACKAGE_PARENT, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, script), *args], capture_output=True,
                          text=True, env=env, cwd=EXAMPLES, timeout=300)
    assert proc.returncode == 0, f"{script} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.mark.requires_native
def test_convert_official_danet_example_saves_memory():
    # 48 x 48: a map large enough that auto takes a fused backend (on small maps it may take the
    # math itself, which keeps the map: docs/chunked.md, "How auto chooses")
    out = _run("convert_official_danet.py", "--in-channels", "64", "--size", "48")
    assert "converted sa: PAM_Module -> PositionAttention" in out and "converted sc: CAM_Module -> ChannelAttention" in out
    assert "gradients match: True" in out
    line = next(line for line in out.splitlines() if line.startswith("saved for backward"))
    official, converted = (float(part.split()[0]) for part in line.split("official ")[1].split(", converted "))
    map_mib = 2304 * 2304 * 4 / 2**20  # one N x N fp32 map at 48 x 48
    assert official - converted >= 0.9 * map_mib, line  # at least one whole map is no longer kept


def test_mmengine_hook_example_converts():
    pytest.importorskip("mmengine")
    out = _run("mmengine_hook.py", "--iters", "2")
    assert "2 converted, 0 left as they are" in out
    assert "after training: pam is FusedMMSegPAM, cam is FusedMMSegCAM" in out


def test_onnx_export_example_matches():
    for module in ("onnx", "onnxruntime", "onnxscript"):
        pytest.importorskip(module)
    out = _run("onnx_export.py", "--in-channels", "32", "--exporter", "torchscript")
    assert out.count("max |onnx - torch|") == 2
