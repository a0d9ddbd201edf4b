"""Pure ASGI middleware: request body cap (413), request metrics, ``Allow`` for OPTIONS / 405, and the
label-set database's identity on every answer (``X-Store-Id``)."""

from __future__ import annotations

import time
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import problem_response
from service.metrics import Metrics


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the {limit} byte limit")


class BodyLimit:
    """Refuse bodies over ``limit`` bytes, by Content-Length up front or while streaming."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = False
                if too_big:
                    resp = problem_response(413, f"request body exceeds the {self.limit} byte limit", code="too_large")
                    await resp(scope, receive, send)
                    return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, limited, send)


class RequestMetrics:
    """Count requests and observe latency per route template (not per raw path); 499 for a vanished client."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except ClientDisconnect:
            # the client went away (or its body missed the server's deadline: service/server.py answered
            # 408 already); nobody reads an answer, so this is not a server error
            status["code"] = 499
        finally:
            route: Any = scope.get("route")
            path = getattr(route, "path", "unmatched")
            method = scope.get("method", "")
            self.metrics.requests.labels(method, path, str(status["code"])).inc()
            self.metrics.latency.labels(method, path).observe(time.perf_counter() - start)


class AllowedMethods:
    """``OPTIONS`` on a known path answers 204 with ``Allow``; a 405 names every method of the path.

    Starlette matches routes one by one, so a 405 lists only the first route with that path (``GET``
    where ``POST`` also exists) and ``OPTIONS`` is never routed. RFC 9110 (sections 9.3.7, 15.5.6):
    ``Allow`` lists every method the resource supports.
    """

    def __init__(self, app: ASGIApp, routes: list[BaseRoute]) -> None:
        self.app, self.routes = app, routes

    def allowed(self, scope: Scope) -> list[str]:
        methods: set[str] = set()
        for route in _flat(self.routes):
            route_methods = getattr(route, "methods", None)
            if route_methods and route.matches(scope)[0] != Match.NONE:
                methods |= set(route_methods)
        return sorted(methods | {"OPTIONS"}) if methods else []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] == "OPTIONS":
            allowed = self.allowed(scope)
            if allowed:
                await Response(status_code=204, headers={"Allow": ", ".join(allowed)})(scope, receive, send)
                return

        async def fix_405(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 405:
                allow = ", ".join(self.allowed(scope)).encode()
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"allow"]
                message = {**message, "headers": [*headers, (b"allow", allow)]}
            await send(message)

        await self.app(scope, receive, fix_405)


def _flat(routes: list[BaseRoute]) -> list[BaseRoute]:
    """Routes of included routers too (FastAPI keeps ``include_router`` as one entry; its routes carry
    their router's prefix, and the app includes them without one)."""
    out: list[BaseRoute] = []
    for route in routes:
        inner = getattr(route, "original_router", None)
        out.extend(_flat(inner.routes) if inner is not None else [route])
    return out


STORE_ID_HEADER = b"x-store-id"
MODEL_HEADER = b"x-model-version"


class StoreIdentity:
    """Every answer names the label-set database it came from (``X-Store-Id``) and the bundle serving
    now (``X-Model-Version``; a classify answer's ``model`` names the one that computed it).

    Versions are comparable only within one database; a client that keeps the versions it saw
    across runs (the CLI) keys them by this, so a re-created database never gets stale tokens.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def tag(message: Message) -> None:
            services = getattr(scope["app"].state, "services", None)
            if message["type"] == "http.response.start" and services is not None and services.registry.store_id:
                tags = [
                    (STORE_ID_HEADER, services.registry.store_id.encode()),
                    (MODEL_HEADER, services.classifier.model_version.encode()),
                ]
                message = {**message, "headers": [*message.get("headers", []), *tags]}
            await send(message)

        await self.app(scope, receive, tag)
