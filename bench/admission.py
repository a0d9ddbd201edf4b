"""Admission before work (issue 10): 64 closed-loop clients vs 4 against ``promptdistill serve`` (defaults).

Each client POSTs one real JPEG photo (base64 JSON) to ``/v1/classify``, waits for the answer and
sends the next (bench/harness.py's closed loop); a refused client (429) sleeps for the
``Retry-After`` it was sent (capped at 2 s), as a well-behaved client does, then retries.
Per level: admitted-request p50/p99 latency (the answered attempt), goodput (answered requests
per second), refusals and whether each carried ``Retry-After``, refusal latency, and the server's
peak RSS. Goal: at 64 clients admitted p50 <= 3x and goodput >= 0.9x the 4-client figures.
"""

from __future__ import annotations

import logging
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

from bench.common import TINY_CONFIG, BenchCfg, write_result
from bench.harness import Classify, ServerProcess, Window, closed_loop
from bench.hostile import _hwm_mib, cached_bundle
from bench.http_load import ARCH, jpegs

log = logging.getLogger(__name__)
LEVELS = (4, 64)


def _level(server: ServerProcess, clients: int, images: list[bytes], seconds: float) -> dict[str, Any]:
    lv = closed_loop(
        partial(Classify, server.url, images, top_k=5), clients, window=Window(0.0, seconds), max_wait_s=2.0
    )
    return {
        "clients": clients,
        "answered": lv["ok"],
        "goodput_rps": lv["throughput_rps"],
        "admitted_p50_ms": lv["attempt_p50_ms"],  # the answered attempt: what an admitted request waits
        "admitted_p99_ms": lv["attempt_p99_ms"],
        "refused": lv["refusals_retried"] + lv["errors"].get("429", 0),
        "refused_with_retry_after": lv["refusals_retried"],
        "refusal_p50_ms": lv["refusal_p50_ms"],
        "errors": lv["errors"],
        "server_peak_rss_mib": _hwm_mib(server.pid),
    }


def run(cfg: BenchCfg) -> dict[str, Any]:
    arch = str(TINY_CONFIG) if cfg.quick else ARCH
    seconds = 5.0 if cfg.quick else 40.0
    images = jpegs()
    with tempfile.TemporaryDirectory(prefix="pd-bench-admission-") as tmp:
        bundle = cached_bundle(arch)
        with ServerProcess.serve(bundle, Path(tmp) / "state", threads=cfg.threads) as server:
            _level(server, 2, images, 3.0)  # warm-up (also refines the service-time estimate)
            levels = []
            for c in LEVELS:
                levels.append(_level(server, c, images, seconds))
                log.info("%s", levels[-1])
            capacity_log = [ln for ln in server.output(10**7).splitlines() if "admission:" in ln]
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
