"""bench/http_load.load's steady-state window against a real HTTP server that sheds load."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bench.http_load import load


class _Refuses(BaseHTTPRequestHandler):
    """Answers every POST with 429 and ``Retry-After: 1``, counting them."""

    protocol_version = "HTTP/1.1"
    posts = 0
    lock = threading.Lock()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        with _Refuses.lock:
            _Refuses.posts += 1
        body = b'{"detail": "busy"}'
        self.send_response(429)
        self.send_header("Retry-After", "1")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def refusing_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Refuses)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Refuses.posts = 0
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()


def test_a_client_whose_retry_would_miss_the_window_stops(refusing_port: int) -> None:
    """Told to wait past the window's end, a client stops: it does not re-send at once, again and again."""
    out = load(refusing_port, 4, 0, [b"{}"], 0.0, honour_retry_after=True, window=(0.1, 0.4))
    assert _Refuses.posts == 4, f"{_Refuses.posts} POSTs from 4 clients each told to come back after the window"
    assert out["ok"] == 0 and out["errors"] == {} and out["refusals_retried"] == 4
