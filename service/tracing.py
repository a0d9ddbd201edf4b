"""OpenTelemetry traces: a span per request with child spans for admission, decode, encode, search and
text encoding, exported over OTLP (HTTP/protobuf) when the standard variables configure it.

On when ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (and neither
``OTEL_SDK_DISABLED=true`` nor ``OTEL_TRACES_EXPORTER=none``); the exporter, the batch processor
and the resource read the other ``OTEL_*`` variables themselves (headers, timeout,
``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_BSP_*``). Otherwise no tracer provider
exists and every helper here returns at once (one ``is None`` check): tracing off costs nothing.

Incoming W3C ``traceparent`` headers (HTTP) and metadata (gRPC) continue the caller's trace. A batch
the engine encodes serves several requests: its ``encode`` span is a child of the first request's
trace and links to the others (OpenTelemetry's way to join a span to several traces). Log lines
written inside a span end in ``trace_id=... span_id=...``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any, TypeVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)
T = TypeVar("T")
_NULL: AbstractContextManager[Any] = nullcontext()
_tracer: Any = None  # opentelemetry Tracer while tracing is on
_provider: Any = None


def wanted(env: Mapping[str, str]) -> bool:
    """Do the standard OTEL_* variables ask for traces over OTLP?"""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() != "otlp":
        return False
    return bool(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def configure(env: Mapping[str, str] | None = None) -> bool:
    """Start exporting when the environment asks for it (once per process); True when tracing is on."""
    global _tracer, _provider
    env = os.environ if env is None else env
    if _tracer is not None or not wanted(env):
        return _tracer is not None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or ""
    if protocol not in ("", "http/protobuf"):
        log.warning("OTLP protocol %r is not supported here; exporting traces over http/protobuf", protocol)
    _provider = TracerProvider(
        resource=Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", "promptdistill")})
    )
    _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    _tracer = _provider.get_tracer("promptdistill")
    _install_log_filter()
    log.info("exporting OpenTelemetry traces over OTLP")
    return True


def shutdown() -> None:
    """Flush what is buffered and stop exporting (the lifespan's end)."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None


def enabled() -> bool:
    return _tracer is not None


def span(name: str, **attributes: Any) -> AbstractContextManager[Any]:
    """A child span of the current one for the body of a ``with``; a no-op when tracing is off."""
    if _tracer is None:
        return _NULL
    return _tracer.start_as_current_span(name, attributes=attributes)


async def in_span(name: str, awaitable: Awaitable[T], **attributes: Any) -> T:
    """``await awaitable`` inside a span named ``name`` (a coroutine runs in the awaiting context)."""
    if _tracer is None:
        return await awaitable
    with _tracer.start_as_current_span(name, attributes=attributes):
        return await awaitable


def current() -> Any:
    """The current trace context (kept by queued work so that a batch can join its requests' traces)."""
    if _tracer is None:
        return None
    from opentelemetry import context

    return context.get_current()


def batch_span(name: str, contexts: Iterable[Any], **attributes: Any) -> AbstractContextManager[Any]:
    """A span for work serving several requests: child of the first request's trace, links to the rest."""
    if _tracer is None:
        return _NULL
    from opentelemetry import trace

    found = [c for c in contexts if c is not None]
    links = [trace.Link(trace.get_current_span(c).get_span_context()) for c in found[1:]]
    parent = found[0] if found else None
    return _tracer.start_as_current_span(name, context=parent, links=links, attributes=attributes)


def extract(carrier: Mapping[str, str]) -> Any:
    """The caller's trace context from W3C ``traceparent`` / ``tracestate`` headers or metadata."""
    from opentelemetry import propagate

    return propagate.extract(carrier)


def server_span(name: str, carrier: Mapping[str, str], **attributes: Any) -> AbstractContextManager[Any]:
    """The root span of one incoming request (a child of the caller's span when it sent one)."""
    if _tracer is None:
        return _NULL
    from opentelemetry.trace import SpanKind

    return _tracer.start_as_current_span(name, context=extract(carrier), kind=SpanKind.SERVER, attributes=attributes)


class RequestTracing:
    """ASGI middleware: one SERVER span per HTTP request, named ``METHOD /route/{template}``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if _tracer is None or scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "")
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
        with server_span(f"{method} {scope.get('path', '')}", carrier, **{"http.request.method": method}) as sp:

            async def record(message: Message) -> None:
                if message["type"] == "http.response.start":
                    sp.set_attribute("http.response.status_code", int(message["status"]))
                await send(message)

            try:
                await self.app(scope, receive, record)
            finally:
                route = getattr(scope.get("route"), "path", None)
                if route:
                    sp.update_name(f"{method} {route}")
                    sp.set_attribute("http.route", route)


class _TraceIds(logging.Filter):
    """Notes the current trace and span ids on records logged inside a span (at logging time: the
    handler may format later)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _tracer is None or hasattr(record, "trace_id"):
            return True
        from opentelemetry import trace

        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            record.trace_id = f"{ctx.trace_id:032x}"
            record.span_id = f"{ctx.span_id:016x}"
        return True


class _WithTraceIds(logging.Formatter):
    """A handler's own formatter, then `` trace_id=... span_id=...`` for records that carry them
    (uvicorn's access formatter builds its line from the record's args, so the message cannot carry them)."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        line = self.inner.format(record)
        trace_id = getattr(record, "trace_id", None)
        return f"{line} trace_id={trace_id} span_id={getattr(record, 'span_id', '')}" if trace_id else line


def _install_log_filter() -> None:
    ids = _TraceIds()
    for name in (None, "uvicorn", "uvicorn.error", "uvicorn.access"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, _TraceIds) for f in handler.filters):
                handler.addFilter(ids)
                handler.setFormatter(_WithTraceIds(handler.formatter))
