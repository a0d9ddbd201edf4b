"""Reliability-suite fixtures: ``promptdistill serve`` as a real child process on 127.0.0.1.

The suite's other parts live with the service tests and are not repeated here: SIGKILL
durability, the bad-input corpus and overload are in tests/service/.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.harness import ServerProcess

START_TIMEOUT_S = 120.0


def start_server(
    bundle: Path, workdir: Path, env: dict[str, str] | None = None, port: int | None = None
) -> ServerProcess:
    """Start the real CLI on ``port`` (default: a free loopback port) and wait for /readyz."""
    server = ServerProcess.serve(bundle, workdir / "state", env=env, port=port, log=workdir / "server.log")
    server.start()
    try:
        server.wait_ready(START_TIMEOUT_S)
    except BaseException:
        server.kill()
        raise
    return server


def stop_server(server: ServerProcess) -> None:
    server.kill()


@pytest.fixture
def bundle_copy(tiny_bundle_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the session's tiny zero-shot bundle (the original stays read-only)."""
    return Path(shutil.copytree(tiny_bundle_dir, tmp_path / "bundle"))


@pytest.fixture(scope="module")
def module_server(tiny_bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for a whole module (schemathesis runs hundreds of requests against it)."""
    work = tmp_path_factory.mktemp("reliability")
    bundle = Path(shutil.copytree(tiny_bundle_dir, work / "bundle"))
    server = start_server(bundle, work)
    try:
        yield server
    finally:
        stop_server(server)
