"""docs/config.md's key tables, generated from the schema: `python -m petformers.config.docs` rewrites them.

tests/test_config.py fails when the file and the schema disagree, so a key is documented once, where
it is declared (schema.py), and its places and ignore reasons where they are mapped (mindformers.py).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from petformers.config import mindformers, schema
from petformers.config.load import schema_keys

DOC = Path(__file__).resolve().parents[2] / "docs" / "config.md"
BEGIN = "<!-- keys: generated from petformers/config/schema.py by `python -m petformers.config.docs` -->"
END = "<!-- end of generated keys -->"


def _place(path: str) -> str:
    return "the `CheckpointMonitor` callback" if "{ckpt}" in path else f"`{path}`"


def _default(value) -> str:
    if value is None:
        return "`null`"
    if value == "":
        return "`''`"
    if value == {}:
        return "`{}`"
    return f"`{value}`"


def render() -> str:
    """The generated part of docs/config.md: one table per section, then the ignored keys by reason."""
    docs = {}
    for f in dataclasses.fields(schema.RunConfig):
        if f.metadata.get("section"):
            docs[f.name] = (f.default_factory.__doc__ or "").strip()
            for g in dataclasses.fields(f.default_factory):
                docs[f"{f.name}.{g.name}"] = g.metadata["doc"]
        elif "doc" in f.metadata:
            docs[f.name] = f.metadata["doc"]
    out = [BEGIN, ""]
    section = None
    for key in schema_keys():
        head = key.name.split(".", 1)[0] if "." in key.name else ""
        if head != section:
            section = head
            title = f"`{head}` section: {docs[head]}" if head else "Top level"
            out += ["", f"### {title}", "", "| key | default | also read from | meaning |", "| --- | --- | --- | --- |"]
        paths = mindformers.PATHS.get(key.name)
        shown = f"`{paths[0]}`" if paths else f"`model.{key.name.split('.', 1)[1]}`"
        also = ", ".join(_place(p) for p in paths[1:]) if paths else ""
        meaning = docs[key.name]
        if key.ignored:
            meaning += f". **Accepted, not acted on**: {key.ignored}"
        out.append(f"| {shown} | {_default(key.default)} | {also} | {meaning} |")
    out += ["", "### Accepted and ignored MindFormers keys, by reason", "",
            "Named in the run's log (and in `resolved_config.yaml`) when a config sets them; never an error.", "",
            "| reason | keys |", "| --- | --- |"]
    for reason, keys in mindformers._IGNORED_GROUPS:
        out.append(f"| {reason} | {', '.join(f'`{k}`' for k in keys)} |")
    out.append(f"| {mindformers._MONITOR_REASON} | `CheckpointMonitor`'s "
               f"{', '.join(f'`{k}`' for k in sorted(mindformers.MONITOR_IGNORED))} |")
    out.append(f"| {mindformers._CALLBACK_REASON} | every other entry of `callbacks` |")
    out += ["", END]
    return "\n".join(out).replace("\n\n\n", "\n\n")


def current(text: str) -> str:
    """The generated part of a docs/config.md text ('' when its markers are missing)."""
    if BEGIN not in text or END not in text:
        return ""
    return text[text.index(BEGIN):text.index(END) + len(END)]


def main() -> int:
    text = DOC.read_text(encoding="utf-8")
    if not current(text):
        print(f"{DOC}: the markers {BEGIN!r} ... {END!r} are missing", file=sys.stderr)
        return 2
    DOC.write_text(text.replace(current(text), render()), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
