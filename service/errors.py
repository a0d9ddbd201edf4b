"""Domain errors and their one mapping to HTTP.

Everything below :class:`ServiceError` carries an HTTP status and a message that tells the caller
what to do; :func:`install_error_handlers` is the only place that turns them into responses.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

log = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """The service cannot start; the message says what to fix."""


class ServiceError(Exception):
    """Base of errors a client can cause or handle. ``status`` is the HTTP status."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


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


class DeadlineExceeded(ServiceError):
    status, code = 504, "deadline_exceeded"


class ClientGone(ServiceError):
    """The client disconnected while its work was queued; nobody reads this response."""

    status, code = 499, "client_closed_request"


async def _handle(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    if exc.status >= 500:
        log.warning("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
    headers = dict(exc.headers)
    if isinstance(exc, Unauthorized):
        headers.setdefault("WWW-Authenticate", "ApiKey")
    return JSONResponse({"detail": exc.message, "error": exc.code}, status_code=exc.status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Map every :class:`ServiceError` to its status with ``{"detail", "error"}``."""
    app.add_exception_handler(ServiceError, _handle)
