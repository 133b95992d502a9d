"""``python -m attnseg`` runs in a fresh interpreter, exits 0 and reports the environment."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

import attnseg


def _run_cli(cwd):
    # the same attnseg as this process (an in-place build included): its package's parent first
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(attnseg.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([package_parent, *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run(
        [sys.executable, "-m", "attnseg"], env=env, capture_output=True, text=True, timeout=60,
        cwd=cwd,  # not the repository root: attnseg must come from PYTHONPATH
    )


def test_cli_reports_environment(tmp_path):
    result = _run_cli(tmp_path)
    assert result.returncode == 0, f"exit code {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    out = result.stdout
    assert torch.__version__ in out
    assert attnseg.__version__ in out
    assert os.path.dirname(os.path.abspath(attnseg.__file__)) in out, "the CLI imported a different attnseg"
    for backend in ("native", "triton", "chunked", "reference", "auto"):
        assert backend in out, f"backend {backend!r} missing from the output:\n{out}"
    assert "chunked    available" in out
    assert "backends on cpu" in out
    expected_native = "loaded" if attnseg.native_available() else "NOT loaded"
    assert expected_native in out
