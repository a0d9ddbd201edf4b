"""Three real ``promptdistill serve`` replicas (separate state dirs) on one real PostgreSQL.

Read-your-writes with the client's token on another replica, propagation without one, a killed
listener, a SIGKILLed replica, a database outage, concurrent creates, identical final contents.
Timings are not asserted here (bench/cluster.py measures them); counts and outcomes are.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from PIL import Image

from bench.cluster_kit import PostgresServer, postgres_available, replica, start_replicas
from bench.harness import ServerProcess
from promptdistill.cli import main
from service.client import Client, ServiceClientError
from tests.service.conftest import png_bytes
from tests.service.fleet.conftest import pg_root
from tests.service.fleet.test_registry_sync import wait_until

pytestmark = pytest.mark.slow


class Fleet:
    def __init__(self, pg: PostgresServer, replicas: list[ServerProcess]) -> None:
        self.pg, self.replicas = pg, replicas

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    def classes(self, url: str, name: str) -> dict[str, Any]:
        return httpx2.get(f"{url}/v1/label-sets/{name}/classes", timeout=30).json()  # type: ignore[no-any-return]

    def version_everywhere(self, name: str, version: int) -> bool:
        return all(self.classes(u, name).get("version", -1) >= version for u in self.urls)


@pytest.fixture(scope="module")
def fleet(tiny_bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    why = postgres_available()
    if why:
        pytest.skip(why)
    root = pg_root()
    states = tmp_path_factory.mktemp("replicas")
    try:
        with PostgresServer(root, fsync=False) as pg:
            replicas = [
                replica(tiny_bundle_dir, states / f"r{i}", pg.url, PROMPTDISTILL_POLL_INTERVAL_S="1") for i in range(3)
            ]
            try:
                start_replicas(replicas)  # together: seeding must happen exactly once
                yield Fleet(pg, replicas)
            finally:
                for r in replicas:
                    r.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def image() -> bytes:
    return png_bytes(Image.new("RGB", (64, 64), (200, 120, 40)))


def test_reads_on_another_replica_see_the_clients_own_writes(fleet: Fleet) -> None:
    clients = [Client(u) for u in fleet.urls]
    violations, regressions, last = 0, 0, 0
    try:
        clients[0].create_label_set("ryw", ["seed0", "seed1"])
        for i in range(24):
            writer, reader = clients[i % 3], clients[(i + 1) % 3]
            writer.seen.update(reader.seen)  # one logical client, whichever replica answers
            if i % 4 == 3:
                out = writer.remove_class("ryw", name=f"c{i - 1}")
                gone, present = f"c{i - 1}", None
            else:
                out = writer.add_classes([f"c{i}"], label_set="ryw")
                gone, present = None, f"c{i}"
            reader.seen.update(writer.seen)
            got = reader.classes("ryw")  # sends min_version automatically
            names = {c["name"] for c in got["classes"]}
            violations += got["version"] < out["version"] or (present is not None and present not in names)
            violations += gone is not None and gone in names
            regressions += got["version"] < last
            last = max(last, got["version"])
    finally:
        for c in clients:
            c.close()
    assert (violations, regressions) == (0, 0)


def test_cli_runs_read_their_writes_on_any_replica(fleet: Fleet, tmp_path: Path, capsys: Any) -> None:
    """One CLI process per command: the versions file carries the token from one run to the next."""
    stores = {httpx2.get(f"{u}/livez", timeout=30).headers["x-store-id"] for u in fleet.urls}
    assert len(stores) == 1  # one database, one identity, whichever replica answers
    vf = str(tmp_path / "versions.json")
    for i in range(6):
        writer, reader = fleet.urls[i % 3], fleet.urls[(i + 1) % 3]
        assert main(["classes", "add", f"cli-{i}", "--url", writer, "--versions-file", vf]) == 0
        capsys.readouterr()
        assert main(["classes", "list", "--url", reader, "--versions-file", vf]) == 0
        assert f"cli-{i}" in capsys.readouterr().out


def test_changes_reach_every_replica_without_a_token(fleet: Fleet) -> None:
    with Client(fleet.urls[1]) as c:
        out = c.add_classes(["quokka"], label_set="default")
    assert wait_until(lambda: fleet.version_everywhere("default", out["version"]), 30)
    assert all("quokka" in {x["name"] for x in fleet.classes(u, "default")["classes"]} for u in fleet.urls)


def test_the_same_name_created_at_once_on_every_replica_succeeds_once(fleet: Fleet) -> None:
    statuses: list[int] = []
    barrier = threading.Barrier(3)

    def create(url: str) -> None:
        barrier.wait(timeout=30)
        resp = httpx2.post(f"{url}/v1/label-sets", json={"name": "same", "names": ["a", "b"]}, timeout=60)
        statuses.append(resp.status_code)

    threads = [threading.Thread(target=create, args=(u,)) for u in fleet.urls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert sorted(statuses) == [201, 409, 409]


def test_killed_listeners_catch_up(fleet: Fleet) -> None:
    assert wait_until(lambda: fleet.pg.kill_listeners() >= 3, 30)
    with Client(fleet.urls[0]) as c:
        versions = [c.add_classes([f"after-kill-{i}"], label_set="default")["version"] for i in range(3)]
    assert wait_until(lambda: fleet.version_everywhere("default", versions[-1]), 30)


def test_a_sigkilled_replica_restarts_at_the_latest_version(fleet: Fleet) -> None:
    victim = fleet.replicas[2]
    victim.kill()
    with Client(fleet.urls[0]) as c:
        latest = c.add_classes(["while-down"], label_set="default")["version"]
    victim.start()
    victim.wait_ready()
    got = fleet.classes(victim.url, "default")
    assert got["version"] >= latest and "while-down" in {x["name"] for x in got["classes"]}


def test_database_outage_keeps_classifying_and_refuses_writes(fleet: Fleet) -> None:
    fleet.pg.stop()
    try:
        for url in fleet.urls:
            with Client(url) as c:
                assert c.classify_bytes([image()], label_set="default", top_k=1)["results"]
                with pytest.raises(ServiceClientError) as refused:
                    c.add_classes(["during-outage"], label_set="default")
                assert refused.value.status == 503
            ready = httpx2.get(f"{url}/readyz", timeout=30)
            assert ready.status_code == 200 and ready.json()["checks"]["database"].startswith("degraded")
    finally:
        fleet.pg.start()
    with Client(fleet.urls[2]) as c:
        out = c.add_classes(["after-outage"], label_set="default")  # the store reconnects by itself
    assert wait_until(lambda: fleet.version_everywhere("default", out["version"]), 30)


def test_replicas_end_with_identical_contents(fleet: Fleet) -> None:
    def contents(url: str) -> dict[str, Any]:
        sets = httpx2.get(f"{url}/v1/label-sets", timeout=30).json()["label_sets"]
        return {s["name"]: (s["version"], fleet.classes(url, s["name"])["classes"]) for s in sets}

    assert wait_until(lambda: contents(fleet.urls[0]) == contents(fleet.urls[1]) == contents(fleet.urls[2]), 30)
    assert "during-outage" not in {c["name"] for c in contents(fleet.urls[0])["default"][1]}
