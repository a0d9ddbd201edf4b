"""Real components for fleet tests and benchmarks: a throw-away PostgreSQL and `serve` replicas.

``PostgresServer`` runs Debian's PostgreSQL 15 binaries (``initdb`` into a temp dir as the
``postgres`` user when we are root, a free loopback port, a private socket dir). ``Replica`` is
one ``promptdistill serve`` process with its own state dir, pointed at that database.
Both stop what they started (by process id) and bound every wait with a deadline.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx2

REPO = Path(__file__).resolve().parents[1]
PG_BIN = Path(os.environ.get("PROMPTDISTILL_PG_BIN", "/usr/lib/postgresql/15/bin"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def postgres_available() -> str | None:
    """None when a PostgreSQL server can be started here, else why not."""
    if not (PG_BIN / "initdb").exists():
        return f"PostgreSQL binaries not found in {PG_BIN} (apt-get install postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root but there is no 'postgres' user to run initdb as"
    return None


class PostgresServer:
    """``with PostgresServer(tmp) as pg: pg.url`` — initdb, start, stop (immediate) on exit."""

    def __init__(self, root: Path, fsync: bool = True) -> None:
        self.root = root
        self.data = root / "pgdata"
        self.socket_dir = root / "sock"
        self.log = root / "postgres.log"
        self.port = free_port()
        self.fsync = fsync
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *cmd: str, timeout: float = 60) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*prefix, *cmd], check=True, timeout=timeout, capture_output=True)

    def __enter__(self) -> PostgresServer:
        self.root.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            for p in (self.root, self.socket_dir):
                shutil.chown(p, "postgres", "postgres")
        initdb = str(PG_BIN / "initdb")
        self._run(initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
        self.start()
        return self

    def start(self) -> None:
        fsync = "on" if self.fsync else "off"
        opts = f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1 -c fsync={fsync}"
        pg_ctl = str(PG_BIN / "pg_ctl")
        self._run(pg_ctl, "-D", str(self.data), "-o", opts, "-l", str(self.log), "-w", "-t", "60", "start")

    def stop(self) -> None:
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "-t", "60", "stop")

    def sql(self, query: str) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
            cur = conn.execute(query)
            return list(cur.fetchall()) if cur.description else []

    def kill_listeners(self) -> int:
        """pg_terminate_backend every connection that LISTENs (the replicas' watchers)."""
        rows = self.sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE query LIKE 'LISTEN %' AND pid <> pg_backend_pid()"
        )
        return len(rows)

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped by the test
            self.stop()


class Replica:
    """One ``promptdistill serve`` process on a free loopback port with its own state dir."""

    def __init__(self, bundle: Path, state_dir: Path, database_url: str | None, *extra: str, **env: str) -> None:
        self.bundle, self.state_dir, self.database_url = bundle, state_dir, database_url
        self.extra, self.env = extra, env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr_path = state_dir.with_suffix(".stderr.log")

    def start(self) -> Replica:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": str(REPO), "PROMPTDISTILL_THREADS": "1", "HF_HUB_OFFLINE": "1", **self.env}
        if self.database_url:
            env["PROMPTDISTILL_DATABASE_URL"] = self.database_url
        cmd = [sys.executable, "-m", "promptdistill", "serve", "--bundle", str(self.bundle)]
        cmd += ["--state-dir", str(self.state_dir), "--port", str(self.port), *self.extra]
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
        return self

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.stderr_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"replica {self.url} exited with {self.proc.returncode}: {tail}")
            try:
                if httpx2.get(self.url + "/readyz", timeout=2.0).status_code == 200:
                    return
            except httpx2.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"replica {self.url} not ready after {timeout_s}s")

    def kill(self) -> None:
        """SIGKILL (no drain): what a crashed pod looks like."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def start_replicas(replicas: list[Replica], timeout_s: float = 180.0) -> None:
    """Start all at once (they seed the database together: the advisory lock must hold), wait for each."""
    for r in replicas:
        r.start()
    for r in replicas:
        r.wait_ready(timeout_s)
