"""Fleet benchmark: 3 real replicas on one real PostgreSQL (fsync on), loopback, separate state dirs.

Figures (issue 13, goals in brackets): read-your-writes violations and version regressions over
>= 200 writes incl. removals, each read back on another replica with the token [0, 0]; commit ->
visible on all 3 without a token, p95 [<= 500 ms]; catch-up after every listener connection is
killed [<= 2 s, 0 missed]; a SIGKILLed replica restarts at the latest version; PostgreSQL stopped:
classify success [100 %], writes 503; restarted: first write visible everywhere [<= 2 s];
concurrent writers: duplicate / decreasing versions [0], same name at once -> one 201; identical
final contents; classify throughput of one replica on PostgreSQL vs SQLite [>= 0.95x].
"""

from __future__ import annotations

import base64
import itertools
import logging
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import httpx2

from bench.cluster_kit import PostgresServer, replica, start_replicas
from bench.common import TINY_CONFIG, BenchCfg, real_photos, write_result
from bench.harness import Classify, ServerProcess, Window, closed_loop

log = logging.getLogger(__name__)
NAMES = ["cat", "dog", "astronaut", "coffee cup", "rocket", "flower", "temple", "coins"]


def _bundle(out: Path) -> Path:
    import torch

    from models.zeroshot import build_zeroshot_bundle, named_templates

    torch.manual_seed(0)
    build_zeroshot_bundle(str(TINY_CONFIG), None, NAMES, named_templates("simple"), out, onnx=True, progress=False)
    return out


def _until(cond: Callable[[], bool], timeout_s: float, step_s: float = 0.005) -> float | None:
    """Seconds until ``cond()`` held, or None if it did not within ``timeout_s``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if cond():
            return time.monotonic() - start
        time.sleep(step_s)
    return None


class Probe:
    """Thin HTTP helpers over one keep-alive client per replica.

    Raw HTTP on purpose: these probes ask each replica what it has *without* a version token, which
    the project's client always sends for a set it has seen (it is made to read its own writes).
    """

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self.http = {u: httpx2.Client(base_url=u, timeout=30) for u in urls}

    def version(self, url: str, name: str) -> int:
        r = self.http[url].get(f"/v1/label-sets/{name}/classes")
        return int(r.json()["version"]) if r.status_code == 200 else -1

    def classes(self, url: str, name: str, min_version: int | None = None) -> dict[str, Any]:
        params = {"min_version": min_version} if min_version is not None else {}
        return self.http[url].get(f"/v1/label-sets/{name}/classes", params=params).json()  # type: ignore[no-any-return]

    def everywhere(self, name: str, version: int) -> bool:
        return all(self.version(u, name) >= version for u in self.urls)

    def add(self, url: str, name: str, names: list[str]) -> httpx2.Response:
        return self.http[url].post(f"/v1/label-sets/{name}/classes", json={"names": names})

    def remove(self, url: str, name: str, cls: str) -> httpx2.Response:
        return self.http[url].request("DELETE", f"/v1/label-sets/{name}/classes", params={"name": cls})

    def contents(self, url: str) -> dict[str, Any]:
        sets = self.http[url].get("/v1/label-sets").json()["label_sets"]
        return {s["name"]: self.classes(url, s["name"])["classes"] for s in sets}


def read_your_writes(p: Probe, n_writes: int) -> dict[str, Any]:
    p.http[p.urls[0]].post("/v1/label-sets", json={"name": "ryw", "names": ["seed"]})
    violations = regressions = removals = 0
    last = 0
    for i in range(n_writes):
        writer, reader = p.urls[i % 3], p.urls[(i + 1) % 3]
        removing = i % 4 == 3
        resp = p.remove(writer, "ryw", f"c{i - 1}") if removing else p.add(writer, "ryw", [f"c{i}"])
        out = resp.json()
        removals += removing
        got = p.classes(reader, "ryw", min_version=out["version"])
        names = {c["name"] for c in got.get("classes", [])}
        ok = got.get("version", -1) >= out["version"] and ((f"c{i - 1}" not in names) if removing else f"c{i}" in names)
        violations += not ok
        regressions += got.get("version", -1) < last
        last = max(last, got.get("version", -1))
    return {"writes": n_writes, "removals": removals, "violations": violations, "version_regressions": regressions}


def visibility(p: Probe, n_writes: int) -> dict[str, Any]:
    """Commit (the write's response) -> every replica answers that version, without a token."""
    p.http[p.urls[0]].post("/v1/label-sets", json={"name": "vis", "names": ["seed"]})
    lags: list[float] = []
    missed = 0
    for i in range(n_writes):
        version = int(p.add(p.urls[i % 3], "vis", [f"v{i}"]).json()["version"])
        lag = _until(lambda v=version: p.everywhere("vis", v), 10)  # type: ignore[misc]
        if lag is None:
            missed += 1
        else:
            lags.append(lag * 1000)
    lags.sort()
    return {
        "writes": n_writes,
        "p50_ms": round(statistics.median(lags), 1),
        "p95_ms": round(lags[int(0.95 * (len(lags) - 1))], 1),
        "max_ms": round(lags[-1], 1),
        "not_visible_within_10s": missed,
    }


def listener_kill(p: Probe, pg: PostgresServer) -> dict[str, Any]:
    killed = pg.kill_listeners()
    versions, names = [], []
    for i in range(20):
        names.append(f"k{i}")
        versions.append(p.add(p.urls[i % 3], "default", [f"k{i}"]).json()["version"])
    catch_up = _until(lambda: p.everywhere("default", versions[-1]), 10)
    missed = sum(n not in {c["name"] for c in p.classes(u, "default")["classes"]} for u in p.urls for n in names)
    return {"listeners_killed": killed, "writes_after_kill": 20, "catch_up_s": catch_up, "missed_changes": missed}


def kill9_restart(p: Probe, victim: ServerProcess) -> dict[str, Any]:
    victim.kill()
    latest = p.add(p.urls[0], "default", ["while-down"]).json()["version"]
    start = time.monotonic()
    victim.start()
    victim.wait_ready()
    ready_s = time.monotonic() - start
    got = p.classes(victim.url, "default")
    return {"restart_to_ready_s": round(ready_s, 2), "version_at_ready": got["version"], "latest_version": latest}


def outage(p: Probe, pg: PostgresServer, image_b64: str, n: int) -> dict[str, Any]:
    pg.stop()
    try:
        ok = total = writes_503 = ready_200 = 0
        for u in p.urls:
            for _ in range(n):
                r = p.http[u].post("/v1/classify", json={"images": [image_b64], "top_k": 1})
                ok += r.status_code == 200
                total += 1
            for i in range(3):
                writes_503 += p.add(u, "default", [f"down{i}"]).status_code == 503
            ready_200 += p.http[u].get("/readyz").status_code == 200
    finally:
        pg.start()
    out = p.add(p.urls[1], "default", ["after-restart"])
    first_write_status = out.status_code
    version = out.json().get("version", 10**12)
    visible = _until(lambda: p.everywhere("default", version), 10)
    return {
        "classify_success_pct": round(100 * ok / total, 2),
        "classify_requests": total,
        "writes_503": f"{writes_503}/{3 * len(p.urls)}",
        "readyz_200": f"{ready_200}/{len(p.urls)}",
        "first_write_after_restart_status": first_write_status,
        "first_write_visible_everywhere_s": visible,
    }


def concurrent_writers(p: Probe, per_writer: int) -> dict[str, Any]:
    p.http[p.urls[0]].post("/v1/label-sets", json={"name": "conc", "names": ["seed"]})
    seen: list[list[int]] = [[] for _ in p.urls]

    def work(k: int) -> None:
        for i in range(per_writer):
            r = p.add(p.urls[k], "conc", [f"w{k}-{i}"])
            seen[k].append(int(r.json()["version"]))

    with ThreadPoolExecutor(len(p.urls)) as pool:
        list(pool.map(work, range(len(p.urls))))
    flat = [v for per in seen for v in per]
    decreasing = sum(b <= a for per in seen for a, b in itertools.pairwise(per))
    one_201 = 0
    rounds = 5
    for r in range(rounds):
        barrier = threading.Barrier(len(p.urls))

        def create(url: str, r: int = r, barrier: threading.Barrier = barrier) -> int:
            barrier.wait(timeout=30)
            return p.http[url].post("/v1/label-sets", json={"name": f"same{r}", "names": ["a"]}).status_code

        with ThreadPoolExecutor(len(p.urls)) as pool:
            codes = sorted(pool.map(create, p.urls))
        one_201 += codes == [201] + [409] * (len(p.urls) - 1)
    return {
        "writes": len(flat),
        "duplicate_versions": len(flat) - len(set(flat)),
        "decreasing_versions_per_writer": decreasing,
        "same_name_rounds_with_exactly_one_201": f"{one_201}/{rounds}",
    }


def converge(p: Probe) -> dict[str, Any]:
    """After the last write (no token): wait until every replica lists the same sets and classes."""
    start = time.monotonic()
    contents: list[dict[str, Any]] = []

    def identical() -> bool:
        contents[:] = [p.contents(u) for u in p.urls]
        return contents[0] == contents[1] == contents[2]

    took = _until(identical, 10, step_s=0.05)
    differing = sorted(n for n in set().union(*contents) if len({repr(c.get(n)) for c in contents}) > 1)
    return {
        "final_contents_identical": took is not None,
        "final_contents_converged_after_s": None if took is None else round(time.monotonic() - start, 3),
        "final_contents_differing_sets": differing,
        "final_sets": len(contents[0]),
        "final_classes": sum(len(v) for v in contents[0].values()),
    }


def throughput(bundle: Path, root: Path, pg_url: str, image: bytes, seconds: float) -> dict[str, Any]:
    """One replica at a time, SQLite and PostgreSQL alternated 3x (load drifts on a shared box)."""
    rates: dict[str, list[float]] = {"sqlite": [], "postgres": []}
    for rnd in range(3):
        for kind in ("sqlite", "postgres"):
            with replica(bundle, root / f"tp-{kind}-{rnd}", pg_url if kind == "postgres" else None) as r:
                rates[kind].append(_classify_rate(r.url, image, seconds))
    med = {k: statistics.median(v) for k, v in rates.items()}
    per_round = [round(p / s, 3) for p, s in zip(rates["postgres"], rates["sqlite"], strict=True)]
    return {
        "concurrency": 4,
        "img_per_s": rates,
        "median_img_per_s": med,
        "pg_over_sqlite": round(med["postgres"] / med["sqlite"], 3),
        "pg_over_sqlite_per_round": per_round,
    }


def _classify_rate(url: str, image: bytes, seconds: float, concurrency: int = 4) -> float:
    send = partial(Classify, url, [image], top_k=3)
    closed_loop(send, 1, requests=5)  # warm-up
    return round(float(closed_loop(send, concurrency, window=Window(0.0, seconds))["throughput_rps"]), 2)


def run(cfg: BenchCfg) -> dict[str, Any]:
    import io

    tmp = Path(tempfile.mkdtemp(prefix="promptdistill-fleet-"))
    tmp.chmod(0o755)  # the server runs as 'postgres' and must reach its data dir below this one
    try:
        bundle = _bundle(tmp / "bundle")
        buf = io.BytesIO()
        real_photos()[0].convert("RGB").save(buf, "JPEG", quality=90)
        image = buf.getvalue()
        image_b64 = base64.b64encode(image).decode()
        results: dict[str, Any] = {}
        with PostgresServer(tmp / "pg", fsync=True) as pg:
            replicas = [replica(bundle, tmp / f"r{i}", pg.url) for i in range(3)]
            try:
                t0 = time.monotonic()
                start_replicas(replicas)
                results["start_3_replicas_s"] = round(time.monotonic() - t0, 1)
                p = Probe([r.url for r in replicas])
                quick = cfg.quick
                results["read_your_writes"] = read_your_writes(p, 12 if quick else 240)
                results["visibility_without_token"] = visibility(p, 10 if quick else 100)
                results["listener_kill"] = listener_kill(p, pg)
                results["kill9_restart"] = kill9_restart(p, replicas[2])
                results["outage"] = outage(p, pg, image_b64, 5 if quick else 30)
                results["concurrent_writers"] = concurrent_writers(p, 5 if quick else 40)
                results.update(converge(p))
            finally:
                for r in replicas:
                    r.stop()
            results["throughput"] = throughput(bundle, tmp, pg.url, image, 3 if quick else 10)
        payload = {"model": "tiny zero-shot bundle (ONNX fp32), 3 replicas, PostgreSQL 15 fsync=on", **results}
        write_result("fleet", payload, cfg)
        return payload
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
