"""Staged writes: across filesystems, interrupted, under any umask, and read by another user."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from models import staging
from models.bundle import MANIFEST, load_bundle, save_bundle
from models.staging import STAGING_PREFIX, staged_file
from service.errors import StartupError
from service.settings import Settings
from service.state import load_checked_bundle
from tests.conftest import CLASS_NAMES, TINY_CONFIG

SHM = Path("/dev/shm")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def umask() -> Iterator[object]:
    """Set a umask for one test (``umask(0o027)``), restored afterwards."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def _modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*")}


def _staging_leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(STAGING_PREFIX)]


@pytest.mark.slow
@pytest.mark.skipif(not SHM.is_dir(), reason="needs a tmpfs at /dev/shm")
def test_onnx_bundle_with_tmpdir_on_another_filesystem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reported EXDEV: $TMPDIR on a tmpfs, the bundle on disk (the CLI's builder, ONNX included)."""
    from models.zeroshot import build_zeroshot_bundle, named_templates

    if os.stat(SHM).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("/dev/shm and the test folder are one filesystem here")
    shm_tmp = Path(tempfile.mkdtemp(dir=SHM))
    monkeypatch.setenv("TMPDIR", str(shm_tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read $TMPDIR
    try:
        assert tempfile.gettempdir() == str(shm_tmp)
        out = tmp_path / "bundle"
        build_zeroshot_bundle(str(TINY_CONFIG), None, CLASS_NAMES[:3], named_templates("simple"), out, onnx=True)
        loaded = load_bundle(out, verify=True)
        assert loaded.manifest.image_encoder.onnx[0].file in loaded.manifest.files
        assert not _staging_leftovers(out)
        assert not list(shm_tmp.rglob("*.onnx*")), "the graph may not be staged in $TMPDIR"
    finally:
        shutil.rmtree(shm_tmp, ignore_errors=True)


@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_bundle_files_follow_the_umask(
    tiny_bundle_dir: Path, tmp_path: Path, umask: object, mask: int, file_mode: int, dir_mode: int
) -> None:
    """safetensors and mkdtemp create 0600/0700 entries; a saved bundle must look like plain open()/mkdir."""
    os.umask(mask)
    out = save_bundle(load_bundle(tiny_bundle_dir), tmp_path / "b").resolve()
    modes = _modes(out)
    assert "backbones/clip.safetensors" in modes and "image_encoder.onnx" in modes
    for rel, mode in modes.items():
        want = dir_mode if (out / rel).is_dir() else file_mode
        assert mode == want, f"{rel}: {oct(mode)} under umask {oct(mask)}"


def test_staged_file_follows_the_umask_and_replaces_atomically(tmp_path: Path, umask: object) -> None:
    os.umask(0o027)
    dest = tmp_path / "ckpt.pt"
    dest.write_text("old")
    with pytest.raises(RuntimeError), staged_file(dest) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert dest.read_text() == "old" and not _staging_leftovers(tmp_path)
    with staged_file(dest) as tmp:
        assert tmp.parent == dest.parent  # same filesystem as the destination
        fd = os.open(tmp, os.O_WRONLY)  # mkstemp made it 0600
        os.write(fd, b"new")
        os.close(fd)
    assert dest.read_text() == "new"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o640


def test_failed_write_keeps_the_old_bundle(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "b"
    shutil.copytree(tiny_bundle_dir, out)
    before = (out / MANIFEST).read_text()

    def exports(stage: Path) -> dict[str, Path]:
        (stage / "image_encoder.onnx").write_bytes(b"half a graph")
        raise KeyboardInterrupt  # Ctrl-C in the middle of an export

    with pytest.raises(KeyboardInterrupt):
        save_bundle(load_bundle(out), out, exports=exports)
    assert (out / MANIFEST).read_text() == before
    load_bundle(out, verify=True)  # the old bundle, intact
    assert not _staging_leftovers(out)


def test_crash_while_moving_in_leaves_no_manifest(
    tiny_bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dying between the renames of the commit: no folder that `make serve` or compose takes as finished."""
    out = tmp_path / "b"
    shutil.copytree(tiny_bundle_dir, out)
    real_move = staging._move_into
    moved: list[Path] = []

    def crash_after_one(src: Path, dst: Path) -> None:
        if moved:
            raise OSError(28, "No space left on device")
        moved.append(dst)
        real_move(src, dst)

    monkeypatch.setattr(staging, "_move_into", crash_after_one)
    with pytest.raises(OSError, match="No space"):
        save_bundle(load_bundle(out), out)
    assert moved and not (out / MANIFEST).exists()
    monkeypatch.setattr(staging, "_move_into", real_move)
    save_bundle(load_bundle(tiny_bundle_dir), out)  # the retry simply writes it again
    load_bundle(out, verify=True)


KILLED_WRITER = """
import sys, time
from pathlib import Path
from models.bundle import load_bundle, save_bundle

def exports(stage):
    (stage / "image_encoder.onnx").write_bytes(b"x" * 4096)
    Path(sys.argv[3]).touch()  # tell the test we are mid-export
    time.sleep(120)
    return {}

save_bundle(load_bundle(sys.argv[1]), sys.argv[2], exports=exports)
"""


@pytest.mark.slow
def test_killed_export_leaves_no_manifest_and_the_next_write_cleans_up(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    out, ready = tmp_path / "fresh", tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tiny_bundle_dir), str(out), str(ready)], cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, "writer exited early"
            assert time.monotonic() < deadline, "writer never reached the export"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert out.is_dir() and not (out / MANIFEST).exists()
    assert _staging_leftovers(out), "the test should have caught the writer mid-write"
    save_bundle(load_bundle(tiny_bundle_dir), out)
    assert not _staging_leftovers(out)
    load_bundle(out, verify=True)


def _startup_error_as(uid: int, bundle: Path) -> str:
    """The service's start-up error for ``bundle``, loaded by ``uid`` (a forked child drops root)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 1
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            try:
                load_checked_bundle(Settings(bundle=bundle))
                message = "loaded"
            except StartupError as e:
                message = str(e)
            os.write(write, message.encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        message = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, message
    return message


@pytest.mark.parametrize("unreadable", ["class_vectors.safetensors", "backbones"])
def test_unreadable_bundle_file_is_one_line_naming_file_and_fix(tiny_bundle_dir: Path, unreadable: str) -> None:
    """A bundle written 0600/0700 by someone else (the old safetensors modes) and served as uid 10001."""
    if not hasattr(os, "fork"):
        pytest.skip("needs fork")
    top = Path(tempfile.mkdtemp())  # not under pytest's 0700 base folder: the other uid must reach it
    try:
        top.chmod(0o755)
        bundle = top / "b"
        shutil.copytree(tiny_bundle_dir, bundle)
        for p in [bundle, *bundle.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        (bundle / unreadable).chmod(0o700 if (bundle / unreadable).is_dir() else 0o600)
        if os.geteuid() == 0:
            message = _startup_error_as(10001, bundle)
        else:
            with pytest.raises(StartupError) as info:
                load_checked_bundle(Settings(bundle=bundle))
            message = str(info.value)
        assert "\n" not in message
        assert str(bundle / unreadable) in message, message
        assert "Permission denied" in message or "not searchable" in message, message
        assert f"chmod -R a+rX {bundle}" in message and "umask 022" in message, message
    finally:
        shutil.rmtree(top, ignore_errors=True)
