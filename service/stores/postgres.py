"""PostgreSQL store: one database shared by every replica of a fleet (psycopg 3).

Selected by ``PROMPTDISTILL_DATABASE_URL=postgresql://...``. Writes lock the set's row
(``SELECT ... FOR UPDATE``), then advance the one-row ``clock`` table, so writers commit in clock
order and versions only increase (a sequence would not do: two writers could commit out of
order). The writing transaction sends ``NOTIFY`` (delivered on commit only); every replica's
watcher thread ``LISTEN``s, re-checks all versions whenever it (re)connects, and polls versions
every ``poll_interval_s`` as a safety net.

When the server is unreachable, every call raises :class:`StoreUnavailable` (503 + Retry-After)
and the next call reconnects; the registry keeps serving the snapshots it has.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict

from service.errors import LabelSetExists, StartupError, StoreUnavailable
from service.stores.base import LEGACY, Store

log = logging.getLogger(__name__)
CHANNEL = "promptdistill_label_sets"
_SEED_LOCK = 0x70_64_73_74  # pg_advisory_xact_lock key for schema creation and seeding ("pdst")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS clock (id SMALLINT PRIMARY KEY CHECK (id = 1), value BIGINT NOT NULL);
INSERT INTO clock (id, value) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;
CREATE TABLE IF NOT EXISTS label_sets (
    name TEXT PRIMARY KEY, version BIGINT NOT NULL, next_id BIGINT NOT NULL, created_at TEXT NOT NULL,
    index_kind TEXT);
ALTER TABLE label_sets ADD COLUMN IF NOT EXISTS index_kind TEXT;
CREATE TABLE IF NOT EXISTS classes (
    label_set TEXT NOT NULL REFERENCES label_sets(name) ON DELETE CASCADE,
    id BIGINT NOT NULL, name TEXT NOT NULL, provenance TEXT NOT NULL,
    created_at TEXT NOT NULL, PRIMARY KEY (label_set, id), UNIQUE (label_set, name));
CREATE TABLE IF NOT EXISTS vectors (
    label_set TEXT NOT NULL, class_id BIGINT NOT NULL, space TEXT NOT NULL, vector BYTEA NOT NULL,
    PRIMARY KEY (label_set, class_id, space),
    FOREIGN KEY (label_set, class_id) REFERENCES classes(label_set, id) ON DELETE CASCADE);
"""
# A database made before spaces: its one-vector-per-class column moves to `vectors`, tagged with the
# old bundle fingerprint (the registry re-tags them with that bundle's space when it serves it). One
# transaction, under the schema lock; replicas of the older release must be stopped first.
_MIGRATE_VECTORS = f"""
DO $$ BEGIN
  IF EXISTS (SELECT 1 FROM information_schema.columns
             WHERE table_schema = current_schema() AND table_name = 'classes' AND column_name = 'vector') THEN
    INSERT INTO vectors (label_set, class_id, space, vector)
      SELECT label_set, id, '{LEGACY}' || COALESCE((SELECT value FROM meta WHERE key = 'bundle_fingerprint'), ''),
             vector FROM classes ON CONFLICT DO NOTHING;
    ALTER TABLE classes DROP COLUMN vector;
  END IF;
END $$;
"""
_DOWN = (psycopg.OperationalError, psycopg.InterfaceError)


def describe(url: str) -> str:
    """``host:port/dbname`` of a connection URL (never the password)."""
    try:
        info = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql (unparsable URL)"
    return f"postgresql://{info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"


class PostgresStore(Store):
    """One connection behind a lock for reads and writes, one more for LISTEN (the watcher)."""

    shared = True

    def __init__(
        self,
        url: str,
        embed_dim: int,
        space: str,
        poll_interval_s: float = 2.0,
        retry_after_s: int = 1,
        connect_timeout_s: int = 3,
    ) -> None:
        self.embed_dim = embed_dim
        self.space = space
        self.poll_interval_s = poll_interval_s
        self.retry_after_s = retry_after_s
        self._url, self._timeout = url, connect_timeout_s
        self._lock = threading.RLock()
        self._conn: psycopg.Connection[Any] | None = None
        self._depth = 0  # open transactions on _conn (reads nest into a running write)
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.problem: str | None = None  # why the database is unreachable right now, for /readyz
        try:
            with self.transaction() as db:
                self.lock_all(db)  # replicas starting together would race on CREATE TABLE IF NOT EXISTS
                db.execute(_SCHEMA)
                db.execute(_MIGRATE_VECTORS)
        except StoreUnavailable as e:
            raise StartupError(f"cannot reach the label-set database {self.where}: {e.message}") from e

    @property
    def where(self) -> str:
        return describe(self._url)

    def _connect(self) -> psycopg.Connection[Any]:
        # UTF-8 whatever the database's encoding: on a SQL_ASCII database psycopg would otherwise
        # hand back text columns as bytes (found with a stand-in server initialised without a locale)
        return psycopg.connect(self._url, autocommit=True, connect_timeout=self._timeout, client_encoding="UTF8")

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    @contextmanager
    def _session(self, begin: str) -> Iterator[psycopg.Connection[Any]]:
        with self._lock:
            if self._depth:  # nested in a running transaction on this thread
                assert self._conn is not None
                yield self._conn
                return
            try:
                conn = self._begin(begin)
                self._depth = 1
                try:
                    yield conn
                except BaseException:
                    if not conn.closed and not conn.broken:
                        conn.execute("ROLLBACK")
                    raise
                finally:
                    self._depth = 0
                conn.execute("COMMIT")
                self.problem = None
            except _DOWN as e:
                self._lost(e)
                raise StoreUnavailable(
                    f"the label-set database is unreachable ({type(e).__name__}); retry later",
                    retry_after_s=self.retry_after_s,
                ) from e

    def _begin(self, begin: str) -> psycopg.Connection[Any]:
        """BEGIN on the connection, reconnecting once if it was closed under us (server restart,
        pg_terminate_backend): nothing was sent yet, so a retry cannot apply anything twice."""
        for attempt in (0, 1):
            if self._conn is None or self._conn.closed:
                self._conn = self._connect()
            try:
                self._conn.execute(begin)
                return self._conn
            except _DOWN:
                self._conn.close()
                self._conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _lost(self, e: BaseException) -> None:
        if self.problem is None:
            log.warning("label-set database %s unreachable: %s", self.where, str(e).strip() or type(e).__name__)
        self.problem = f"unreachable: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def transaction(self) -> Any:
        """READ COMMITTED: each statement after the row lock sees every earlier committed writer."""
        return self._session("BEGIN")

    def read(self) -> Any:
        return self._session("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s")

    # ----------------------------------------------------------------- write hooks
    def lock_all(self, db: psycopg.Connection[Any]) -> None:
        db.execute("SELECT pg_advisory_xact_lock(%s)", (_SEED_LOCK,))

    def _lock_set(self, db: psycopg.Connection[Any], name: str) -> bool:
        return db.execute("SELECT 1 FROM label_sets WHERE name = %s FOR UPDATE", (name,)).fetchone() is not None

    def _insert_set(self, db: psycopg.Connection[Any], name: str, index_kind: str | None = None) -> None:
        try:
            super()._insert_set(db, name, index_kind)
        except pg_errors.UniqueViolation as e:  # a concurrent create of the same name committed first
            raise LabelSetExists(f"label set {name!r} already exists") from e

    def _tick(self, db: psycopg.Connection[Any]) -> int:
        row = db.execute("UPDATE clock SET value = value + 1 WHERE id = 1 RETURNING value").fetchone()
        assert row is not None
        return int(row[0])

    def advance_clock(self, db: psycopg.Connection[Any], at_least: int) -> None:
        db.execute("UPDATE clock SET value = GREATEST(value, %s) WHERE id = 1", (at_least,))

    def set_meta(self, db: psycopg.Connection[Any], key: str, value: str) -> None:
        db.execute(
            "INSERT INTO meta (key, value) VALUES (%s, %s) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            (key, value),
        )

    def notify(self, db: psycopg.Connection[Any], name: str, version: int) -> None:
        db.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"{name}:{version}"))

    # ----------------------------------------------------------------- propagation
    def watch(self, on_change: Callable[[str, int], None], on_connect: Callable[[], None]) -> None:
        """Start the watcher thread: NOTIFY -> ``on_change(name, version)``; (re)connect and every
        ``poll_interval_s`` -> ``on_connect()`` (re-check every version)."""
        self._watcher = threading.Thread(
            target=self._watch_loop, args=(on_change, on_connect), name="label-set-watcher", daemon=True
        )
        self._watcher.start()

    def _watch_loop(self, on_change: Callable[[str, int], None], on_connect: Callable[[], None]) -> None:
        listen: psycopg.Connection[Any] | None = None
        next_poll = time.monotonic() + self.poll_interval_s
        backoff = 0.1
        while not self._stop.is_set():
            if listen is None:
                try:
                    listen = self._connect()
                    listen.execute(f"LISTEN {CHANNEL}")
                    backoff = 0.1
                except _DOWN:
                    listen = None
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 1.0)
                    _safely(on_connect)  # the poll still runs (it fails fast while the server is down)
                    continue
                _safely(on_connect)  # changes made while we were not listening
            try:
                # Short windows so close() returns quickly; notifications arrive as they commit.
                for note in listen.notifies(timeout=0.5):
                    name, _, version = note.payload.rpartition(":")
                    _safely(on_change, name, int(version))
            except _DOWN as e:
                log.warning("label-set listener lost its connection (%s); reconnecting", type(e).__name__)
                listen.close()
                listen = None
                continue
            if time.monotonic() >= next_poll:
                next_poll = time.monotonic() + self.poll_interval_s
                _safely(on_connect)
        if listen is not None:
            listen.close()


def _safely(fn: Callable[..., None], *args: Any) -> None:
    """Watcher callbacks must never kill the thread: a failed refresh is retried by the next poll."""
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - logged; the poll repeats the work
        log.debug("label-set refresh failed: %s", e)
