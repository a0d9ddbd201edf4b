"""Reading user-supplied lists (class names, templates, prompt pools) from files."""

from __future__ import annotations

import json
from pathlib import Path


def read_string_list(path: str | Path, what: str) -> list[str]:
    """Stripped strings from a ``.json`` list, or from a text file with one per line.

    Blank lines and lines starting with ``#`` are skipped in text files. ``what`` names the file
    in error messages ("class file", "prompt pool file", ...).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}")
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".json":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not valid JSON: {e}") from e
        if not isinstance(raw, list) or not all(isinstance(s, str) for s in raw):
            raise ValueError(f"{p}: expected a JSON list of strings")
        return [s.strip() for s in raw]
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
