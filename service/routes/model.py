"""The served model: its card (``GET /v1/model``) and a hot swap of its image tower (``POST /v1/admin/reload``)."""

from __future__ import annotations

import os
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from models.card import model_card
from service.deps import ApiKeyDep, ServicesDep
from service.reload import Reloader
from service.schemas import ModelInfo, ReloadOut

router = APIRouter(prefix="/v1", tags=["model"])


async def get_reloader(request: Request) -> Reloader:
    reloader: Reloader = request.app.state.reloader
    return reloader


ReloaderDep = Annotated[Reloader, Depends(get_reloader)]


@router.get("/model", response_model=ModelInfo, summary="the served bundle's model card, what is loaded and since when")
async def get_model(services: ServicesDep) -> ModelInfo:
    return ModelInfo(
        card=model_card(services.bundle),
        loaded={
            "since": services.loaded_at,
            "version": services.classifier.model_version,
            "backend": services.encoder.backend,
            "provider": services.encoder.provider,
            "space": services.registry.store.space,
            "worker_pid": str(os.getpid()),  # serve --workers N: which worker answered
        },
        reloads=list(services.history),
    )


@router.post(
    "/admin/reload",
    response_model=ReloadOut,
    dependencies=[ApiKeyDep],
    summary="re-read the configured bundle and swap its image tower in without a restart (same space only)",
    responses={
        401: {"description": "API key missing or wrong"},
        409: {
            "description": "a reload is running, class vectors are being encoded, or the bundle is of another "
            "embedding space (restart)"
        },
        422: {"description": "the configured path holds no servable bundle; the old one keeps serving"},
    },
)
async def reload_bundle(reloader: ReloaderDep) -> ReloadOut:
    entry = await reloader.reload("POST /v1/admin/reload")
    if entry["outcome"] == "swapped":
        entry = {**entry, "detail": entry["detail"] + reloader.tell_workers()}
    return ReloadOut(**entry, version=reloader.services.classifier.model_version)
