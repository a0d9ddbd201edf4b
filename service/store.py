"""SQLite store of label sets: the durable source of truth (WAL, synchronous=FULL).

Every change runs in one ``BEGIN IMMEDIATE`` transaction that also advances a global clock; the
set's ``version`` becomes the new clock value, so versions only ever increase (even across a
delete and re-create). The caller answers the client only after :meth:`commit` returned.
FAISS indexes are derived from these rows and can always be rebuilt.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from service.errors import DuplicateClass, LabelSetExists, StartupError, UnknownClass, UnknownLabelSet

DB_FILE = "labelsets.sqlite3"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS label_sets (
    name TEXT PRIMARY KEY, version INTEGER NOT NULL, next_id INTEGER NOT NULL, created_at TEXT NOT NULL,
    index_kind TEXT);
CREATE TABLE IF NOT EXISTS classes (
    label_set TEXT NOT NULL REFERENCES label_sets(name) ON DELETE CASCADE,
    id INTEGER NOT NULL, name TEXT NOT NULL, provenance TEXT NOT NULL, vector BLOB NOT NULL,
    created_at TEXT NOT NULL, PRIMARY KEY (label_set, id), UNIQUE (label_set, name));
"""


@dataclass(frozen=True)
class SetRows:
    """One label set as stored: ids [N] int64, names, provenance, vectors [N, D] float32."""

    name: str
    version: int
    ids: np.ndarray
    names: list[str]
    provenance: list[str]
    vectors: np.ndarray
    index_kind: str | None = None  # "flat" | "ivf"; None: the service's default kind


def _migrate(db: sqlite3.Connection) -> None:
    """Bring a database written by an older release up to the current schema (idempotent)."""
    columns = {r[1] for r in db.execute("PRAGMA table_info(label_sets)")}
    if "index_kind" not in columns:  # added with per-set index kinds; NULL = the service default
        db.execute("ALTER TABLE label_sets ADD COLUMN index_kind TEXT")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class LabelSetStore:
    """Thread-safe (one connection behind a lock) store of label sets and class vectors."""

    def __init__(self, state_dir: Path, embed_dim: int) -> None:
        self.path = state_dir / DB_FILE
        self.embed_dim = embed_dim
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
            _migrate(self._db)
        except sqlite3.Error as e:
            raise StartupError(f"cannot open the label-set database {self.path}: {e}") from e

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

    # ----------------------------------------------------------------- reads
    def meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_names(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT name FROM label_sets ORDER BY name")]

    def versions(self) -> dict[str, int]:
        with self._lock:
            return {r[0]: int(r[1]) for r in self._db.execute("SELECT name, version FROM label_sets")}

    def version(self, name: str) -> int | None:
        with self._lock:
            row = self._db.execute("SELECT version FROM label_sets WHERE name = ?", (name,)).fetchone()
        return None if row is None else int(row[0])

    def ping(self) -> None:
        with self._lock:
            self._db.execute("SELECT 1").fetchone()

    def load(self, name: str) -> SetRows:
        """All rows of one set, in id order (one consistent read)."""
        with self.transaction() as db:
            row = db.execute("SELECT version, index_kind FROM label_sets WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise UnknownLabelSet(f"label set {name!r} does not exist")
            rows = db.execute(
                "SELECT id, name, provenance, vector FROM classes WHERE label_set = ? ORDER BY id", (name,)
            ).fetchall()
        vectors = np.zeros((len(rows), self.embed_dim), dtype=np.float32)  # [N, D]
        for i, r in enumerate(rows):
            vec = np.frombuffer(r[3], dtype="<f4")
            if vec.shape != (self.embed_dim,):
                raise StartupError(f"database {self.path}: class {r[1]!r} in {name!r} has a vector of size {vec.size}")
            vectors[i] = vec
        return SetRows(
            name=name,
            version=int(row[0]),
            ids=np.asarray([r[0] for r in rows], dtype=np.int64),
            names=[r[1] for r in rows],
            provenance=[r[2] for r in rows],
            vectors=vectors,
            index_kind=row[1],
        )

    # ----------------------------------------------------------------- writes (caller holds no transaction)
    def _tick(self, db: sqlite3.Connection) -> int:
        row = db.execute("SELECT value FROM meta WHERE key = 'clock'").fetchone()
        clock = (int(row[0]) if row else 0) + 1
        db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('clock', ?)", (str(clock),))
        return clock

    def create_set(
        self,
        db: sqlite3.Connection,
        name: str,
        names: Sequence[str],
        vectors: np.ndarray,
        provenance: str | Sequence[str],
        ids: Sequence[int] | None = None,
        index_kind: str | None = None,
    ) -> int:
        """Inside a transaction: a new set with its classes; returns its version."""
        if db.execute("SELECT 1 FROM label_sets WHERE name = ?", (name,)).fetchone():
            raise LabelSetExists(f"label set {name!r} already exists")
        version = self._tick(db)
        db.execute(
            "INSERT INTO label_sets (name, version, next_id, created_at, index_kind) VALUES (?, ?, 0, ?, ?)",
            (name, version, _now(), index_kind),
        )
        self._insert(db, name, names, vectors, provenance, ids)
        return version

    def add_classes(
        self, db: sqlite3.Connection, name: str, names: Sequence[str], vectors: np.ndarray, provenance: str
    ) -> tuple[int, list[int]]:
        """Inside a transaction: append classes; returns (version, new ids). Duplicates -> 409."""
        self._require(db, name)
        existing = self.existing_names(db, name, names)
        if existing:
            raise DuplicateClass(f"label set {name!r} already has {sorted(existing)[:10]}")
        version = self._tick(db)
        db.execute("UPDATE label_sets SET version = ? WHERE name = ?", (version, name))
        return version, self._insert(db, name, names, vectors, provenance, None)

    def existing_names(self, db: sqlite3.Connection, name: str, names: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(names), 500):
            chunk = list(names[start : start + 500])
            marks = ",".join("?" * len(chunk))
            q = f"SELECT name FROM classes WHERE label_set = ? AND name IN ({marks})"
            found |= {r[0] for r in db.execute(q, (name, *chunk))}
        return found

    def remove_class(
        self, db: sqlite3.Connection, name: str, class_id: int | None, class_name: str | None
    ) -> tuple[int, int, str]:
        """Inside a transaction: delete one class by id or name; returns (version, id, name)."""
        self._require(db, name)
        if class_id is not None:
            row = db.execute("SELECT id, name FROM classes WHERE label_set = ? AND id = ?", (name, class_id)).fetchone()
        else:
            row = db.execute(
                "SELECT id, name FROM classes WHERE label_set = ? AND name = ?", (name, class_name)
            ).fetchone()
        if row is None:
            what = f"id {class_id}" if class_id is not None else f"name {class_name!r}"
            raise UnknownClass(f"label set {name!r} has no class with {what}")
        db.execute("DELETE FROM classes WHERE label_set = ? AND id = ?", (name, row[0]))
        version = self._tick(db)
        db.execute("UPDATE label_sets SET version = ? WHERE name = ?", (version, name))
        return version, int(row[0]), str(row[1])

    def delete_set(self, db: sqlite3.Connection, name: str) -> int:
        self._require(db, name)
        db.execute("DELETE FROM classes WHERE label_set = ?", (name,))
        db.execute("DELETE FROM label_sets WHERE name = ?", (name,))
        return self._tick(db)

    def set_meta(self, db: sqlite3.Connection, key: str, value: str) -> None:
        db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def _require(self, db: sqlite3.Connection, name: str) -> None:
        if not db.execute("SELECT 1 FROM label_sets WHERE name = ?", (name,)).fetchone():
            raise UnknownLabelSet(f"label set {name!r} does not exist")

    def _insert(
        self,
        db: sqlite3.Connection,
        name: str,
        names: Sequence[str],
        vectors: np.ndarray,
        provenance: str | Sequence[str],
        ids: Sequence[int] | None,
    ) -> list[int]:
        prov = [provenance] * len(names) if isinstance(provenance, str) else list(provenance)
        vecs = np.ascontiguousarray(vectors, dtype="<f4")  # [N, D]
        if vecs.shape != (len(names), self.embed_dim):
            raise ValueError(f"vectors have shape {vecs.shape}, expected ({len(names)}, {self.embed_dim})")
        (next_id,) = db.execute("SELECT next_id FROM label_sets WHERE name = ?", (name,)).fetchone()
        new_ids = list(ids) if ids is not None else list(range(next_id, next_id + len(names)))
        now = _now()
        db.executemany(
            "INSERT INTO classes (label_set, id, name, provenance, vector, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            [
                (name, i, n, prov[k], vecs[k].tobytes(), now)
                for k, (i, n) in enumerate(zip(new_ids, names, strict=True))
            ],
        )
        top = max([next_id - 1, *new_ids]) + 1
        db.execute("UPDATE label_sets SET next_id = ? WHERE name = ?", (top, name))
        return new_ids
