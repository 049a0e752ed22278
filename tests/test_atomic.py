"""petformers.atomic: a file is replaced whole or not at all, and every writer of the package uses it."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from petformers import atomic

PACKAGE = Path(__file__).resolve().parents[1] / "petformers"


def test_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "state.json"
    atomic.write_json(target, {"step": 1, "name": "é"})
    atomic.write_json(target, {"step": 2})
    assert json.loads(target.read_text(encoding="utf-8")) == {"step": 2}
    atomic.write_text(tmp_path / "a.txt", "x\n")
    atomic.write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin", "state.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "adapter_config.json"
    atomic.write_json(target, {"r": 8})
    with pytest.raises(RuntimeError):
        with atomic.atomic_open(target) as fh:
            fh.write('{"r": 1')  # half written when the writer dies
            raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"r": 8}
    assert not atomic.temp_path(target).exists()
    with pytest.raises(RuntimeError), atomic.replacing(target) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"r": 8} and not tmp.exists()


def _writes_outside_the_helper(tree: ast.AST) -> list[int]:
    """Lines that open a file for writing or call write_text/write_bytes on a path."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in ("write_text", "write_bytes") and not (
                isinstance(func.value, ast.Name) and func.value.id == "atomic"):
            found.append(node.lineno)
        if isinstance(func, ast.Name) and func.id == "open":
            mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"),
                                                                   None)
            if isinstance(mode, ast.Constant) and any(c in str(mode.value) for c in "wx"):
                found.append(node.lineno)
    return found


def test_every_writer_goes_through_the_helper():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "atomic.py" or path == PACKAGE / "config" / "docs.py":  # docs.py rewrites docs/, a dev tool
            continue
        offenders += [f"{path.relative_to(PACKAGE.parent)}:{line}"
                      for line in _writes_outside_the_helper(ast.parse(path.read_text(encoding="utf-8")))]
    assert offenders == []


def test_the_scan_finds_a_plain_write():
    tree = ast.parse("def f(p):\n    p.write_text('x')\n    open(p, 'wb').write(b'')\n    open(p, mode='a')\n")
    assert _writes_outside_the_helper(tree) == [2, 3]
