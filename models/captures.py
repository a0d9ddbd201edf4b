"""The capture folder's layout, shared by the service that writes it and the trainer that reads it.

``<dir>/<sha[:2]>/<sha>.jpg``, ``sha`` the SHA-256 of the uploaded bytes. A fixed tenth of the images
is *held out* (chosen by their hash, so the split never changes as the folder grows and every
replica and every run agree): re-distillation never reads them, shadow evaluation reads only them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SUFFIX = ".jpg"
HELD_OUT_EVERY = 10  # one image in ten is held out


@dataclass(frozen=True)
class Kept:
    path: Path
    sha256: str
    size: int
    mtime: float


def is_held_out(sha256: str) -> bool:
    return int(sha256[:8], 16) % HELD_OUT_EVERY == 0


def scan(folder: Path) -> Iterator[Kept]:
    """Every kept image under ``folder`` (files of another shape are not captures and are skipped)."""
    for sub in sorted(folder.glob("??")):
        for f in sorted(sub.glob("*" + SUFFIX)):
            if is_capture_name(f"{sub.name}/{f.name}"):
                sha = f.name[: -len(SUFFIX)]
                try:
                    st = f.stat()
                except OSError:
                    continue  # deleted meanwhile (another replica's retention sweep)
                yield Kept(f, sha, st.st_size, st.st_mtime)


def capture_images(folder: Path, held_out: bool) -> list[Path]:
    """The training part (``held_out=False``) or the held-out part of a capture folder, in a fixed order."""
    return [k.path for k in scan(folder) if is_held_out(k.sha256) == held_out]


def is_capture_name(relative: str) -> bool:
    """``<sha[:2]>/<sha>.jpg`` (relative to the folder, ``/``-separated): the one shape a capture has."""
    sub, _, name = relative.partition("/")
    sha = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else ""
    return len(sha) == 64 and sha.startswith(sub) and len(sub) == 2 and all(c in "0123456789abcdef" for c in sha)


def foreign_files(folder: Path) -> list[Path]:
    """Files under ``folder`` that are not captures (a writer's hidden ``.<sha>.<pid>.tmp`` in progress is not
    counted: it becomes a capture when renamed into place)."""
    out = []
    for f in sorted(folder.rglob("*")):
        if f.is_dir() or (f.name.startswith(".") and f.name.endswith(".tmp")):
            continue
        if not is_capture_name(f.relative_to(folder).as_posix()):
            out.append(f)
    return out
