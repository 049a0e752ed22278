"""Reading JSON files users hand us, with errors that name the file and line."""

from __future__ import annotations

import json
from pathlib import Path

from petformers.errors import PetformersError


def read_json(file: str | Path, error: type[PetformersError] = PetformersError):
    """The parsed JSON of `file`; invalid JSON raises `error` naming the file and line."""
    file = Path(file)
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise error(f"{file}: invalid JSON at line {e.lineno}: {e.msg}") from None
    except UnicodeDecodeError:
        raise error(f"{file}: not UTF-8 text") from None
