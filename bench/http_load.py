"""HTTP load against the real service (``promptdistill serve`` in a subprocess, loopback only).

At concurrency 1, 4 and 16 (threads with keep-alive connections, each POSTing one real photo as
base64 JSON to ``/v1/classify``): throughput, p50/p95/p99 latency. In the same run, before and after
the server, the raw ONNX Runtime encoder on the same graph with the same thread count: images/s at
batch 1 and 8. The ratio service / raw says what decoding, preprocessing, batching, search and
HTTP cost. On a 2-core machine the client, the server's event loop and the encoder share the
cores, so the ratio is a lower bound of what a dedicated server achieves.
"""

from __future__ import annotations

import base64
import http.client
import io
import itertools
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import TINY_CONFIG, BenchCfg, ort_session, real_photos, save_figure, time_call, write_result

log = logging.getLogger(__name__)

CONCURRENCY = (1, 4, 16)
ARCH = "ViT-B-32"  # realistic encoder cost (random init); --quick uses the tiny model


def build_bundle(arch: str, out: Path) -> Path:
    """A zero-shot bundle with ONNX (random weights), 100 ImageNet class names."""
    import torch
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    from models.zeroshot import build_zeroshot_bundle, named_templates

    torch.manual_seed(0)
    names = list(IMAGENET_CLASSNAMES[:100])
    build_zeroshot_bundle(arch, None, names, named_templates("simple"), out, onnx=True, progress=False)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``promptdistill serve`` as a subprocess on 127.0.0.1; waits for /readyz."""

    def __init__(
        self, bundle: Path, state: Path, threads: int, log_path: Path, env_extra: dict[str, str] | None = None
    ) -> None:
        self.port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTDISTILL_")}  # defaults only
        env.update({"PROMPTDISTILL_THREADS": str(threads), "HF_HUB_OFFLINE": "1", **(env_extra or {})})
        args = ["serve", "--bundle", str(bundle), "--state-dir", str(state), "--port", str(self.port)]
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "promptdistill.cli", *args], env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.log_path.read_text()[-3000:]}")
            try:
                status, _ = request(self.port, "GET", "/readyz")
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready after {timeout_s} s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(60)
        finally:
            self._log.close()


def request(port: int, method: str, path: str, body: bytes | None = None, conn: Any = None) -> tuple[int, bytes]:
    status, data, _ = request_with_retry_after(port, method, path, body, conn)
    return status, data


def request_with_retry_after(
    port: int, method: str, path: str, body: bytes | None = None, conn: Any = None
) -> tuple[int, bytes, float | None]:
    """Status, body and the ``Retry-After`` header in seconds (None when absent)."""
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Content-Type": "application/json"} if body is not None else {}
    c.request(method, path, body=body, headers=headers)
    resp = c.getresponse()
    data = resp.read()
    retry_after = resp.getheader("Retry-After")
    if conn is None:
        c.close()
    return resp.status, data, float(retry_after) if retry_after else None


def _payloads() -> list[bytes]:
    out = []
    for photo in real_photos(mirror=False):
        buf = io.BytesIO()
        photo.save(buf, format="JPEG", quality=90)
        out.append(json.dumps({"images": [base64.b64encode(buf.getvalue()).decode()], "top_k": 5}).encode())
    return out


def load(
    port: int,
    concurrency: int,
    n_requests: int,
    payloads: list[bytes],
    max_seconds: float,
    path: str = "/v1/classify",
    honour_retry_after: bool = False,
    window: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """``n_requests`` POSTs to ``path`` from ``concurrency`` threads; stops early after ``max_seconds``.

    ``honour_retry_after``: clients behave like ours (service/client.py): a 429 / 503 with
    ``Retry-After`` is retried after that delay, its latency counted from the first attempt, and the
    refusals are counted in ``refusals``.

    ``window=(warm_up_s, measure_s)``: steady state instead of a fixed count. Every client sends
    request after request until the window closes; only answers that arrive inside the window
    (after the warm-up) count, so throughput is answers / ``measure_s``. A fixed count ends with a
    tail in which few clients are left (the last ones may be asleep in a Retry-After), which charges a
    server that sheds load for its clients' back-off, not for its work.
    """
    done: list[tuple[float, float, int]] = []  # (finished at, latency ms, status)
    refusals = [0]
    lock = threading.Lock()
    counter = iter(range(n_requests)) if window is None else itertools.count()
    t0 = time.perf_counter()
    open_from, close_at = (t0, t0 + max_seconds) if window is None else (t0 + window[0], t0 + sum(window))

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        for i in counter:  # shared iterator: each index taken once (next() on a C iterator is atomic)
            if time.perf_counter() > close_at:
                break
            start = time.perf_counter()
            while True:
                status, _, retry_after = request_with_retry_after(port, "POST", path, payloads[i % len(payloads)], conn)
                if not (honour_retry_after and status in (429, 503) and retry_after is not None):
                    break
                with lock:
                    refusals[0] += 1
                if window is not None and time.perf_counter() + retry_after > close_at:
                    status = 0  # the window closes before the retry: this client is done (sending again
                    break  # at once would hammer the server with requests it was told to delay)
                time.sleep(retry_after)
            if not status:
                break
            now = time.perf_counter()
            with lock:
                done.append((now, (now - start) * 1000.0, status))
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if window is not None:
        done = [d for d in done if open_from <= d[0] <= close_at]
    latencies = [ms for _, ms, status in done if status == 200]
    errors: dict[int, int] = {}
    for _, _, status in done:
        if status != 200:
            errors[status] = errors.get(status, 0) + 1
    lat = np.asarray(latencies) if latencies else np.asarray([np.nan])
    out = {
        "concurrency": concurrency,
        "ok": len(latencies),
        "errors": errors,
        "refusals_retried": refusals[0],
        "wall_s": wall,
        "throughput_rps": len(latencies) / (wall if window is None else window[1]),
        "p50_ms": float(np.percentile(lat, 50)),
        "p95_ms": float(np.percentile(lat, 95)),
        "p99_ms": float(np.percentile(lat, 99)),
    }
    if window is not None:
        out["window_s"] = {"warm_up": window[0], "measured": window[1]}
    return out


def raw_encoder(onnx_path: Path, pixels: np.ndarray, cfg: BenchCfg) -> dict[str, float]:
    """Images/s of the bare ONNX Runtime session at batch 1 and 8 (no decoding, no HTTP)."""
    session = ort_session(onnx_path, cfg.threads)
    out = {}
    for b in (1, 8):
        x = np.ascontiguousarray(pixels[:b])
        iters = 2 if cfg.quick else (40 if b == 1 else 10)
        t = time_call(partial(session.run, None, {"pixels": x}), iters=iters, max_seconds=cfg.max_seconds)
        out[f"b{b}_images_per_s"] = b * 1000.0 / t.median_ms
    return out


def run(cfg: BenchCfg) -> dict[str, Any]:
    from models.bundle import load_bundle
    from models.preprocess import preprocess_batch

    arch = str(TINY_CONFIG) if cfg.quick else ARCH
    with tempfile.TemporaryDirectory(prefix="pd-bench-http-") as tmp:
        bundle_dir = build_bundle(arch, Path(tmp) / "bundle")
        bundle = load_bundle(bundle_dir)
        pixels = preprocess_batch(real_photos(mirror=False)[:8], bundle.manifest.image_encoder.preprocess.to_config())
        onnx_path = bundle_dir / bundle.manifest.image_encoder.onnx[0].file
        raw_before = raw_encoder(onnx_path, pixels, cfg)
        payloads = _payloads()
        server = Server(bundle_dir, Path(tmp) / "state", cfg.threads, Path(tmp) / "server.log")
        try:
            server.wait_ready()
            load(server.port, 2, 4, payloads, cfg.max_seconds)  # warm-up
            levels = []
            for c in CONCURRENCY:
                n = 4 * c if cfg.quick else max(40, 8 * c)
                levels.append(load(server.port, c, n, payloads, 3 * cfg.max_seconds))
                log.info("c=%d: %s", c, {k: round(v, 2) for k, v in levels[-1].items() if isinstance(v, float)})
        finally:
            exit_code = server.stop()
        raw_after = raw_encoder(onnx_path, pixels, cfg)
    raw = {k: (raw_before[k] + raw_after[k]) / 2 for k in raw_before}
    best = max(raw.values())
    for lv in levels:
        lv["ratio_vs_raw_b1"] = lv["throughput_rps"] / raw["b1_images_per_s"]
        lv["ratio_vs_raw_best"] = lv["throughput_rps"] / best
    payload = {
        "goal": "service throughput >= 0.9x raw ONNX Runtime encoder throughput",
        "model": f"{Path(arch).stem if cfg.quick else arch} zero-shot bundle, random init, ONNX fp32, 100 classes",
        "request": "POST /v1/classify, JSON, one base64 JPEG photo (real, 300-1411 px), top_k 5",
        "server": "promptdistill serve, defaults (max_batch_size 16, max_wait_ms 5), PROMPTDISTILL_THREADS",
        "raw_encoder": {"before": raw_before, "after": raw_after, "mean": raw},
        "levels": levels,
        "server_exit_code": exit_code,
    }
    write_result("http", payload, cfg)
    _plot(levels, raw, cfg)
    return payload


def _plot(levels: list[dict[str, Any]], raw: dict[str, float], cfg: BenchCfg) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cs = [lv["concurrency"] for lv in levels]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(cs, [lv["throughput_rps"] for lv in levels], marker="o", label="service (requests/s = images/s)")
    for k, v in raw.items():
        a.axhline(v, linestyle="--", color="gray" if "b1" in k else "black", label=f"raw ORT {k.split('_')[0]}")
    a.set(xscale="log", xlabel="concurrency", ylabel="images / s", title="throughput")
    a.set_xticks(cs, [str(c) for c in cs])
    a.legend(fontsize=8)
    for q in ("p50_ms", "p95_ms", "p99_ms"):
        b.plot(cs, [lv[q] for lv in levels], marker="o", label=q[:3])
    b.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="latency ms", title="latency")
    b.set_xticks(cs, [str(c) for c in cs])
    b.legend()
    return save_figure(fig, "http", cfg)
