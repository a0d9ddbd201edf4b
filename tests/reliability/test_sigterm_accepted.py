"""SIGTERM: stop accepting, then answer every connection that was accepted -- 0 resets.

Two kinds of requests are sent just before the signal, against the real ``promptdistill serve`` child:
fresh connections (many land in the kernel's accept backlog, which a plain close of the listener
resets) and the next request on idle kept-alive connections (which a plain close of idle connections
resets while the request sits in the socket buffer). A connection whose ``connect()`` succeeded was
accepted and must get a complete HTTP response (200, or 429/503 with Retry-After from admission); one
refused at ``connect()`` was not accepted.
(test_sigterm_drain.py covers requests already queued in the engine.)
"""

from __future__ import annotations

import base64
import io
import json
import signal
import socket
import threading
from pathlib import Path

import pytest
from PIL import Image

from tests.reliability.conftest import start_server, stop_server

pytestmark = pytest.mark.slow
N_FRESH = 120
N_KEPT = 40
SEND_BEFORE_SIGNAL = N_FRESH // 2  # the signal goes out once this many fresh requests are on their way


def _classify_request(close: bool) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (20, 120, 220)).save(buf, "PNG")
    body = json.dumps({"images": [base64.b64encode(buf.getvalue()).decode()], "top_k": 1}).encode()
    head = f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return (head + ("Connection: close\r\n" if close else "") + "\r\n").encode() + body


def _read_response(sock: socket.socket) -> bytes:
    """One whole response (by Content-Length); raises on a reset, returns short data on EOF."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def _outcome(sock: socket.socket) -> str:
    try:
        data = _read_response(sock)
    except ConnectionResetError:
        return "reset"
    status = data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/1.1 ") else "no answer"
    return status


def test_sigterm_answers_every_accepted_connection(bundle_copy: Path, tmp_path: Path) -> None:
    server = start_server(bundle_copy, tmp_path)
    addr = ("127.0.0.1", int(server.url.rsplit(":", 1)[1]))
    fresh_request, kept_request = _classify_request(close=True), _classify_request(close=False)
    outcomes: dict[int, str] = {}
    sent = threading.Semaphore(0)

    def fresh(i: int) -> None:
        try:
            sock = socket.create_connection(addr, timeout=60)
        except ConnectionRefusedError:
            outcomes[i] = "refused"  # after the listener closed: not accepted, nothing promised
            sent.release()
            return
        with sock:
            try:
                sock.sendall(fresh_request)
            except (BrokenPipeError, ConnectionResetError):
                outcomes[i] = "reset"
                sent.release()
                return
            sent.release()
            outcomes[i] = _outcome(sock)

    try:
        kept = [socket.create_connection(addr, timeout=60) for _ in range(N_KEPT)]
        for sock in kept:  # one answered request each: now they are idle keep-alive connections
            sock.sendall(kept_request)
            assert _outcome(sock) == "200"
        threads = [threading.Thread(target=fresh, args=(i,)) for i in range(N_FRESH)]
        for t in threads:
            t.start()
        for _ in range(SEND_BEFORE_SIGNAL):
            assert sent.acquire(timeout=60), "fresh requests were never sent"
        for sock in kept:
            sock.sendall(kept_request)
        server.proc.send_signal(signal.SIGTERM)
        kept_outcomes = [_outcome(sock) for sock in kept]
        for t in threads:
            t.join(timeout=120)
        code = server.proc.wait(timeout=60)
    finally:
        stop_server(server)
        for sock in kept:
            sock.close()
    fresh_outcomes = list(outcomes.values())
    assert len(fresh_outcomes) == N_FRESH
    # an answer is a complete response: 200, or a refusal with Retry-After when admission is full
    answers = {"200", "429", "503"}
    counts = sorted((o, fresh_outcomes.count(o)) for o in set(fresh_outcomes))
    answered = sum(o in answers for o in fresh_outcomes)
    assert answered >= SEND_BEFORE_SIGNAL, counts
    assert set(fresh_outcomes) <= answers | {"refused"}, counts
    assert "200" in fresh_outcomes, counts
    assert set(kept_outcomes) <= answers, sorted(set(kept_outcomes))
    assert code == 0, server.output()
