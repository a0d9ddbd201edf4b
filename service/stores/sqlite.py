"""SQLite store (the embedded default): one file in the state dir, WAL, synchronous=FULL.

Writes run in ``BEGIN IMMEDIATE`` (one writer at a time across every worker process on the host);
the global clock is the ``meta`` row ``clock``. Other workers notice changes by comparing versions
on each read (the registry does that when ``shared`` is False), which costs one local query.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from service.errors import StartupError
from service.stores.base import LEGACY, Store

DB_FILE = "labelsets.sqlite3"
_VECTORS = """
CREATE TABLE IF NOT EXISTS vectors (
    label_set TEXT NOT NULL, class_id INTEGER NOT NULL, space TEXT NOT NULL, vector BLOB NOT NULL,
    PRIMARY KEY (label_set, class_id, space),
    FOREIGN KEY (label_set, class_id) REFERENCES classes(label_set, id) ON DELETE CASCADE);
"""
_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS label_sets (
    name TEXT PRIMARY KEY, version INTEGER NOT NULL, next_id INTEGER NOT NULL, created_at TEXT NOT NULL,
    index_kind TEXT);
CREATE TABLE IF NOT EXISTS classes (
    label_set TEXT NOT NULL REFERENCES label_sets(name) ON DELETE CASCADE,
    id INTEGER NOT NULL, name TEXT NOT NULL, provenance TEXT NOT NULL,
    created_at TEXT NOT NULL, PRIMARY KEY (label_set, id), UNIQUE (label_set, name));
"""
    + _VECTORS
)
_CLASSES_V2 = """
CREATE TABLE classes_v2 (
    label_set TEXT NOT NULL REFERENCES label_sets(name) ON DELETE CASCADE,
    id INTEGER NOT NULL, name TEXT NOT NULL, provenance TEXT NOT NULL,
    created_at TEXT NOT NULL, PRIMARY KEY (label_set, id), UNIQUE (label_set, name));
INSERT INTO classes_v2 SELECT label_set, id, name, provenance, created_at FROM classes;
DROP TABLE classes;
ALTER TABLE classes_v2 RENAME TO classes;
"""


def _migrate(db: sqlite3.Connection) -> None:
    """Bring a database written by an older release up to the current schema (idempotent), in one
    transaction: a crash leaves the old schema, and the next start migrates again."""
    columns = {r[1] for r in db.execute("PRAGMA table_info(label_sets)")}
    if columns and "index_kind" not in columns:  # added with per-set index kinds; NULL = the service default
        db.execute("ALTER TABLE label_sets ADD COLUMN index_kind TEXT")
    if "vector" not in {r[1] for r in db.execute("PRAGMA table_info(classes)")}:
        return
    # Vectors per space: the old one-vector-per-class column moves to `vectors`, tagged with the old
    # bundle fingerprint (the registry re-tags them with the space of that bundle when it serves it).
    db.execute("PRAGMA foreign_keys=OFF")  # the rebuilt table must not cascade into `vectors`
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            if "vector" not in {r[1] for r in db.execute("PRAGMA table_info(classes)")}:
                db.execute("COMMIT")  # another worker process migrated it while this one waited
                return
            db.execute(_VECTORS)
            db.execute(
                "INSERT OR IGNORE INTO vectors (label_set, class_id, space, vector) SELECT label_set, id, "
                f"'{LEGACY}' || COALESCE((SELECT value FROM meta WHERE key = 'bundle_fingerprint'), ''), vector "
                "FROM classes"
            )
            for stmt in _CLASSES_V2.strip().split(";"):
                if stmt.strip():
                    db.execute(stmt)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    finally:
        db.execute("PRAGMA foreign_keys=ON")


class SqliteStore(Store):
    """Thread-safe (one connection behind a lock) SQLite store."""

    def __init__(self, state_dir: Path, embed_dim: int, space: str) -> None:
        self.path = state_dir / DB_FILE
        self.embed_dim = embed_dim
        self.space = space
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            _migrate(self._db)  # before the schema script: it would create `vectors` referencing old `classes`
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as e:
            raise StartupError(f"cannot open the label-set database {self.path}: {e}") from e

    @property
    def where(self) -> str:
        return str(self.path)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (durable on return), rolled back on any error."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A deferred transaction: WAL gives it one snapshot from its first read to its end.

        Inside a running transaction (same thread: the lock is re-entrant) it reads in that one.
        """
        with self._lock:
            if self._db.in_transaction:
                yield self._db
                return
            self._db.execute("BEGIN")
            try:
                yield self._db
            finally:
                self._db.execute("COMMIT")

    def _tick(self, db: sqlite3.Connection) -> int:
        row = db.execute("SELECT value FROM meta WHERE key = 'clock'").fetchone()
        clock = (int(row[0]) if row else 0) + 1
        db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('clock', ?)", (str(clock),))
        return clock

    def advance_clock(self, db: sqlite3.Connection, at_least: int) -> None:
        row = db.execute("SELECT value FROM meta WHERE key = 'clock'").fetchone()
        if (int(row[0]) if row else 0) < at_least:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('clock', ?)", (str(at_least),))

    def set_meta(self, db: sqlite3.Connection, key: str, value: str) -> None:
        db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))
