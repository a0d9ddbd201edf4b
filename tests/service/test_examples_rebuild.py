"""The migration's rebuild of example classes writes the re-embedded examples back, so a restart (or a
second rebuild) embeds nothing again; and near-duplicate examples are judged against the bundle's sample."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from models.prototypes import Gap, class_vector
from service.examples import near_duplicate_cosine, rebuilt_vector
from service.images import EncodedImage
from service.store import SqliteStore
from service.stores.base import ExampleRow

DIM = 8


def pixels_embedding(data: bytes) -> np.ndarray:
    """A deterministic stand-in for the image tower: a unit vector seeded by the bytes."""
    v = np.random.default_rng(int(hashlib.sha256(data).hexdigest()[:8], 16)).standard_normal(DIM)
    return (v / np.linalg.norm(v)).astype(np.float32)


class CountingTower:
    """The part of service.classifier.Classifier that rebuilt_vector uses; counts the images embedded."""

    def __init__(self) -> None:
        self.settings = SimpleNamespace(max_images_per_request=2, request_timeout_s=30.0)
        self.embedded = 0

    async def embed_images(self, images: list[EncodedImage], deadline: float) -> np.ndarray:
        self.embedded += len(images)
        return np.stack([pixels_embedding(im.data) for im in images])


def example(i: int) -> ExampleRow:
    data = bytes([i]) * (40 + i)
    return ExampleRow(hashlib.sha256(data).hexdigest(), "image/png", data, np.full(DIM, 0.1, np.float32))


def test_rebuild_writes_the_new_embeddings_back_and_a_restart_reuses_them(tmp_path: Path) -> None:
    old = SqliteStore(tmp_path, DIM, "old space")
    with old.transaction() as db:
        old.create_set(db, "s", ["named"], np.eye(DIM, dtype=np.float32)[:1], "runtime")
    with old.transaction() as db:
        _, (cid,) = old.add_classes(
            db, "s", ["pics"], np.eye(DIM, dtype=np.float32)[1:2], "examples", examples=[[example(i) for i in range(5)]]
        )
    texts = np.eye(DIM, dtype=np.float32)[:3]
    gap = Gap.between(texts, None)
    want = class_vector(None, np.stack([pixels_embedding(example(i).data) for i in range(5)]), gap)

    def rebuild(store: SqliteStore, tower: CountingTower) -> np.ndarray:
        registry: Any = SimpleNamespace(store=store)
        return asyncio.run(rebuilt_vector(tower, registry, gap, "s", cid, None))  # type: ignore[arg-type]

    new, tower = SqliteStore(tmp_path, DIM, "new space"), CountingTower()
    np.testing.assert_allclose(rebuild(new, tower), want, atol=1e-6)
    assert tower.embedded == 5  # every kept example, in chunks of max_images_per_request
    rows = new.examples("s", cid)
    assert {e.space for e in rows} == {"new space"}
    np.testing.assert_allclose(np.stack([e.embedding for e in rows]), [pixels_embedding(e.data) for e in rows])
    restarted, tower2 = SqliteStore(tmp_path, DIM, "new space"), CountingTower()  # a restart: a fresh store
    np.testing.assert_allclose(rebuild(restarted, tower2), want, atol=1e-6)
    assert tower2.embedded == 0  # nothing embedded again
    with old.transaction() as db:  # one example back in the old space (e.g. an old replica re-embedded it)
        old.put_example_embeddings(db, "s", cid, {example(3).digest: np.full(DIM, 0.1, np.float32)})
    tower3 = CountingTower()
    np.testing.assert_allclose(rebuild(restarted, tower3), want, atol=1e-6)
    assert tower3.embedded == 1  # only the one that is not of the served space


def test_near_duplicate_threshold_is_the_samples_nearest_neighbour_quantile() -> None:
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((300, DIM)) * 3  # rows need not be unit: they are normalised
    unit = sample / np.linalg.norm(sample, axis=1, keepdims=True)
    cos = unit @ unit.T
    np.fill_diagonal(cos, -np.inf)
    want = float(np.quantile(cos.max(axis=1), 0.99))
    assert abs(near_duplicate_cosine(sample) - want) < 1e-12  # type: ignore[operator]
    assert abs(near_duplicate_cosine(sample, 0.5) - float(np.quantile(cos.max(axis=1), 0.5))) < 1e-12  # type: ignore[operator]
    assert near_duplicate_cosine(None) is None and near_duplicate_cosine(sample[:1]) is None
