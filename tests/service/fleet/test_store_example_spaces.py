"""Re-embedded examples written back (SQLite and PostgreSQL): an example keeps one embedding, tagged with
the space that made it; a store of another space replaces it in place, and reads see the new one."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from service.store import Store
from service.stores.base import ExampleRow
from tests.service.fleet.conftest import EMBED_DIM


def vecs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, EMBED_DIM)).astype(np.float32)  # [n, D]


def example(i: int) -> ExampleRow:
    return ExampleRow(f"{i:064x}", "image/png", bytes([i % 256]) * (50 + i), vecs(1, 100 + i)[0])


def test_put_example_embeddings_replaces_another_spaces_embedding(make_store: Callable[..., Store]) -> None:
    old, new = make_store(), make_store()
    new.space = "another space"  # a replica serving a bundle of another embedding space
    with old.transaction() as db:
        old.create_set(db, "s", ["named"], vecs(1), "runtime")
    with old.transaction() as db:
        _, (cid,) = old.add_classes(db, "s", ["pics"], vecs(1, 1), "examples", examples=[[example(1), example(2)]])
    assert [e.space for e in old.examples("s", cid)] == ["test", "test"]
    again = vecs(1, 7)[0]
    with new.transaction() as db:
        assert new.put_example_embeddings(db, "s", cid, {example(2).digest: again, "f" * 64: again}) == 1
    rows = new.examples("s", cid)
    assert [e.space for e in rows] == ["test", "another space"] and [e.digest for e in rows] == [
        example(1).digest,
        example(2).digest,
    ]
    np.testing.assert_array_equal(rows[1].embedding, again)
    np.testing.assert_array_equal(rows[0].embedding, example(1).embedding)
    assert rows[1].data == example(2).data  # the image itself is untouched
    with new.read() as db:
        np.testing.assert_array_equal(new.example_embeddings(db, "s", cid), again[None])
    with old.read() as db:  # the old space now lacks it: its add_examples re-embeds (and writes back) it
        np.testing.assert_array_equal(old.example_embeddings(db, "s", cid), example(1).embedding[None])
    with new.transaction() as db:  # a class gone meanwhile: nothing written
        assert new.put_example_embeddings(db, "s", cid + 99, {example(1).digest: again}) == 0
