"""Open Inference Protocol v2 over REST (``/v2``), with the binary-data and classification extensions.

Errors leave in the protocol's own form, ``{"error": "..."}``, with the service's status (400 where
the native routes say 422). Refusals made before a route runs (body over the size limit, unknown
path or method) keep the service-wide RFC 9457 form. See :mod:`service.oip` for the models.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from models import __version__
from service.errors import InvalidInput, Overloaded, ServiceError
from service.images import EncodedImage
from service.oip import (
    EXTENSIONS,
    SERVER_NAME,
    InferResult,
    InputTensor,
    Models,
    OutputRequest,
    check_key,
    rest_status,
    split_bytes,
)
from service.state import Services

HEADER_LENGTH = "inference-header-content-length"
OCTET = "application/octet-stream"
Scalar = StrictBool | StrictInt | float | str


class OipError(BaseModel):
    """The Open Inference Protocol's error body."""

    error: str = Field(description="what went wrong and what to do")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputIn(_Strict):
    name: str
    shape: list[StrictInt]
    datatype: str
    parameters: dict[str, Scalar] | None = Field(default=None, description="binary_data_size: bytes in the tail")
    data: list[Any] | None = Field(default=None, description="BYTES: base64 or data: URI strings, row-major")


class OutputIn(_Strict):
    name: str
    parameters: dict[str, Scalar] | None = Field(
        default=None, description="classification: k (top-k strings); binary_data: answer in the binary tail"
    )


class InferenceRequest(_Strict):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "inputs": [{"name": "IMAGE", "shape": [1], "datatype": "BYTES", "data": ["<base64 JPEG>"]}],
                    "outputs": [{"name": "SCORES", "parameters": {"classification": 3}}],
                }
            ]
        },
    )

    id: str | None = None
    model_name: str | None = Field(default=None, description="if given, the path's model (kserve sends it)")
    model_version: str | None = Field(default=None, description="ignored: a model answers from its current version")
    parameters: dict[str, Scalar] | None = Field(default=None, description="binary_data_output: all outputs binary")
    inputs: list[InputIn]
    outputs: list[OutputIn] | None = None


class OutputOut(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Scalar] | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    outputs: list[OutputOut]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class OipRoute(APIRoute):
    """Renders every refusal inside a /v2 route as ``{"error": ...}``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except ServiceError as e:
                return JSONResponse({"error": e.message}, status_code=rest_status(e), headers=e.headers)
            except RequestValidationError as e:
                return JSONResponse({"error": _summary(e.errors())}, status_code=400)

        return guarded


def _summary(errors: Any) -> str:
    parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in list(errors)[:5]]
    return "invalid request: " + "; ".join(parts)


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": OipError, "description": "the request cannot be used (shape, datatype, sizes, image)"},
    401: {"model": OipError, "description": "API key missing or wrong (only when oip_require_api_key is set)"},
    404: {"model": OipError, "description": "unknown model"},
}
_INFER_ERRORS: dict[int | str, dict[str, Any]] = {
    **_ERRORS,
    409: {"model": OipError, "description": "the label set is empty"},
    429: {"model": OipError, "description": "at capacity (refused before any decoding); see Retry-After"},
    503: {"model": OipError, "description": "shutting down, or the label-set store is unreachable"},
    504: {"model": OipError, "description": "not finished within the request deadline"},
}
router = APIRouter(prefix="/v2", tags=["open inference protocol"], route_class=OipRoute)


def _models(request: Request) -> Models:
    services: Services | None = getattr(request.app.state, "services", None)
    if services is None:
        raise Overloaded("the server is still starting", retry_after_s=1, status=503)
    check_key(services, request.headers.get("x-api-key"))
    return Models(services)


@router.get("", response_model=ServerMetadata, summary="server metadata (name, version, extensions)")
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)


@router.get("/health/live", response_model=Live, summary="the server is live")
async def server_live() -> Live:
    return Live(live=True)


@router.get(
    "/health/ready",
    response_model=Ready,
    summary="the server is ready for inference",
    responses={503: {"model": Ready, "description": "not ready (starting or draining)"}},
)
async def server_ready(request: Request) -> Response:
    services: Services | None = getattr(request.app.state, "services", None)
    ready = services is not None and services.engine.running
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


@router.get("/models/{model}", response_model=ModelMetadata, summary="model metadata", responses=_ERRORS)
async def model_metadata(model: str, request: Request) -> ModelMetadata:
    meta = await _models(request).metadata(model)
    return ModelMetadata(
        name=meta.name,
        versions=meta.versions,
        platform=meta.platform,
        inputs=[TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.inputs],
        outputs=[TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.outputs],
    )


@router.get(
    "/models/{model}/ready",
    response_model=ModelReady,
    summary="the model is ready (a label set with classes, or the image encoder)",
    responses={**_ERRORS, 503: {"model": ModelReady, "description": "not ready"}},
)
async def model_ready(model: str, request: Request) -> Response:
    ready = await _models(request).model_ready(model)
    return JSONResponse({"name": model, "ready": ready}, status_code=200 if ready else 503)


_INFER_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}},
            OCTET: {
                "schema": {"type": "string", "format": "binary"},
                "description": "binary-data extension: the JSON header (Inference-Header-Content-Length bytes), "
                "then each binary input's bytes in order",
            },
        },
    }
}


@router.post(
    "/models/{model}/infer",
    response_model=InferenceResponse,
    summary="classify (label-set models) or embed (image-encoder) BYTES images",
    responses=_INFER_ERRORS,
    openapi_extra=_INFER_BODY,
)
async def model_infer(model: str, request: Request) -> Response:
    models = _models(request)
    header, tail = _split_body(await request.body(), request.headers.get(HEADER_LENGTH))
    req = _parse_header(header)
    if req.model_name is not None and req.model_name != model:
        raise InvalidInput(f"model_name {req.model_name!r} in the body differs from the path's model {model!r}")
    inputs = _inputs(req, tail)
    binary_all = (req.parameters or {}).get("binary_data_output") is True
    outputs = [_output(o, binary_all) for o in req.outputs or []]
    result = await models.infer(model, inputs, outputs, request.is_disconnected)
    binary = {o.name for o in outputs if o.binary} | ({t.name for t in result.outputs} if binary_all else set())
    return _respond(result, req.id, binary)


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    if not header_length.isdigit():
        raise InvalidInput(f"Inference-Header-Content-Length: {header_length[:20]!r} is not a byte count")
    n = int(header_length)
    if n > len(body):
        raise InvalidInput(f"Inference-Header-Content-Length {n} overruns the {len(body)}-byte body")
    return body[:n], body[n:]


def _parse_header(header: bytes) -> InferenceRequest:
    try:
        return InferenceRequest.model_validate_json(header)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False, include_context=False, include_input=False)) from e


def _inputs(req: InferenceRequest, tail: bytes) -> list[InputTensor]:
    out: list[InputTensor] = []
    pos = 0
    for t in req.inputs:
        size = (t.parameters or {}).get("binary_data_size")
        if size is None:
            out.append(InputTensor(t.name, t.datatype, t.shape, _json_elements(t)))
            continue
        if t.data is not None or type(size) is not int or size < 0:
            raise InvalidInput(f"input {t.name}: binary_data_size must be a byte count, and then no 'data'")
        if pos + size > len(tail):
            raise InvalidInput(
                f"input {t.name}: binary_data_size {size} overruns the binary data ({len(tail) - pos} left)"
            )
        raw = tail[pos : pos + size]
        pos += size
        elements: list[EncodedImage | str] = [EncodedImage(b) for b in _bytes_of(t, raw)]
        out.append(InputTensor(t.name, t.datatype, t.shape, elements))
    if pos != len(tail):
        raise InvalidInput(f"{len(tail) - pos} byte(s) of binary data belong to no input (binary_data_size)")
    return out


def _bytes_of(t: InputIn, raw: bytes) -> list[bytes]:
    if t.datatype != "BYTES":
        raise InvalidInput(f"input {t.name}: datatype {t.datatype!r}; it must be BYTES (encoded image files)")
    return split_bytes(raw, f"input {t.name}")


def _json_elements(t: InputIn) -> list[EncodedImage | str]:
    if t.data is None:
        raise InvalidInput(f"input {t.name}: no 'data' and no binary_data_size parameter")
    flat: list[Any] = []
    stack = [t.data]
    while stack:  # row-major flatten of nested lists
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            flat.append(item)
    if t.datatype == "BYTES" and not all(isinstance(x, str) for x in flat):
        raise InvalidInput(f"input {t.name}: BYTES elements in JSON are strings (base64 or data: URIs)")
    return list(flat)


def _output(o: OutputIn, binary_all: bool) -> OutputRequest:
    params = o.parameters or {}
    k = params.get("classification")
    if k is not None and (type(k) is not int or k < 1):
        raise InvalidInput(f"output {o.name}: classification must be an integer >= 1 (the top k)")
    binary = params.get("binary_data", binary_all)
    if type(binary) is not bool:
        raise InvalidInput(f"output {o.name}: binary_data must be true or false")
    return OutputRequest(o.name, k if isinstance(k, int) else None, binary)


def _respond(result: InferResult, request_id: str | None, binary: set[str]) -> Response:
    outputs: list[dict[str, Any]] = []
    tail: list[bytes] = []
    for t in result.outputs:
        entry: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
        if t.name in binary:
            raw = t.raw()
            entry["parameters"] = {"binary_data_size": len(raw)}
            tail.append(raw)
        elif t.fp32 is not None:
            entry["data"] = [float(x) for x in t.fp32]
        else:
            entry["data"] = [s.decode() for s in t.strings]
        outputs.append(entry)
    body: dict[str, Any] = {"model_name": result.model, "model_version": result.version, "outputs": outputs}
    if request_id is not None:
        body["id"] = request_id
    header = json.dumps(body, separators=(",", ":")).encode()
    if not tail:
        return Response(header, media_type="application/json")
    return Response(header + b"".join(tail), media_type=OCTET, headers={HEADER_LENGTH: str(len(header))})
