"""Classes from example images: request parsing (JSON and multipart) and ``POST .../classes/{id}/examples``.

The add-classes route (service/routes/label_sets.py) parses its body here and hands requests with
examples to :class:`service.examples.ExampleWriter`.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Path, Request, status
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, BeforeValidator, ValidationError
from starlette.datastructures import FormData

from service.curator import NO_DEADLINE
from service.deps import ApiKeyDep, ServicesDep
from service.errors import InvalidInput, UnsupportedMediaType
from service.examples import Added, ExampleLimits, ExampleWriter, bundle_gap, image_sample, near_duplicate_cosine
from service.images import EncodedImage, read_uploads
from service.names import clean_names, clean_templates
from service.routes.quality import quality_out
from service.schemas import ChangeOut, ClassesIn, ClassOut, ExamplesIn
from service.settings import Settings
from service.state import Services

router = APIRouter(prefix="/v1/label-sets", tags=["label sets"])
LIMITS = ExampleLimits()
_FORM_FIELDS = {"names", "name", "files", "templates", "if_exists", "if_similar"}


def _digits(value: object) -> object:
    """Path integers are written with digits only (as in service/routes/label_sets.py)."""
    if isinstance(value, str) and not re.fullmatch(r"[0-9]+", value):
        raise ValueError("must be a whole number written with digits only")
    return value


ClassId = Annotated[int, Path(ge=0, le=2**62, description="class id within the set"), BeforeValidator(_digits)]
SetName = Annotated[str, Path(description="label-set name", examples=["default"])]


@dataclass
class ClassesRequest:
    """An add-classes request, JSON or multipart, not yet checked."""

    names: list[str]
    examples: dict[str, list[EncodedImage | str]] = field(default_factory=dict)
    templates: list[str] | None = None
    if_exists: str = "error"
    if_similar: str = "warn"


async def get_writer(request: Request, services: ServicesDep) -> ExampleWriter:
    """One writer per served bundle (its gap is computed once from the bundle; a reload makes a new one)."""
    held: tuple[object, object, ExampleWriter] | None = getattr(request.app.state, "example_writer", None)
    if held is not None and held[0] is services.bundle and held[1] is services.registry:
        return held[2]
    vectors = [v.float().numpy() for v in services.bundle.class_vectors.values()]
    sample = image_sample(services.bundle)
    # off the event loop: with a sample, both read it against itself / the shipped class vectors (~1e9 mult-adds)
    gap, near = await asyncio.gather(
        asyncio.to_thread(bundle_gap, vectors, sample), asyncio.to_thread(near_duplicate_cosine, sample)
    )
    text = services.text

    async def encode_names(names: list[str], templates: list[str] | None) -> np.ndarray:
        return await text.encode(names, templates, urgent=True, timeout_s=NO_DEADLINE)  # as the curator's

    gate = services.curator.gate
    writer = ExampleWriter(services.classifier, services.registry, gap, encode_names, LIMITS, gate, near)
    request.app.state.example_writer = (services.bundle, services.registry, writer)
    return writer


WriterDep = Annotated[ExampleWriter, Depends(get_writer)]


async def parse_classes_request(request: Request, settings: Settings) -> ClassesRequest:
    """JSON (:class:`ClassesIn`) or multipart (``names``, ``name`` + ``files``)."""
    ctype = _content_type(request)
    if ctype == "multipart/form-data":
        async with request.form(max_files=LIMITS.per_class, max_fields=1000, max_part_size=1024 * 1024) as form:
            return await _from_form(form, settings)
    body = _json(ClassesIn, await request.body())
    examples: dict[str, list[EncodedImage | str]] = {k: list(v) for k, v in (body.examples or {}).items()}
    return ClassesRequest(body.names, examples, body.templates, body.if_exists, body.if_similar)


def _content_type(request: Request) -> str:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not ctype:  # as FastAPI reads a body without a content type: JSON
        return "application/json"
    if ctype == "application/json" or ctype.endswith("+json") or ctype == "multipart/form-data":
        return ctype
    raise UnsupportedMediaType(
        f"unsupported content type {ctype or '(none)'!r}: send application/json, or multipart/form-data "
        "with 'name' + 'files' (example images)"
    )


def _json(model: type[Any], body: bytes) -> Any:
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False, include_context=False, include_input=False)) from e


async def _from_form(form: FormData, settings: Settings) -> ClassesRequest:
    unknown = set(form.keys()) - _FORM_FIELDS
    if unknown:
        raise InvalidInput(f"unknown form fields {sorted(unknown)}; expected names, name, files, templates, if_exists")
    names = [str(v) for v in form.getlist("names")]
    one = form.getlist("name")
    files = await read_uploads(form, settings.max_image_bytes)
    if len(one) > 1 or (files and not one):
        raise InvalidInput("multipart: one 'name' for the uploaded 'files' (one class with examples per request)")
    examples = {str(one[0]): files} if one else {}
    if_exists = str(form.get("if_exists") or "error")
    if if_exists not in ("error", "skip"):
        raise InvalidInput("if_exists: 'error' or 'skip'")
    if_similar = str(form.get("if_similar") or "warn")
    if if_similar not in ("warn", "error"):
        raise InvalidInput("if_similar: 'warn' or 'error'")
    templates = [str(t) for t in form.getlist("templates")] or None
    return ClassesRequest(names, examples, templates, if_exists, if_similar)


async def add_with_examples(
    set_name: str, req: ClassesRequest, services: Services, writer: ExampleWriter, request: Request
) -> tuple[ChangeOut, bool]:
    """The add-classes route's path for requests with examples; (answer, whether anything was added)."""
    s = services.settings
    names = clean_names(req.names, s.max_labels_per_request, s.max_name_length) if req.names else []
    classes = writer.new_classes(names, req.examples, s.max_name_length)
    templates = None
    if any(c.named for c in classes):
        templates = clean_templates(req.templates, s.max_templates)
        services.text.check_templates(templates)
    added = await writer.add_classes(
        set_name,
        classes,
        templates,
        skip_existing=req.if_exists == "skip",
        if_similar=req.if_similar,
        is_disconnected=request.is_disconnected,
    )
    return change_out(set_name, added), bool(added.change.ids)


def change_out(set_name: str, added: Added) -> ChangeOut:
    c = added.change
    classes = [
        ClassOut(id=i, name=n, provenance=p, examples=k, replaces=added.replaced)
        for i, n, p, k in zip(c.ids, c.names, added.provenance, added.examples, strict=True)
    ]
    quality = quality_out(added.quality)
    return ChangeOut(
        label_set=set_name, version=c.version, classes=classes, skipped=c.skipped, gap=added.gap, quality=quality
    )


def openapi_body(json_model: type[BaseModel], multipart: dict[str, Any]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{json_model.__name__}"}},
                "multipart/form-data": {"schema": multipart},
            },
        }
    }


_BINARY_LIST = {"type": "array", "items": {"type": "string", "format": "binary"}}
ADD_CLASSES_BODY = openapi_body(
    ClassesIn,
    {
        "type": "object",
        "properties": {
            "names": {"type": "array", "items": {"type": "string"}, "description": "classes by name"},
            "name": {"type": "string", "description": "the class the uploaded files are examples of"},
            "files": {**_BINARY_LIST, "description": "example images of 'name'"},
            "templates": {"type": "array", "items": {"type": "string"}},
            "if_exists": {"type": "string", "enum": ["error", "skip"], "default": "error"},
            "if_similar": {"type": "string", "enum": ["warn", "error"], "default": "warn"},
        },
    },
)
ADD_EXAMPLES_BODY = openapi_body(
    ExamplesIn,
    {"type": "object", "required": ["files"], "properties": {"files": {**_BINARY_LIST, "description": "images"}}},
)
#: What a request with examples can add to the add-classes route's documented answers.
EXAMPLE_ERRORS: dict[int | str, dict[str, str]] = {
    413: {"description": "an example over the byte or pixel limit"},
    415: {"description": "neither JSON nor multipart"},
    429: {"description": "the image engine is at capacity; see Retry-After"},
}
_ERRORS: dict[int | str, dict[str, str]] = {
    401: {"description": "API key missing or wrong"},
    404: {"description": "unknown label set or class"},
    409: {"description": "the same example twice, or already stored for the class"},
    422: {"description": "not an image, too many examples, no examples"},
    503: {"description": "database unreachable (Retry-After)"},
    **EXAMPLE_ERRORS,
}


@router.post(
    "/{name}/classes/{class_id}/examples",
    response_model=ChangeOut,
    status_code=status.HTTP_201_CREATED,
    dependencies=[ApiKeyDep],
    openapi_extra=ADD_EXAMPLES_BODY,
    responses=_ERRORS,
    summary="add example images to a class: its vector is rebuilt from all its examples (and its name), "
    "under a new id with the same name",
)
async def add_examples(
    name: SetName, class_id: ClassId, request: Request, writer: WriterDep, services: ServicesDep
) -> ChangeOut:
    if _content_type(request) == "multipart/form-data":
        async with request.form(max_files=LIMITS.per_class, max_fields=10, max_part_size=1024 * 1024) as form:
            unknown = set(form.keys()) - {"files"}
            if unknown:
                raise InvalidInput(f"unknown form fields {sorted(unknown)}; expected files")
            images = await read_uploads(form, services.settings.max_image_bytes)
    else:
        images = list(_json(ExamplesIn, await request.body()).examples)
    added = await writer.add_examples(name, class_id, images, request.is_disconnected)
    return change_out(name, added)
