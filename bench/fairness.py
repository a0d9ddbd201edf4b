"""Fair text encoding (issue 10): an authenticated class add during a flood of maximal open-vocabulary requests.

A random ViT-B-32 zero-shot bundle behind ``promptdistill serve`` with an API key. Quiet: the
latency of adding one class (``POST /v1/label-sets/default/classes``, one new name). Flood: 8
anonymous closed-loop clients each sending classify requests with the most candidate labels allowed
(``max_candidate_prompts`` / templates, fresh names every time, so the LRU cache never helps);
meanwhile the same single-name add is repeated. Goal: median add latency under the flood <= 2x quiet.
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import TINY_CONFIG, BenchCfg, write_result
from bench.harness import ServerProcess
from bench.hostile import cached_bundle
from bench.http_load import ARCH, jpegs
from service.client import Client, ServiceClientError

log = logging.getLogger(__name__)
KEY = "bench-key"
FLOOD_CLIENTS = 8


def _adds(client: Client, tag: str, n: int) -> list[float]:
    """``n`` single-name adds, one after another (0.2 s apart): each one's latency in ms."""
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        client.add_classes([f"{tag} class {i}"])
        out.append((time.perf_counter() - t0) * 1000)
        time.sleep(0.2)
    return out


def _flood(url: str, image: bytes, labels: int, stop: threading.Event, c: int, out: dict[str, list[Any]]) -> None:
    """One anonymous client: open-vocabulary requests with ``labels`` fresh names each, until ``stop``."""
    with Client(url, timeout_s=300.0, retries=0) as client:
        i = 0
        while not stop.is_set():
            names = [f"open label {c}-{i}-{j}" for j in range(labels)]
            t0 = time.perf_counter()
            try:
                client.classify_bytes([image], candidate_labels=names)
                status = 200
            except ServiceClientError as e:  # a refused or timed-out anonymous request is a data point
                status = e.status
            out["ms"].append((time.perf_counter() - t0) * 1000)
            out["status"].append(status)
            i += 1
            if status == 429:
                time.sleep(0.2)


def run(cfg: BenchCfg) -> dict[str, Any]:
    arch = str(TINY_CONFIG) if cfg.quick else ARCH
    image = jpegs()[0]
    n_adds = 3 if cfg.quick else 8
    with tempfile.TemporaryDirectory(prefix="pd-bench-fairness-") as tmp:
        bundle = cached_bundle(arch)
        templates = len(json.loads((bundle / "manifest.json").read_text())["text_encoder"]["templates"])
        labels_per_request = 256 // templates  # the default max_candidate_prompts
        env = {"PROMPTDISTILL_API_KEY": KEY}
        server = ServerProcess.serve(bundle, Path(tmp) / "state", env=env, threads=cfg.threads)
        with server, server.client(api_key=KEY, timeout_s=300.0) as writer:
            _adds(writer, "warm", 2)
            quiet = _adds(writer, "quiet", n_adds)
            stop = threading.Event()
            flood: dict[str, list[Any]] = {"ms": [], "status": []}
            threads = [
                threading.Thread(target=_flood, args=(server.url, image, labels_per_request, stop, c, flood))
                for c in range(FLOOD_CLIENTS)
            ]
            for t in threads:
                t.start()
            time.sleep(3.0)  # the text encoder is saturated
            loaded = _adds(writer, "flood", n_adds)
            stop.set()
            server.kill()  # the flood's queued text work need not drain
            for t in threads:
                t.join()
    payload = {
        "model": f"{Path(arch).stem} zero-shot bundle, random init, {templates} templates",
        "flood": f"{FLOOD_CLIENTS} anonymous clients, {labels_per_request} fresh candidate labels per request "
        f"({labels_per_request * templates} prompts)",
        "quiet_add_ms": quiet,
        "flood_add_ms": loaded,
        "quiet_add_median_ms": statistics.median(quiet),
        "flood_add_median_ms": statistics.median(loaded),
        "ratio": statistics.median(loaded) / statistics.median(quiet),
        "flood_requests": {str(s): flood["status"].count(s) for s in set(flood["status"])},
        "flood_request_median_ms": statistics.median(flood["ms"]) if flood["ms"] else None,
    }
    log.info("%s", {k: v for k, v in payload.items() if not isinstance(v, list)})
    write_result("fairness", payload, cfg)
    return payload
