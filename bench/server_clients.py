"""Clients for bench/server.py: slow attackers and requests racing SIGTERM on raw sockets (byte-level
control the project's client cannot give: half-sent headers, kept-alive sockets written at a chosen
moment), and normal traffic through the project's client."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import select
import socket
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx2
from PIL import Image

TRICKLE_S = 0.3  # a slow client sends one byte this often: a per-read idle timeout never fires


def _image_b64() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (20, 120, 220)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def classify_request(close: bool) -> bytes:
    body = json.dumps({"images": [_image_b64()], "top_k": 1}).encode()
    head = f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return (head + ("Connection: close\r\n" if close else "") + "\r\n").encode() + body


def slow_connections(port: int, n: int, deadline_s: float, give_up_s: float) -> list[float | None]:
    """Open ``n`` slow connections (half slowloris, half slow body); per connection, seconds from its
    deadline to its close by the server (None: still open when we gave up)."""
    socks, opened = [], []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        if i % 2:
            s.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        else:
            s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
            s.sendall(b'Content-Length: 100000\r\n\r\n{"images": ["')
        s.setblocking(False)
        socks.append(s)
        opened.append(time.monotonic())
    closed: list[float | None] = [None] * n
    stop = time.monotonic() + give_up_s
    while time.monotonic() < stop and any(c is None for c in closed):
        open_ones = [s for s, c in zip(socks, closed, strict=True) if c is None]
        for s in open_ones:
            with contextlib.suppress(OSError):
                s.send(b"a")
        readable, _, _ = select.select(open_ones, [], [], TRICKLE_S)
        now = time.monotonic()
        for i, s in enumerate(socks):
            if closed[i] is None and s in readable:
                try:
                    chunk = s.recv(65536)
                    while chunk:  # drain the 408 to the EOF
                        chunk = s.recv(65536)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    pass
                closed[i] = now - opened[i] - deadline_s
    for s in socks:
        s.close()
    return closed


def normal_traffic(url: str, seconds: float | None = None, stop: threading.Event | None = None) -> dict[str, Any]:
    """Sequential readyz + classify requests (the project's client); latency percentiles (ms) and errors."""
    from service.client import Client, ServiceClientError

    image = base64.b64decode(_image_b64())
    latencies, errors = [], 0
    end = time.monotonic() + (seconds or 3600)
    with Client(url, timeout_s=30.0, retries=0) as c:
        while time.monotonic() < end and not (stop and stop.is_set()):
            t = time.perf_counter()
            try:
                ok = c.ready() and bool(c.classify_bytes([image], top_k=1))
            except (ServiceClientError, httpx2.HTTPError):
                ok = False
            latencies.append(time.perf_counter() - t)
            errors += not ok
    ms = sorted(x * 1000 for x in latencies)
    return {
        "requests": 2 * len(ms),
        "errors": errors,
        "p50_ms": round(statistics.median(ms), 1) if ms else None,
        "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 1) if ms else None,
    }


def _outcome(sock: socket.socket) -> str:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
            if b"\r\n\r\n" in data:
                head, _, body = data.partition(b"\r\n\r\n")
                length = [int(x.split(b":")[1]) for x in head.lower().split(b"\r\n") if x.startswith(b"content-len")]
                if length and len(body) >= length[0]:
                    break
    except ConnectionResetError:
        return "reset"
    if not data.startswith(b"HTTP/1.1 ") or b"\r\n\r\n" not in data:
        return "no answer"
    status = data[9:12]
    if status == b"200":
        return "answered"
    if status in (b"429", b"503"):
        return "refused with 429/503"
    return f"answered {status.decode('ascii', 'replace')}"  # any other complete answer (a 504 deadline...)


def drain_round(port: int, send_sigterm: Callable[[], None], fresh: int = 120, kept: int = 40) -> dict[str, int]:
    """``kept`` idle keep-alive connections send their next request and ``fresh`` new connections send
    one each; SIGTERM goes out once half of the fresh ones are sent. Outcome counts over all of them."""
    addr = ("127.0.0.1", port)
    counts = {"answered": 0, "refused with 429/503": 0, "refused": 0, "reset": 0, "no answer": 0}
    lock, sent = threading.Lock(), threading.Semaphore(0)
    kept_socks = [socket.create_connection(addr, timeout=60) for _ in range(kept)]
    for s in kept_socks:
        s.sendall(classify_request(close=False))
        _outcome_one(s)

    def one() -> None:
        try:
            s = socket.create_connection(addr, timeout=60)
        except ConnectionRefusedError:
            result = "refused"
            sent.release()
        else:
            with s:
                try:
                    s.sendall(classify_request(close=True))
                except OSError:
                    result = "reset"
                    sent.release()
                else:
                    sent.release()
                    result = _outcome(s)
        with lock:
            counts[result] = counts.get(result, 0) + 1

    threads = [threading.Thread(target=one) for _ in range(fresh)]
    for t in threads:
        t.start()
    for _ in range(fresh // 2):
        sent.acquire(timeout=60)
    for s in kept_socks:
        s.sendall(classify_request(close=False))
    send_sigterm()
    for s in kept_socks:
        result = _outcome(s)
        s.close()
        counts[result] = counts.get(result, 0) + 1
    for t in threads:
        t.join(timeout=120)
    return counts


def _outcome_one(sock: socket.socket) -> None:
    """Read exactly one kept-alive response (by Content-Length), leaving the connection open."""
    data = b""
    while True:
        data += sock.recv(65536)
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            length = [int(x.split(b":")[1]) for x in head.lower().split(b"\r\n") if x.startswith(b"content-len")]
            if len(body) >= length[0]:
                return
