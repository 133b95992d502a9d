"""Every Python block of README.md runs as written.

A block preceded by ``<!-- readme-test: skip (reason) -->`` is not run (it needs files or GPUs
this machine does not have), but it must still compile and use no name it does not define or
import; every other ```python block is executed in a fresh namespace, in a temporary folder, and
must not raise.
"""

from __future__ import annotations

import ast
import builtins
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"(?:<!-- readme-test: skip \((?P<skip>.*?)\) -->\n)?```python\n(?P<code>.*?)```", re.S)


def _blocks():
    text = README.read_text(encoding="utf-8")
    blocks = []
    for match in _BLOCK.finditer(text):
        line = text.count("\n", 0, match.start("code")) + 1
        marks = [pytest.mark.skip(reason=f"README block at line {line}: {match['skip']}")] if match["skip"] else []
        blocks.append(pytest.param(match["code"], id=f"line{line}", marks=marks))
    return blocks


def test_readme_has_python_blocks():
    assert len(_blocks()) >= 5


@pytest.mark.requires_native
@pytest.mark.parametrize("code", _blocks())
def test_readme_block_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})


def _undefined_names(code: str) -> set[str]:
    """Names a block loads but never binds (imports, assignments, defs, loop targets, ...)."""
    tree = ast.parse(code)
    bound = set(dir(builtins))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
            if not isinstance(node, ast.ClassDef):
                bound.update(a.arg for a in ast.walk(node.args) if isinstance(a, ast.arg))
        elif isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            bound.add(node.id)
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)} - bound


@pytest.mark.parametrize("code", [b.values[0] for b in _blocks()], ids=[b.id for b in _blocks()])
def test_readme_block_defines_what_it_uses(code):
    """Also the blocks that are not run: every name they use is imported or defined in them."""
    assert not _undefined_names(code), f"undefined in the block: {sorted(_undefined_names(code))}"


def test_the_name_check_catches_an_undefined_name():
    assert _undefined_names("import torch\nhead = DANetHead(2048, 19)\nx = torch.zeros(1)") == {"DANetHead"}
