"""Supply-chain scan: the package never unpickles, never evaluates code it reads, never runs a shell and
never trusts remote code. Each rule is shown to catch its own example first, so the scan can fail."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCANNED = [REPO / "petformers", REPO / "scripts"]
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "marshal", "shelve", "joblib", "cloudpickle"}
UNPICKLERS = {"load", "loads", "Unpickler", "open"}  # pickle.load, marshal.loads, shelve.open, joblib.load...
SAFE_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


def _name(node: ast.AST) -> str:
    """`a.b.c` for an attribute chain or name, '' otherwise."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _name(node.value)
        return f"{inner}.{node.attr}" if inner else node.attr
    return ""


def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def findings(source: str, filename: str = "<code>") -> list[str]:
    """Every unsafe call or import in `source`, as 'file:line: what'."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            loaders = [a.name for a in node.names if a.name in UNPICKLERS or a.name == "*"]
            if loaders:
                found.append(f"{where}: from {node.module} import {', '.join(loaders)} (unpickling runs code)")
        if isinstance(node, ast.keyword) and node.arg == "trust_remote_code" and not (
                isinstance(node.value, ast.Constant) and node.value.value is False):
            found.append(f"{where}: trust_remote_code")
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "trust_remote_code=True" in node.value:
            found.append(f"{where}: trust_remote_code in a string")
        if not isinstance(node, ast.Call):
            continue
        func = _name(node.func)
        last = func.rsplit(".", 1)[-1]
        if (isinstance(node.func, ast.Name) and func in ("eval", "exec", "__import__")) or \
                func in ("builtins.eval", "builtins.exec"):
            found.append(f"{where}: {func}()")
        if "." in func and func.split(".")[0] in UNSAFE_MODULES and last in UNPICKLERS:
            found.append(f"{where}: {func}() (unpickling runs code)")
        if func.endswith("torch.load"):
            if not _is_true(_kw(node, "weights_only")):
                found.append(f"{where}: torch.load without weights_only=True")
        if func in ("yaml.load", "yaml.load_all"):
            loader = _name(_kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else ast.Constant(None)))
            if loader.rsplit(".", 1)[-1] not in SAFE_LOADERS:
                found.append(f"{where}: {func} without SafeLoader")
        if func in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all"):
            found.append(f"{where}: {func}")
        if _is_true(_kw(node, "shell")):
            found.append(f"{where}: {func}(shell=True)")
        if func in ("os.system", "os.popen") or last in ("popen2", "getoutput", "getstatusoutput") and \
                func.startswith(("commands", "subprocess")):
            found.append(f"{where}: {func}() runs a shell")
    return found


@pytest.mark.parametrize("snippet", [
    "import torch\ntorch.load('x.pt')",
    "import torch\ntorch.load('x.pt', weights_only=False)",
    "import pickle\npickle.load(open('x', 'rb'))",
    "import pickle\npickle.Unpickler(f).load()",
    "from pickle import loads",
    "import shelve\nshelve.open('x')",
    "import yaml\nyaml.load(open('x'))",
    "import yaml\nyaml.load(open('x'), Loader=yaml.Loader)",
    "import yaml\nyaml.unsafe_load('x')",
    "eval('1')",
    "exec('x = 1')",
    "import subprocess\nsubprocess.run('ls', shell=True)",
    "import os\nos.system('ls')",
    "AutoModel.from_pretrained('x', trust_remote_code=True)",
])
def test_each_rule_catches_its_example(snippet):
    assert findings(snippet), snippet


@pytest.mark.parametrize("snippet", [
    "import torch\ntorch.load('x.pt', map_location='cpu', weights_only=True)",
    "import yaml\nyaml.safe_load('x')",
    "import yaml\nyaml.load('x', Loader=yaml.CSafeLoader)",
    "import subprocess\nsubprocess.run(['ls'], check=True)",
    "import pickle\ntry:\n    pass\nexcept pickle.UnpicklingError:\n    pass",  # naming the error type only
    "model.eval()",
])
def test_safe_forms_pass(snippet):
    assert findings(snippet) == []


def test_the_package_and_scripts_have_no_unsafe_calls():
    files = sorted(f for root in SCANNED for f in root.rglob("*.py"))
    assert len(files) > 50  # the scan saw the package
    found = [hit for f in files for hit in findings(f.read_text(encoding="utf-8"), str(f.relative_to(REPO)))]
    assert found == [], "\n".join(found)
