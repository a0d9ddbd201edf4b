"""``POST /v1/classify``: multipart uploads or JSON (ours or the Hugging Face shape)."""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import FormData

from service.classifier import ClassifyJob
from service.deps import ServicesDep
from service.errors import InvalidInput, UnsupportedMediaType
from service.images import EncodedImage, read_uploads
from service.schemas import ClassifyRequest, ClassifyResponse, HFAnswer, HFLabelScore
from service.settings import Settings

router = APIRouter(prefix="/v1", tags=["classify"])
_FORM_INT = re.compile(r"[0-9]{1,12}")
_FORM_FLOAT = re.compile(r"-?[0-9]{1,12}(\.[0-9]{1,20})?([eE][-+]?[0-9]{1,3})?")
_FORM_FIELDS = {
    "files", "label_set", "top_k", "candidate_labels", "hypothesis_template", "unknown_threshold", "min_version",
    "unknown", "acceptance", "capture",
}  # fmt: skip

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
        "min_version": {"type": "integer", "minimum": 1},
        "unknown": {"type": "string", "enum": ["calibrated"]},
        "acceptance": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "capture": {"type": "boolean", "default": True},
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
    response_model=ClassifyResponse | HFAnswer,
    openapi_extra=OPENAPI_BODY,
    summary="classify images against a label set or ad-hoc candidate labels",
    responses={
        413: {"description": "body, image bytes or pixels over the limit"},
        415: {"description": "neither JSON nor multipart"},
        422: {
            "description": "undecodable image, URL instead of image, invalid labels; unknown='calibrated' on a bundle "
            "without a calibration sample (code no_calibration_sample)"
        },
        429: {"description": "at capacity (refused before any decoding); see Retry-After"},
        503: {"description": "shutting down; see Retry-After"},
    },
)
async def classify(request: Request, services: ServicesDep) -> ClassifyResponse | HFAnswer:
    job = await _parse(request, services.settings)
    answer = await services.classifier.classify(job, request.is_disconnected)
    return hf_answer(answer, job.hf_single) if job.hf_single is not None else answer


def hf_answer(answer: ClassifyResponse, single: bool) -> HFAnswer:
    """The Hugging Face zero-shot answer: per image a list of {label, score}, best first; a flat list
    for a single ``inputs`` string (as huggingface_hub's client parses it)."""
    per_image = [[HFLabelScore(label=p.label, score=p.score) for p in r.predictions] for r in answer.results]
    return per_image[0] if single else per_image


async def _parse(request: Request, settings: Settings) -> ClassifyJob:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json" or ctype.endswith("+json"):
        return _from_json(await request.body())
    if ctype == "multipart/form-data":
        return await _from_form(request, settings)
    raise UnsupportedMediaType(
        f"unsupported content type {ctype or '(none)'!r}: send application/json or multipart/form-data with 'files'"
    )


def _from_json(body: bytes) -> ClassifyJob:
    try:
        req = ClassifyRequest.model_validate_json(body)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False, include_context=False, include_input=False)) from e
    images: list[EncodedImage | str] = []
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
    job = ClassifyJob(images, req.label_set, top_k, labels, template, req.unknown_threshold, req.min_version)
    job.unknown, job.acceptance, job.capture = req.unknown, req.acceptance, req.capture
    if req.inputs is not None:  # asked in the Hugging Face shape: answered in it
        job.hf_single = isinstance(req.inputs, str)
    return job


async def _from_form(request: Request, settings: Settings) -> ClassifyJob:
    async with request.form(
        max_files=settings.max_images_per_request, max_fields=1000, max_part_size=1024 * 1024
    ) as form:
        return await _job_from_form(form, settings)


async def _job_from_form(form: FormData, settings: Settings) -> ClassifyJob:
    files = await read_uploads(form, settings.max_image_bytes)
    unknown = set(form.keys()) - _FORM_FIELDS
    if unknown:
        raise InvalidInput(
            f"unknown form fields {sorted(unknown)}; expected files, label_set, top_k, candidate_labels, ..."
        )
    labels = [str(v) for v in form.getlist("candidate_labels")] or None
    template = form.get("hypothesis_template")
    return ClassifyJob(
        images=files,
        label_set=str(form.get("label_set") or "default"),
        top_k=_form_number(form.get("top_k"), "top_k", int, 5),
        candidate_labels=labels,
        hypothesis_template=str(template) if template is not None else None,
        unknown_threshold=_form_number(form.get("unknown_threshold"), "unknown_threshold", float, None),
        min_version=_form_number(form.get("min_version"), "min_version", int, None),
        unknown=str(form.get("unknown")) if form.get("unknown") is not None else None,
        acceptance=_form_number(form.get("acceptance"), "acceptance", float, None),
        capture=_form_bool(form.get("capture"), "capture"),
    )


def _form_bool(raw: object, field: str) -> bool:
    if raw is None or raw == "":
        return True
    value = str(raw).strip().lower()
    if value not in ("true", "false"):
        raise InvalidInput(f"{field}: must be true or false")
    return value == "true"


def _form_number(raw: object, field: str, kind: type, default: Any) -> Any:
    if raw is None or raw == "":
        return default
    text = str(raw)
    # strict: digits only for integers ("3", not " 3", "+3", "3_0" or "3.0"); floats as JSON writes them
    pattern = _FORM_INT if kind is int else _FORM_FLOAT
    if not pattern.fullmatch(text):
        raise InvalidInput(f"{field}: {text[:40]!r} is not a valid {kind.__name__}")
    value = kind(text)
    if kind is int and value < 1:
        raise InvalidInput(f"{field}: must be >= 1")
    if kind is float and not -1.0 <= value <= 1.0:
        raise InvalidInput(f"{field}: must be within [-1, 1]")
    return value
