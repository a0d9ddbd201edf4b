"""Admission before work (issue 10): 64 closed-loop clients vs 4 against ``promptdistill serve`` (defaults).

Each client POSTs one real JPEG photo (base64 JSON) to ``/v1/classify``, waits for the answer and
sends the next; a refused client (429) sleeps for the ``Retry-After`` it was sent (capped at 2 s),
as a well-behaved client does. Per level: admitted-request p50/p99 latency, goodput (answered
requests per second), refusals and whether each carried ``Retry-After``, refusal latency, and the
server's peak RSS. Goal: at 64 clients admitted p50 <= 3x and goodput >= 0.9x the 4-client figures.
"""

from __future__ import annotations

import http.client
import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import TINY_CONFIG, BenchCfg, write_result
from bench.hostile import _hwm_mib, cached_bundle
from bench.http_load import ARCH, Server, _payloads

log = logging.getLogger(__name__)
LEVELS = (4, 64)


def _client(port: int, payloads: list[bytes], stop: float, out: dict[str, list[Any]], lock: threading.Lock) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    i = 0
    while time.perf_counter() < stop:
        t0 = time.perf_counter()
        try:
            conn.request(
                "POST", "/v1/classify", body=payloads[i % len(payloads)], headers={"Content-Type": "application/json"}
            )
            resp = conn.getresponse()
            resp.read()
        except (OSError, http.client.HTTPException):
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            with lock:
                out["errors"].append("transport")
            continue
        dt = time.perf_counter() - t0
        i += 1
        with lock:
            if resp.status == 200:
                out["ok"].append(dt)
            elif resp.status == 429:
                retry = resp.getheader("Retry-After")
                out["refused"].append((dt, retry))
            else:
                out["errors"].append(resp.status)
        if resp.status == 429:
            time.sleep(min(float(retry or 1), 2.0))
    conn.close()


def _level(server: Server, clients: int, payloads: list[bytes], seconds: float) -> dict[str, Any]:
    out: dict[str, list[Any]] = {"ok": [], "refused": [], "errors": []}
    lock = threading.Lock()
    start = time.perf_counter()
    stop = start + seconds
    threads = [threading.Thread(target=_client, args=(server.port, payloads, stop, out, lock)) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = np.asarray(out["ok"]) * 1000 if out["ok"] else np.asarray([np.nan])
    refused = out["refused"]
    return {
        "clients": clients,
        "answered": len(out["ok"]),
        "goodput_rps": len(out["ok"]) / wall,
        "admitted_p50_ms": float(np.percentile(ok, 50)),
        "admitted_p99_ms": float(np.percentile(ok, 99)),
        "refused": len(refused),
        "refused_with_retry_after": sum(1 for _, r in refused if r),
        "refusal_p50_ms": float(np.median([d for d, _ in refused]) * 1000) if refused else None,
        "errors": out["errors"][:20],
        "server_peak_rss_mib": _hwm_mib(server.proc.pid),
    }


def run(cfg: BenchCfg) -> dict[str, Any]:
    arch = str(TINY_CONFIG) if cfg.quick else ARCH
    seconds = 5.0 if cfg.quick else 40.0
    payloads = _payloads()
    with tempfile.TemporaryDirectory(prefix="pd-bench-admission-") as tmp:
        bundle = cached_bundle(arch)
        server = Server(bundle, Path(tmp) / "state", cfg.threads, Path(tmp) / "server.log")
        try:
            server.wait_ready()
            _level(server, 2, payloads, 3.0)  # warm-up (also refines the service-time estimate)
            levels = []
            for c in LEVELS:
                levels.append(_level(server, c, payloads, seconds))
                log.info("%s", levels[-1])
            capacity_log = [ln for ln in server.log_path.read_text().splitlines() if "admission:" in ln]
        finally:
            server.stop()
    four, many = levels[0], levels[-1]
    payload = {
        "model": f"{Path(arch).stem} zero-shot bundle, random init, ONNX fp32; server defaults",
        "seconds_per_level": seconds,
        "levels": levels,
        "p50_ratio_64_vs_4": many["admitted_p50_ms"] / four["admitted_p50_ms"],
        "goodput_ratio_64_vs_4": many["goodput_rps"] / four["goodput_rps"],
        "capacity_at_start": capacity_log[:1],
    }
    write_result("admission", payload, cfg)
    return payload
