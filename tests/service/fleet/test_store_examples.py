"""Examples in the store (SQLite and PostgreSQL): kept with their class, moved when its vector changes,
gone with it, never half-added; and databases written before examples existed open unchanged."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from service.errors import UnknownClass
from service.store import DB_FILE, SqliteStore, Store
from service.stores.base import ExampleRow
from tests.service.fleet.conftest import EMBED_DIM


def vecs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, EMBED_DIM)).astype(np.float32)  # [n, D]


def example(i: int) -> ExampleRow:
    return ExampleRow(f"{i:064x}", "image/png", bytes([i % 256]) * (100 + i), vecs(1, 100 + i)[0])


def test_classes_with_examples_round_trip(make_store: Callable[..., Store]) -> None:
    store = make_store()
    with store.transaction() as db:
        store.create_set(db, "s", ["named"], vecs(1), "runtime")
    text = vecs(1, 1)[0]
    with store.transaction() as db:
        version, ids = store.add_classes(
            db, "s", ["both", "pictures"], vecs(2, 2), ["runtime+examples", "examples"],
            text_vectors=[text, None], examples=[[example(1), example(2)], [example(3)]],
        )  # fmt: skip
    rows = store.load("s")
    assert rows.version == version and rows.names == ["named", "both", "pictures"]
    assert rows.provenance == ["runtime", "runtime+examples", "examples"]
    got = store.examples("s", ids[0])
    assert [e.digest for e in got] == [example(1).digest, example(2).digest]
    assert got[1].data == example(2).data and got[1].media_type == "image/png"
    np.testing.assert_array_equal(got[0].embedding, example(1).embedding)
    assert store.example_counts("s") == {ids[0]: 2, ids[1]: 1}
    with store.read() as db:
        np.testing.assert_array_equal(store.example_embeddings(db, "s", ids[1]), example(3).embedding[None])
        both = store.class_row(db, "s", ids[0])
        assert both.text_vector is not None and store.class_row(db, "s", ids[1]).text_vector is None
        np.testing.assert_array_equal(both.text_vector, text)
        assert store.class_row(db, "s", 0).text_vector is None
        with pytest.raises(UnknownClass):
            store.class_row(db, "s", 99)


def test_replacing_a_class_moves_its_examples_to_a_new_id(make_store: Callable[..., Store]) -> None:
    store, replica = make_store(), make_store()
    with store.transaction() as db:
        store.create_set(db, "s", ["a", "b"], vecs(2), "runtime")
    with store.transaction() as db:
        _, (cid,) = store.add_classes(db, "s", ["c"], vecs(1, 1), "examples", examples=[[example(1)]])
    known = replica.load("s")
    new_vector = vecs(1, 5)[0]
    with store.transaction() as db:
        version, new_id = store.replace_class(db, "s", cid, new_vector, "examples", None, [example(2), example(3)])
    assert new_id > cid and version > known.version
    assert [e.digest for e in store.examples("s", new_id)] == [example(i).digest for i in (1, 2, 3)]
    assert store.examples("s", cid) == []
    delta = replica.delta("s", known.ids)  # a replica learns the change from ids alone
    assert cid not in delta.current_ids and delta.added.ids.tolist() == [new_id]
    assert delta.added.names == ["c"]
    np.testing.assert_array_equal(delta.added.vectors[0], new_vector)
    with store.transaction() as db, pytest.raises(UnknownClass):
        store.replace_class(db, "s", cid, new_vector, "examples", None, [])


def test_examples_go_with_their_class_and_their_set(make_store: Callable[..., Store]) -> None:
    store = make_store()
    with store.transaction() as db:
        store.create_set(db, "s", ["a"], vecs(1), "runtime")
        _, ids = store.add_classes(db, "s", ["b", "c"], vecs(2), "examples", examples=[[example(1)], [example(2)]])
    with store.transaction() as db:
        store.remove_class(db, "s", ids[0], None)
    assert store.example_counts("s") == {ids[1]: 1}
    with store.transaction() as db:
        store.delete_set(db, "s")
    with store.transaction() as db:
        store.create_set(db, "s", ["a", "b", "c"], vecs(3), "runtime")  # same ids again: no stale examples
    assert store.example_counts("s") == {}


def test_a_failed_write_leaves_no_class_and_no_example(make_store: Callable[..., Store]) -> None:
    store = make_store()
    with store.transaction() as db:
        store.create_set(db, "s", ["a"], vecs(1), "runtime")
    before = store.load("s")
    twice = [example(1), example(1)]  # the same digest twice in one class: the database refuses it
    with pytest.raises(Exception, match="(?i)unique|duplicate"), store.transaction() as db:
        store.add_classes(db, "s", ["b"], vecs(1), "examples", examples=[twice])
    after = store.load("s")
    assert after.version == before.version and after.names == ["a"]
    assert store.example_counts("s") == {}


# The schema as release c1db7be (before examples and spaces) wrote it: a database made then must open
# with everything kept.
OLD_SQLITE = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE label_sets (
    name TEXT PRIMARY KEY, version INTEGER NOT NULL, next_id INTEGER NOT NULL, created_at TEXT NOT NULL,
    index_kind TEXT);
CREATE TABLE classes (
    label_set TEXT NOT NULL REFERENCES label_sets(name) ON DELETE CASCADE,
    id INTEGER NOT NULL, name TEXT NOT NULL, provenance TEXT NOT NULL, vector BLOB NOT NULL,
    created_at TEXT NOT NULL, PRIMARY KEY (label_set, id), UNIQUE (label_set, name));
"""
OLD_POSTGRES = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE clock (id SMALLINT PRIMARY KEY CHECK (id = 1), value BIGINT NOT NULL);
INSERT INTO clock (id, value) VALUES (1, 0);
CREATE TABLE label_sets (
    name TEXT PRIMARY KEY, version BIGINT NOT NULL, next_id BIGINT NOT NULL, created_at TEXT NOT NULL,
    index_kind TEXT);
CREATE TABLE classes (
    label_set TEXT NOT NULL REFERENCES label_sets(name) ON DELETE CASCADE,
    id BIGINT NOT NULL, name TEXT NOT NULL, provenance TEXT NOT NULL, vector BYTEA NOT NULL,
    created_at TEXT NOT NULL, PRIMARY KEY (label_set, id), UNIQUE (label_set, name));
"""


def test_a_database_written_before_examples_opens_with_everything_kept(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    v = vecs(2, 9)
    if backend == "sqlite":
        old = sqlite3.connect(tmp_path / DB_FILE)
        old.executescript(OLD_SQLITE)
        old.execute("INSERT INTO meta VALUES ('clock', '3')")
        old.execute("INSERT INTO label_sets VALUES ('pets', 3, 2, '2026-12-01T00:00:00+00:00', NULL)")
        old.executemany(
            "INSERT INTO classes VALUES ('pets', ?, ?, 'runtime', ?, '2026-12-01T00:00:00+00:00')",
            [(0, "cat", v[0].tobytes()), (1, "dog", v[1].tobytes())],
        )
        old.commit()
        old.close()
        open_store: Callable[[], Store] = lambda: SqliteStore(tmp_path, EMBED_DIM, "test")  # noqa: E731
    else:
        import psycopg

        from service.stores.postgres import PostgresStore

        url = request.getfixturevalue("pg_url")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(OLD_POSTGRES)
            conn.execute("UPDATE clock SET value = 3")
            conn.execute("INSERT INTO label_sets VALUES ('pets', 3, 2, '2026-12-01T00:00:00+00:00', NULL)")
            for i, n in enumerate(["cat", "dog"]):
                conn.execute(
                    "INSERT INTO classes VALUES ('pets', %s, %s, 'runtime', %s, '2026-12-01T00:00:00+00:00')",
                    (i, n, v[i].tobytes()),
                )
        open_store = lambda: PostgresStore(url, EMBED_DIM, "test")  # noqa: E731
    _check_migrated(open_store, v)


def _check_migrated(open_store: Callable[[], Store], v: np.ndarray) -> None:
    store = open_store()
    try:
        with store.read() as db:
            assert store.class_ids(db, "pets") == {"cat": 0, "dog": 1}
        assert sum(store.spaces().values()) == 2  # the old vectors, kept (tagged as the old bundle's)
        assert store.version("pets") == 3 and store.example_counts("pets") == {}
        with store.transaction() as db:
            assert store.class_row(db, "pets", 1).text_vector is None
            version, new_id = store.replace_class(db, "pets", 1, v[0], "runtime+examples", v[1], [example(1)])
        assert version == 4 and new_id == 2
        rows = store.load("pets")
        assert rows.ids.tolist() == [2] and rows.names == ["dog"] and rows.missing == (0,)
        np.testing.assert_array_equal(rows.vectors[0], v[0])
    finally:
        store.close()
    again = open_store()  # a second start migrates nothing twice
    try:
        with again.read() as db:
            assert again.class_ids(db, "pets") == {"cat": 0, "dog": 2}
            np.testing.assert_array_equal(again.class_row(db, "pets", 2).text_vector, v[1])
        assert len(again.examples("pets", 2)) == 1
    finally:
        again.close()
