"""Label-set search: exact top-k + softmax against an independent numpy reference, IVF recall, threads."""

from __future__ import annotations

import asyncio
import base64
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service import create_app
from service.index import SearchCfg, Snapshot, adhoc_rank, ivf_nlist
from service.settings import IVF_MIN_CLASSES
from service.store import DB_FILE, LabelSetStore, SetRows
from tests.service.conftest import png_bytes

SCALE = 100.0  # CLIP's logit scale: a sharp softmax, where float errors show most


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _clustered(rng: np.random.Generator, n: int, d: int, centres: np.ndarray) -> np.ndarray:
    x = centres[rng.integers(0, len(centres), n)] + rng.standard_normal((n, d)).astype(np.float32) * 0.6 / np.sqrt(d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def reference(query: np.ndarray, vectors: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
    """Full float64 softmax over every class, fully sorted (the old behaviour, written independently)."""
    cos = query.astype(np.float64) @ vectors.astype(np.float64).T  # [B, N]
    logits = SCALE * cos
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    order = np.argsort(-cos, axis=1, kind="stable")[:, :k]
    return ids[order], np.take_along_axis(cos, order, 1), np.take_along_axis(probs, order, 1)


def _rows(vectors: np.ndarray, kind: str | None = None, version: int = 1) -> SetRows:
    n = len(vectors)
    ids = np.arange(10, 10 + 3 * n, 3, dtype=np.int64)  # ids are not positions
    return SetRows("s", version, ids, [f"c{i}" for i in range(n)], ["test"] * n, vectors, kind)


@pytest.mark.parametrize(("n", "k"), [(1, 5), (7, 7), (5000, 10), (5000, 1), (20_000, 7)])
def test_flat_search_matches_a_full_softmax_reference(n: int, k: int) -> None:
    rng = np.random.default_rng(n)
    vectors, query = _unit(rng, n, 64), _unit(rng, 3, 64)
    snap = Snapshot.from_rows(_rows(vectors))
    got = snap.search(query, k, SCALE)
    ids, cos, scores = reference(query, vectors, snap.ids, k)
    np.testing.assert_array_equal(got.ids, ids)
    np.testing.assert_allclose(got.cosines, cos, atol=1e-5)
    np.testing.assert_allclose(got.scores, scores, rtol=1e-4, atol=1e-9)
    assert got.scores.shape == (3, min(k, n))


def test_top_k_by_chunks_and_gemm_blocks_give_the_same_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    vectors, query = _unit(rng, 3000, 32), _unit(rng, 9, 32)
    snap = Snapshot.from_rows(_rows(vectors))
    whole = snap.search(query, 4, SCALE)
    adhoc = adhoc_rank(query, vectors, SCALE, 4)
    monkeypatch.setattr("service.index._CHUNK", 256)  # top-k picked from 12 chunks, some of them short
    monkeypatch.setattr("service.index._BLOCK", 2 * 3000)  # ad-hoc labels: two images per GEMM
    split, adhoc_split = snap.search(query, 4, SCALE), adhoc_rank(query, vectors, SCALE, 4)
    np.testing.assert_array_equal(split.ids, whole.ids)
    np.testing.assert_allclose(split.scores, whole.scores, rtol=1e-6)
    np.testing.assert_array_equal(adhoc_split.ids, adhoc.ids)
    np.testing.assert_allclose(adhoc_split.scores, adhoc.scores, rtol=1e-4)  # GEMM shape changes rounding
    np.testing.assert_array_equal(snap.ids[adhoc.ids], whole.ids)


def test_adhoc_rank_matches_the_reference() -> None:
    rng = np.random.default_rng(2)
    labels, query = _unit(rng, 12, 64), _unit(rng, 2, 64)
    got = adhoc_rank(query, labels, SCALE, 5)
    ids, _, scores = reference(query, labels, np.arange(12), 5)
    np.testing.assert_array_equal(got.ids, ids)
    np.testing.assert_allclose(got.scores, scores, rtol=1e-4, atol=1e-9)


def test_flat_snapshot_keeps_one_copy_of_its_vectors() -> None:
    rng = np.random.default_rng(3)
    snap = Snapshot.from_rows(_rows(_unit(rng, 100, 16)))
    assert not snap.vectors.flags.owndata and not snap.vectors.flags.writeable  # a view of FAISS's buffer
    np.testing.assert_array_equal(snap.index_ids(), np.sort(snap.ids))
    assert snap.index.ntotal == 100 and not snap.approximate


def _ivf_case(n: int = 2 * IVF_MIN_CLASSES) -> tuple[np.ndarray, np.ndarray, Snapshot]:
    rng = np.random.default_rng(4)
    centres = _unit(rng, 300, 32)
    vectors, query = _clustered(rng, n, 32, centres), _clustered(rng, 40, 32, centres)
    snap = Snapshot.from_rows(_rows(vectors, "ivf"), cfg=SearchCfg(nprobe=32))
    return vectors, query, snap


def test_ivf_recall_and_softmax_estimate_against_exact() -> None:
    vectors, query, snap = _ivf_case()
    assert snap.approximate and snap.kind == "ivf" and snap.index.nlist == ivf_nlist(len(vectors))
    np.testing.assert_array_equal(snap.index_ids(), np.sort(snap.ids))
    got = snap.search(query, 5, SCALE)
    ids, cos, scores = reference(query, vectors, snap.ids, 5)
    assert (got.ids[:, 0] == ids[:, 0]).mean() >= 0.95  # recall@1 on clustered data
    hit = got.ids[:, 0] == ids[:, 0]
    np.testing.assert_allclose(got.cosines[hit, 0], cos[hit, 0], atol=1e-5)  # candidates carry exact cosines
    rel = np.abs(got.scores[hit, 0] - scores[hit, 0]) / scores[hit, 0]
    assert np.median(rel) < 0.05, rel  # the denominator is estimated outside the candidates


def test_ivf_keeps_its_centroids_on_the_next_version_and_small_sets_stay_exact() -> None:
    vectors, _, snap = _ivf_case()
    grown = np.concatenate([vectors, vectors[:5]])
    nxt = Snapshot.from_rows(_rows(grown, "ivf", version=2), cfg=SearchCfg(), previous=snap)
    a = snap.index.quantizer.reconstruct_n(0, snap.index.nlist)
    b = nxt.index.quantizer.reconstruct_n(0, nxt.index.nlist)
    np.testing.assert_array_equal(a, b)  # not retrained
    assert nxt.index.ntotal == len(grown)
    small = Snapshot.from_rows(_rows(vectors[:50], "ivf"))
    assert small.kind == "ivf" and not small.approximate  # under IVF_MIN_CLASSES: exact


def test_a_small_change_patches_the_previous_ivf_index_and_searches_as_a_full_rebuild() -> None:
    import faiss

    vectors, query, snap = _ivf_case()
    rows = _rows(vectors, "ivf")
    gone = np.isin(np.arange(len(vectors)), [3, 17, 500, 9000])
    extra = _unit(np.random.default_rng(9), 10, vectors.shape[1])
    ids = np.concatenate([rows.ids[~gone], rows.ids[-1] + 3 * np.arange(1, 11)])
    new_vectors = np.concatenate([vectors[~gone], extra])
    names = [f"c{i}" for i in range(len(ids))]
    nxt = Snapshot.from_rows(
        SetRows("s", 2, ids, names, ["test"] * len(ids), new_vectors, "ivf"), cfg=SearchCfg(nprobe=32), previous=snap
    )
    np.testing.assert_array_equal(nxt.index_ids(), np.sort(ids))  # removed ids gone, new ones in
    assert snap.index.ntotal == len(vectors)  # the previous version is untouched (still serving)
    # reference: the same centroids, every row assigned afresh
    centroids = snap.index.quantizer.reconstruct_n(0, snap.index.nlist)
    quantizer = faiss.IndexFlatIP(vectors.shape[1])
    quantizer.add(centroids)
    full = faiss.IndexIVFFlat(quantizer, vectors.shape[1], snap.index.nlist, faiss.METRIC_INNER_PRODUCT)
    full.add_with_ids(np.ascontiguousarray(nxt.vectors), ids)
    full.nprobe = 32
    for index in (nxt.index, full):
        assert index.ntotal == len(ids)
    d_patch, i_patch = nxt.index.search(np.ascontiguousarray(query), 8)
    d_full, i_full = full.search(np.ascontiguousarray(query), 8)
    np.testing.assert_allclose(d_patch, d_full, atol=1e-5)
    np.testing.assert_array_equal(i_patch[:, 0], i_full[:, 0])


def test_concurrent_searches_agree_and_faiss_threads_are_set_on_the_searching_thread() -> None:
    import faiss

    _, query, snap = _ivf_case()
    serial = [snap.search(query[i : i + 1], 3, SCALE) for i in range(16)]
    seen: list[int] = []

    def one(i: int) -> np.ndarray:
        out = snap.search(query[i : i + 1], 3, SCALE)
        seen.append(faiss.omp_get_max_threads())  # this worker thread's OpenMP setting after searching
        return out.ids

    faiss.omp_set_num_threads(2)  # the main thread's setting must not be what the workers use
    try:
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(one, range(16)))
    finally:
        faiss.omp_set_num_threads(1)
    for s, g in zip(serial, got, strict=True):
        np.testing.assert_array_equal(s.ids, g)
    assert set(seen) == {1}, seen
    assert threading.current_thread() is threading.main_thread()


def test_store_migrates_an_old_database_and_keeps_the_index_kind(tmp_path: Path) -> None:
    old = sqlite3.connect(tmp_path / DB_FILE)
    old.executescript(
        "CREATE TABLE label_sets (name TEXT PRIMARY KEY, version INTEGER NOT NULL, next_id INTEGER NOT NULL,"
        " created_at TEXT NOT NULL);"
        "INSERT INTO label_sets VALUES ('legacy', 1, 0, '2026-01-01');"
    )
    old.close()
    store = LabelSetStore(tmp_path, 4, "test")
    try:
        assert store.load("legacy").index_kind is None  # NULL: the service default
        with store.transaction() as db:
            store.create_set(db, "big", ["a", "b"], np.eye(2, 4, dtype=np.float32), "test", index_kind="ivf")
    finally:
        store.close()
    again = LabelSetStore(tmp_path, 4, "test")  # reopening migrates nothing twice
    try:
        assert again.load("big").index_kind == "ivf" and again.load("legacy").index_kind is None
    finally:
        again.close()


def test_index_kind_is_chosen_per_set_over_http_and_survives_a_restart(make_settings: Any, photos: list[Any]) -> None:
    image = base64.b64encode(png_bytes(photos[0])).decode()
    with TestClient(create_app(make_settings(index_kind="flat"))) as http:
        made = http.post("/v1/label-sets", json={"name": "big", "names": ["ant", "bee"], "index": "ivf"})
        assert made.status_code == 201 and made.json()["index"] == "ivf", made.text
        bad = http.post("/v1/label-sets", json={"name": "bad", "names": ["ant"], "index": "hnsw"})
        assert bad.status_code == 422 and http.get("/v1/label-sets/bad/classes").status_code == 404
        assert http.post("/v1/label-sets", json={"name": "plain", "names": ["ant"]}).json()["index"] == "flat"
        out = http.post("/v1/classify", json={"images": [image], "label_set": "big", "top_k": 2})
        assert out.status_code == 200, out.text
        assert abs(sum(p["score"] for p in out.json()["results"][0]["predictions"]) - 1) < 1e-5  # all classes
    with TestClient(create_app(make_settings(index_kind="ivf"))) as http:
        assert http.get("/v1/label-sets/big/classes").json()["index"] == "ivf"  # stored with the set
        assert http.get("/v1/label-sets/plain/classes").json()["index"] == "ivf"  # NULL follows the default


def test_small_searches_run_on_the_event_loop_and_big_ones_in_the_search_pool() -> None:
    """A hop to a thread costs more than a 100-class search; a large label set must not block the loop."""
    from service.classifier import INLINE_SEARCH_WORK, Classifier

    pool = ThreadPoolExecutor(1, thread_name_prefix="search")
    holder = SimpleNamespace(_search_pool=pool)

    def where() -> str:
        return threading.current_thread().name

    async def both() -> tuple[str, str, str]:
        loop_thread = where()
        small = await Classifier._search(holder, INLINE_SEARCH_WORK, where)  # type: ignore[arg-type]
        big = await Classifier._search(holder, INLINE_SEARCH_WORK + 1, where)  # type: ignore[arg-type]
        return loop_thread, small, big

    try:
        loop_thread, small, big = asyncio.run(both())
    finally:
        pool.shutdown()
    assert small == loop_thread and big.startswith("search") and big != loop_thread
