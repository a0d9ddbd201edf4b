"""One error format: every refusal, from every source, is an RFC 9457 problem (application/problem+json).

Sources: domain errors (service/errors.py), request validation (FastAPI's and the classify route's
own JSON parsing), routing (404, 405 with Allow), middleware (body size by Content-Length and while
streaming), the API key check, overload (429 + Retry-After) and an unexpected exception (500).
All over real HTTP against the real app in uvicorn.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx2
import pytest

from tests.service.conftest import png_bytes

KEY = "problem-key"


def _assert_problem(resp: httpx2.Response, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/problem+json", resp.headers
    body = resp.json()
    assert body["status"] == status and body["code"] == code, body
    assert body["type"] == f"urn:promptdistill:problem:{code}"
    assert body["title"] and isinstance(body["detail"], str) and body["detail"], body
    return body


@pytest.fixture
def server(live: Any) -> Iterator[Any]:
    with live(api_key=KEY, max_request_bytes=64 * 1024, max_image_bytes=32 * 1024) as s:
        yield s


def test_domain_errors(server: Any) -> None:
    with server.client(headers={"X-API-Key": KEY}) as http:
        body = _assert_problem(http.get("/v1/label-sets/nope/classes"), 404, "unknown_label_set")
        assert "nope" in body["detail"]
        _assert_problem(http.post("/v1/label-sets/default/classes", json={"names": ["cat"]}), 409, "duplicate_class")
        _assert_problem(http.delete("/v1/label-sets/default"), 409, "protected_label_set")
        _assert_problem(http.post("/v1/classify", content=b"x", headers={"content-type": "text/plain"}), 415,
                        "unsupported_media_type")  # fmt: skip


def test_validation_errors_list_each_field(server: Any) -> None:
    with server.client(headers={"X-API-Key": KEY}) as http:
        body = _assert_problem(
            http.post("/v1/label-sets", json={"name": "pets", "names": "cat", "extra": 1}), 422, "validation_error"
        )
        by_field = {e["field"]: e for e in body["errors"]}
        assert set(by_field) == {"names", "extra"}, body
        assert by_field["names"]["pointer"] == "#/names" and by_field["names"]["in"] == "body"
        assert all(e["detail"] and e["type"] for e in body["errors"])
        assert "cat" not in str(body["errors"]), "the input is not echoed back"
        query = _assert_problem(http.get("/v1/label-sets/default/classes", params={"limit": 0}), 422,
                                "validation_error")  # fmt: skip
        assert [(e["in"], e["field"]) for e in query["errors"]] == [("query", "limit")]
        path = _assert_problem(http.delete("/v1/label-sets/default/classes/-1"), 422, "validation_error")
        assert path["errors"][0]["in"] == "path"
        # the classify route parses JSON itself: same shape, and a broken body is a field error too
        cls = _assert_problem(http.post("/v1/classify", json={"images": ["x"], "top_k": 0}), 422, "validation_error")
        assert [e["field"] for e in cls["errors"]] == ["top_k"]
        broken = http.post("/v1/classify", content=b"{not json", headers={"content-type": "application/json"})
        assert _assert_problem(broken, 422, "validation_error")["errors"]


def test_unknown_routes_and_methods(server: Any) -> None:
    with server.client() as http:
        body = _assert_problem(http.get("/v2/nothing"), 404, "not_found")
        assert "/v2/nothing" in body["detail"]
        resp = http.put("/v1/label-sets")
        _assert_problem(resp, 405, "method_not_allowed")
        allow = set(resp.headers["allow"].replace(" ", "").split(","))
        assert {"GET", "POST"} <= allow and not allow & {"PUT", "PATCH", "DELETE"}, allow  # every method of the path


def test_middleware_refusals(server: Any) -> None:
    with server.client(headers={"X-API-Key": KEY}) as http:
        big = {"names": ["x" * 100] * 1000}  # ~100 KB > the 64 KiB limit
        body = _assert_problem(http.post("/v1/label-sets/default/classes", json=big), 413, "too_large")
        assert "65536" in body["detail"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: the limit trips while streaming
            yield b'{"names": ["'
            for _ in range(100):
                yield b"y" * 1024
            yield b'"]}'

        streamed = http.post(
            "/v1/label-sets/default/classes", content=chunks(), headers={"content-type": "application/json"}
        )
        _assert_problem(streamed, 413, "too_large")
        names = {c["name"] for c in http.get("/v1/label-sets/default/classes").json()["classes"]}
        assert not any(n.startswith("x") or n.startswith("y") for n in names)


def test_auth_refusal(server: Any) -> None:
    with server.client() as http:
        resp = http.post("/v1/label-sets/default/classes", json={"names": ["okapi"]})
        body = _assert_problem(resp, 401, "unauthorized")
        assert resp.headers["www-authenticate"] == "ApiKey" and "X-API-Key" in body["detail"]


def test_overload_refusal_carries_retry_after(live: Any, photos: list[Any]) -> None:
    image = base64.b64encode(png_bytes(photos[0].resize((64, 64)))).decode()
    with live(max_images_in_flight=1, max_batch_size=1, max_wait_ms=0, retry_after_s=3) as server:
        engine = server.services.engine
        fast = engine.encode
        engine.encode = lambda px: (time.sleep(0.2), fast(px))[1]  # a slow model: bursts queue

        def one(_: int) -> httpx2.Response:
            return httpx2.post(server.url + "/v1/classify", json={"images": [image]}, timeout=60)

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(16)))
        engine.encode = fast
    refused = [r for r in results if r.status_code == 429]
    assert refused, [r.status_code for r in results]
    for r in refused:
        _assert_problem(r, 429, "overloaded")
        assert r.headers["retry-after"] == "3"


def test_unexpected_exception_is_a_problem_too(live: Any) -> None:
    with live() as server:

        @server.app.get("/test-crash", include_in_schema=False)
        async def crash() -> None:
            raise ZeroDivisionError("boom")

        with server.client() as http:
            body = _assert_problem(http.get("/test-crash"), 500, "internal_error")
            assert "boom" not in body["detail"], "internals stay in the server log"
            assert http.get("/readyz").status_code == 200
