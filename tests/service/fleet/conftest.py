"""Fleet fixtures: a real PostgreSQL server (session), a fresh database per test, store factories.

The PostgreSQL leg needs Debian's ``postgresql`` package (``.ci/run`` installs it); without it
those tests skip with the reason, and the SQLite leg still runs.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.cluster_kit import PostgresServer, postgres_available
from service.store import SqliteStore, Store

EMBED_DIM = 64
_db_numbers = itertools.count()


def pg_root() -> Path:
    # Not under pytest's tmp dir: that is 0700 root-only, and the server runs as 'postgres'.
    return Path(tempfile.mkdtemp(prefix="promptdistill-pg-"))


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL 15 server on a free loopback port for the whole session (fsync off: tests only)."""
    why = postgres_available()
    if why:
        pytest.skip(why)
    root = pg_root()
    try:
        with PostgresServer(root, fsync=False) as server:
            yield server
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_url(postgres: PostgresServer) -> str:
    """A URL of a brand-new database on the session server."""
    name = f"t{next(_db_numbers)}"
    postgres.sql(f"CREATE DATABASE {name}")
    return postgres.url.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_store(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Store]]:
    """``make_store()`` -> a new store on this test's database (several = several replicas/workers)."""
    opened: list[Store] = []
    url = request.getfixturevalue("pg_url") if backend == "postgres" else None

    def make(**kwargs: object) -> Store:
        if url is None:
            store: Store = SqliteStore(tmp_path, EMBED_DIM, "test")
        else:
            from service.stores.postgres import PostgresStore

            store = PostgresStore(url, EMBED_DIM, "test", **kwargs)  # type: ignore[arg-type]
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()
