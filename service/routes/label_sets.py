"""Label sets and their classes: list, create, add, remove (mutations need the API key)."""

from __future__ import annotations

import asyncio
import base64
import re
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Path, Query, Response, status
from pydantic import BeforeValidator

from service.deps import ApiKeyDep, CuratorDep, RegistryDep
from service.errors import InvalidInput
from service.index import Snapshot
from service.names import clean_name
from service.registry import RUNTIME
from service.routes.quality import quality_out
from service.schemas import (
    ChangeOut,
    ClassesIn,
    ClassList,
    ClassOut,
    DeletedSet,
    LabelSetIn,
    LabelSetList,
    LabelSetSummary,
)

router = APIRouter(prefix="/v1/label-sets", tags=["label sets"])


def _digits(value: object) -> object:
    """Integers in paths and query strings are written with digits: pydantic's lax mode would also
    take "+0.0" or " 7" as whole numbers, which the OpenAPI schema (type integer) does not allow."""
    if isinstance(value, str) and not re.fullmatch(r"-?[0-9]+", value):
        raise ValueError("must be a whole number written with digits only")
    return value


Digits = BeforeValidator(_digits)
SetName = Annotated[str, Path(description="label-set name", examples=["default"])]
ClassId = Annotated[int, Path(ge=0, le=2**62, description="class id within the set"), Digits]
MinVersion = Annotated[
    int | None,
    Query(
        ge=0,
        le=2**62,
        description="answer from a snapshot at least this new (the last version you saw); "
        "a lagging replica waits briefly, reads the database, else 503 + Retry-After",
    ),
    Digits,  # after the FieldInfo: before it, FastAPI writes ge/le instead of minimum/maximum
]
_ERRORS: dict[int | str, dict[str, str]] = {
    401: {"description": "API key missing or wrong"},
    404: {"description": "unknown label set or class"},
    409: {"description": "duplicate name, existing set, protected set, or (if_similar='error') a likely duplicate"},
    422: {"description": "invalid names or templates"},
    503: {"description": "database unreachable, or min_version not reached in time (Retry-After)"},
}


MAX_PAGE = 10_000
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE, description="classes per page"), Digits]
Cursor = Annotated[
    str | None,
    Query(max_length=64, description="next_cursor of the previous page (opaque); omit for the first page"),
]


def _classes(snap: Snapshot, rows: np.ndarray | None = None) -> list[ClassOut]:
    rows = np.arange(len(snap)) if rows is None else rows
    return [ClassOut(id=int(snap.ids[r]), name=snap.names[r], provenance=snap.provenance[r]) for r in rows]


def _encode_cursor(after_id: int) -> str:
    return base64.urlsafe_b64encode(f"after:{after_id}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        kind, _, value = text.partition(":")
        after = int(value)
        if kind != "after" or not 0 <= after < 2**63:
            raise ValueError(text)
        return after
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidInput(
            "cursor: not a next_cursor this server gave out; omit it to start from the first page"
        ) from e


def _page(snap: Snapshot, limit: int, cursor: str | None) -> tuple[list[ClassOut], str | None]:
    """Classes in ascending id order after the cursor's id: a page stays stable while the set changes."""
    order = np.argsort(snap.ids, kind="stable")  # [N] rows by ascending id
    start = 0 if cursor is None else int(np.searchsorted(snap.ids[order], _decode_cursor(cursor), side="right"))
    rows = order[start : start + limit]
    more = start + limit < len(order)
    return _classes(snap, rows), (_encode_cursor(int(snap.ids[rows[-1]])) if more and len(rows) else None)


@router.get(
    "", response_model=LabelSetList, responses={503: _ERRORS[503]}, summary="list label sets with their versions"
)
async def list_label_sets(registry: RegistryDep, min_version: MinVersion = None) -> LabelSetList:
    rows = await asyncio.to_thread(registry.summaries, min_version)
    return LabelSetList(label_sets=[LabelSetSummary(name=n, version=v, n_classes=c) for n, v, c in rows])


@router.post(
    "",
    response_model=ClassList,
    status_code=status.HTTP_201_CREATED,
    dependencies=[ApiKeyDep],
    responses={**_ERRORS, 200: {"model": ClassList, "description": "if_exists='skip' and the set already exists"}},
    summary="create a label set from class names (encoded through the bundle's text side)",
)
async def create_label_set(body: LabelSetIn, curator: CuratorDep, response: Response) -> ClassList:
    skip = body.if_exists == "skip"
    change = await curator.create(
        body.name, body.names, body.templates, skip_existing=skip, index=body.index, if_similar=body.if_similar
    )
    assert change.snapshot is not None
    if change.skipped:
        response.status_code = status.HTTP_200_OK  # the set was already there: nothing created
    snap = change.snapshot
    return ClassList(
        label_set=snap.name,
        version=change.version,
        index_size=int(snap.index.ntotal),
        index=snap.kind,
        classes=_classes(snap),
        quality=None if change.skipped else quality_out(change.quality),
    )


@router.get(
    "/{name}/classes",
    response_model=ClassList,
    responses={404: _ERRORS[404], 503: _ERRORS[503]},
    summary="classes of a set, a page at a time (ascending id; follow next_cursor)",
)
async def list_classes(
    name: SetName, registry: RegistryDep, limit: Limit = 1000, cursor: Cursor = None, min_version: MinVersion = None
) -> ClassList:
    snap = await asyncio.to_thread(registry.get, name, min_version)
    classes, next_cursor = _page(snap, limit, cursor)
    return ClassList(
        label_set=name,
        version=snap.version,
        index_size=int(snap.index.ntotal),
        index=snap.kind,
        classes=classes,
        next_cursor=next_cursor,
    )


@router.post(
    "/{name}/classes",
    response_model=ChangeOut,
    status_code=status.HTTP_201_CREATED,
    dependencies=[ApiKeyDep],
    responses={**_ERRORS, 200: {"model": ChangeOut, "description": "if_exists='skip' and every name was there"}},
    summary="add classes (all or none; if_exists='skip' leaves out names already there); durable before the response",
)
async def add_classes(name: SetName, body: ClassesIn, curator: CuratorDep, response: Response) -> ChangeOut:
    skip = body.if_exists == "skip"
    change = await curator.add(name, body.names, body.templates, skip_existing=skip, if_similar=body.if_similar)
    added = [ClassOut(id=i, name=n, provenance=RUNTIME) for i, n in zip(change.ids, change.names, strict=True)]
    if not added:
        response.status_code = status.HTTP_200_OK  # every name was already there: nothing changed
    quality = quality_out(change.quality)
    return ChangeOut(label_set=name, version=change.version, classes=added, skipped=change.skipped, quality=quality)


@router.delete(
    "/{name}/classes/{class_id}",
    response_model=ChangeOut,
    dependencies=[ApiKeyDep],
    responses=_ERRORS,
    summary="remove one class by id",
)
async def remove_class_by_id(name: SetName, class_id: ClassId, registry: RegistryDep) -> ChangeOut:
    return await _remove(registry, name, class_id, None)


@router.delete(
    "/{name}/classes",
    response_model=ChangeOut,
    dependencies=[ApiKeyDep],
    responses=_ERRORS,
    summary="remove one class by name (?name=...)",
)
async def remove_class_by_name(
    name: SetName, registry: RegistryDep, class_name: Annotated[str, Query(alias="name", min_length=1)]
) -> ChangeOut:
    return await _remove(registry, name, None, class_name)


async def _remove(registry: RegistryDep, name: str, class_id: int | None, class_name: str | None) -> ChangeOut:
    cleaned = clean_name(class_name, 0, 10_000) if class_name is not None else None
    change = await asyncio.to_thread(registry.remove, name, class_id, cleaned)
    removed = [ClassOut(id=i, name=n, provenance="removed") for i, n in zip(change.ids, change.names, strict=True)]
    return ChangeOut(label_set=name, version=change.version, classes=removed)


@router.delete(
    "/{name}",
    response_model=DeletedSet,
    dependencies=[ApiKeyDep],
    responses=_ERRORS,
    summary="delete a label set (not 'default')",
)
async def delete_label_set(name: SetName, registry: RegistryDep) -> DeletedSet:
    change = await asyncio.to_thread(registry.delete, name)
    return DeletedSet(label_set=name, version=change.version)
