"""Real components for fleet tests and benchmarks: a throw-away PostgreSQL and `serve` replicas.

``PostgresServer`` runs Debian's PostgreSQL 15 binaries (``initdb`` into a temp dir as the
``postgres`` user when we are root, a free loopback port, a private socket dir). ``replica`` is
one ``promptdistill serve`` process (bench/harness.py) with its own state dir, pointed at that
database. Both stop what they started (by process id) and bound every wait with a deadline.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
from pathlib import Path
from typing import Any

from bench.harness import ServerProcess, free_port

PG_BIN = Path(os.environ.get("PROMPTDISTILL_PG_BIN", "/usr/lib/postgresql/15/bin"))


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


def replica(
    bundle: Path, state_dir: Path, database_url: str | None, *extra: str, port: int | None = None, **env: str
) -> ServerProcess:
    """One ``promptdistill serve`` process (not started) with its own state dir, on ``database_url``
    (None: its own SQLite file); ``port``: a given one (a replica restarted in place), else a free one."""
    if database_url:
        env["PROMPTDISTILL_DATABASE_URL"] = database_url
    return ServerProcess.serve(bundle, state_dir, *extra, env=env, port=port)


def start_replicas(replicas: list[ServerProcess], timeout_s: float = 180.0) -> None:
    """Start all at once (they seed the database together: the advisory lock must hold), wait for each."""
    for r in replicas:
        r.start()
    for r in replicas:
        r.wait_ready(timeout_s)
