"""The YAML as a tree: reading it, `key.path=value` overrides, dotted paths, and the line of each key.

Everything here knows YAML and dotted paths, nothing about what a key means (that is schema.py and
mindformers.py). Errors are ConfigErrors that name the file, the line or the override.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from petformers.errors import ConfigError

MISSING = object()  # what `get` returns for a path that is not in the tree


def read_yaml(source: str) -> tuple[dict, dict[str, int]]:
    """The YAML file at `source` as a plain tree (aliases unshared), and dotted path -> line of its key."""
    p = Path(source)
    if not p.is_file():
        raise ConfigError(f"{source}: config file not found")
    try:
        raw = p.read_bytes()
        text = raw.decode("utf-8")
    except OSError as e:
        raise ConfigError(f"{source}: cannot read the config ({e})") from None
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(f"{source}:{line}: not UTF-8 text (byte {e.start})") from None
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise ConfigError(f"{where}: invalid YAML ({_yaml_problem(e)})") from None
    try:
        tree = _plain(tree)
    except ConfigError as e:  # a recursive alias: point at the first anchor
        anchors = [i for i, line in enumerate(text.split("\n"), 1) if "&" in line]
        raise ConfigError(f"{source}:{anchors[0] if anchors else 1}: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(tree).__name__}")
    return tree, _line_index(text)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """A copy of `raw` with each "key.path=value" set (value parsed as a YAML scalar; numbers index lists)."""
    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        key, text = (s.strip() for s in item.split("=", 1))
        if not key:
            raise ConfigError(f"override {item!r}: empty key")
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: invalid value ({_yaml_problem(e)})") from None
        set_path(out, key, value, what=f"override {item!r}")
    return out


def locate(message: str, source: str, lines: dict[str, int], changed: set[str]) -> str:
    """Prefix an error that starts with a dotted path by the file and line it came from."""
    path = message.split(":", 1)[0]
    if path.startswith("--") or path.startswith("override"):
        return message
    if any(path == c or path.startswith(c + ".") for c in changed):
        return f"{message} (value set on the command line)"
    if not source:
        return message
    line = lines.get(path)
    while line is None and "." in path:  # a key that is missing: point at its section
        path = path.rsplit(".", 1)[0]
        line = lines.get(path)
    return f"{source}:{line}: {message}" if line else f"{source}: {message}"


def get(tree, path: str):
    """The value at a dotted path (a number indexes a list), or MISSING."""
    node = tree
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return MISSING
    return node


def set_path(tree: dict, path: str, value, what: str = ""):
    """Set the value at a dotted path, creating missing mappings on the way."""
    parts = path.split(".")
    node = tree
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{what or path}: {'.'.join(parts[:i]) or '(top)'} is a list; "
                                  f"use an index below {len(node)}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise ConfigError(f"{what or path}: {'.'.join(parts[:i])} is not a mapping")


def _yaml_problem(e: yaml.YAMLError) -> str:
    return getattr(e, "problem", None) or str(e).splitlines()[0]


def _plain(node, _stack: tuple = ()):
    """The loaded tree with YAML anchors unshared: setting `train_dataset.x` leaves `train_dataset_task` alone."""
    if isinstance(node, (dict, list)):
        if id(node) in _stack:
            raise ConfigError("the YAML refers to itself through an alias (recursive anchor)")
        _stack = _stack + (id(node),)
        if isinstance(node, dict):
            return {k: _plain(v, _stack) for k, v in node.items()}
        return [_plain(v, _stack) for v in node]
    return node


def _line_index(text: str) -> dict[str, int]:
    """Dotted path -> 1-based line of its key, for error messages."""
    out: dict[str, int] = {}

    def walk(node, prefix: str, depth: int):
        if depth > 32:
            return
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                path = f"{prefix}.{k.value}" if prefix else str(k.value)
                out.setdefault(path, k.start_mark.line + 1)
                walk(v, path, depth + 1)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                path = f"{prefix}.{i}"
                out.setdefault(path, v.start_mark.line + 1)
                walk(v, path, depth + 1)

    try:
        walk(yaml.compose(text), "", 0)
    except yaml.YAMLError:
        pass
    return out
