"""``python -m bench lifecycle``: issue 21's figures (a new model never strands a class).

* ``reload``: 16 closed-loop clients classify through ``serve --bundle LINK``; after a steady
  window the link is switched to a bundle of the same space (the same tower without its ONNX graph,
  served by torch) and ``POST /v1/admin/reload`` swaps it in while the clients keep going; ``/readyz``
  is polled every 20 ms throughout. Figures: failed requests [goal 0], p99 latency of the requests
  that overlapped the swap vs the steady window's [<= 2x], ``/readyz`` answers other than 200 [0].
* ``migrate``: a database holding N runtime classes (added through a first bundle) is served by a
  bundle of another space (another text side), which encodes them all in the background: names
  encoded per second (first start, no kill), then the same from scratch with ``kill -9`` at K random
  points of the migration. Figures: classes lost after the last restart [0] (every name has a
  vector in the new space and the sets are served), names encoded beyond N across the runs,
  against one batch per kill [<= 64 per kill].
* ``roundtrip``: ``promptdistill labelsets export --vectors`` of that database, imported into an
  empty one: identical sets, ids, versions [yes].
* ``rates``: names re-encoded per second by a new space's text side, for 100k runtime classes
  (tiny text side) and 10k for a ViT-B/32 text side (open_clip ``ViT-B-32``, random weights; 100k
  would take about an hour on this 2-core machine at the rate 10k gives): a label
  set of N names with no vector (``labelsets import``) served by a bundle of that space, timed from
  the first batch encoded to the last (bundles with one template: one prompt per name).
* ``rolling``: 3 replicas on PostgreSQL moved one by one from bundle v1 to v2 (a new space) while a
  writer adds and removes classes and readers classify with ``min_version`` (bench/rolling.py):
  classes lost [0], 5xx [0], read-your-writes violations [0].

``BENCH_LIFECYCLE_PARTS=reload,migrate`` runs some parts. ``--quick``: tiny sizes.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx2

from bench.common import REPO, TINY_CONFIG, BenchCfg, part_run, photo_jpegs, with_part_run, write_result
from bench.harness import Classify, ServerProcess, Window, closed_loop, metrics
from bench.hostile import cached_bundle
from bench.rolling import rolling_part

log = logging.getLogger(__name__)
PARTS = ("reload", "migrate", "roundtrip", "rates", "rolling")
RATES = {"tiny": (str(TINY_CONFIG), 100_000), "ViT-B-32": ("ViT-B-32", 10_000)}  # arch -> (config, names)
CLIENTS = 16


def _variant(bundle: Path, dest: Path, *, other_space: bool) -> Path:
    """The same tower without its ONNX graph (same space), or with another text side (another space).

    Files are linked, not copied (a ViT-B/32 bundle is hundreds of MB); only the manifest differs."""
    dest.mkdir(parents=True)
    for entry in bundle.iterdir():
        if entry.name != "manifest.json":
            (dest / entry.name).symlink_to(entry.resolve())
    manifest = json.loads((bundle / "manifest.json").read_text())
    if other_space:
        manifest["text_encoder"]["templates"] = ["a {}."]
    else:
        for spec in manifest["image_encoder"]["onnx"]:
            for rel in (spec["file"], spec.get("data_file")):
                if rel:
                    manifest["files"].pop(rel, None)
        manifest["image_encoder"]["onnx"] = []
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def reload_part(bundle: Path, tmp: Path, cfg: BenchCfg) -> dict[str, Any]:
    link = tmp / "current"
    link.symlink_to(bundle)
    variant = _variant(bundle, tmp / "same-space", other_space=False)
    images = photo_jpegs(8, (320, 240))
    steady_s, swap_s = (3.0, 6.0) if cfg.quick else (10.0, 15.0)
    ready_codes: list[int] = []
    stop = threading.Event()
    with ServerProcess.serve(link, tmp / "reload-state", "--api-key", "k", threads=cfg.threads) as server:

        def poll() -> None:
            with httpx2.Client(base_url=server.url, timeout=10) as http:
                while not stop.is_set():
                    ready_codes.append(http.get("/readyz").status_code)
                    time.sleep(0.02)

        poller = threading.Thread(target=poll)
        poller.start()
        steady = closed_loop(lambda: Classify(server.url, images), CLIENTS, window=Window(2.0, steady_s))
        swap: dict[str, Any] = {}

        def swap_soon() -> None:
            time.sleep(swap_s / 3)
            tmp_link = link.with_name("current.new")
            tmp_link.symlink_to(variant)
            os.replace(tmp_link, link)
            t0 = time.perf_counter()
            with server.client(api_key="k") as client:
                swap["answer"] = client.reload()
            swap["seconds"] = time.perf_counter() - t0

        swapper = threading.Thread(target=swap_soon)
        swapper.start()
        during = closed_loop(lambda: Classify(server.url, images), CLIENTS, window=Window(0.0, swap_s))
        swapper.join()
        stop.set()
        poller.join()
    failed = sum(during["errors"].values()) + sum(steady["errors"].values())
    return {
        "clients": CLIENTS,
        "steady": steady,
        "during_swap": during,
        "swap_seconds": swap.get("seconds"),
        "swap_outcome": swap.get("answer", {}).get("outcome"),
        "failed_requests": failed,
        "p99_ratio": during["p99_ms"] / steady["p99_ms"],
        "readyz_polls": len(ready_codes),
        "readyz_not_200": sum(1 for c in ready_codes if c != 200),
    }


def _names(n: int) -> list[str]:
    return [f"runtime class {i:06d}" for i in range(n)]


def _seed_database(bundle: Path, state: Path, n: int, threads: int) -> None:
    """N runtime classes added through the first bundle (its space), in requests of 1,000 names."""
    with ServerProcess.serve(bundle, state, threads=threads) as server, server.client() as client:
        names = _names(n)
        for start in range(0, n, 1000):
            client.add_classes(names[start : start + 1000])


def _names_encoded(server: ServerProcess) -> float:
    return sum(v for k, v in metrics(server.url, "promptdistill_text_encoder_names").items() if k.startswith("_total"))


def _wait_live(server: ServerProcess, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx2.get(server.url + "/livez", timeout=2.0).status_code == 200:
                return
        except httpx2.TransportError:
            pass
        time.sleep(0.02)
    raise TimeoutError(f"{server.url} never answered /livez:\n{server.output()}")


def _vectors(state: Path) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-m", "promptdistill", "labelsets", "spaces", "--state-dir", str(state)],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    return {k: int(v) for k, v in json.loads(out.stdout).items()}


def migrate_part(bundle: Path, tmp: Path, cfg: BenchCfg) -> dict[str, Any]:
    n = 500 if cfg.quick else 10_000
    kills = 2 if cfg.quick else 10
    other = _variant(bundle, tmp / "other-space", other_space=True)
    seed = tmp / "seed-state"
    _seed_database(bundle, seed, n, cfg.threads)
    total = n + len(json.loads((bundle / "manifest.json").read_text())["label_sets"][0]["classes"])
    # 1. one uninterrupted migration: names encoded per second
    clean = tmp / "clean-state"
    shutil.copytree(seed, clean)
    server = ServerProcess.serve(other, clean, threads=cfg.threads).start()
    t0 = time.perf_counter()
    server.wait_ready(timeout_s=3600)
    seconds = time.perf_counter() - t0
    encoded = _names_encoded(server)
    server.stop()
    # 2. the same with kill -9 at random points
    rng = random.Random(0)
    killed = tmp / "killed-state"
    shutil.copytree(seed, killed)
    server = ServerProcess.serve(other, killed, threads=cfg.threads)
    encoded_runs: list[float] = []
    for k in range(kills):
        server.start()
        _wait_live(server)  # the migration starts with the app; then a random point of it
        time.sleep(rng.uniform(0.1, 1.0) * seconds / kills)
        encoded_runs.append(_names_encoded(server))  # counted as a batch starts: what the kill throws away too
        server.kill()
        log.info("kill %d of %d: %.0f names encoded in that run", k + 1, kills, encoded_runs[-1])
    server.start()
    server.wait_ready(timeout_s=3600)
    encoded_runs.append(_names_encoded(server))
    with server.client() as client:
        served = {c["name"] for c in client.iter_classes("default")}
    server.stop()
    spaces = _vectors(killed)
    missing_names = [x for x in _names(n) if x not in served]
    return {
        "runtime_classes": n,
        "bundle": bundle.name,
        "uninterrupted": {"seconds": seconds, "names_encoded": encoded, "names_per_s": encoded / seconds},
        "kills": kills,
        "classes_lost": len(missing_names),
        "vectors_per_space": spaces,
        "names_encoded_all_runs": sum(encoded_runs),
        "redone": sum(encoded_runs) - encoded,
        "redone_per_kill": (sum(encoded_runs) - encoded) / kills,
        "kills_during_migration": sum(1 for x in encoded_runs[:-1] if x > 0),
        "batch": 64,
        "complete": len(spaces) == 2 and all(v == total for v in spaces.values()),
    }


def roundtrip_part(tmp: Path) -> dict[str, Any]:
    state = tmp / "killed-state" if (tmp / "killed-state").is_dir() else tmp / "seed-state"
    if not state.is_dir():
        return {"skipped": "needs the migrate part's database"}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out, target = tmp / "sets.jsonl", tmp / "imported"
    cli = [sys.executable, "-m", "promptdistill", "labelsets"]
    subprocess.run([*cli, "export", "--state-dir", str(state), "--vectors", "-o", str(out)], check=True, env=env)
    subprocess.run([*cli, "import", str(out), "--state-dir", str(target)], check=True, env=env, capture_output=True)
    again = tmp / "again.jsonl"
    subprocess.run([*cli, "export", "--state-dir", str(target), "--vectors", "-o", str(again)], check=True, env=env)
    a, b = out.read_text().splitlines()[1:], again.read_text().splitlines()[1:]
    return {"lines": len(a), "identical": a == b}


def _names_only(path: Path, n: int) -> None:
    """A labelsets export of one set of ``n`` runtime classes and no vectors (what a new space starts from)."""
    from service.labelsets_io import FORMAT_VERSION, ClassLine, Header, SetLine

    stamp = "2026-12-01T00:00:00+00:00"
    with path.open("w", encoding="utf-8") as out:
        out.write(Header(kind="header", version=FORMAT_VERSION, exported_at=stamp, clock=1).model_dump_json() + "\n")
        out.write(SetLine(kind="set", name="runtime", version=1, next_id=n, created_at=stamp).model_dump_json() + "\n")
        for i, name in enumerate(_names(n)):
            line = ClassLine(kind="class", set="runtime", id=i, name=name, provenance="runtime", created_at=stamp)
            out.write(line.model_dump_json(exclude_defaults=True) + "\n")


def _encode_all(bundle: Path, state: Path, n: int, threads: int) -> dict[str, Any]:
    """Serve ``state`` with ``bundle`` until no class lacks a vector; the encoding rate from the metrics."""
    server = ServerProcess.serve(bundle, state, threads=threads).start()
    try:
        _wait_live(server)
        first: tuple[float, float] | None = None
        deadline = time.monotonic() + 3600
        while time.monotonic() < deadline:
            count, now = _names_encoded(server), time.monotonic()
            if first is None and count > 0:
                first = (now, count)
            ready = httpx2.get(server.url + "/readyz", timeout=30)
            if ready.status_code == 200 and "vectors" not in ready.json()["checks"] and count >= n:
                break
            time.sleep(0.1)
        else:
            raise TimeoutError(f"{n} names not encoded within an hour:\n{server.output()}")
        assert first is not None
        done = _names_encoded(server)
        with server.client() as client:
            served = sum(1 for _ in client.iter_classes("runtime"))
    finally:
        server.stop()
    seconds = max(now - first[0], 0.1)  # a quick run can finish between two polls
    return {"names": n, "served": served, "seconds": round(seconds, 1), "names_per_s": (done - first[1]) / seconds}


def rates_part(tmp: Path, cfg: BenchCfg, previous: dict[str, Any]) -> dict[str, Any]:
    """``BENCH_LIFECYCLE_RATES=tiny`` measures some text sides; the others keep their last figures."""
    arches = os.environ.get("BENCH_LIFECYCLE_RATES", ",".join(RATES)).split(",")
    kept = {k: v for k, v in previous.items() if k in RATES and k not in arches}
    out: dict[str, Any] = {k: {"ran": previous.get("ran"), **v} for k, v in kept.items()}  # its own run's info
    for arch in arches:
        config, n = RATES[arch]
        n = 500 if cfg.quick else n
        bundle = _variant(cached_bundle(config), tmp / f"rates-{arch}", other_space=True)  # one template
        state, file = tmp / f"rates-{arch}-state", tmp / f"rates-{arch}.jsonl"
        _names_only(file, n)
        t0 = time.perf_counter()
        cli = [sys.executable, "-m", "promptdistill", "labelsets", "import", str(file), "--state-dir", str(state)]
        subprocess.run(cli, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        imported = time.perf_counter() - t0
        ran = part_run()
        out[arch] = {**_encode_all(bundle, state, n, cfg.threads), "import_seconds": round(imported, 1),
                     "templates": 1, "ran": ran}  # fmt: skip
        log.info("rates %s: %s", arch, out[arch])
    return out


def run(cfg: BenchCfg) -> dict[str, Any]:
    """The parts in BENCH_LIFECYCLE_PARTS; parts not run keep their figures from the last result file
    (each part records the commit, time and load it ran at)."""
    parts = os.environ.get("BENCH_LIFECYCLE_PARTS", ",".join(PARTS)).split(",")
    bundle = cached_bundle(str(TINY_CONFIG))
    previous = cfg.out_dir / "lifecycle.json"
    kept = json.loads(previous.read_text()) if previous.is_file() else {}
    result: dict[str, Any] = {k: with_part_run(v, kept) for k, v in kept.items() if k in PARTS and k not in parts}
    result["bundle"] = "tiny zero-shot (models/configs/tiny-clip.json)"
    with tempfile.TemporaryDirectory(prefix="pd-bench-lifecycle-") as name:
        tmp = Path(name)
        runs: dict[str, Any] = {
            "reload": lambda: reload_part(bundle, tmp, cfg),
            "migrate": lambda: migrate_part(bundle, tmp, cfg),
            "roundtrip": lambda: roundtrip_part(tmp),
            "rates": lambda: rates_part(tmp, cfg, kept.get("rates", {})),
            "rolling": lambda: rolling_part(
                bundle,
                _variant(bundle, tmp / "rolling-v2", other_space=True),
                photo_jpegs(1, (320, 240))[0],
                tmp,
                cfg.quick,
            ),
        }
        for part in PARTS:
            if part in parts:
                ran = part_run()
                result[part] = {**runs[part](), "ran": ran}
                log.info("%s: %s", part, {k: v for k, v in result[part].items() if k not in ("steady", "during_swap")})
    write_result("lifecycle", result, cfg)
    return result
