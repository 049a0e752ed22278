"""Reading JSON files users hand us, with errors that name the file and line."""

from __future__ import annotations

import json
from pathlib import Path

from petformers.errors import PetformersError


def read_json(file: str | Path, error: type[PetformersError] = PetformersError):
    """The parsed JSON of `file`; invalid JSON raises `error` naming the file and line."""
    file = Path(file)
    raw = file.read_bytes()
    try:
        return json.loads(raw.decode("utf-8"))
    except json.JSONDecodeError as e:
        raise error(f"{file}: invalid JSON at line {e.lineno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise error(f"{file}: not UTF-8 text at line {line} (byte {e.start})") from None
