"""Fair text encoding (issue 10): an authenticated class add during a flood of maximal open-vocabulary requests.

A random ViT-B-32 zero-shot bundle behind ``promptdistill serve`` with an API key. Quiet: the
latency of adding one class (``POST /v1/label-sets/default/classes``, one new name). Flood: 8
anonymous closed-loop clients each sending classify requests with the most candidate labels allowed
(``max_candidate_prompts`` / templates, fresh names every time, so the LRU cache never helps);
meanwhile the same single-name add is repeated. Goal: median add latency under the flood <= 2x quiet.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import TINY_CONFIG, BenchCfg, real_photos, write_result
from bench.hostile import cached_bundle
from bench.http_load import ARCH, Server

log = logging.getLogger(__name__)
KEY = "bench-key"
FLOOD_CLIENTS = 8


def _post(port: int, path: str, body: dict[str, Any], key: str | None = None) -> tuple[int, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    headers = {"Content-Type": "application/json", **({"X-API-Key": key} if key else {})}
    t0 = time.perf_counter()
    conn.request("POST", path, body=json.dumps(body), headers=headers)
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp.status, time.perf_counter() - t0


def _adds(port: int, tag: str, n: int) -> list[float]:
    out = []
    for i in range(n):
        status, dt = _post(port, "/v1/label-sets/default/classes", {"names": [f"{tag} class {i}"]}, KEY)
        assert status == 201, status
        out.append(dt * 1000)
        time.sleep(0.2)
    return out


def run(cfg: BenchCfg) -> dict[str, Any]:
    arch = str(TINY_CONFIG) if cfg.quick else ARCH
    buf = io.BytesIO()
    real_photos(mirror=False)[0].save(buf, "JPEG", quality=90)
    image = base64.b64encode(buf.getvalue()).decode()
    n_adds = 3 if cfg.quick else 8
    with tempfile.TemporaryDirectory(prefix="pd-bench-fairness-") as tmp:
        bundle = cached_bundle(arch)
        templates = len(json.loads((bundle / "manifest.json").read_text())["text_encoder"]["templates"])
        labels_per_request = 256 // templates  # the default max_candidate_prompts
        server = Server(
            bundle, Path(tmp) / "state", cfg.threads, Path(tmp) / "server.log", {"PROMPTDISTILL_API_KEY": KEY}
        )
        try:
            server.wait_ready()
            _adds(server.port, "warm", 2)
            quiet = _adds(server.port, "quiet", n_adds)
            stop = threading.Event()
            flood: dict[str, list[Any]] = {"ms": [], "status": []}

            def anonymous(c: int) -> None:
                i = 0
                while not stop.is_set():
                    names = [f"open label {c}-{i}-{j}" for j in range(labels_per_request)]
                    try:
                        status, dt = _post(server.port, "/v1/classify", {"images": [image], "candidate_labels": names})
                    except OSError:  # a timed-out anonymous request is a data point, not a crash
                        status, dt = -1, 300.0
                    flood["ms"].append(dt * 1000)
                    flood["status"].append(status)
                    i += 1
                    if status == 429:
                        time.sleep(0.2)

            threads = [threading.Thread(target=anonymous, args=(c,)) for c in range(FLOOD_CLIENTS)]
            for t in threads:
                t.start()
            time.sleep(3.0)  # the text lane is saturated
            loaded = _adds(server.port, "flood", n_adds)
            stop.set()
            for t in threads:
                t.join()
        finally:
            server.proc.kill()  # the flood's queued text work need not drain
            server.stop()
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
