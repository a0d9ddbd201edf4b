"""Slow clients cannot hold the server: headers and bodies have deadlines (408), connections a cap (503).

Against the real ``promptdistill serve`` child. The slow clients trickle a byte at a time, so a per-read
idle timeout would never close them: only a deadline for the whole header block / body does. What is
asserted is behaviour (every slow connection answered 408 and closed, normal clients all served);
how fast it happens is measured in bench/slow_clients.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import select
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
import pytest
from PIL import Image

from tests.reliability.conftest import ServerProcess, start_server, stop_server

pytestmark = pytest.mark.slow
TIMEOUT_S = 2  # header and body deadline the server gets
N_SLOW = 128  # as in the red-team report: half slowloris, half slow body
GIVE_UP_S = 60.0  # far beyond the deadline: a server without one keeps them open


@dataclass
class Slow:
    sock: socket.socket
    received: bytearray = field(default_factory=bytearray)
    closed: bool = False


def _host_port(server: ServerProcess) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


def open_slow(server: ServerProcess, kind: str) -> Slow:
    sock = socket.create_connection(_host_port(server), timeout=10)
    if kind == "headers":  # slowloris: the header block never ends
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    else:  # headers complete, the promised body never finishes
        sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
        sock.sendall(b'Content-Length: 100000\r\n\r\n{"images": ["')
    sock.setblocking(False)
    return Slow(sock)


def trickle_until_closed(conns: list[Slow], give_up_s: float) -> None:
    """Send one byte to every open connection each round and read whatever the server answers."""
    deadline = time.monotonic() + give_up_s
    while time.monotonic() < deadline and not all(c.closed for c in conns):
        for c in conns:
            if not c.closed:
                with contextlib.suppress(OSError):  # the server closed it; the read below sees why
                    c.sock.send(b"a")
        readable, _, _ = select.select([c.sock for c in conns if not c.closed], [], [], 0.3)
        for c in conns:
            if c.sock in readable:
                try:
                    chunk = c.sock.recv(65536)
                except ConnectionResetError:  # a byte we sent crossed the close: closed all the same
                    chunk = b""
                c.received += chunk
                c.closed = not chunk


def normal_traffic(server: ServerProcess, stop: threading.Event, results: list[int | str]) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, "PNG")
    with httpx2.Client(base_url=server.url, timeout=30) as c:
        while not stop.is_set():
            try:
                results.append(c.get("/readyz").status_code)
                r = c.post("/v1/classify", files={"files": ("red.png", buf.getvalue(), "image/png")})
                results.append(r.status_code)
            except httpx2.HTTPError as e:
                results.append(repr(e))


@pytest.fixture(scope="module")
def slow_server(tiny_bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    work = tmp_path_factory.mktemp("slow-clients")
    bundle = Path(shutil.copytree(tiny_bundle_dir, work / "bundle"))
    env = {"PROMPTDISTILL_HEADER_TIMEOUT_S": str(TIMEOUT_S), "PROMPTDISTILL_BODY_TIMEOUT_S": str(TIMEOUT_S)}
    server = start_server(bundle, work, env)
    try:
        yield server
    finally:
        stop_server(server)


def test_slow_headers_and_bodies_get_408_and_normal_clients_are_served(slow_server: ServerProcess) -> None:
    stop, results = threading.Event(), []
    normal = threading.Thread(target=normal_traffic, args=(slow_server, stop, results))
    normal.start()
    try:
        conns = [open_slow(slow_server, "headers" if i % 2 else "body") for i in range(N_SLOW)]
        trickle_until_closed(conns, GIVE_UP_S)
    finally:
        stop.set()
        normal.join(timeout=60)
    still_open = sum(not c.closed for c in conns)
    assert still_open == 0, f"{still_open}/{N_SLOW} slow connections still open after {GIVE_UP_S} s"
    answers = [bytes(c.received) for c in conns if c.received]
    # a connection can be reset by a trickled byte crossing the close before its 408 is read; most are not
    assert len(answers) >= N_SLOW // 2, f"only {len(answers)} of {N_SLOW} read an answer"
    assert all(a.startswith(b"HTTP/1.1 408 ") and b"connection: close" in a for a in answers), answers[:3]
    assert results and all(r == 200 for r in results), [r for r in results if r != 200][:5]
    assert slow_server.proc.poll() is None


@pytest.mark.parametrize("kind", ["headers", "body"])
def test_an_idle_slow_request_gets_408_then_eof(slow_server: ServerProcess, kind: str) -> None:
    c = open_slow(slow_server, kind)
    c.sock.setblocking(True)
    c.sock.settimeout(GIVE_UP_S)
    data = b""
    while chunk := c.sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), data
    assert json.loads(body)["code"] == "request_timeout" and kind.encode() in body
    # the next request is unaffected
    assert httpx2.get(slow_server.url + "/livez", timeout=30).status_code == 200


def test_connections_beyond_the_cap_get_503_with_retry_after(bundle_copy: Path, tmp_path: Path) -> None:
    cap = 8
    env = {"PROMPTDISTILL_MAX_CONNECTIONS": str(cap), "PROMPTDISTILL_HEADER_TIMEOUT_S": "120"}
    server = start_server(bundle_copy, tmp_path, env)
    try:
        held = [socket.create_connection(_host_port(server), timeout=10) for _ in range(cap)]
        r = _wait_for(lambda: httpx2.get(server.url + "/livez", timeout=30), lambda r: r.status_code == 503)
        assert r.headers["retry-after"].isdigit() and r.headers["connection"] == "close"
        assert r.json()["code"] == "overloaded" and r.headers["content-type"] == "application/problem+json"
        for s in held:
            s.close()
        _wait_for(lambda: httpx2.get(server.url + "/livez", timeout=30), lambda r: r.status_code == 200)
    finally:
        stop_server(server)


def _wait_for(call, ok, timeout_s: float = 30.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while True:
        result = call()
        if ok(result) or time.monotonic() > deadline:
            assert ok(result), result
            return result
        time.sleep(0.05)
