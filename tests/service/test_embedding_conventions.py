"""The three OpenAI-style image-embedding conventions through the ``openai`` client, unmodified:
NV-CLIP's data: URIs in ``input`` (modality inferred, texts and images mixed), Infinity's
``modality``, and vLLM's chat-style ``messages`` (sent with ``client.post`` as vLLM's own example
does). For each, the cosines of the returned image embeddings with the label set's class vectors
equal /v1/classify's within 1e-4, and texts equal the class vectors of the same names."""

from __future__ import annotations

import base64
from typing import Any

import httpx2
import numpy as np
import pytest
from openai import OpenAI
from openai.types import CreateEmbeddingResponse

from tests.service.conftest import LiveServer, png_bytes


def _uri(image: Any) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def _cosines_match(server: LiveServer, uris: list[str], emb: np.ndarray) -> None:
    snap = server.services.registry.get("default")
    answer = httpx2.post(server.url + "/v1/classify", json={"images": uris, "top_k": len(snap)}, timeout=60).json()
    by_id = {int(i): row for row, i in enumerate(snap.ids)}
    for b, result in enumerate(answer["results"]):
        for p in result["predictions"]:
            assert abs(float(emb[b] @ snap.vectors[by_id[p["class_id"]]]) - p["cosine"]) < 1e-4


def _text_matches(server: LiveServer, vector: np.ndarray, name: str) -> None:
    snap = server.services.registry.get("default")
    assert float(vector @ snap.vectors[snap.names.index(name)]) > 1 - 1e-4


@pytest.mark.slow
def test_three_conventions_with_the_openai_client(shared_server: LiveServer, photos: list[Any]) -> None:
    server = shared_server
    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    uris = [_uri(p) for p in photos[:2]]

    # NV-CLIP: modality inferred per input; a text and two images in one request, order kept
    nv = client.embeddings.create(model="tiny", input=["rocket", *uris])
    vec = np.array([d.embedding for d in nv.data])
    assert [d.index for d in nv.data] == [0, 1, 2]
    _text_matches(server, vec[0], "rocket")
    _cosines_match(server, uris, vec[1:])

    # Infinity: modality says every input is an image (plain base64 allowed too)
    plain = [u.split(",", 1)[1] for u in uris]
    inf = client.embeddings.create(model="tiny", input=plain, extra_body={"modality": "image"})
    _cosines_match(server, uris, np.array([d.embedding for d in inf.data]))

    # vLLM: chat-style messages, each image_url / text part one embedding
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in uris]
    messages = [
        {"role": "user", "content": [parts[0]]},
        {"role": "user", "content": [parts[1], {"type": "text", "text": "cat"}]},
    ]
    vllm = client.post(
        "/embeddings",
        body={"model": "tiny", "messages": messages, "encoding_format": "float"},
        cast_to=CreateEmbeddingResponse,
    )
    vec = np.array([d.embedding for d in vllm.data])
    assert vec.shape[0] == 3
    _cosines_match(server, uris, vec[:2])
    _text_matches(server, vec[2], "cat")


def test_convention_refusals(shared_server: LiveServer) -> None:
    with httpx2.Client(base_url=shared_server.url) as http:
        both = http.post("/v1/embeddings", json={"input": ["a"], "messages": [{"role": "user", "content": "a"}]})
        assert both.status_code == 422 and "exactly one" in both.json()["detail"]
        neither = http.post("/v1/embeddings", json={"model": "x"})
        assert neither.status_code == 422
        url = {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}
        fetch = http.post("/v1/embeddings", json={"messages": [{"role": "user", "content": [url]}]})
        assert fetch.status_code == 422 and "not fetched" in fetch.json()["detail"]
        bad = http.post("/v1/embeddings", json={"input": ["data:image/png;base64,aGVsbG8="]})
        assert bad.status_code == 422 and bad.headers["content-type"] == "application/problem+json"
