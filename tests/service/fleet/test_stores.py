"""One store suite, run against SQLite and a real PostgreSQL: versions, deltas, concurrent writers."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from service.errors import DuplicateClass, LabelSetExists, UnknownClass, UnknownLabelSet
from service.store import Store
from tests.service.fleet.conftest import EMBED_DIM


def vecs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, EMBED_DIM)).astype(np.float32)  # [n, D]


def test_versions_only_increase_across_every_kind_of_write(make_store: Callable[..., Store]) -> None:
    store = make_store()
    seen = []
    with store.transaction() as db:
        seen.append(store.create_set(db, "pets", ["cat", "dog"], vecs(2), "runtime"))
    with store.transaction() as db:
        seen.append(store.add_classes(db, "pets", ["hamster"], vecs(1, 1), "runtime")[0])
    with store.transaction() as db:
        version, removed, name = store.remove_class(db, "pets", None, "dog")
        seen.append(version)
    assert (removed, name) == (1, "dog")
    with store.transaction() as db:
        seen.append(store.delete_set(db, "pets"))
    assert store.version("pets") is None
    with store.transaction() as db:
        seen.append(store.create_set(db, "pets", ["cat"], vecs(1), "runtime"))
    assert seen == sorted(seen) and len(set(seen)) == len(seen), seen
    rows = store.load("pets")
    assert rows.version == seen[-1] and rows.names == ["cat"] and rows.ids.tolist() == [0]


def test_load_returns_exactly_what_was_written(make_store: Callable[..., Store]) -> None:
    store = make_store()
    v = vecs(3, 7)
    with store.transaction() as db:
        store.create_set(db, "s", ["a", "b", "c"], v, ["bundle", "bundle", "runtime"], ids=[5, 2, 9])
    rows = store.load("s")
    assert rows.ids.tolist() == [2, 5, 9] and rows.names == ["b", "a", "c"]
    assert rows.provenance == ["bundle", "bundle", "runtime"]
    np.testing.assert_array_equal(rows.vectors, v[[1, 0, 2]])  # bytes round trip: exact
    with store.transaction() as db:
        _, ids = store.add_classes(db, "s", ["d"], vecs(1), "runtime")
    assert ids == [10]  # next id continues after the largest given id


def test_delta_reads_only_the_rows_a_replica_lacks(make_store: Callable[..., Store]) -> None:
    store = make_store()
    with store.transaction() as db:
        store.create_set(db, "s", ["a", "b", "c"], vecs(3), "runtime")
    known = store.load("s").ids
    with store.transaction() as db:
        store.add_classes(db, "s", ["d", "e"], vecs(2, 3), "runtime")
    with store.transaction() as db:
        version, _, _ = store.remove_class(db, "s", 1, None)
    delta = store.delta("s", known)
    assert delta.version == version
    assert delta.current_ids.tolist() == [0, 2, 3, 4]
    assert delta.added.ids.tolist() == [3, 4] and delta.added.names == ["d", "e"]
    with pytest.raises(UnknownLabelSet):
        store.delta("nope", known)


def test_failed_writes_change_nothing(make_store: Callable[..., Store]) -> None:
    store = make_store()
    with store.transaction() as db:
        version = store.create_set(db, "s", ["a"], vecs(1), "runtime")
    attempts = [
        (LabelSetExists, lambda db: store.create_set(db, "s", ["x"], vecs(1), "runtime")),
        (DuplicateClass, lambda db: store.add_classes(db, "s", ["a"], vecs(1), "runtime")),
        (UnknownClass, lambda db: store.remove_class(db, "s", 99, None)),
        (UnknownLabelSet, lambda db: store.add_classes(db, "nope", ["x"], vecs(1), "runtime")),
        (UnknownLabelSet, lambda db: store.delete_set(db, "nope")),
    ]
    for error, write in attempts:
        with pytest.raises(error), store.transaction() as db:
            write(db)
    assert store.versions() == {"s": version}
    assert store.load("s").names == ["a"]
    with store.transaction() as db:  # the clock did not move for the failed writes either
        assert store.add_classes(db, "s", ["b"], vecs(1), "runtime")[0] == version + 1


def test_concurrent_writers_get_unique_increasing_versions(make_store: Callable[..., Store]) -> None:
    """Four writers (separate connections, like replicas) on one shared set and one own set each."""
    setup = make_store()
    with setup.transaction() as db:
        setup.create_set(db, "shared", ["seed"], vecs(1), "runtime")
    writers = [make_store() for _ in range(4)]
    results: list[list[tuple[str, int]]] = [[] for _ in writers]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(writers))

    def work(k: int) -> None:
        store = writers[k]
        try:
            barrier.wait(timeout=30)
            with store.transaction() as db:
                results[k].append((f"own{k}", store.create_set(db, f"own{k}", ["x"], vecs(1), "runtime")))
            for i in range(10):
                with store.transaction() as db:
                    version, _ = store.add_classes(db, "shared", [f"w{k}-{i}"], vecs(1, i), "runtime")
                results[k].append(("shared", version))
        except BaseException as e:  # noqa: BLE001 - re-raised below in the test thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(writers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    versions = [v for per in results for _, v in per]
    assert len(versions) == 44 and len(set(versions)) == 44  # no duplicates
    for per in results:  # each writer saw its own versions strictly increase
        assert [v for _, v in per] == sorted(v for _, v in per)
    final = setup.load("shared")
    assert len(final.names) == 41 and final.version == max(v for per in results for s, v in per if s == "shared")


def test_same_name_created_at_once_succeeds_exactly_once(make_store: Callable[..., Store]) -> None:
    stores = [make_store() for _ in range(4)]
    outcomes: list[str] = []
    barrier = threading.Barrier(len(stores))

    def create(store: Store, k: int) -> None:
        barrier.wait(timeout=30)
        try:
            with store.transaction() as db:
                store.create_set(db, "race", [f"by{k}"], vecs(1, k), "runtime")
            outcomes.append("created")
        except LabelSetExists:
            outcomes.append("exists")

    threads = [threading.Thread(target=create, args=(s, k)) for k, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(outcomes) == ["created", "exists", "exists", "exists"]
    assert len(stores[0].load("race").names) == 1


def test_a_sql_ascii_database_still_returns_text(postgres: Any) -> None:
    """A database made without a UTF-8 locale (initdb in a bare container): names and metadata stay str."""
    from service.stores.postgres import PostgresStore

    postgres.sql("CREATE DATABASE ascii_db ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    store = PostgresStore(postgres.url.rsplit("/", 1)[0] + "/ascii_db", EMBED_DIM, "test")
    try:
        with store.transaction() as db:
            store.create_set(db, "tiere", ["katze", "hund", "k\u00e4fer"], vecs(3), "runtime")
            store.set_meta(db, "bundle_fingerprint", "abc")
        rows = store.load("tiere")
        assert rows.names == ["katze", "hund", "k\u00e4fer"] and store.meta("bundle_fingerprint") == "abc"
        assert store.version("tiere") == rows.version
    finally:
        store.close()


# The schema of the release before spaces (35d5d75), verbatim: one vector per class, in `classes`.
_OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS label_sets (
    name TEXT PRIMARY KEY, version BIGINT NOT NULL, next_id BIGINT NOT NULL, created_at TEXT NOT NULL,
    index_kind TEXT);
CREATE TABLE IF NOT EXISTS classes (
    label_set TEXT NOT NULL REFERENCES label_sets(name) ON DELETE CASCADE,
    id BIGINT NOT NULL, name TEXT NOT NULL, provenance TEXT NOT NULL, vector BYTEA NOT NULL,
    created_at TEXT NOT NULL, PRIMARY KEY (label_set, id), UNIQUE (label_set, name));
"""


def _write_old_release_database(backend: str, where: Any, vectors: np.ndarray) -> None:
    """What the previous release left behind: two sets, a removed class (a gap in ids), its fingerprint."""
    rows = [("animals", i, n, "runtime", vectors[k].astype("<f4").tobytes(), "2026-12-01T00:00:00+00:00")
            for k, (i, n) in enumerate([(0, "cat"), (2, "dog"), (3, "k\u00e4fer")])]  # fmt: skip
    rows.append(("tools", 0, "saw", "bundle", vectors[3].astype("<f4").tobytes(), "2026-12-01T00:00:00+00:00"))
    sets = [("animals", 7, 4, "2026-12-01T00:00:00+00:00", None), ("tools", 2, 1, "2026-12-01T00:00:00+00:00", None)]
    meta = [("bundle_fingerprint", "abc"), ("store_id", "f" * 32), ("clock", "7")]
    if backend == "sqlite":
        import sqlite3

        db = sqlite3.connect(where / "labelsets.sqlite3")
        db.executescript(_OLD_SCHEMA.replace("BYTEA", "BLOB").replace("BIGINT", "INTEGER"))
        db.executemany("INSERT INTO meta VALUES (?, ?)", meta)
        db.executemany("INSERT INTO label_sets VALUES (?, ?, ?, ?, ?)", sets)
        db.executemany("INSERT INTO classes VALUES (?, ?, ?, ?, ?, ?)", rows)
        db.commit()
        db.close()
        return
    import psycopg

    with psycopg.connect(where, autocommit=True) as db:
        db.execute(_OLD_SCHEMA)
        db.execute("CREATE TABLE clock (id SMALLINT PRIMARY KEY CHECK (id = 1), value BIGINT NOT NULL)")
        db.execute("INSERT INTO clock VALUES (1, 7)")
        with db.cursor() as cur:
            cur.executemany("INSERT INTO meta VALUES (%s, %s)", meta[:2])
            cur.executemany("INSERT INTO label_sets VALUES (%s, %s, %s, %s, %s)", sets)
            cur.executemany("INSERT INTO classes VALUES (%s, %s, %s, %s, %s, %s)", rows)


def test_a_database_of_the_release_before_spaces_migrates_in_place_losing_nothing(
    backend: str, make_store: Callable[..., Store], request: pytest.FixtureRequest, tmp_path: Any
) -> None:
    """Every set, id, name, provenance, version and vector survives; the vectors wait under the old
    bundle's tag until a bundle claims them (the registry re-tags them for the bundle they were made with)."""
    vectors = vecs(4, seed=3)
    _write_old_release_database(
        backend, tmp_path if backend == "sqlite" else request.getfixturevalue("pg_url"), vectors
    )
    store = make_store()
    assert store.versions() == {"animals": 7, "tools": 2}
    assert store.meta("store_id") == "f" * 32 and store.spaces() == {"legacy:abc": 4}
    assert store.load("animals").missing == (0, 2, 3)  # not this space's yet: never served as if it were
    with store.transaction() as db:
        assert store.retag(db, "legacy:abc", "test") == 4
    animals, tools = store.load("animals"), store.load("tools")
    assert animals.names == ["cat", "dog", "k\u00e4fer"] and list(animals.ids) == [0, 2, 3] and not animals.missing
    assert animals.provenance == ["runtime"] * 3 and tools.provenance == ["bundle"]
    assert np.array_equal(animals.vectors, vectors[:3]) and np.array_equal(tools.vectors, vectors[3:])
    with store.transaction() as db:  # writes go on from there: ids after the old next_id, versions after the clock
        version, ids = store.add_classes(db, "animals", ["owl"], vecs(1), "runtime")
    assert ids == [4] and version == 8
    again = make_store()  # a second start (another worker) finds the migrated schema and changes nothing
    assert again.load("animals").names == ["cat", "dog", "k\u00e4fer", "owl"] and again.spaces() == {"test": 5}


def test_missing_reads_a_pass_over_a_set_in_batches_after_the_last_id(make_store: Callable[..., Store]) -> None:
    store = make_store()
    with store.transaction() as db:
        store.create_set(db, "s", [f"c{i}" for i in range(6)], vecs(6), "runtime")
    store.space = "another space"  # the same database read by a bundle of another space
    assert store.missing("s", 4) == ([0, 1, 2, 3], ["c0", "c1", "c2", "c3"], ["runtime"] * 4)
    assert store.missing("s", 4, after=3)[0] == [4, 5]
    with store.transaction() as db:
        assert store.put_vectors(db, "s", [4, 1], vecs(2, seed=1)) == 2
    assert store.missing("s", 10, after=2)[0] == [3, 5] and store.missing("s", 10)[0] == [0, 2, 3, 5]
    assert store.missing_counts() == {"s": 4}
