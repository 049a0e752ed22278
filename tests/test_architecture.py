"""The package's shape, read from its source with `ast`: imports flow one way, and say the architecture.

- no import cycle between modules, nor between packages (petformers/X/ or a top-level module);
- `petformers.cli` is imported by nothing but `petformers.__main__` (commands sit on top);
- petformers modules are imported at module level; a function-level import says why (a comment on it
  or just above it), or is a check for an optional extra or a torch version (in `try: ... except
  ImportError`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "petformers"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str:
    """The petformers module an imported name lives in ("petformers.pet.PetConfig" -> "petformers.pet")."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _imports(tree: ast.AST):
    """(node, imported petformers module names) for every import statement of a module."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield node, [_resolve(a.name) for a in node.names if a.name.startswith("petformers")]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if node.module.startswith("petformers"):
                yield node, [_resolve(f"{node.module}.{a.name}") or _resolve(node.module) for a in node.names]
            else:
                yield node, []


def _graph() -> dict[str, set[str]]:
    graph = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for _, targets in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            graph[name] |= {t for t in targets if t and t != name}
    return graph


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_modules():
    assert _cycles(_graph()) == []


def test_no_import_cycle_between_packages():
    packages: dict[str, set[str]] = {}
    for module, targets in _graph().items():
        packages.setdefault(_package(module), set()).update(
            _package(t) for t in targets if _package(t) != _package(module))
    assert _cycles(packages) == []


def test_cli_is_imported_by_nothing_below_it():
    importers = sorted(m for m, targets in _graph().items() if not m.startswith("petformers.cli")
                       and any(t.startswith("petformers.cli") for t in targets))
    assert importers == ["petformers.__main__"]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_sit_at_module_level_or_say_why(module):
    path = MODULES[module]
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    tree = ast.parse(source)
    guarded = set()  # imports inside `try: ... except ImportError` (a version or optional-feature check)
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                for h in node.handlers):
            guarded |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for inner, targets in _imports(node):
            where = f"{path.relative_to(PACKAGE.parent)}:{inner.lineno}"
            if id(inner) in guarded:
                continue  # an optional extra (petformers.board needs starlette) or a version check
            assert not targets, f"{where}: import petformers modules at module level"
            first = inner.lineno - 1  # the import block this statement belongs to, and the line above it
            while first > 0 and lines[first - 1].lstrip().startswith(("import ", "from ")):
                first -= 1
            said = any("#" in line for line in lines[first:inner.lineno]) or \
                (first > 0 and lines[first - 1].lstrip().startswith("#"))
            assert said, f"{where}: a function-level import says why (a comment on it or above it)"
