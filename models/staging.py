"""Staged writes: build a file or a folder next to its destination, then rename it into place.

Every write that others may read while it is under way (bundles, ONNX graphs, training
checkpoints) goes through here, for three reasons:

* The staging area lies *next to* the destination, never in ``$TMPDIR``: ``os.replace`` only
  renames within one filesystem, and ``$TMPDIR`` is often another one (a tmpfs ``/tmp``, a Docker
  volume or NFS as the destination), which fails with ``EXDEV`` (invalid cross-device link).
* A reader never sees a half-written result: a file appears complete or not at all; a bundle
  folder gets its ``manifest.json`` last, so until then it is not a bundle (``make serve`` and
  compose's demo job test exactly that file). Staging leftovers of an interrupted write are
  hidden names (``.staging-*``) that no reader looks at, removed by the next write.
* Results follow the umask like a plain ``open()``: some writers (safetensors, ``mkdtemp``)
  create private 0600/0700 entries, which breaks a bundle exported by one user and served by
  another (the container runs as uid 10001).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

STAGING_PREFIX = ".staging-"


def current_umask() -> int:
    """The process umask, read without changing it (``os.umask`` can only set it, racing threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc (not Linux): set-and-restore, briefly
    os.umask(mask)
    return mask


def follow_umask(path: Path) -> None:
    """Give ``path`` (recursively, for a folder) the modes a plain ``open()``/``mkdir`` would have."""
    mask = current_umask()
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
        os.chmod(path, 0o777 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


@contextlib.contextmanager
def staged_file(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on success it replaces ``dest`` atomically.

    On an exception the temporary file is removed and ``dest`` is untouched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f"{STAGING_PREFIX}{dest.name}.", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        follow_umask(tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_staging(folder: Path) -> None:
    """Remove leftovers of interrupted writes (``.staging-*``) directly inside ``folder``."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.name.startswith(STAGING_PREFIX):
            log.info("removing %s, left behind by an interrupted write", entry)
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_dir(dest: str | Path, *, marker: str, replaces: list[str] | None = None) -> Iterator[Path]:
    """Yield an empty staging folder inside ``dest``; on success its entries move into ``dest``.

    The staging folder lives inside ``dest`` (same filesystem, and ``dest`` itself may be a mount
    point that cannot be renamed). On success: ``dest/marker`` is removed first (from then on the
    folder is not a finished result), then ``replaces`` (the old result's files) and every staged
    entry is moved in, ``marker`` last. An interruption at any point leaves either the old result,
    a folder without ``marker``, or the new result; never an old marker over new files.

    Args:
        dest: the result folder (created if missing); other files in it are left alone.
        marker: the file whose presence means "finished" (a bundle's ``manifest.json``); the
            staged folder must contain it.
        replaces: paths relative to ``dest`` of the previous result, removed before the move.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(dest)
    stage = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=dest))
    try:
        yield stage
        if not (stage / marker).is_file():
            raise FileNotFoundError(f"staged result in {stage} has no {marker}")
        follow_umask(stage)
        (dest / marker).unlink(missing_ok=True)
        for rel in replaces or []:
            old = dest / rel
            if old.is_file() or old.is_symlink():
                old.unlink()
        for entry in sorted(stage.iterdir()):
            if entry.name != marker:
                _move_into(entry, dest / entry.name)
        os.replace(stage / marker, dest / marker)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _move_into(src: Path, dst: Path) -> None:
    """Rename ``src`` onto ``dst``; folders merge (a rename cannot replace a non-empty folder)."""
    if src.is_dir() and dst.is_dir() and not dst.is_symlink():
        for child in sorted(src.iterdir()):
            _move_into(child, dst / child.name)
        return
    os.replace(src, dst)
