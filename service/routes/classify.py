"""``POST /v1/classify``: multipart uploads or JSON (ours or the Hugging Face shape)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile

from models.preprocess import preprocess_image
from service.deps import ServicesDep
from service.errors import EmptyLabelSet, ImageTooLarge, InvalidInput, UnsupportedMediaType
from service.images import decode_base64_image, decode_image
from service.index import Ranked, adhoc_rank
from service.names import clean_names, clean_templates
from service.schemas import ClassifyRequest, ClassifyResponse, ImageResult, Prediction
from service.settings import Settings
from service.state import Services

router = APIRouter(prefix="/v1", tags=["classify"])
UNKNOWN = "unknown"


@dataclass
class Job:
    images: list[bytes | str]  # raw upload bytes, or base64 / data: URI strings
    label_set: str
    top_k: int
    candidate_labels: list[str] | None
    hypothesis_template: str | None
    unknown_threshold: float | None


_MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["files"],
    "properties": {
        "files": {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "description": "one or more images",
        },
        "label_set": {"type": "string", "default": "default"},
        "top_k": {"type": "integer", "minimum": 1, "default": 5},
        "candidate_labels": {"type": "array", "items": {"type": "string"}},
        "hypothesis_template": {"type": "string"},
        "unknown_threshold": {"type": "number", "minimum": -1, "maximum": 1},
    },
}
OPENAPI_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/ClassifyRequest"}},
            "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
        },
    }
}


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    openapi_extra=OPENAPI_BODY,
    summary="classify images against a label set or ad-hoc candidate labels",
    responses={
        413: {"description": "body, image bytes or pixels over the limit"},
        415: {"description": "neither JSON nor multipart"},
        422: {"description": "undecodable image, URL instead of image, invalid labels"},
        429: {"description": "queue full; see Retry-After"},
        503: {"description": "shutting down; see Retry-After"},
    },
)
async def classify(request: Request, services: ServicesDep) -> ClassifyResponse:
    job = await _parse(request, services)
    settings = services.settings
    if job.top_k > settings.max_top_k:
        raise InvalidInput(f"top_k: at most {settings.max_top_k}")
    if not job.images:
        raise InvalidInput("no images: send 'images' (JSON), 'inputs' (Hugging Face shape) or multipart 'files'")
    if len(job.images) > settings.max_images_per_request:
        raise InvalidInput(f"{len(job.images)} images, at most {settings.max_images_per_request} per request")
    pixels = await asyncio.to_thread(_prepare, job.images, services)  # [B, 3, H, W]
    if job.candidate_labels is not None:
        names = clean_names(
            job.candidate_labels, settings.max_labels_per_request, settings.max_name_length, "candidate_labels"
        )
        templates = clean_templates([job.hypothesis_template], 1) if job.hypothesis_template is not None else None
        services.text.check_templates(templates)
        vectors = await asyncio.to_thread(services.text.encode_cached, names, templates)  # [C, D]
        emb = await services.engine.embed(
            pixels, timeout_s=settings.request_timeout_s, is_disconnected=request.is_disconnected
        )
        ranked = adhoc_rank(emb, vectors, services.logit_scale, job.top_k)
        return _response(None, None, ranked, names, job.unknown_threshold, services)
    if job.hypothesis_template is not None:
        raise InvalidInput("hypothesis_template applies to candidate_labels only; label sets are already encoded")
    snap = await asyncio.to_thread(services.registry.get, job.label_set)  # this version answers the request
    if len(snap) == 0:
        raise EmptyLabelSet(f"label set {job.label_set!r} has no classes; add some first")
    emb = await services.engine.embed(
        pixels, timeout_s=settings.request_timeout_s, is_disconnected=request.is_disconnected
    )
    ranked = await asyncio.to_thread(snap.search, emb, job.top_k, services.logit_scale)  # O(N): off the loop
    return _response(snap.name, snap.version, ranked, snap, job.unknown_threshold, services)


def _response(
    label_set: str | None, version: int | None, ranked: Ranked, labels: Any, threshold: float | None, services: Services
) -> ClassifyResponse:
    results = []
    for b in range(ranked.ids.shape[0]):
        preds = [
            Prediction(
                class_id=int(i),
                label=labels.label(int(i)) if label_set is not None else labels[int(i)],
                score=float(s),
                cosine=float(c),
            )
            for i, s, c in zip(ranked.ids[b], ranked.scores[b], ranked.cosines[b], strict=True)
        ]
        unknown = threshold is not None and preds[0].cosine < threshold
        results.append(
            ImageResult(index=b, label=UNKNOWN if unknown else preds[0].label, unknown=unknown, predictions=preds)
        )
    services.metrics.images.inc(len(results))
    return ClassifyResponse(label_set=label_set, version=version, results=results)


def _prepare(images: list[bytes | str], services: Services) -> np.ndarray:
    """Decode and preprocess every image (all must be valid); [B, 3, H, W] float32."""
    cfg = services.bundle.manifest.image_encoder.preprocess.to_config()
    out = []
    for i, raw in enumerate(images):
        data = decode_base64_image(raw, i, services.limits.max_bytes) if isinstance(raw, str) else raw
        out.append(preprocess_image(decode_image(data, i, services.limits), cfg))
    return np.stack(out)


async def _parse(request: Request, services: Services) -> Job:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json" or ctype.endswith("+json"):
        return _from_json(await request.body())
    if ctype == "multipart/form-data":
        return await _from_form(request, services)
    raise UnsupportedMediaType(
        f"unsupported content type {ctype or '(none)'!r}: send application/json or multipart/form-data with 'files'"
    )


def _from_json(body: bytes) -> Job:
    try:
        req = ClassifyRequest.model_validate_json(body)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False, include_context=False, include_input=False)) from e
    images: list[bytes | str] = []
    if req.images is not None and req.inputs is not None:
        raise InvalidInput("send either 'images' or 'inputs' (Hugging Face shape), not both")
    if req.images is not None:
        images = list(req.images)
    elif req.inputs is not None:
        images = [req.inputs] if isinstance(req.inputs, str) else list(req.inputs)
    params = req.parameters
    labels = req.candidate_labels
    template = req.hypothesis_template
    top_k = req.top_k
    if params is not None:
        if (labels is not None and params.candidate_labels is not None) or (template and params.hypothesis_template):
            raise InvalidInput("give candidate_labels / hypothesis_template either at the top level or in 'parameters'")
        labels = labels if labels is not None else params.candidate_labels
        template = template or params.hypothesis_template
        top_k = params.top_k or top_k
    return Job(images, req.label_set, top_k, labels, template, req.unknown_threshold)


async def _from_form(request: Request, services: Services) -> Job:
    settings = services.settings
    async with request.form(
        max_files=settings.max_images_per_request, max_fields=1000, max_part_size=1024 * 1024
    ) as form:
        return await _job_from_form(form, settings)


async def _job_from_form(form: FormData, settings: Settings) -> Job:
    files: list[bytes | str] = []
    for i, item in enumerate(form.getlist("files")):
        if not isinstance(item, UploadFile):
            raise InvalidInput(f"files[{i}]: must be a file upload (multipart part with a filename)")
        data = await item.read(settings.max_image_bytes + 1)
        if len(data) > settings.max_image_bytes:
            raise ImageTooLarge(f"image {i}: larger than the {settings.max_image_bytes} byte limit per image")
        files.append(data)
    unknown = set(form.keys()) - {
        "files",
        "label_set",
        "top_k",
        "candidate_labels",
        "hypothesis_template",
        "unknown_threshold",
    }
    if unknown:
        raise InvalidInput(
            f"unknown form fields {sorted(unknown)}; expected files, label_set, top_k, candidate_labels, ..."
        )
    labels = [str(v) for v in form.getlist("candidate_labels")] or None
    template = form.get("hypothesis_template")
    return Job(
        images=files,
        label_set=str(form.get("label_set") or "default"),
        top_k=_form_number(form.get("top_k"), "top_k", int, 5),
        candidate_labels=labels,
        hypothesis_template=str(template) if template is not None else None,
        unknown_threshold=_form_number(form.get("unknown_threshold"), "unknown_threshold", float, None),
    )


def _form_number(raw: object, field: str, kind: type, default: Any) -> Any:
    if raw is None or raw == "":
        return default
    try:
        value = kind(str(raw))
    except ValueError as e:
        raise InvalidInput(f"{field}: {raw!r} is not a valid {kind.__name__}") from e
    if kind is int and value < 1:
        raise InvalidInput(f"{field}: must be >= 1")
    if kind is float and not -1.0 <= value <= 1.0:
        raise InvalidInput(f"{field}: must be within [-1, 1]")
    return value
