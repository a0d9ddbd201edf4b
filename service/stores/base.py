"""The store interface and the SQL both implementations share.

A store is the durable source of truth for label sets. Names are the truth; vectors are derived
per embedding *space* (models.bundle.bundle_space): a class (label set, id, name, provenance) is
stored once in ``classes``, its vector once per space in ``vectors``. A store object reads and
writes the vectors of one space (``space``); classes that have no vector in it yet are reported as
``missing`` (the service encodes them: service/migration.py) and never served without one.

Every change runs in one transaction that locks the set's row, then advances one global clock row;
the set's ``version`` becomes the new clock value. Because the clock row stays locked until commit,
writers commit in clock order and a version never goes backwards (even across a delete and
re-create). The caller answers the client only after the transaction committed. FAISS indexes are
derived from these rows.

A class row never changes under its id (replicas cache rows by id and read only the ids they lack):
a change to a class's vector (examples added) replaces the row by a new id with the same name, in the
same transaction, and its examples move with it. Examples (the re-encoded images a class was made
from, kept so that another model can re-embed them) live in their own table, keyed by
(set, class id, seq), each with one embedding and the space of that embedding (a model that
re-embeds it writes its own in place: ``put_example_embeddings``); ``text_vectors`` holds,
per space, the name's own vector of a class that mixes a name and examples. All are added, moved and
deleted in the transaction that changes their class.

SQL here is written with ``?`` placeholders; :meth:`Store._sql` adapts it to the driver.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from service.errors import DuplicateClass, LabelSetExists, StartupError, UnknownClass, UnknownLabelSet

LEGACY = "legacy:"  # space tag of vectors from a database made before spaces, + the bundle fingerprint
Tx = Any  # a driver connection inside an open transaction (sqlite3.Connection / psycopg.Connection)


@dataclass(frozen=True)
class SetRows:
    """One label set as stored: ids [N] int64, names, provenance, vectors [N, D] float32."""

    name: str
    version: int
    ids: np.ndarray
    names: list[str]
    provenance: list[str]
    vectors: np.ndarray
    index_kind: str | None = None  # column label_sets.index_kind: "flat" | "ivf"; None: the service default
    missing: tuple[int, ...] = ()  # ids of classes with no vector in the store's space (not in the rows above)


@dataclass(frozen=True)
class SetDelta:
    """What changed in a set relative to ids a replica already holds (one consistent read).

    ``current_ids`` [N] are all ids now stored; ``added`` holds only the rows the caller lacked.
    """

    version: int
    current_ids: np.ndarray
    added: SetRows


@dataclass(frozen=True)
class ExampleRow:
    """One example image of a class as stored."""

    digest: str  # sha256 (hex) of the bytes as the client sent them: duplicates are refused by it
    media_type: str  # of ``data``: image/png or image/jpeg
    data: bytes  # the re-encoded image (bounded size) that another model can re-embed
    embedding: np.ndarray  # [D] float32: the served image tower's embedding of the upload (store's space)
    space: str | None = None  # read back: the space of ``embedding`` (the last one that embedded the example)


@dataclass(frozen=True)
class ClassRow:
    """One class as stored; ``text_vector`` [D] is the name's own vector when examples were mixed in."""

    id: int
    name: str
    provenance: str
    vector: np.ndarray | None  # [D] in the store's space; None: not encoded in it yet
    text_vector: np.ndarray | None


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Store(abc.ABC):
    """Durable, versioned label sets. Writes take a ``tx`` from :meth:`transaction`."""

    embed_dim: int
    space: str  # the embedding space whose vectors this store reads and writes
    #: True when other hosts write too and tell us (LISTEN/NOTIFY): the registry then serves its
    #: snapshots without a database read per request. False (SQLite): every read checks the version.
    shared: bool = False

    @property
    @abc.abstractmethod
    def where(self) -> str:
        """Where the data lives, for messages (no password)."""

    @abc.abstractmethod
    def transaction(self) -> AbstractContextManager[Tx]:
        """A write transaction; committed (durably) when the block returns, rolled back on error."""

    @abc.abstractmethod
    def read(self) -> AbstractContextManager[Tx]:
        """A read-only transaction that sees one consistent state."""

    @abc.abstractmethod
    def close(self) -> None: ...

    @abc.abstractmethod
    def _tick(self, db: Tx) -> int:
        """Advance the clock row inside the transaction; returns the new value."""

    @abc.abstractmethod
    def set_meta(self, db: Tx, key: str, value: str) -> None: ...

    @abc.abstractmethod
    def advance_clock(self, db: Tx, at_least: int) -> None:
        """Move the clock to ``at_least`` if it is behind (an import brings versions of its own)."""

    def lock_all(self, db: Tx) -> None:
        """Serialise with every other writer (start-up seeding). SQLite's BEGIN IMMEDIATE already does."""
        return None

    def notify(self, db: Tx, name: str, version: int) -> None:
        """Tell other replicas (on commit) that ``name`` is now at ``version``; nothing for SQLite."""
        return None

    def watch(self, on_change: Callable[[str, int], None], on_connect: Callable[[], None]) -> None:
        """Start delivering other replicas' changes (background); nothing for SQLite."""
        return None

    def _sql(self, sql: str) -> str:
        return sql

    def _lock_set(self, db: Tx, name: str) -> bool:
        """Lock the set's row for the rest of the transaction; False if it does not exist."""
        return db.execute(self._sql("SELECT 1 FROM label_sets WHERE name = ?"), (name,)).fetchone() is not None

    def _blob(self, vec: np.ndarray) -> Any:
        return vec.tobytes()

    # ----------------------------------------------------------------- reads
    def _one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        with self.read() as db:
            return db.execute(self._sql(sql), tuple(params)).fetchone()

    def meta(self, key: str) -> str | None:
        row = self._one("SELECT value FROM meta WHERE key = ?", (key,))
        return None if row is None else str(row[0])

    def set_names(self) -> list[str]:
        with self.read() as db:
            return [r[0] for r in db.execute(self._sql("SELECT name FROM label_sets ORDER BY name")).fetchall()]

    def versions(self) -> dict[str, int]:
        with self.read() as db:
            return {r[0]: int(r[1]) for r in db.execute(self._sql("SELECT name, version FROM label_sets")).fetchall()}

    def version(self, name: str) -> int | None:
        row = self._one("SELECT version FROM label_sets WHERE name = ?", (name,))
        return None if row is None else int(row[0])

    def ping(self) -> None:
        self._one("SELECT 1")

    def load(self, name: str) -> SetRows:
        """All rows of one set, in id order (one consistent read)."""
        return self.delta(name, np.zeros(0, dtype=np.int64)).added

    def delta(self, name: str, known_ids: np.ndarray) -> SetDelta:
        """The set's version and ids, plus the full rows of ids not in ``known_ids`` (one read)."""
        with self.read() as db:
            q = self._sql("SELECT version, index_kind FROM label_sets WHERE name = ?")
            row = db.execute(q, (name,)).fetchone()
            if row is None:
                raise UnknownLabelSet(f"label set {name!r} does not exist")
            q = self._sql("SELECT id FROM classes WHERE label_set = ? ORDER BY id")
            ids = [int(r[0]) for r in db.execute(q, (name,)).fetchall()]
            current = np.asarray(ids, dtype=np.int64)
            want = current[~np.isin(current, known_ids)]
            rows = self._rows(db, name, want, fetch_all=len(want) == len(current))
        return SetDelta(int(row[0]), current, self._set_rows(name, int(row[0]), rows, row[1]))

    def _rows(self, db: Tx, name: str, want: np.ndarray, fetch_all: bool) -> list[Any]:
        cols = (
            "SELECT c.id, c.name, c.provenance, v.vector FROM classes c LEFT JOIN vectors v "
            "ON v.label_set = c.label_set AND v.class_id = c.id AND v.space = ? WHERE c.label_set = ?"
        )
        if fetch_all:
            return list(db.execute(self._sql(cols + " ORDER BY c.id"), (self.space, name)).fetchall())
        out: list[Any] = []
        for start in range(0, len(want), 500):
            chunk = [int(i) for i in want[start : start + 500]]
            marks = ",".join("?" * len(chunk))
            q = f"{cols} AND c.id IN ({marks}) ORDER BY c.id"
            out += db.execute(self._sql(q), (self.space, name, *chunk)).fetchall()
        return out

    def _set_rows(self, name: str, version: int, rows: list[Any], index_kind: str | None = None) -> SetRows:
        have = [r for r in rows if r[3] is not None]
        vectors = np.zeros((len(have), self.embed_dim), dtype=np.float32)  # [N, D]
        for i, r in enumerate(have):
            vec = np.frombuffer(bytes(r[3]), dtype="<f4")
            if vec.shape != (self.embed_dim,):
                raise StartupError(f"database {self.where}: class {r[1]!r} in {name!r} has a vector of size {vec.size}")
            vectors[i] = vec
        return SetRows(
            name=name,
            version=version,
            ids=np.asarray([r[0] for r in have], dtype=np.int64),
            names=[r[1] for r in have],
            provenance=[r[2] for r in have],
            vectors=vectors,
            index_kind=index_kind,
            missing=tuple(int(r[0]) for r in rows if r[3] is None),
        )

    def missing(self, name: str, limit: int, after: int = -1) -> tuple[list[int], list[str], list[str]]:
        """Up to ``limit`` classes of ``name`` with id > ``after`` (ids, names, provenance; ascending id) with no
        vector in this space. ``after``: the last id of the previous batch, so that a pass over a set reads each
        class once (from the start every batch would re-read every class encoded before it)."""
        q = (
            "SELECT c.id, c.name, c.provenance FROM classes c WHERE c.label_set = ? AND c.id > ? AND NOT EXISTS "
            "(SELECT 1 FROM vectors v WHERE v.label_set = c.label_set AND v.class_id = c.id AND v.space = ?) "
            "ORDER BY c.id LIMIT ?"
        )
        with self.read() as db:
            rows = db.execute(self._sql(q), (name, after, self.space, limit)).fetchall()
        return [int(r[0]) for r in rows], [str(r[1]) for r in rows], [str(r[2]) for r in rows]

    def missing_counts(self) -> dict[str, int]:
        """Per label set, how many classes have no vector in this space (sets with none are left out)."""
        q = (
            "SELECT c.label_set, COUNT(*) FROM classes c WHERE NOT EXISTS (SELECT 1 FROM vectors v "
            "WHERE v.label_set = c.label_set AND v.class_id = c.id AND v.space = ?) GROUP BY c.label_set"
        )
        with self.read() as db:
            return {str(r[0]): int(r[1]) for r in db.execute(self._sql(q), (self.space,)).fetchall()}

    def spaces(self) -> dict[str, int]:
        """Every space with stored vectors -> how many vectors it holds."""
        with self.read() as db:
            rows = db.execute(self._sql("SELECT space, COUNT(*) FROM vectors GROUP BY space ORDER BY space"))
            return {str(r[0]): int(r[1]) for r in rows.fetchall()}

    # ----------------------------------------------------------------- writes (inside transaction())
    def create_set(
        self,
        db: Tx,
        name: str,
        names: Sequence[str],
        vectors: np.ndarray,
        provenance: str | Sequence[str],
        ids: Sequence[int] | None = None,
        index_kind: str | None = None,
    ) -> int:
        """A new set with its classes (``index_kind``: how it is searched, None: the default); its version."""
        if self._lock_set(db, name):
            raise LabelSetExists(f"label set {name!r} already exists")
        self._insert_set(db, name, index_kind)
        version = self._tick(db)
        db.execute(self._sql("UPDATE label_sets SET version = ? WHERE name = ?"), (version, name))
        self._insert(db, name, names, vectors, provenance, ids)
        self.notify(db, name, version)
        return version

    def _insert_set(self, db: Tx, name: str, index_kind: str | None = None) -> None:
        q = "INSERT INTO label_sets (name, version, next_id, created_at, index_kind) VALUES (?, 0, 0, ?, ?)"
        db.execute(self._sql(q), (name, now(), index_kind))

    def add_classes(
        self,
        db: Tx,
        name: str,
        names: Sequence[str],
        vectors: np.ndarray,
        provenance: str | Sequence[str],
        *,
        text_vectors: Sequence[np.ndarray | None] | None = None,
        examples: Sequence[Sequence[ExampleRow]] | None = None,
    ) -> tuple[int, list[int]]:
        """Append classes (with their ``examples``, one list per name); returns (version, new ids).

        ``text_vectors``: per name, the name's own vector where ``vectors`` mixes in examples.
        Duplicates -> 409.
        """
        self._require(db, name)
        existing = self.existing_names(db, name, names)
        if existing:
            raise DuplicateClass(f"label set {name!r} already has {sorted(existing)[:10]}")
        version = self._tick(db)
        db.execute(self._sql("UPDATE label_sets SET version = ? WHERE name = ?"), (version, name))
        ids = self._insert(db, name, names, vectors, provenance, None, text_vectors)
        for class_id, rows in zip(ids, examples or [], strict=False):
            self._insert_examples(db, name, class_id, rows, 0)
        self.notify(db, name, version)
        return version, ids

    def existing_names(self, db: Tx, name: str, names: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(names), 500):
            chunk = list(names[start : start + 500])
            marks = ",".join("?" * len(chunk))
            q = f"SELECT name FROM classes WHERE label_set = ? AND name IN ({marks})"
            found |= {r[0] for r in db.execute(self._sql(q), (name, *chunk)).fetchall()}
        return found

    def remove_class(self, db: Tx, name: str, class_id: int | None, class_name: str | None) -> tuple[int, int, str]:
        """Delete one class by id or name; returns (version, id, name)."""
        self._require(db, name)
        by, key = ("id", class_id) if class_id is not None else ("name", class_name)
        row = db.execute(
            self._sql(f"SELECT id, name FROM classes WHERE label_set = ? AND {by} = ?"), (name, key)
        ).fetchone()
        if row is None:
            what = f"id {class_id}" if class_id is not None else f"name {class_name!r}"
            raise UnknownClass(f"label set {name!r} has no class with {what}")
        db.execute(self._sql("DELETE FROM vectors WHERE label_set = ? AND class_id = ?"), (name, row[0]))
        db.execute(self._sql("DELETE FROM classes WHERE label_set = ? AND id = ?"), (name, row[0]))
        db.execute(self._sql("DELETE FROM examples WHERE label_set = ? AND class_id = ?"), (name, row[0]))
        db.execute(self._sql("DELETE FROM text_vectors WHERE label_set = ? AND class_id = ?"), (name, row[0]))
        version = self._tick(db)
        db.execute(self._sql("UPDATE label_sets SET version = ? WHERE name = ?"), (version, name))
        self.notify(db, name, version)
        return version, int(row[0]), str(row[1])

    def delete_set(self, db: Tx, name: str) -> int:
        """Delete a set and its classes; returns the clock value of the deletion."""
        self._require(db, name)
        db.execute(self._sql("DELETE FROM vectors WHERE label_set = ?"), (name,))
        db.execute(self._sql("DELETE FROM classes WHERE label_set = ?"), (name,))
        db.execute(self._sql("DELETE FROM examples WHERE label_set = ?"), (name,))
        db.execute(self._sql("DELETE FROM text_vectors WHERE label_set = ?"), (name,))
        db.execute(self._sql("DELETE FROM label_sets WHERE name = ?"), (name,))
        version = self._tick(db)
        self.notify(db, name, version)
        return version

    def put_vectors(
        self, db: Tx, name: str, ids: Sequence[int], vectors: np.ndarray, text: dict[int, np.ndarray] | None = None
    ) -> int:
        """Store this space's vectors [N, D] of existing classes (those removed meanwhile and those that
        have one already are left alone); the set's version stays (its classes did not change).
        ``text``: class id -> the name's own vector, for classes made of a name and examples.
        Returns how many were stored."""
        vecs = np.ascontiguousarray(vectors, dtype="<f4")
        if vecs.shape != (len(ids), self.embed_dim):
            raise ValueError(f"vectors have shape {vecs.shape}, expected ({len(ids)}, {self.embed_dim})")
        have = set(self._vector_ids(db, name, ids))
        alive = {int(r[0]) for r in self._class_ids(db, name, ids)}
        rows = [
            (name, int(i), self.space, self._blob(v))
            for i, v in zip(ids, vecs, strict=True)
            if int(i) in alive and int(i) not in have
        ]
        self._insert_vectors(db, rows)
        stored = {r[1] for r in rows}
        texts = [(name, i, self.space, self._text_blob(v)) for i, v in (text or {}).items() if i in stored]
        self._insert_vectors(db, texts, table="text_vectors")
        version = db.execute(self._sql("SELECT version FROM label_sets WHERE name = ?"), (name,)).fetchone()
        if rows and version is not None:
            self.notify(db, name, int(version[0]))  # replicas of this space may be waiting for them
        return len(rows)

    def retag(self, db: Tx, old: str, new: str) -> int:
        """Move the vectors of space ``old`` to ``new`` (where ``new`` has none for that class)."""
        db.execute(
            self._sql(
                "INSERT INTO vectors (label_set, class_id, space, vector) SELECT v.label_set, v.class_id, ?, v.vector "
                "FROM vectors v WHERE v.space = ? AND NOT EXISTS (SELECT 1 FROM vectors w WHERE "
                "w.label_set = v.label_set AND w.class_id = v.class_id AND w.space = ?)"
            ),
            (new, old, new),
        )
        n = db.execute(self._sql("SELECT COUNT(*) FROM vectors WHERE space = ?"), (old,)).fetchone()[0]
        db.execute(self._sql("DELETE FROM vectors WHERE space = ?"), (old,))
        return int(n)

    def class_ids(self, db: Tx, name: str) -> dict[str, int]:
        """Class name -> id of every class of ``name`` (empty for a set that does not exist)."""
        rows = db.execute(self._sql("SELECT name, id FROM classes WHERE label_set = ?"), (name,)).fetchall()
        return {str(r[0]): int(r[1]) for r in rows}

    def drop_space(self, db: Tx, space: str) -> int:
        """Delete every vector of ``space`` (never the store's own); returns how many."""
        if space == self.space:
            raise ValueError("the space this service reads cannot be removed")
        n = db.execute(self._sql("SELECT COUNT(*) FROM vectors WHERE space = ?"), (space,)).fetchone()[0]
        db.execute(self._sql("DELETE FROM vectors WHERE space = ?"), (space,))
        return int(n)

    def _vector_ids(self, db: Tx, name: str, ids: Sequence[int]) -> list[int]:
        out: list[int] = []
        for start in range(0, len(ids), 500):
            chunk = [int(i) for i in ids[start : start + 500]]
            marks = ",".join("?" * len(chunk))
            q = f"SELECT class_id FROM vectors WHERE label_set = ? AND space = ? AND class_id IN ({marks})"
            out += [int(r[0]) for r in db.execute(self._sql(q), (name, self.space, *chunk)).fetchall()]
        return out

    def _class_ids(self, db: Tx, name: str, ids: Sequence[int]) -> list[Any]:
        out: list[Any] = []
        for start in range(0, len(ids), 500):
            chunk = [int(i) for i in ids[start : start + 500]]
            marks = ",".join("?" * len(chunk))
            out += db.execute(
                self._sql(f"SELECT id FROM classes WHERE label_set = ? AND id IN ({marks})"), (name, *chunk)
            ).fetchall()
        return out

    def lock_version(self, db: Tx, name: str) -> int:
        """Lock the set's row and return its version (what this transaction's change builds on)."""
        self._require(db, name)
        return int(db.execute(self._sql("SELECT version FROM label_sets WHERE name = ?"), (name,)).fetchone()[0])

    def _require(self, db: Tx, name: str) -> None:
        if not self._lock_set(db, name):
            raise UnknownLabelSet(f"label set {name!r} does not exist")

    def _insert(
        self,
        db: Tx,
        name: str,
        names: Sequence[str],
        vectors: np.ndarray,
        provenance: str | Sequence[str],
        ids: Sequence[int] | None,
        text_vectors: Sequence[np.ndarray | None] | None = None,
    ) -> list[int]:
        prov = [provenance] * len(names) if isinstance(provenance, str) else list(provenance)
        texts = list(text_vectors) if text_vectors is not None else [None] * len(names)
        vecs = np.ascontiguousarray(vectors, dtype="<f4")  # [N, D]
        if vecs.shape != (len(names), self.embed_dim):
            raise ValueError(f"vectors have shape {vecs.shape}, expected ({len(names)}, {self.embed_dim})")
        (next_id,) = db.execute(self._sql("SELECT next_id FROM label_sets WHERE name = ?"), (name,)).fetchone()
        new_ids = list(ids) if ids is not None else list(range(next_id, next_id + len(names)))
        stamp = now()
        rows = [(name, i, n, prov[k], stamp) for k, (i, n) in enumerate(zip(new_ids, names, strict=True))]
        self._insert_classes(db, rows)
        self._insert_vectors(db, [(name, i, self.space, self._blob(vecs[k])) for k, i in enumerate(new_ids)])
        texts_rows = [
            (name, i, self.space, self._text_blob(t)) for i, t in zip(new_ids, texts, strict=True) if t is not None
        ]
        self._insert_vectors(db, texts_rows, "text_vectors")
        top = max([next_id - 1, *new_ids]) + 1
        db.execute(self._sql("UPDATE label_sets SET next_id = ? WHERE name = ?"), (top, name))
        return new_ids

    def _insert_classes(self, db: Tx, rows: list[tuple[Any, ...]]) -> None:
        sql = "INSERT INTO classes (label_set, id, name, provenance, created_at) VALUES (?, ?, ?, ?, ?)"
        with _cursor(db) as cur:
            cur.executemany(self._sql(sql), rows)

    def _insert_vectors(self, db: Tx, rows: list[tuple[Any, ...]], table: str = "vectors") -> None:
        sql = f"INSERT INTO {table} (label_set, class_id, space, vector) VALUES (?, ?, ?, ?)"
        with _cursor(db) as cur:
            cur.executemany(self._sql(sql), rows)

    def _text_blob(self, vec: np.ndarray | None) -> Any:
        return None if vec is None else self._blob(np.ascontiguousarray(vec, dtype="<f4").reshape(self.embed_dim))

    # ----------------------------------------------------------------- examples
    def replace_class(
        self,
        db: Tx,
        name: str,
        class_id: int,
        vector: np.ndarray,
        provenance: str,
        text_vector: np.ndarray | None,
        examples: Sequence[ExampleRow],
    ) -> tuple[int, int]:
        """Give a class a new vector (examples added): a new id, same name, its examples moved to it
        plus ``examples``; returns (version, new id). Unknown class -> 404."""
        old = self.class_row(db, name, class_id)
        for table in ("vectors", "text_vectors"):  # every space's: the new row is of this space only
            db.execute(self._sql(f"DELETE FROM {table} WHERE label_set = ? AND class_id = ?"), (name, class_id))
        db.execute(self._sql("DELETE FROM classes WHERE label_set = ? AND id = ?"), (name, class_id))
        version = self._tick(db)
        db.execute(self._sql("UPDATE label_sets SET version = ? WHERE name = ?"), (version, name))
        (new_id,) = self._insert(db, name, [old.name], vector[None], provenance, None, [text_vector])
        q = "UPDATE examples SET class_id = ? WHERE label_set = ? AND class_id = ?"
        db.execute(self._sql(q), (new_id, name, class_id))
        row = db.execute(
            self._sql("SELECT COALESCE(MAX(seq), -1) FROM examples WHERE label_set = ? AND class_id = ?"),
            (name, new_id),
        ).fetchone()
        self._insert_examples(db, name, new_id, examples, int(row[0]) + 1)
        self.notify(db, name, version)
        return version, new_id

    def class_row(self, db: Tx, name: str, class_id: int) -> ClassRow:
        """One class with its vector and its name's own vector in this space (None where there is none)."""
        q = "SELECT id, name, provenance FROM classes WHERE label_set = ? AND id = ?"
        row = db.execute(self._sql(q), (name, class_id)).fetchone()
        if row is None:
            raise UnknownClass(f"label set {name!r} has no class with id {class_id}")
        found = []
        for table in ("vectors", "text_vectors"):
            q = f"SELECT vector FROM {table} WHERE label_set = ? AND class_id = ? AND space = ?"
            v = db.execute(self._sql(q), (name, class_id, self.space)).fetchone()
            found.append(None if v is None else np.frombuffer(bytes(v[0]), dtype="<f4").copy())
        return ClassRow(int(row[0]), str(row[1]), str(row[2]), found[0], found[1])

    def example_digests(self, db: Tx, name: str, class_id: int) -> list[str]:
        q = "SELECT digest FROM examples WHERE label_set = ? AND class_id = ? ORDER BY seq"
        return [str(r[0]) for r in db.execute(self._sql(q), (name, class_id)).fetchall()]

    def example_embeddings(self, db: Tx, name: str, class_id: int) -> np.ndarray:
        """[K, D] the embeddings in this space of a class's examples, in the order they were added
        (examples embedded in another space are left out: they need re-embedding)."""
        q = "SELECT embedding FROM examples WHERE label_set = ? AND class_id = ? AND space = ? ORDER BY seq"
        rows = db.execute(self._sql(q), (name, class_id, self.space)).fetchall()
        out = np.zeros((len(rows), self.embed_dim), dtype=np.float32)
        for i, r in enumerate(rows):
            out[i] = np.frombuffer(bytes(r[0]), dtype="<f4")
        return out

    def examples(self, name: str, class_id: int) -> list[ExampleRow]:
        """A class's examples (images and embeddings) in the order they were added (one read)."""
        q = (
            "SELECT digest, media_type, data, embedding, space FROM examples WHERE label_set = ? AND class_id = ? "
            "ORDER BY seq"
        )
        with self.read() as db:
            rows = db.execute(self._sql(q), (name, class_id)).fetchall()
        return [
            ExampleRow(str(r[0]), str(r[1]), bytes(r[2]), np.frombuffer(bytes(r[3]), dtype="<f4"), str(r[4]))
            for r in rows
        ]

    def put_example_embeddings(self, db: Tx, name: str, class_id: int, embeddings: dict[str, np.ndarray]) -> int:
        """Store this space's embeddings of a class's kept examples (digest -> [D]), re-embedded after a
        model change, in place of the other space's (an example keeps one embedding: the last space's).
        Examples gone meanwhile are left out; returns how many were stored."""
        q = "UPDATE examples SET space = ?, embedding = ? WHERE label_set = ? AND class_id = ? AND digest = ?"
        done = 0
        for digest, vec in embeddings.items():
            cur = db.execute(self._sql(q), (self.space, self._text_blob(vec), name, class_id, digest))
            done += max(int(cur.rowcount), 0)
        return done

    def example_counts(self, name: str) -> dict[int, int]:
        """Class id -> number of stored examples (classes without examples are absent)."""
        q = "SELECT class_id, COUNT(*) FROM examples WHERE label_set = ? GROUP BY class_id"
        with self.read() as db:
            return {int(r[0]): int(r[1]) for r in db.execute(self._sql(q), (name,)).fetchall()}

    def _insert_examples(self, db: Tx, name: str, class_id: int, examples: Sequence[ExampleRow], seq: int) -> None:
        sql = (
            "INSERT INTO examples (label_set, class_id, seq, digest, media_type, data, space, embedding, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
        )
        stamp = now()
        rows = [
            (name, class_id, seq + k, e.digest, e.media_type, e.data, self.space, self._text_blob(e.embedding), stamp)
            for k, e in enumerate(examples)
        ]
        if rows:
            with _cursor(db) as cur:
                cur.executemany(self._sql(sql), rows)


class _cursor:
    """``db.cursor()`` closed on exit (sqlite3 cursors are not context managers)."""

    def __init__(self, db: Tx) -> None:
        self.cur = db.cursor()

    def __enter__(self) -> Any:
        return self.cur

    def __exit__(self, *exc: object) -> None:
        self.cur.close()
