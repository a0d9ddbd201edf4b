"""Liveness, readiness (the whole data path) and Prometheus metrics. Never behind the API key."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from models.bundle import Bundle
from service.deps import ServicesDep
from service.errors import ServiceError, StoreUnavailable
from service.schemas import Health
from service.server import count_ready

router = APIRouter(tags=["health"])
PROBE_TIMEOUT_S = 10.0


@router.get("/livez", response_model=Health, summary="the process is up")
async def livez() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    summary="bundle, index, database and a probe inference all work",
    responses={503: {"model": Health, "description": "not ready; `checks` says which part failed"}},
)
async def readyz(request: Request) -> Response:
    services = getattr(request.app.state, "services", None)
    if services is None:
        return JSONResponse(Health(status="unready", checks={"startup": "still loading"}).model_dump(), 503)
    checks: dict[str, str] = {"bundle": bundle_identity(services.bundle), "precision": services.encoder.gate.summary()}
    ok = True
    workers = services.settings.workers
    if workers > 1 and services.settings.worker_dir is not None:  # serve --workers N: are all N serving?
        ready = await asyncio.to_thread(count_ready, services.settings.worker_dir)
        checks["workers"] = f"{ready}/{workers} ready (this answer: pid {os.getpid()})"
        ok = ready >= workers
    try:
        await asyncio.to_thread(services.registry.store.ping)
        checks["database"] = "ok"
        problems = await asyncio.to_thread(services.registry.check)
        checks["index"] = "; ".join(problems) if problems else "ok"
        migrating = services.migrator.status()
        if migrating:
            checks["vectors"] = migrating  # a set with a complete snapshot keeps serving meanwhile
        ok = ok and not problems
    except StoreUnavailable as e:
        # A shared database is down: every replica still classifies from its snapshots. Stay ready
        # (and say so), or every pod would leave the load balancer at the same moment.
        checks["database"] = f"degraded: {e.message}"
        checks["index"] = f"serving snapshots {services.registry.served_versions()}"
    except (ServiceError, OSError, ValueError) as e:
        checks["database"], ok = f"failed: {e}", False
    except Exception as e:  # noqa: BLE001 - sqlite3.Error and friends: report, don't crash the probe
        checks["database"], ok = f"failed: {type(e).__name__}: {e}", False
    try:
        emb = await services.engine.embed(services.probe, timeout_s=PROBE_TIMEOUT_S, urgent=True)
        norm = float(np.linalg.norm(emb[0]))
        good = emb.shape == (1, services.bundle.manifest.embed_dim) and abs(norm - 1.0) < 1e-3
        checks["inference"] = f"ok ({services.encoder.provider})" if good else f"bad embedding (norm {norm:.4f})"
        ok = ok and good
    except ServiceError as e:
        checks["inference"], ok = f"failed: {e.message}", False
    checks["capture"] = services.classifier.capture.status()  # informational: capture never fails readiness
    status = "ready" if ok else "unready"
    return JSONResponse(Health(status=status, checks=checks).model_dump(), 200 if ok else 503)


def bundle_identity(bundle: Bundle) -> str:
    """Folder name, method and a fingerprint of the bundle's files; never the absolute path (it leaks layout)."""
    m = bundle.manifest
    digest = hashlib.sha256(json.dumps(m.files, sort_keys=True).encode()).hexdigest()[:12]
    name = bundle.root.name if bundle.root is not None else "in-memory"
    return f"{name} ({m.producer.get('method', '?')}, files sha256:{digest})"


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(services: ServicesDep) -> Response:
    m, admission = services.metrics, services.classifier.admission
    m.queue_depth.labels("image").set(services.engine.depth)
    m.queue_depth.labels("text").set(services.text.engine.depth)
    capture = services.classifier.capture
    m.capture_active.set(1 if capture.active else 0)
    m.capture_images.set(capture.kept)
    m.capture_errors.set(capture.errors)
    m.capture_skipped.set(capture.skipped)
    m.admission_capacity.set(admission.capacity)
    m.admission_in_flight.set(admission.in_flight)
    m.admission_image_seconds.set(admission.image_s)
    # Sets deleted through another worker or replica leave this process's series too; with the database
    # down (StoreUnavailable) the metrics still render and are pruned at a later scrape.
    with contextlib.suppress(ServiceError):
        services.metrics.prune_label_sets(await asyncio.to_thread(services.registry.store.versions))
    return Response(services.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
