"""The OpenAPI document, shaped for generated clients.

FastAPI's own schema is the starting point; this module makes it fit what the server really does:
short stable operationIds (``listClasses``, not ``list_classes_v1_label_sets__name__classes_get``),
the ``apiKey`` security scheme on mutating routes (Swagger UI's "Authorize" button), and every error
response described as ``application/problem+json`` with the :class:`~service.schemas.Problem`
schema (422 with :class:`~service.schemas.ValidationProblem`), including the refusals that come from
middleware (413 body size) and the key check (401) that FastAPI cannot see.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute

from service.errors import PROBLEM_JSON
from service.schemas import ClassifyRequest, Problem, ValidationProblem

_REF = "#/components/schemas/{model}"
_RETRY_AFTER = {
    "Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer", "minimum": 0}}
}
_DEFAULT_DESCRIPTIONS = {
    401: "API key missing or wrong (send it in X-API-Key)",
    413: "request body over the server's limit",
    422: "the request failed validation; `errors` lists the fields",
}


def operation_id(route: APIRoute) -> str:
    """camelCase of the handler's name: ``list_classes`` -> ``listClasses`` (stable across paths)."""
    head, *rest = route.name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def build_openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, then the fixes above; cached on the app like FastAPI's own."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes, tags=app.openapi_tags
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (ClassifyRequest, Problem, ValidationProblem):
        body = model.model_json_schema(ref_template=_REF, by_alias=True)
        components.update(body.pop("$defs", {}))
        components[model.__name__] = body
    # FastAPI's validation shapes are never sent: every 422 is a ValidationProblem.
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    seen: set[str] = set()
    for path, item in schema.get("paths", {}).items():
        for method, op in item.items():
            _fix_operation(op)
            op_id = op.get("operationId", "")
            if op_id in seen or not re.fullmatch(r"[a-z][A-Za-z0-9]*", op_id):
                raise RuntimeError(f"{method.upper()} {path}: operationId {op_id!r} is not unique and camelCase")
            seen.add(op_id)
    app.openapi_schema = schema
    return schema


def _fix_operation(op: dict[str, Any]) -> None:
    responses: dict[str, Any] = op.setdefault("responses", {})
    if op.get("parameters") or op.get("requestBody"):
        responses.setdefault("422", {})
    if op.get("requestBody"):
        responses.setdefault("413", {})
    if op.get("security"):
        responses.setdefault("401", {})
    for status, response in responses.items():
        if not status.isdigit() or int(status) < 400:
            continue
        code = int(status)
        response.setdefault("description", _DEFAULT_DESCRIPTIONS.get(code, "error"))
        if not response["description"] or response["description"] == "Validation Error":
            response["description"] = _DEFAULT_DESCRIPTIONS.get(code, "error")
        if _has_own_model(response):  # e.g. /readyz's 503 is a Health report, not a refusal
            continue
        model = ValidationProblem if code == 422 else Problem
        response["content"] = {PROBLEM_JSON: {"schema": {"$ref": _REF.format(model=model.__name__)}}}
        if code in (429, 503):
            response.setdefault("headers", {}).update(_RETRY_AFTER)


def _has_own_model(response: dict[str, Any]) -> bool:
    refs = [c.get("schema", {}).get("$ref", "") for c in response.get("content", {}).values()]
    return any(ref and not ref.endswith("/HTTPValidationError") for ref in refs)
