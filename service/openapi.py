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
from service.routes.v2 import InferenceRequest
from service.schemas import ClassesIn, ClassifyRequest, ExamplesIn, Problem, ValidationProblem

_REF = "#/components/schemas/{model}"
_RETRY_AFTER = {
    "Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer", "minimum": 0}}
}
_DEFAULT_DESCRIPTIONS = {
    400: "the body could not be parsed",
    401: "API key missing or wrong (send it in X-API-Key)",
    413: "request body over the server's limit",
    422: "the request failed validation; `errors` lists the fields",
    503: "unavailable for now (overloaded, draining, or the label-set store is unreachable); see Retry-After",
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
    for model in (ClassifyRequest, InferenceRequest, ClassesIn, ExamplesIn, Problem, ValidationProblem):
        body = model.model_json_schema(ref_template=_REF, by_alias=True)
        components.update(body.pop("$defs", {}))
        components[model.__name__] = body
    # FastAPI's validation shapes are never sent: every 422 is a ValidationProblem.
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    seen: set[str] = set()
    for path, item in schema.get("paths", {}).items():
        for method, op in item.items():
            for status, description in EXTRA_RESPONSES.get(op.get("operationId", ""), {}).items():
                op.setdefault("responses", {}).setdefault(status, {"description": description})
            _fix_operation(op, api=path.startswith("/v1/"))
            _add_links(op)
            op_id = op.get("operationId", "")
            if op_id in seen or not re.fullmatch(r"[a-z][A-Za-z0-9]*", op_id):
                raise RuntimeError(f"{method.upper()} {path}: operationId {op_id!r} is not unique and camelCase")
            seen.add(op_id)
    app.openapi_schema = schema
    return schema


# Where a created or changed set's name leads next (clients and schemathesis' stateful phase follow
# these rather than guessing: a ClassList's class names are not label-set names).
_SET_NAME = {"name": "$response.body#/label_set"}
LINKS = {
    ("createLabelSet", "201"): ("listClasses", "addClasses", "deleteLabelSet"),
    ("addClasses", "201"): ("listClasses",),
}


# Refusals an operation's route cannot declare by itself (they come from the pipeline it calls).
EXTRA_RESPONSES: dict[str, dict[str, str]] = {
    "classify": {
        "404": "unknown label set",
        "409": "the label set is empty, or candidate_labels on a bundle without a text side",
        "504": "not finished within the request deadline",
    },
}


_FIRST_CLASS = {**_SET_NAME, "class_id": "$response.body#/classes/0/id"}


def _add_links(op: dict[str, Any]) -> None:
    for (op_id, status), targets in LINKS.items():
        if op.get("operationId") == op_id:
            links = op["responses"][status].setdefault("links", {})
            for target in targets:
                links[target] = {"operationId": target, "parameters": dict(_SET_NAME)}
            links["removeClassById"] = {"operationId": "removeClassById", "parameters": dict(_FIRST_CLASS)}


def _fix_operation(op: dict[str, Any], api: bool) -> None:
    responses: dict[str, Any] = op.setdefault("responses", {})
    if api:  # any /v1 route can meet an unreachable label-set store (or a draining server)
        responses.setdefault("503", {})
    if op.get("parameters") or op.get("requestBody"):
        responses.setdefault("422", {})
    if op.get("requestBody"):
        responses.setdefault("400", {})
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
