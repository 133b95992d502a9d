"""Every Python block of README.md runs as written.

A block preceded by ``<!-- readme-test: skip (reason) -->`` is skipped with that reason (it
needs files or GPUs this machine does not have); every other ```python block is executed in a
fresh namespace, in a temporary folder, and must not raise.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"(?:<!-- readme-test: skip \((?P<skip>[^)]*)\) -->\n)?```python\n(?P<code>.*?)```", re.S)


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
