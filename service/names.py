"""Validation of class names, label-set names and templates coming from clients."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

from models.class_vectors import class_name, validate_templates
from service.errors import DuplicateClass, InvalidInput

_SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Bidirectional overrides/isolates: invisible, and they make a name render as a different string.
_BIDI = {chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))}
_BAD_CATEGORIES = {"Cc", "Cs", "Co", "Cn"}  # control, lone surrogate, private use, unassigned
_INVISIBLE = {"\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad"}


def clean_name(raw: object, index: int, max_length: int) -> str:
    """The class name as training spells it (:func:`models.class_vectors.class_name`: NFC, ``_`` as
    a space, stripped); raises InvalidInput naming the problem."""
    if not isinstance(raw, str):
        raise InvalidInput(f"name {index}: must be a string")
    name = class_name(raw)
    if not name.strip("".join(_INVISIBLE)).strip():
        raise InvalidInput(f"name {index}: empty (or only whitespace / invisible characters)")
    if len(name) > max_length:
        raise InvalidInput(f"name {index}: {len(name)} characters, at most {max_length} allowed")
    for ch in name:
        if ch in _BIDI:
            raise InvalidInput(f"name {index}: contains the bidirectional control U+{ord(ch):04X}")
        if unicodedata.category(ch) in _BAD_CATEGORIES:
            raise InvalidInput(
                f"name {index}: contains U+{ord(ch):04X} ({unicodedata.category(ch)}: control, surrogate, "
                "private-use or unassigned characters are not allowed)"
            )
    return name


def clean_names(raw: Sequence[object], max_count: int, max_length: int, what: str = "names") -> list[str]:
    """Validate a list of names: 1..max_count entries, each clean, no duplicates (409)."""
    if len(raw) == 0:
        raise InvalidInput(f"{what}: at least one name is required")
    if len(raw) > max_count:
        raise InvalidInput(f"{what}: {len(raw)} given, at most {max_count} per request")
    names = [clean_name(n, i, max_length) for i, n in enumerate(raw)]
    seen: set[str] = set()
    dupes = sorted({n for n in names if n in seen or seen.add(n)})  # type: ignore[func-returns-value]
    if dupes:
        raise DuplicateClass(f"{what}: duplicated within the request: {dupes[:10]}")
    return names


def clean_set_name(name: str) -> str:
    if not _SET_NAME.match(name):
        raise InvalidInput(
            f"label-set name {name[:80]!r} is invalid: 1-64 characters, letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def clean_templates(raw: Sequence[str] | None, max_count: int) -> list[str] | None:
    """None stays None (the bundle's templates); otherwise each needs exactly one ``{}``."""
    if raw is None:
        return None
    if len(raw) > max_count:
        raise InvalidInput(f"templates: {len(raw)} given, at most {max_count}")
    try:
        return validate_templates(raw)
    except ValueError as e:
        raise InvalidInput(f"templates: {e}") from e
