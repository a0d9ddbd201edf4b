"""Domain errors and their one rendering on the wire: RFC 9457 problem details.

Everything below :class:`ServiceError` carries an HTTP status, a stable ``code`` and a message that
tells the caller what to do. Every refusal the service makes — a domain error, request validation,
an unknown route or method, a middleware refusal (body size, overload), even an unexpected
exception — leaves as ``application/problem+json`` with ``type``, ``title``, ``status``, ``detail``
and ``code`` (plus ``errors``, one entry per invalid field, for validation). :func:`problem_response`
is the one place that builds such a response; :func:`install_error_handlers` routes every source to it.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
# Problem types are URNs: they name the kind of problem without promising a page to fetch.
TYPE_PREFIX = "urn:promptdistill:problem:"


class StartupError(RuntimeError):
    """The service cannot start; the message says what to fix."""


class ServiceError(Exception):
    """Base of errors a client can cause or handle. ``status`` is the HTTP status."""

    status = 400
    code = "bad_request"

    def __init__(
        self, message: str, *, headers: dict[str, str] | None = None, extensions: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        self.extensions = extensions or {}  # extra members of the problem object (RFC 9457 section 3.2)


class UnknownLabelSet(ServiceError):
    status, code = 404, "unknown_label_set"


class UnknownClass(ServiceError):
    status, code = 404, "unknown_class"


class DuplicateClass(ServiceError):
    status, code = 409, "duplicate_class"


class LabelSetExists(ServiceError):
    status, code = 409, "label_set_exists"


class ProtectedLabelSet(ServiceError):
    status, code = 409, "protected_label_set"


class SimilarClasses(ServiceError):
    """if_similar='error' and a new class is a likely duplicate or confusion (the pairs in ``pairs``)."""

    status, code = 409, "similar_classes"


class EmptyLabelSet(ServiceError):
    status, code = 409, "empty_label_set"


class NoTextSide(ServiceError):
    status, code = 409, "no_text_side"


class InvalidInput(ServiceError):
    status, code = 422, "invalid_input"


class BadImage(ServiceError):
    status, code = 422, "bad_image"


class ImageTooLarge(ServiceError):
    status, code = 413, "too_large"


class UnsupportedMediaType(ServiceError):
    status, code = 415, "unsupported_media_type"


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"


class Overloaded(ServiceError):
    """The queue is full (429) or the server is draining (503); both carry Retry-After."""

    status, code = 429, "overloaded"

    def __init__(self, message: str, *, retry_after_s: int, status: int = 429) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})
        self.status = status


class StoreUnavailable(ServiceError):
    """The label-set database cannot be reached: writes (and reads it must answer) get 503."""

    status, code = 503, "store_unavailable"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class Encoding(ServiceError):
    """A label set's classes have no vectors in the served space yet (a new bundle's space, or classes
    another replica added): answered once they are encoded (503 + Retry-After)."""

    status, code = 503, "encoding_vectors"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class ReloadRefused(ServiceError):
    """A reload cannot happen now (another one runs) or cannot swap this bundle in; the served model stays."""

    status, code = 409, "reload_refused"


class BadBundle(ServiceError):
    """The configured bundle path does not hold a bundle this service can serve; the served model stays."""

    status, code = 422, "bad_bundle"


class DeadlineExceeded(ServiceError):
    status, code = 504, "deadline_exceeded"


class ClientGone(ServiceError):
    """The client disconnected while its work was queued; nobody reads this response."""

    status, code = 499, "client_closed_request"


# Codes for refusals that are not ServiceErrors (routing, validation, crashes), by status.
_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "too_large",
    422: "validation_error",
    500: "internal_error",
    503: "unavailable",
}


_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def _title(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:  # 499 and other non-standard statuses
        return "Client Closed Request" if status == 499 else "Error"


def problem_body(
    status: int, detail: str, *, code: str | None = None, errors: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The problem-details object (RFC 9457) for ``status``; ``code`` names the kind of problem."""
    code = code or _HTTP_CODES.get(status, "error")
    body: dict[str, Any] = {
        "type": TYPE_PREFIX + code,
        "title": _title(status),
        "status": status,
        "detail": detail,
        "code": code,
    }
    if errors is not None:
        body["errors"] = errors
    return body


def problem_response(
    status: int,
    detail: str,
    *,
    code: str | None = None,
    headers: dict[str, str] | None = None,
    errors: list[dict[str, Any]] | None = None,
) -> JSONResponse:
    """An ``application/problem+json`` response; usable from routes, handlers and pure ASGI middleware."""
    return JSONResponse(
        problem_body(status, detail, code=code, errors=errors),
        status_code=status,
        headers=headers,
        media_type=PROBLEM_JSON,
    )


def field_errors(raw: Any) -> list[dict[str, Any]]:
    """pydantic's error list as ``{"pointer", "field", "detail", "type"}`` entries (no input echoed back)."""
    out = []
    for err in raw:
        loc = [str(part) for part in err.get("loc", ())]
        # the first element says where the field lives (body, query, path, header); the pointer is
        # the JSON Pointer (RFC 6901) into that part, as RFC 9457's examples use.
        where, rest = (
            (loc[0], loc[1:]) if loc and loc[0] in ("body", "query", "path", "header", "cookie") else ("body", loc)
        )
        escaped = [p.replace("~", "~0").replace("/", "~1") for p in rest]
        out.append(
            {
                "in": where,
                "pointer": "#/" + "/".join(escaped) if rest else "#",
                "field": ".".join(rest) if rest else where,
                "detail": str(err.get("msg", "invalid")),
                "type": str(err.get("type", "value_error")),
            }
        )
    return out


async def _domain(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    if exc.status >= 500:
        log.warning("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
    headers = dict(exc.headers)
    if isinstance(exc, Unauthorized):
        headers.setdefault("WWW-Authenticate", "ApiKey")
    response = problem_response(exc.status, exc.message, code=exc.code, headers=headers)
    if exc.extensions:
        body = problem_body(exc.status, exc.message, code=exc.code) | exc.extensions
        response = JSONResponse(body, status_code=exc.status, headers=headers, media_type=PROBLEM_JSON)
    return response


async def _validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = field_errors(exc.errors())
    summary = "; ".join(f"{e['field']}: {e['detail']}" for e in errors[:5])
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return problem_response(422, f"invalid request: {summary}{more}", code="validation_error", errors=errors)


async def _http(request: Request, exc: Exception) -> JSONResponse:
    """Routing refusals (404, 405 with Allow) and starlette's own HTTPExceptions; headers are kept."""
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else _title(exc.status_code)
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"no route {request.url.path}; see /docs for the routes"
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers = {k: v for k, v in headers.items() if k.lower() != "allow"}
        headers["Allow"] = allowed_methods(request)
        if detail == "Method Not Allowed":
            detail = f"{request.method} is not allowed on {request.url.path}; allowed: {headers['Allow']}"
    return problem_response(exc.status_code, detail, headers=headers)


def allowed_methods(request: Request) -> str:
    """Every method some route serves at this path (starlette's 405 names only the first route's).

    Routes are probed by method because included routers do not expose a ``methods`` attribute.
    """
    methods = {
        method
        for method in _METHODS
        if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in request.app.routes)
    }
    if "GET" in methods:
        methods.add("HEAD")
    return ", ".join(sorted(methods))


_CRASH_DETAIL = "internal error; the server log has the details"


async def _crash(request: Request, exc: Exception) -> JSONResponse:
    # (only for crashes outside CrashGuard; starlette re-raises after this, so the server logs them)
    return problem_response(500, _CRASH_DETAIL)


class CrashGuard:
    """Innermost middleware: an unexpected exception becomes a 500 problem, logged once, not re-raised.

    Starlette's own 500 handler re-raises after answering, and uvicorn then closes the connection,
    which can reset it before the client has read the answer.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            log.exception("%s %s -> 500", scope.get("method"), scope.get("path"))
            if started:  # nothing sensible can follow a started response
                raise
            await problem_response(500, _CRASH_DETAIL)(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    """Route every error source of the app to :func:`problem_response`."""
    app.add_exception_handler(ServiceError, _domain)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _crash)
    app.add_middleware(CrashGuard)  # added first: innermost, inside the body limit and metrics
