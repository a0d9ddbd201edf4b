"""The ``rolling`` part of ``python -m bench lifecycle``: a rolling upgrade to a bundle of a new space.

Three ``serve`` replicas of bundle v1 share one PostgreSQL database (fsync on). They are moved one by
one to bundle v2, of another embedding space (another text side), the way a Deployment rollout does
it: the replica leaves the rotation (its pod is terminating; a preStop sleep of ``PRESTOP_S`` lets
requests already routed to it arrive), drains on SIGTERM, starts again on v2
with its own state dir and the same database, and rejoins the rotation when ``/readyz`` answers 200.
Meanwhile, through whichever replicas are in the rotation:

* a writer adds and removes classes of one label set, one at a time, and after each write reads it
  back on another replica with ``min_version`` = the write's version (read-your-writes);
* readers classify against that set with ``min_version`` = the newest version the writer has had
  acknowledged, ``top_k`` large enough to list every class.

Every answer is checked against the writer's log: an answer at version V must list exactly the
classes the set held at V, and V must be at least the ``min_version`` asked. 503 + Retry-After is
``min_version``'s documented answer while a replica's space lacks a vector (the client waits and
asks again); it is counted apart from other 5xx. At the end, every replica (all on v2) must list
every class the writer left in the set, and v2's space must hold a vector for every class.
"""

from __future__ import annotations

import logging
import random
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.cluster_kit import PostgresServer, replica, start_replicas
from bench.harness import ServerProcess
from service.client import Client, Overloaded, ServiceClientError, Unreachable

log = logging.getLogger(__name__)
SET = "rolling"
READERS = 4
FIRST = [f"seed class {i}" for i in range(8)]
RETRY_S = 30.0  # a min_version read that stays 503 this long counts as never answered
PRESTOP_S = 1.0  # out of the rotation this long before SIGTERM: a Deployment's preStop sleep (deploy/k8s)


@dataclass
class Tally:
    """What the clients saw; ``log`` maps each acknowledged version of the set to its classes then."""

    log: dict[int, frozenset[str]] = field(default_factory=dict)
    latest: int = 0
    writes: int = 0
    removals: int = 0
    reads: int = 0
    retry_503: int = 0  # 503 + Retry-After (min_version not yet in that replica's space)
    other_5xx: dict[int, int] = field(default_factory=dict)
    unreachable: int = 0
    never_answered: int = 0
    violations: list[str] = field(default_factory=list)
    deferred: list[tuple[int, int, frozenset[str]]] = field(default_factory=list)  # (asked, got version, labels)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def status(self, e: ServiceClientError) -> None:
        with self.lock:
            if isinstance(e, Unreachable):
                self.unreachable += 1
            elif isinstance(e, Overloaded) and e.status == 503 and e.retry_after_s is not None:
                self.retry_503 += 1
            elif e.status >= 500:
                self.other_5xx[e.status] = self.other_5xx.get(e.status, 0) + 1

    def check(self, asked: int, answer: dict[str, Any]) -> None:
        got = int(answer["version"])
        labels = frozenset(p["label"] for p in answer["results"][0]["predictions"])
        with self.lock:
            self.reads += 1
            if got < asked:
                self.violations.append(f"asked min_version {asked}, answered from {got}")
            else:
                self.deferred.append((asked, got, labels))  # the writer may not have logged version got yet

    def verify(self) -> None:
        """Every answer against the writer's log (once the writer has stopped: every version is logged)."""
        for asked, got, labels in self.deferred:
            want = self.log.get(got)
            if want is None:
                self.violations.append(f"version {got} was never acknowledged to the writer")
            elif labels != want:
                self.violations.append(f"version {got}: listed {sorted(labels ^ want)[:4]} wrongly (asked {asked})")


class Rotation:
    """The replicas a load balancer routes to (a Service's ready endpoints)."""

    def __init__(self, replicas: list[ServerProcess]) -> None:
        self.replicas = replicas
        self.members = set(range(len(replicas)))
        self.lock = threading.Lock()

    def pick(self, rng: random.Random, not_: str | None = None) -> str:
        with self.lock:
            urls = [self.replicas[i].url for i in sorted(self.members)]
        others = [u for u in urls if u != not_]
        return rng.choice(others or urls)


def _read(tally: Tally, url: str, image: bytes, asked: int, deadline_s: float) -> None:
    """Classify with ``min_version``, waiting out 503 + Retry-After as the client is told to."""
    end = time.monotonic() + deadline_s
    with Client(url, retries=0, timeout_s=30) as c:
        while True:
            try:
                tally.check(asked, c.classify_bytes([image], label_set=SET, top_k=100, min_version=asked))
                return
            except ServiceClientError as e:
                tally.status(e)
                if not isinstance(e, Overloaded) or time.monotonic() > end:
                    tally.never_answered += isinstance(e, Overloaded)
                    return
                time.sleep(min(e.retry_after_s or 0.2, 0.2))


def _writer(tally: Tally, rot: Rotation, image: bytes, stop: threading.Event) -> None:
    rng = random.Random(1)
    members = set(FIRST)
    k = 0
    while not stop.is_set():
        url = rot.pick(rng)
        remove = len(members) > 20 or (len(members) > 4 and rng.random() < 0.4)
        name = rng.choice(sorted(members)) if remove else f"class {k}"
        try:
            with Client(url, retries=0, timeout_s=30) as c:
                out = c.remove_class(SET, name=name) if remove else c.add_classes([name], label_set=SET)
        except ServiceClientError as e:
            tally.status(e)
            continue
        k += not remove
        members = members - {name} if remove else members | {name}
        with tally.lock:
            tally.log[int(out["version"])] = frozenset(members)
            tally.latest = max(tally.latest, int(out["version"]))
            tally.writes += 1
            tally.removals += remove
        _read(tally, rot.pick(rng, not_=url), image, int(out["version"]), RETRY_S)  # read your write elsewhere


def _reader(tally: Tally, rot: Rotation, image: bytes, stop: threading.Event, seed: int) -> None:
    rng = random.Random(100 + seed)
    while not stop.is_set():
        with tally.lock:
            asked = tally.latest
        _read(tally, rot.pick(rng), image, asked, RETRY_S)


def _upgrade(rot: Rotation, i: int, v2: Path, tmp: Path, url: str) -> dict[str, float]:
    """Replica ``i``: out of the rotation, SIGTERM (drain), start on v2 (same port), ready, back in."""
    with rot.lock:
        rot.members.discard(i)
    old = rot.replicas[i]
    time.sleep(PRESTOP_S)  # requests routed just before the removal reach it before it stops accepting
    t0 = time.monotonic()
    old.stop()
    new = replica(v2, tmp / f"rolling-r{i}-v2", url, port=old.port)
    new.start()
    ready_s = new.wait_ready(timeout_s=300)
    with rot.lock:
        rot.replicas[i] = new
        rot.members.add(i)
    return {"drain_s": round(time.monotonic() - t0 - ready_s, 2), "ready_s": round(ready_s, 2)}


def rolling_part(bundle: Path, v2: Path, image: bytes, tmp: Path, quick: bool) -> dict[str, Any]:
    pg_root = Path(tempfile.mkdtemp(prefix="pd-bench-rolling-pg-"))  # its own top folder: postgres must reach it
    steady_s = 3.0 if quick else 8.0
    try:
        with PostgresServer(pg_root, fsync=True) as pg:
            replicas = [replica(bundle, tmp / f"rolling-r{i}", pg.url) for i in range(3)]
            start_replicas(replicas)
            try:
                return _roll(replicas, pg, v2, image, tmp, steady_s)
            finally:
                for r in replicas:
                    r.stop()
    finally:
        shutil.rmtree(pg_root, ignore_errors=True)


def _roll(
    replicas: list[ServerProcess], pg: PostgresServer, v2: Path, image: bytes, tmp: Path, steady_s: float
) -> dict[str, Any]:
    with replicas[0].client() as c:
        created = c.create_label_set(SET, FIRST)
    tally, rot, stop = Tally(), Rotation(replicas), threading.Event()
    tally.log[int(created["version"])] = frozenset(FIRST)
    tally.latest = int(created["version"])
    threads = [threading.Thread(target=_writer, args=(tally, rot, image, stop))]
    threads += [threading.Thread(target=_reader, args=(tally, rot, image, stop, k)) for k in range(READERS)]
    for t in threads:
        t.start()
    steps = []
    try:
        time.sleep(steady_s)  # old fleet under load first
        for i in range(3):
            steps.append(_upgrade(rot, i, v2, tmp, pg.url))
            log.info("rolling: replica %d on v2 after %s (%d writes so far)", i, steps[-1], tally.writes)
            time.sleep(steady_s / 2)
        time.sleep(steady_s / 2)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    tally.verify()
    final = tally.log[max(tally.log)]
    return {**_summary(tally, steps), **_final(rot, pg, final)}


def _summary(tally: Tally, steps: list[dict[str, float]]) -> dict[str, Any]:
    return {
        "replicas": 3,
        "readers": READERS,
        "steps": steps,
        "writes": tally.writes,
        "removals": tally.removals,
        "reads_checked": tally.reads,
        "violations": len(tally.violations),
        "violation_examples": tally.violations[:5],
        "retry_503": tally.retry_503,
        "other_5xx": sum(tally.other_5xx.values()),
        "other_5xx_by_status": tally.other_5xx,
        "unreachable": tally.unreachable,
        "never_answered": tally.never_answered,
    }


def _final(rot: Rotation, pg: PostgresServer, final: frozenset[str]) -> dict[str, Any]:
    """Every replica (now v2) lists exactly the writer's last classes; v2's space has every vector."""
    lost: set[str] = set()
    extra: set[str] = set()
    served: set[str] = set()
    for r in rot.replicas:
        with r.client() as c:
            names = {x["name"] for x in c.iter_classes(SET)}
            served.add(c.model()["loaded"]["space"])
        lost |= final - names
        extra |= names - final
    (classes,) = pg.sql("SELECT COUNT(*) FROM classes")[0]
    per_space = {str(s): int(n) for s, n in pg.sql("SELECT space, COUNT(*) FROM vectors GROUP BY space")}
    (space,) = served
    return {
        "final_classes": len(final),
        "classes_lost": len(lost),
        "classes_extra": len(extra),
        "classes_in_database": int(classes),
        "vectors_per_space": per_space,
        "v2_space_complete": per_space.get(space) == int(classes),
    }
