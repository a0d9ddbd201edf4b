"""Registries as replicas: propagation (NOTIFY, reconnect, poll), min_version, outage, and the
read-versions-then-load race of check() / summaries(). Real SQLite and a real PostgreSQL."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.cluster_kit import PostgresServer
from models.bundle import Bundle, load_bundle
from service.errors import ServiceError, StoreUnavailable, UnknownLabelSet
from service.registry import Registry
from service.store import Store
from tests.service.fleet.conftest import pg_root
from tests.service.fleet.test_stores import vecs


def wait_until(cond: Callable[[], bool], timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


@pytest.fixture(scope="module")
def bundle(tiny_bundle_dir: Path) -> Bundle:
    return load_bundle(tiny_bundle_dir)


@pytest.fixture
def make_registry(bundle: Bundle) -> Iterator[Callable[..., Registry]]:
    made: list[Registry] = []

    def make(store: Store, **kwargs: object) -> Registry:
        registry = Registry(store, **kwargs)
        registry.open(bundle)
        made.append(registry)
        return registry

    yield make
    for r in made:
        r.store.close()


def write(store: Store, fn: Callable[..., object], *args: object) -> int:
    with store.transaction() as db:
        out = fn(db, *args)
    return int(out[0] if isinstance(out, tuple) else out)  # type: ignore[arg-type]


def test_check_and_summaries_are_race_free_while_sets_come_and_go(
    make_store: Callable[..., Store], make_registry: Callable[..., Registry]
) -> None:
    """Two workers/replicas: one creates and deletes sets, the other probes (was: 503s and 404s)."""
    writer, reader = make_registry(make_store()), make_registry(make_store())
    stop = threading.Event()
    failures: list[str] = []
    probes = 0

    def churn() -> None:
        k = 0
        while not stop.is_set():
            write(writer.store, writer.store.create_set, f"tmp{k % 3}", ["a", "b"], vecs(2, k), "runtime")
            write(writer.store, writer.store.delete_set, f"tmp{k % 3}")
            k += 1

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline or probes < 50:
            try:
                failures += reader.check()
                names = [n for n, _, _ in reader.summaries()]
                assert "default" in names
            except ServiceError as e:
                failures.append(f"{type(e).__name__}: {e}")
            probes += 1
    finally:
        stop.set()
        thread.join(timeout=30)
    assert failures == [], failures[:5]
    assert probes >= 50


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_a_replica_applies_another_replicas_changes(
    make_store: Callable[..., Store], make_registry: Callable[..., Registry]
) -> None:
    a, b = make_registry(make_store()), make_registry(make_store(poll_interval_s=3600))  # NOTIFY only
    v1 = write(a.store, a.store.create_set, "pets", ["cat", "dog"], vecs(2), "runtime")
    assert wait_until(lambda: "pets" in b.snapshots() and b.snapshots()["pets"].version == v1)
    v2 = write(a.store, a.store.add_classes, "pets", ["hamster"], vecs(1, 1), "runtime")
    v3 = write(a.store, a.store.remove_class, "pets", 0, None)
    assert wait_until(lambda: b.snapshots()["pets"].version == v3) and v1 < v2 < v3
    snap = b.get("pets")
    assert snap.names == ["dog", "hamster"] and snap.ids.tolist() == [1, 2]
    assert int(snap.index.ntotal) == 2 and b.check() == []
    np.testing.assert_allclose(snap.vectors, a.get("pets").vectors, atol=1e-6)
    v4 = write(a.store, a.store.delete_set, "pets")
    assert wait_until(lambda: "pets" not in b.snapshots())
    with pytest.raises(UnknownLabelSet):
        b.get("pets", min_version=v4)  # a tombstone: no waiting, no database read


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_min_version_is_met_from_the_database_when_the_watcher_lags(
    make_store: Callable[..., Store], make_registry: Callable[..., Registry], monkeypatch: pytest.MonkeyPatch
) -> None:
    deaf = make_store()
    monkeypatch.setattr(deaf, "watch", lambda on_change, on_connect: None)  # hears nothing, polls never
    a, b = make_registry(make_store()), make_registry(deaf, min_version_wait_s=0.2)
    before = b.get("default").version
    v = write(a.store, a.store.add_classes, "default", ["axolotl"], vecs(1), "runtime")
    assert b.get("default").version == before  # no token: bounded staleness, no database read
    snap = b.get("default", min_version=v)  # waits 0.2 s, then reads the database itself
    assert snap.version == v and "axolotl" in snap.names


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_killed_listener_reconnects_and_catches_up(
    make_store: Callable[..., Store], make_registry: Callable[..., Registry], postgres: PostgresServer
) -> None:
    a, b = make_registry(make_store()), make_registry(make_store(poll_interval_s=3600))
    assert wait_until(lambda: postgres.kill_listeners() > 0)  # the watchers' LISTEN connections
    names = [f"n{i}" for i in range(5)]
    versions = [write(a.store, a.store.add_classes, "default", [n], vecs(1, i), "runtime") for i, n in enumerate(names)]
    assert wait_until(lambda: b.get("default").version == versions[-1])  # re-check on reconnect
    assert set(names) <= set(b.get("default").names)


def test_outage_serves_snapshots_refuses_writes_and_recovers(
    bundle: Bundle, make_registry: Callable[..., Registry]
) -> None:
    """A server of its own: this test stops and restarts it."""
    from service.stores.postgres import PostgresStore

    root = pg_root()
    try:
        with PostgresServer(root, fsync=False) as pg:
            a = make_registry(PostgresStore(pg.url, 64, "test", poll_interval_s=0.5))
            b = make_registry(PostgresStore(pg.url, 64, "test", poll_interval_s=0.5), min_version_wait_s=0.2)
            version = b.get("default").version
            pg.stop()
            assert b.get("default").version == version  # classification keeps its snapshot
            with pytest.raises(StoreUnavailable) as down:
                write(a.store, a.store.add_classes, "default", ["x"], vecs(1), "runtime")
            assert down.value.status == 503 and "Retry-After" in down.value.headers
            with pytest.raises(ServiceError) as stale:
                b.get("default", min_version=version + 1)
            assert stale.value.status == 503
            pg.start()
            v = write(a.store, a.store.add_classes, "default", ["after"], vecs(1), "runtime")  # reconnects
            assert wait_until(lambda: b.get("default").version == v)
            assert b.store.problem is None or wait_until(lambda: b.store.ping() is None)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_a_token_this_database_never_issued_is_refused(
    make_store: Callable[..., Store], make_registry: Callable[..., Registry]
) -> None:
    registry = make_registry(make_store(), min_version_wait_s=0.05)
    version = registry.get("default").version
    assert registry.get("default", min_version=version).version == version
    with pytest.raises(ServiceError) as foreign:
        registry.get("default", min_version=version + 1000)
    assert foreign.value.status == 422 and "another deployment" in foreign.value.message


def test_min_version_over_http_on_label_set_reads(live: Callable[..., Any]) -> None:
    with live() as server, server.client() as http:
        added = http.post("/v1/label-sets/default/classes", json={"names": ["okapi"]}).json()
        got = http.get("/v1/label-sets/default/classes", params={"min_version": added["version"]})
        assert got.status_code == 200 and "okapi" in {c["name"] for c in got.json()["classes"]}
        listed = http.get("/v1/label-sets", params={"min_version": added["version"]})
        assert listed.status_code == 200
        assert http.get("/v1/label-sets/default/classes", params={"min_version": -1}).status_code == 422
        foreign = http.get("/v1/label-sets/default/classes", params={"min_version": added["version"] + 99})
        assert foreign.status_code == 422


def test_the_client_sends_its_token_on_classify_json_and_form(live: Callable[..., Any], tmp_path: Path) -> None:
    from PIL import Image

    from service.client import Client
    from tests.service.conftest import png_bytes

    photo = tmp_path / "p.png"
    photo.write_bytes(png_bytes(Image.new("RGB", (64, 64), (10, 200, 30))))
    with live() as server, Client(server.url) as client:
        added = client.add_classes(["okapi"], label_set="default")
        assert client.seen["default"] == added["version"]
        by_form = client.classify_files([photo], top_k=1)  # multipart field min_version
        by_json = client.classify_bytes([photo.read_bytes()], top_k=1)  # JSON field min_version
        assert by_form["version"] == by_json["version"] == added["version"]
        client.seen["default"] = added["version"] + 50  # a token from elsewhere: refused, not served stale
        with pytest.raises(Exception, match="422"):
            client.classify_files([photo], top_k=1)
