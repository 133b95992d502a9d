"""What a new user meets first: second-order gradients, empty batches, honest diagnostics.

* Double backward: every op on every backend either computes second-order gradients correctly
  (the reference: gradgradcheck in fp64) or raises :class:`attnseg.DoubleBackwardError` the
  moment a double backward reaches it (the fused backends), naming the op and the way out;
  first-order gradients with ``create_graph=True`` still work there.
* B = 0: empty outputs and empty gradients on every function, module and backend, as torch's
  layers give (the Triton cases run in the interpreter suite of test_triton.py, the CUDA
  launchers' in test_cuda_emulated.py).
* A source tree without a build says what happened and what to do; ``python -m attnseg``
  prints that reason instead of warning, and the architectures inside the CUDA kernels.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attnseg
from attnseg import (
    ChannelAttention,
    DANetHead,
    DoubleBackwardError,
    NonLocal2d,
    ObjectContextAttention,
    PositionAttention,
)

REPO = Path(__file__).resolve().parent.parent
requires_native = pytest.mark.requires_native
F64 = torch.float64


def _input(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64).requires_grad_()


def _modules(backend: str):
    """(name, module in fp64 with non-zero gammas, input maker) for every module attnseg has."""
    def gamma(module):
        with torch.no_grad():
            for name, p in module.named_parameters():
                if name.endswith("gamma"):
                    p.fill_(0.6)
        return module.double()

    return [
        ("PositionAttention", gamma(PositionAttention(16, backend=backend)), lambda: (_input(1, 16, 2, 3),)),
        ("ChannelAttention", gamma(ChannelAttention(backend=backend)), lambda: (_input(1, 6, 2, 3),)),
        ("DANetHead", gamma(DANetHead(32, 2, backend=backend)).eval(), lambda: (_input(1, 32, 2, 2),)),
        ("NonLocal2d", gamma(NonLocal2d(8, backend=backend)), lambda: (_input(1, 8, 2, 3),)),
        ("ObjectContextAttention", gamma(ObjectContextAttention(8, 4, 8, backend=backend)).eval(),
         lambda: (_input(1, 8, 2, 3), _input(1, 3, 2, 3, seed=1))),
    ]


def _functionals(backend: str):
    """(name, fn, inputs) for the three functional entry points."""
    q, k, v = _input(1, 5, 3), _input(1, 6, 3, seed=1), _input(1, 6, 4, seed=2)
    x, e = _input(1, 8, 2, 3, seed=3), _input(1, 2, 2, 3, seed=4)
    gamma = torch.tensor([0.6], dtype=F64, requires_grad=True)
    return [
        ("attention", lambda q, k, v: attnseg.attention(q, k, v, 0.5, backend=backend), (q, k, v)),
        ("position_attention",
         lambda x, qq, kk, vv, g: attnseg.position_attention(x, qq, kk, vv, g, backend=backend),
         (x, e, e.detach().clone().requires_grad_(), x.detach().clone().requires_grad_(), gamma)),
        ("channel_attention", lambda x, g: attnseg.channel_attention(x, g, backend=backend), (x, gamma)),
    ]


def _first(out):
    return out[0] if isinstance(out, tuple) else out


# ---- second-order gradients ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["attention", "position_attention", "channel_attention"])
def test_reference_functionals_have_correct_second_order_gradients(name):
    (_, fn, inputs), = [f for f in _functionals("reference") if f[0] == name]
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("index", range(5), ids=[m[0] for m in _modules("reference")])
def test_reference_modules_have_correct_second_order_gradients(index):
    _, module, make = _modules("reference")[index]
    assert torch.autograd.gradgradcheck(lambda *a: _first(module(*a)), make())


@requires_native
@pytest.mark.parametrize("name", ["attention", "position_attention", "channel_attention"])
def test_native_functionals_refuse_double_backward_when_it_happens(name):
    (_, fn, inputs), = [f for f in _functionals("native") if f[0] == name]
    (_, ref_fn, _), = [f for f in _functionals("reference") if f[0] == name]
    # first order under create_graph=True works and is right ...
    grads = torch.autograd.grad(fn(*inputs).square().sum(), inputs, create_graph=True)
    expected = torch.autograd.grad(ref_fn(*inputs).square().sum(), inputs)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)
    # ... and the second backward raises, naming the fused op and the way out
    op = "channel_attention_fwd" if name == "channel_attention" else "attention_fwd"
    with pytest.raises(DoubleBackwardError, match=f'attnseg::{op}.*backend="reference"'):
        sum(g.sum() for g in grads).backward()
    with pytest.raises(DoubleBackwardError):
        torch.autograd.gradgradcheck(fn, inputs)


@requires_native
@pytest.mark.parametrize("index", range(5), ids=[m[0] for m in _modules("native")])
def test_native_modules_refuse_double_backward(index):
    _, module, make = _modules("native")[index]
    with pytest.raises(DoubleBackwardError, match="first-order gradients only"):
        torch.autograd.gradgradcheck(lambda *a: _first(module(*a)), make())


# ---- empty batches -------------------------------------------------------------------------


def _backends():
    return [pytest.param("native", marks=requires_native), "reference"]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_empty_batch_functionals(backend, dtype):
    q, k, v = (torch.randn(0, n, w, dtype=dtype, requires_grad=True) for n, w in ((5, 4), (6, 4), (6, 3)))
    out, lse = attnseg.attention(q, k, v, backend=backend, return_lse=True)
    out.sum().backward()
    assert out.shape == (0, 5, 3) and lse.shape == (0, 5) and out.dtype == dtype
    assert [t.grad.shape for t in (q, k, v)] == [t.shape for t in (q, k, v)]
    x = torch.randn(0, 8, 3, 4, dtype=dtype, requires_grad=True)
    e = torch.randn(0, 2, 3, 4, dtype=dtype)
    gamma = torch.tensor([0.5], dtype=dtype)
    assert attnseg.position_attention(x, e, e, x, gamma, backend=backend).shape == x.shape
    y = attnseg.channel_attention(x, gamma, backend=backend)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape


@pytest.mark.parametrize("backend", _backends())
def test_empty_batch_modules(backend):
    for name, module, make in _modules(backend):
        inputs = [t.detach()[:0].requires_grad_() for t in make()]
        outputs = module(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        sum(o.sum() for o in outputs).backward()
        assert all(o.shape[0] == 0 for o in outputs), name
        assert inputs[0].grad is not None and inputs[0].grad.shape == inputs[0].shape, name
        assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in module.parameters()), name


def test_zero_spatial_size_is_still_an_error():
    with pytest.raises(ValueError, match="zero-sized dimension"):
        attnseg.attention(torch.randn(1, 0, 4), torch.randn(1, 3, 4), torch.randn(1, 3, 2))
    # on the CPU the projections are GEMMs, which accept an empty x: attnseg's own check then names it
    # (off the CPU, torch's convolution raises first)
    with pytest.raises(ValueError, match="x has a zero-sized dimension"):
        PositionAttention(16)(torch.randn(1, 16, 0, 3))


# ---- backends and diagnostics --------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the report of a machine without a CUDA device")
def test_no_backend_is_reported_available_on_cuda_without_a_device():
    avail = attnseg.available_backends("cuda")
    assert avail["native"] is not None and avail["triton"] is not None, avail
    assert avail["auto"] == "reference"
    if attnseg._ops.native_cuda_built():
        assert "no CUDA device" in avail["native"]


def _fake_source_tree(tmp_path: Path) -> Path:
    """A checkout without a build: the package's Python files and a setup.py, no attnseg._C."""
    root = tmp_path / "checkout"
    shutil.copytree(REPO / "attnseg", root / "attnseg", ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    shutil.copy(REPO / "setup.py", root / "setup.py")
    return root


def _python(args, cwd, **env):
    environment = {k: v for k, v in os.environ.items() if k not in ("ATTNSEG_QUIET", "PYTHONPATH")}
    environment.update(env)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=environment, capture_output=True, text=True,
                          timeout=120)


def test_import_from_a_source_tree_without_a_build_says_why_and_what_to_do(tmp_path):
    root = _fake_source_tree(tmp_path)
    result = _python(["-c", "import attnseg; print(attnseg.__file__)"], cwd=root)
    assert result.returncode == 0, result.stderr
    assert str(root / "attnseg") in result.stdout
    warning = result.stderr
    assert "RuntimeWarning" in warning and "circular import" not in warning
    assert f"imported from the source folder {root / 'attnseg'}, which has no compiled extension" in warning
    assert "Run from another folder" in warning and "pip install -e ." in warning
    installed = Path(attnseg.__file__).parent
    if attnseg.native_available() and str(installed.parent) in sys.path:
        assert f"the installed copy is at {installed}" in warning or "no installed copy" in warning


def test_cli_in_a_source_tree_prints_the_reason_without_the_warning(tmp_path):
    root = _fake_source_tree(tmp_path)
    result = _python(["-m", "attnseg"], cwd=root)
    assert result.returncode == 0, result.stderr
    assert "RuntimeWarning" not in result.stderr, result.stderr
    assert "NOT loaded: attnseg was imported from the source folder" in result.stdout


@pytest.mark.skipif(not attnseg._ops.native_cuda_built(), reason="attnseg was built without its CUDA kernels")
def test_cli_prints_the_architectures_inside_the_cuda_kernels(tmp_path):
    archs = attnseg._ops.native_cuda_architectures()
    assert archs["sass"], archs
    from attnseg.triton.offline import nvidia_tool  # noqa: PLC0415

    tool = nvidia_tool("cuobjdump")
    if tool is not None:  # the fatbinary reader agrees with NVIDIA's tool
        library = attnseg._C.__file__
        listed = subprocess.run([tool, "--list-elf", "--list-ptx", library], capture_output=True, text=True,
                                timeout=300).stdout
        assert sorted({w.rsplit(".", 2)[-2] for w in listed.split() if w.endswith(".cubin")}) == archs["sass"]
        assert sorted({"compute_" + w.rsplit(".", 2)[-2][3:] for w in listed.split() if w.endswith(".ptx")}) \
            == archs["ptx"]
    package_parent = str(Path(attnseg.__file__).resolve().parent.parent)
    result = _python(["-m", "attnseg"], cwd=tmp_path, PYTHONPATH=package_parent)
    assert f"attnseg CUDA SASS:" in result.stdout and ", ".join(archs["sass"]) in result.stdout, result.stdout


@pytest.mark.skipif(not attnseg._ops.native_cuda_built(), reason="attnseg was built without its CUDA kernels")
@pytest.mark.skipif("TORCH_CUDA_ARCH_LIST" in os.environ, reason="built for a TORCH_CUDA_ARCH_LIST of its own")
def test_default_build_carries_ptx_for_newer_gpus():
    # setup.py's default "8.0;8.6;9.0+PTX": SASS for sm_80, sm_86, sm_90 and sm_90's PTX, which a
    # newer GPU (Blackwell, sm_100 / sm_120) JIT-compiles; without it those GPUs get no native kernels
    archs = attnseg._ops.native_cuda_architectures()
    assert archs["sass"] == ["sm_80", "sm_86", "sm_90"] and archs["ptx"] == ["compute_90"], archs
    assert attnseg._ops.cuda_architecture_mismatch((10, 0)) is None
    assert attnseg._ops.cuda_architecture_mismatch((7, 5)) is not None


def test_license_matches_pyproject():
    license_text = (REPO / "LICENSE").read_text()
    assert license_text.startswith("MIT License")
    assert 'license = { text = "MIT" }' in (REPO / "pyproject.toml").read_text()


def test_architecture_rule_follows_sass_major_and_ptx(monkeypatch):
    from attnseg import _ops

    monkeypatch.setattr(_ops, "native_cuda_architectures",
                        lambda: {"sass": ["sm_80", "sm_86", "sm_90"], "ptx": []})
    monkeypatch.setattr(_ops, "_arch_verdicts", {})
    assert _ops.cuda_architecture_mismatch((8, 0)) is None
    assert _ops.cuda_architecture_mismatch((8, 9)) is None  # sm_86 SASS runs on sm_89
    assert _ops.cuda_architecture_mismatch((9, 0)) is None
    for capability in ((7, 5), (10, 0), (12, 0)):  # T4, B200, RTX 50xx: no image
        assert "cannot run on this sm_" in _ops.cuda_architecture_mismatch(capability)
    monkeypatch.setattr(_ops, "native_cuda_architectures",
                        lambda: {"sass": ["sm_80"], "ptx": ["compute_90"]})
    monkeypatch.setattr(_ops, "_arch_verdicts", {})
    assert _ops.cuda_architecture_mismatch((12, 0)) is None  # PTX JIT-compiles for newer GPUs
    assert _ops.cuda_architecture_mismatch((7, 5)) is not None


def test_fatbin_reader_on_a_library_without_cuda_code(tmp_path):
    not_elf = tmp_path / "lib.so"
    not_elf.write_bytes(b"not an ELF library")
    assert attnseg._ops.fatbin_architectures(str(not_elf)) is None
    assert attnseg._ops.fatbin_architectures(torch._C.__file__) is None  # ELF, no .nv_fatbin section
