"""Load generator processes for ``bench gpu`` (stdlib + numpy only: spawned children import nothing heavy).

One Python client process tops out near a few thousand small requests/s (the GIL), below what one
GPU serves; ``bench gpu`` therefore spreads each concurrency level over several processes, each
running ``concurrency / processes`` keep-alive connections that POST real JPEGs in a loop over a
timed window (answers inside the window after the warm-up count).
"""

from __future__ import annotations

import http.client
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

import numpy as np


def _client(port: int, path: str, payloads: list[bytes], start: float, open_at: float, close_at: float) -> list[Any]:
    """Requests back to back until ``close_at``; returns (finished at, latency ms, status) per answer."""
    out = []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    i = int(start * 1000) % len(payloads)
    headers = {"Content-Type": "application/json"}
    while True:
        t0 = time.time()
        if t0 > close_at:
            break
        conn.request("POST", path, body=payloads[i % len(payloads)], headers=headers)
        resp = conn.getresponse()
        resp.read()
        t1 = time.time()
        if open_at <= t1 <= close_at:
            out.append((t1, (t1 - t0) * 1000.0, resp.status))
        i += 1
    conn.close()
    return out


def _process(port: int, path: str, payloads: list[bytes], threads: int, open_at: float, close_at: float) -> list[Any]:
    results: list[list[Any]] = [[] for _ in range(threads)]

    def run(k: int) -> None:
        results[k] = _client(port, path, payloads, k + time.time(), open_at, close_at)

    workers = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return [r for rs in results for r in rs]


def load_window(
    port: int, concurrency: int, payloads: list[bytes], warm_s: float, measure_s: float, processes: int
) -> dict[str, Any]:
    """``concurrency`` connections over ``processes`` processes; images/s and latency over the window."""
    procs = max(1, min(processes, concurrency))
    per = [concurrency // procs + (1 if k < concurrency % procs else 0) for k in range(procs)]
    lead_s = 2.0  # spawned children start (and import) before the window opens
    open_at = time.time() + lead_s + warm_s
    close_at = open_at + measure_s
    with ProcessPoolExecutor(procs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(_process, port, "/v1/classify", payloads, n, open_at, close_at) for n in per]
        done = [r for f in futures for r in f.result()]
    ok = [ms for _, ms, status in done if status == 200]
    errors: dict[str, int] = {}
    for _, _, status in done:
        if status != 200:
            errors[str(status)] = errors.get(str(status), 0) + 1
    lat = np.asarray(ok) if ok else np.asarray([np.nan])
    return {
        "concurrency": concurrency,
        "client_processes": procs,
        "ok": len(ok),
        "errors": errors,
        "images_per_s": len(ok) / measure_s,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "window_s": {"warm_up": warm_s, "measured": measure_s},
        "window_epoch": [open_at, close_at],
    }
