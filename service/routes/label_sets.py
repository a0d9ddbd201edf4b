"""Label sets and their classes: list, create, add, remove (mutations need the API key)."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Path, status

from service.deps import ApiKeyDep, RegistryDep, SettingsDep
from service.index import Snapshot
from service.names import clean_names, clean_set_name, clean_templates
from service.schemas import (
    ClassList,
    ClassOut,
    LabelSetIn,
    LabelSetList,
    LabelSetSummary,
)

router = APIRouter(prefix="/v1/label-sets", tags=["label sets"])
SetName = Annotated[str, Path(description="label-set name", examples=["default"])]
ClassId = Annotated[int, Path(ge=0, le=2**62, description="class id within the set")]
_ERRORS: dict[int | str, dict[str, str]] = {
    401: {"description": "API key missing or wrong"},
    404: {"description": "unknown label set or class"},
    409: {"description": "duplicate name, existing set, or protected set"},
    422: {"description": "invalid names or templates"},
}


def _classes(snap: Snapshot) -> list[ClassOut]:
    return [
        ClassOut(id=int(i), name=n, provenance=p) for i, n, p in zip(snap.ids, snap.names, snap.provenance, strict=True)
    ]


@router.get("", response_model=LabelSetList, summary="list label sets with their versions")
async def list_sets(registry: RegistryDep) -> LabelSetList:
    rows = await asyncio.to_thread(registry.summaries)
    return LabelSetList(label_sets=[LabelSetSummary(name=n, version=v, n_classes=c) for n, v, c in rows])


@router.post(
    "",
    response_model=ClassList,
    status_code=status.HTTP_201_CREATED,
    dependencies=[ApiKeyDep],
    responses=_ERRORS,
    summary="create a label set from class names (encoded through the bundle's text side)",
)
async def create_set(body: LabelSetIn, registry: RegistryDep, settings: SettingsDep) -> ClassList:
    name = clean_set_name(body.name)
    names = clean_names(body.names, settings.max_labels_per_request, settings.max_name_length)
    templates = clean_templates(body.templates, settings.max_templates)
    registry.text.check_templates(templates)
    change = await asyncio.to_thread(registry.create, name, names, templates, body.index)
    assert change.snapshot is not None
    snap = change.snapshot
    return ClassList(
        label_set=name, version=change.version, index_size=int(snap.index.ntotal), index=snap.kind,
        classes=_classes(snap),
    )  # fmt: skip


@router.get("/{name}/classes", response_model=ClassList, responses={404: _ERRORS[404]}, summary="classes of a set")
async def list_classes(name: SetName, registry: RegistryDep) -> ClassList:
    snap = await asyncio.to_thread(registry.get, name)
    return ClassList(
        label_set=name, version=snap.version, index_size=int(snap.index.ntotal), index=snap.kind,
        classes=_classes(snap),
    )  # fmt: skip
