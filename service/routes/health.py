"""Liveness, readiness (the whole data path) and Prometheus metrics. Never behind the API key."""

from __future__ import annotations

import asyncio

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from service.deps import ServicesDep
from service.errors import ServiceError, StoreUnavailable
from service.schemas import Health

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
    checks: dict[str, str] = {
        "bundle": f"{services.bundle.root} ({services.bundle.manifest.producer.get('method', '?')})"
    }
    ok = True
    try:
        await asyncio.to_thread(services.registry.store.ping)
        checks["database"] = "ok"
        problems = await asyncio.to_thread(services.registry.check)
        checks["index"] = "; ".join(problems) if problems else "ok"
        ok = not problems
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
        emb = await services.engine.embed(services.probe, timeout_s=PROBE_TIMEOUT_S, bypass_capacity=True)
        norm = float(np.linalg.norm(emb[0]))
        good = emb.shape == (1, services.bundle.manifest.embed_dim) and abs(norm - 1.0) < 1e-3
        checks["inference"] = f"ok ({services.encoder.provider})" if good else f"bad embedding (norm {norm:.4f})"
        ok = ok and good
    except ServiceError as e:
        checks["inference"], ok = f"failed: {e.message}", False
    status = "ready" if ok else "unready"
    return JSONResponse(Health(status=status, checks=checks).model_dump(), 200 if ok else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(services: ServicesDep) -> Response:
    services.metrics.queue_depth.set(services.engine.depth)
    return Response(services.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
