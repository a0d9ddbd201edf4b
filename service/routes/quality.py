"""``GET /v1/label-sets/{name}/report``: a set's most confusable pairs (service/quality.py), and the
quality block that class additions answer with."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Path, Query

from service.deps import ServicesDep
from service.errors import InvalidInput
from service.index import Snapshot
from service.quality import ClassCheck, confusable_pairs
from service.schemas import ClassQuality, ConfusablePair, LabelSetReport, SimilarClass

router = APIRouter(prefix="/v1/label-sets", tags=["label sets"])
# multiply-adds a report may cost (calibration rows or classes, times classes, times dims): ~1-5 s here
MAX_REPORT_WORK = 12_000_000_000


@router.get(
    "/{name}/report",
    response_model=LabelSetReport,
    responses={404: {"description": "unknown label set"}, 422: {"description": "set too large for a report"}},
    summary="the set's most confusable class pairs (tie rates on the bundle's in-domain calibration images)",
)
async def label_set_report(
    name: Annotated[str, Path(description="label-set name")],
    services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=100, description="pairs to list")] = 20,
) -> LabelSetReport:
    snap = await asyncio.to_thread(services.registry.get, name)
    sample = services.classifier.calibration.sample
    scale = services.logit_scale
    rows = len(snap) if sample is None else len(sample)
    if not snap.approximate and rows * len(snap) * snap.vectors.shape[1] > MAX_REPORT_WORK:
        raise InvalidInput(f"label set {name!r} has {len(snap)} classes, too many for a report on this server")
    pairs = []
    if len(snap) >= 2:
        search = _searcher(snap, scale)
        pairs = await asyncio.to_thread(
            confusable_pairs, snap.ids, snap.names, snap.vectors, search, sample, scale, limit
        )
    return LabelSetReport(
        label_set=name,
        version=snap.version,
        calibrated=sample is not None,
        pairs=[ConfusablePair(**p.__dict__) for p in pairs],
    )


def _searcher(snap: Snapshot, scale: float):  # type: ignore[no-untyped-def]
    return lambda q, k: snap.search(q, k, scale)


def quality_out(checks: list[ClassCheck]) -> list[ClassQuality]:
    return [
        ClassQuality(name=c.name, nearest=[SimilarClass(**n.__dict__) for n in c.neighbours], flagged=bool(c.flagged))
        for c in checks
    ]
