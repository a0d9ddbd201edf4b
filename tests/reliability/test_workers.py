"""``serve --workers N``: gunicorn's arbiter with uvicorn workers (service/workers.py).

Counts come from the server's own log (gunicorn logs every worker boot and every timeout kill), not
from timing: started under CPU load, each of the 3 workers boots exactly once; /readyz counts the
workers that serve; after ``kill -9`` of the supervisor no worker survives and the port is free again.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import httpx2
import pytest

from bench.burner import cpu_burn
from tests.reliability.conftest import ServerProcess, start_server, stop_server

pytestmark = pytest.mark.slow
WORKERS = 3
ENV = {"PROMPTDISTILL_WORKERS": str(WORKERS)}


def worker_pids(server: ServerProcess) -> list[int]:
    return [int(p) for p in re.findall(r"Booting worker with pid: (\d+)", server.log.read_text(errors="replace"))]


def alive(pid: int) -> bool:
    """Running (a zombie waiting for init to reap it is dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def readyz(server: ServerProcess) -> tuple[int, dict[str, str]]:
    r = httpx2.get(server.url + "/readyz", timeout=30)
    return r.status_code, r.json()["checks"]


def wait_until(condition, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_workers_boot_once_under_load_and_readyz_counts_them(bundle_copy: Path, tmp_path: Path) -> None:
    with cpu_burn(3, max_s=300):  # more runnable processes than the 2 cores, while the model loads
        server = start_server(bundle_copy, tmp_path, ENV)
    try:
        wait_until(lambda: readyz(server)[1].get("workers", "").startswith(f"{WORKERS}/{WORKERS}"), 120, "workers")
        log = server.log.read_text(errors="replace")
        assert len(worker_pids(server)) == WORKERS, log[-3000:]
        assert "WORKER TIMEOUT" not in log and "Worker exiting" not in log, log[-3000:]
        # one worker dies: /readyz says so until the arbiter's replacement serves
        victim = worker_pids(server)[0]
        os.kill(victim, signal.SIGKILL)
        seen: list[tuple[int, str]] = []

        def reports(status: int, prefix: str) -> bool:
            code, checks = readyz(server)
            seen.append((code, checks.get("workers", "")))
            return code == status and checks.get("workers", "").startswith(prefix)

        wait_until(lambda: reports(503, f"{WORKERS - 1}/{WORKERS}"), 60, f"no 503 while a worker was down: {seen}")
        wait_until(lambda: reports(200, f"{WORKERS}/{WORKERS}"), 120, f"the replacement never served: {seen[-3:]}")
        assert len(worker_pids(server)) == WORKERS + 1  # exactly one replacement
    finally:
        stop_server(server)


def test_workers_die_with_a_killed_supervisor(bundle_copy: Path, tmp_path: Path) -> None:
    server = start_server(bundle_copy, tmp_path, ENV)
    port = int(server.url.rsplit(":", 1)[1])
    try:
        wait_until(lambda: len(worker_pids(server)) == WORKERS, 60, "workers never booted")
        pids = worker_pids(server)
        assert all(alive(p) for p in pids)
        server.proc.send_signal(signal.SIGKILL)  # the supervisor only: no chance to stop its workers
        server.proc.wait(timeout=30)
        wait_until(lambda: not any(alive(p) for p in pids), 30, f"orphaned workers: {[p for p in pids if alive(p)]}")
    finally:
        stop_server(server)
    # nothing holds the port: a new server starts on it (was: address already in use)
    (tmp_path / "again").mkdir()
    again = start_server(bundle_copy, tmp_path / "again", {}, port=port)
    try:
        assert httpx2.get(again.url + "/livez", timeout=30).status_code == 200
    finally:
        stop_server(again)
