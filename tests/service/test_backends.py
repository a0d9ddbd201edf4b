"""ONNX Runtime and torch image encoders give the same answers through the whole service."""

from __future__ import annotations

import base64
from typing import Any

from tests.service.conftest import png_bytes


def test_onnx_and_torch_backends_agree(live: Any, tmp_path: Any, photos: list[Any]) -> None:
    body = {"images": [base64.b64encode(png_bytes(p)).decode() for p in photos], "top_k": 8}
    answers = {}
    for backend in ("onnx", "torch"):
        with live(backend=backend, state_dir=tmp_path / backend) as server, server.client() as http:
            assert server.services.encoder.backend == backend
            resp = http.post("/v1/classify", json=body)
            assert resp.status_code == 200, resp.text
            answers[backend] = resp.json()["results"]
    worst = 0.0
    for a, b in zip(answers["onnx"], answers["torch"], strict=True):
        assert a["predictions"][0]["class_id"] == b["predictions"][0]["class_id"]
        scores_b = {p["class_id"]: (p["score"], p["cosine"]) for p in b["predictions"]}
        for p in a["predictions"]:
            worst = max(
                worst, abs(p["score"] - scores_b[p["class_id"]][0]), abs(p["cosine"] - scores_b[p["class_id"]][1])
            )
    assert worst <= 1e-4, worst
    print(f"onnx vs torch: max abs diff {worst:.2e} over {len(photos)} photos")
