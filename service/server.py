"""The HTTP layer under the app: uvicorn with read deadlines, a connection cap and a drain that loses nothing.

uvicorn (0.54) closes idle keep-alive connections (``timeout_keep_alive``) and can answer 503 past
``limit_concurrency``, but it has no deadline for a request's headers or body: a client that sends a
header byte every few seconds (slowloris), or a body at a byte a second, holds a connection and a file
descriptor for as long as it likes. hypercorn's ``read_timeout`` is a per-read idle timeout (each byte
restarts it) that closes without an answer, and gunicorn 27's own ASGI worker has keep-alive and
worker timeouts only. So this module adds the smallest missing piece to uvicorn's h11 protocol: one
timer per connection, for the phase the current request is in.

* headers: from the request's first byte (or from the accept, for a connection that sends nothing) to
  the end of its headers, at most ``header_timeout_s``;
* body: from the end of the headers to the end of the body, at most ``body_timeout_s``.

When the timer fires the client gets 408 with ``Connection: close`` and the connection is closed (if the
app had already answered, the connection is just closed). A connection beyond ``max_connections`` gets
503 with ``Retry-After`` for its request and is closed.

On SIGTERM uvicorn closes its listening socket, which resets connections the kernel had completed but
the server had not yet accepted, and closes idle keep-alive connections at once, which resets those
whose next request is already in the socket buffer. :class:`DrainingServer` accepts the whole backlog
before closing the listener, and an idle connection is closed only after a short linger in which a
request already sent is still read and answered (with ``Connection: close``).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any, ClassVar, Literal

import h11
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol, RequestResponseCycle
from uvicorn.server import Server, ServerState

from service.errors import PROBLEM_JSON, problem_body

log = logging.getLogger(__name__)

# How long a connection that is idle when the drain starts stays open. A request its client sent just
# before (on the wire, or already in the socket buffer) is read and answered within it; closing at once,
# as uvicorn does, resets that request. Long enough for a loopback or LAN round trip under load, short
# enough not to delay the drain.
IDLE_LINGER_S = 0.25

Phase = Literal["idle", "headers", "body", "app"]


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float
    body_timeout_s: float
    max_connections: int
    retry_after_s: int


def refusal(status: int, code: str, detail: str) -> bytes:
    """A complete HTTP/1.1 response that closes the connection, with the app's problem-details body."""
    body = json.dumps(problem_body(status, detail, code=code)).encode()
    reason = HTTPStatus(status).phrase
    lines = [f"HTTP/1.1 {status} {reason}", f"content-type: {PROBLEM_JSON}", f"content-length: {len(body)}"]
    return "\r\n".join([*lines, "connection: close", "", ""]).encode("latin-1") + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline per request phase, a connection cap and a lingering drain."""

    limits: ClassVar[ConnectionLimits]

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._phase: Phase = "idle"
        self._deadline: asyncio.TimerHandle | None = None
        self._timed: RequestResponseCycle | None = None  # the request the current phase belongs to
        self._draining = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self.app = self._over_capacity  # this connection's request gets 503, then it is closed
        self._arm("headers")  # a connection that never sends a request is closed too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm("idle")
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._phase == "idle":  # the first byte of the next request on a kept-alive connection
            self._arm("headers")
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        self._disarm("idle")  # between requests uvicorn's keep-alive timer applies
        super().on_response_complete()
        self._follow()  # a pipelined request may have started

    def shutdown(self) -> None:
        """Graceful close (uvicorn calls it on SIGTERM): answer what was sent, then close."""
        self._draining = True
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False
        elif not self.conn.trailing_data[0]:  # idle; a request with bytes already here runs to its deadline
            self.loop.call_later(IDLE_LINGER_S, self._close_if_idle)

    # --- phases
    def _follow(self) -> None:
        """Move the deadline on when a request's headers or body have completed."""
        cycle = self.cycle
        if cycle is None:
            return
        if cycle is not self._timed and not cycle.response_complete:  # new request: its headers are in
            self._timed = cycle
            if self._draining:
                cycle.keep_alive = False
            if cycle.more_body:
                self._arm("body")
            else:
                self._disarm("app")
        elif self._phase == "body" and not cycle.more_body:
            self._disarm("app")

    def _arm(self, phase: Literal["headers", "body"]) -> None:
        self._disarm(phase)
        timeout = self.limits.header_timeout_s if phase == "headers" else self.limits.body_timeout_s
        self._deadline = self.loop.call_later(timeout, self._expired)

    def _disarm(self, phase: Phase) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._phase = phase

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        phase, cycle = self._phase, self.cycle if self._phase == "body" else None
        if cycle is not None and cycle.response_started:  # the app answered without the body: stop waiting
            self.transport.close()
            return
        timeout = self.limits.header_timeout_s if phase == "headers" else self.limits.body_timeout_s
        log.debug("closing %s: request %s not complete within %.1f s", self.client, phase, timeout)
        if cycle is not None:  # the app is waiting for the body: it sees a disconnect, its answer is dropped
            cycle.disconnected = True
            cycle.message_event.set()
        detail = f"the request {phase} did not arrive within {timeout:g} s"
        self.transport.write(refusal(408, "request_timeout", detail))
        self.transport.close()

    def _close_if_idle(self) -> None:
        idle = self.cycle is None or self.cycle.response_complete
        if idle and not self.conn.trailing_data[0] and not self.transport.is_closing():
            if self.conn.our_state in (h11.IDLE, h11.DONE):
                self.conn.send(h11.ConnectionClosed())
            self.transport.close()

    async def _over_capacity(self, scope: Any, receive: Any, send: Any) -> None:
        detail = f"the server holds its maximum of {self.limits.max_connections} connections; retry later"
        body = json.dumps(problem_body(503, detail, code="overloaded"))
        headers = [
            (b"content-type", PROBLEM_JSON.encode()),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(self.limits.retry_after_s).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body.encode()})


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedH11Protocol]:
    """The protocol class uvicorn's ``Config(http=...)`` takes, bound to ``limits``."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits})


class DrainingServer(Server):
    """uvicorn's server, stopping without resets: backlog accepted first; ready hooks for the supervisor."""

    def __init__(
        self,
        config: Config,
        on_ready: Callable[[], None] | None = None,
        on_stop: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(config)
        self.on_ready, self.on_stop = on_ready, on_stop

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.on_ready is not None:
            self.on_ready()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.on_stop is not None:
            self.on_stop()
        # Accept what the kernel has queued and close the listener with no await in between, so no
        # connection can complete its handshake in a gap and then be reset by the close.
        waiting = [conn for server in self.servers for conn in _accept_backlog(server)]
        for server in self.servers:
            server.close()
        if waiting:
            log.info("drain: accepted %d connection(s) from the backlog", len(waiting))
        loop = asyncio.get_running_loop()
        factory = functools.partial(
            self.config.http_protocol_class,  # type: ignore[call-arg]
            config=self.config,
            server_state=self.server_state,
            app_state=self.lifespan.state,
        )
        for conn in waiting:
            await loop.connect_accepted_socket(factory, conn)  # registered: uvicorn's drain waits for it
        await super().shutdown(sockets)


def _accept_backlog(server: asyncio.base_events.Server) -> list[socket.socket]:
    accepted: list[socket.socket] = []
    for transport_socket in server.sockets:
        # asyncio exposes listeners as TransportSocket (no accept()); a dup of the fd shares the same queue
        listener = socket.socket(fileno=os.dup(transport_socket.fileno()))
        try:
            listener.setblocking(False)
            while True:
                try:
                    conn, _ = listener.accept()
                except (BlockingIOError, InterruptedError):
                    break
                conn.setblocking(False)
                accepted.append(conn)
        finally:
            listener.close()
    return accepted


def uvicorn_config(app: str, limits: ConnectionLimits, **kwargs: Any) -> Config:
    """uvicorn's Config with the guarded protocol (h11: the timers hook its parser's events)."""
    return Config(app, http=guarded_protocol(limits), **kwargs)


# --- readiness marks of supervised workers (serve --workers N): one file per serving worker
def mark_ready(folder: Path | None) -> None:
    if folder is not None:
        (folder / f"{os.getpid()}.ready").touch()


def unmark_ready(folder: Path | None) -> None:
    if folder is not None:
        (folder / f"{os.getpid()}.ready").unlink(missing_ok=True)


def count_ready(folder: Path) -> int:
    """Workers marked ready whose process is still alive (a worker killed -9 leaves its mark behind)."""
    alive = 0
    for mark in folder.glob("*.ready"):
        try:
            os.kill(int(mark.stem), 0)
        except (ValueError, ProcessLookupError):
            continue
        except PermissionError:  # alive, owned by someone else
            pass
        alive += 1
    return alive
