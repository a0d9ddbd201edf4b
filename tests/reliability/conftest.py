"""Reliability-suite fixtures: ``promptdistill serve`` as a real child process on 127.0.0.1.

The suite's other parts live with the service tests and are not repeated here: SIGKILL
durability, the bad-input corpus and overload are in tests/service/.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
import pytest

from tests.service.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120.0


@dataclass
class ServerProcess:
    """A started ``promptdistill serve`` child; output goes to ``log`` (a file: pipes can fill up)."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    env: dict[str, str] = field(default_factory=dict)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} during start-up:\n{self.output()}")
            try:
                if httpx2.get(self.url + "/readyz", timeout=2.0).status_code == 200:
                    return
            except httpx2.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server at {self.url} not ready after {timeout_s} s:\n{self.output()}")


def start_server(
    bundle: Path, workdir: Path, env: dict[str, str] | None = None, port: int | None = None
) -> ServerProcess:
    """Start the real CLI on ``port`` (default: a free loopback port) and wait for /readyz."""
    port = port or free_port()
    state = workdir / "state"
    log = workdir / "server.log"
    cmd = [sys.executable, "-m", "promptdistill", "serve", "--bundle", str(bundle), "--state-dir", str(state)]
    cmd += ["--port", str(port)]
    # no PROMPTDISTILL_* setting leaks in from the shell (an API key there would change every answer)
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTDISTILL_")}
    child_env.update({"PYTHONPATH": str(ROOT), "PROMPTDISTILL_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    child_env.update(env or {})
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env, stdout=out, stderr=subprocess.STDOUT)
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", log, env or {})
    try:
        server.wait_ready()
    except BaseException:
        stop_server(server)
        raise
    return server


def stop_server(server: ServerProcess) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(timeout=30)


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
