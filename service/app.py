"""The app factory: ``create_app(settings)`` -> FastAPI app whose lifespan loads the bundle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from models import __version__
from service import tracing
from service.errors import ServiceError, install_error_handlers
from service.grpc_server import GrpcServer
from service.metrics import Metrics
from service.middleware import AllowedMethods, BodyLimit, RequestMetrics, StoreIdentity
from service.openapi import build_openapi, operation_id
from service.reload import Reloader
from service.routes import classify, embeddings, examples, health, label_sets, model, quality, v2
from service.settings import Settings, get_settings
from service.state import build_services

log = logging.getLogger(__name__)

DESCRIPTION = """Image classification with prompt-distilled CLIP bundles.

* Classify against named, versioned, durable **label sets** (`default` holds the bundle's classes);
  every answer names the set and the version it came from.
* Add or remove classes at runtime: names are encoded through the bundle's own text side.
* Or bring `candidate_labels` per request (Hugging Face zero-shot request shape accepted).
* Mutating routes need `X-API-Key` when the server has a key. Image URLs are never fetched.
"""


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    tracing.configure()
    services = await asyncio.to_thread(build_services, settings, app.state.metrics)
    services.engine.start()
    services.text.engine.start()
    services.migrator.start()
    await asyncio.to_thread(services.classifier.capture.start)  # scans the folder: off the loop
    app.state.services = services
    app.state.reloader = reloader = Reloader(services)
    hangup = _on_sighup(reloader)  # --workers N: the supervisor forwards SIGHUP to every worker
    grpc = GrpcServer(services, settings.host, settings.grpc_port) if settings.grpc_port is not None else None
    if grpc is not None:
        await grpc.start()
    log.info(
        "serving bundle %s with %s (%s); state in %s",
        settings.bundle,
        services.encoder.backend,
        services.encoder.provider,
        settings.state_dir,
    )
    try:
        yield
    finally:
        if grpc is not None:
            await grpc.stop(settings.graceful_shutdown_s)
        if hangup is not None:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        await services.migrator.stop()
        await asyncio.to_thread(services.classifier.capture.stop)
        log.info("draining the engines (%d images, %d names queued)", services.engine.depth, services.text.engine.depth)
        await asyncio.gather(
            services.engine.stop(settings.graceful_shutdown_s), services.text.engine.stop(settings.graceful_shutdown_s)
        )
        services.close()
        tracing.shutdown()
        log.info("shut down cleanly")


def _on_sighup(reloader: Reloader) -> bool | None:
    """``kill -HUP``: re-read --bundle and swap it in (refusals are logged; the old bundle keeps serving)."""

    async def reload() -> None:
        with contextlib.suppress(ServiceError):  # the reloader has logged why and kept the old bundle
            await reloader.reload("SIGHUP")

    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, lambda: _keep(asyncio.ensure_future(reload())))
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (tests), or no signals here
        return None
    return True


_background: set[asyncio.Future[None]] = set()


def _keep(task: asyncio.Future[None]) -> None:
    _background.add(task)
    task.add_done_callback(_background.discard)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; nothing heavy happens until the lifespan starts (startup errors are raised there)."""
    settings = settings or get_settings()
    # FastAPIOffline: FastAPI whose /docs (Swagger UI) and /redoc load their scripts from assets in
    # the fastapi-offline wheel (served under /static-offline-docs), not from a public CDN.
    app = FastAPIOffline(
        title="promptdistill",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        generate_unique_id_function=operation_id,
        openapi_tags=[
            {"name": "classify", "description": "images in, top-k classes out"},
            {"name": "label sets", "description": "named, versioned, durable class lists"},
            {"name": "embeddings", "description": "image or text embeddings (OpenAI / Infinity shape)"},
            {"name": "model", "description": "the served bundle's card; hot swap of its image tower"},
            {"name": "health", "description": "liveness, readiness, metrics (never behind the key)"},
            {"name": "open inference protocol", "description": "KServe / Triton v2 REST: BYTES images in, top-k out"},
        ],
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    install_error_handlers(app)
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)
    app.add_middleware(AllowedMethods, routes=app.router.routes)  # the list routers are added to below
    app.add_middleware(RequestMetrics, metrics=app.state.metrics)
    app.add_middleware(StoreIdentity)  # error answers carry it too
    app.add_middleware(tracing.RequestTracing)  # outermost: a request's span covers everything
    for module in (health, label_sets, examples, quality, classify, embeddings, model, v2):
        app.include_router(module.router)
    app.openapi = lambda: build_openapi(app)  # type: ignore[method-assign]
    return app


def create_app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` (worker processes read PROMPTDISTILL_* from the environment)."""
    settings = Settings()
    if not logging.getLogger().handlers:  # spawned workers do not inherit the CLI's logging set-up
        logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return create_app(settings)
