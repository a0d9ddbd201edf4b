"""ONNX Runtime and torch image encoders give the same answers through the whole service."""

from __future__ import annotations

import base64
from typing import Any

import pytest

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


def test_int8_graph_is_served_when_asked(
    live: Any, make_settings: Any, tmp_path: Any, photos: list[Any], tiny_config: Any
) -> None:
    import numpy as np

    from models.zeroshot import build_zeroshot_bundle, named_templates
    from service.errors import StartupError
    from tests.conftest import CLASS_NAMES

    bundle = tmp_path / "int8-bundle"
    build_zeroshot_bundle(
        str(tiny_config), None, CLASS_NAMES, named_templates("simple"), bundle, int8=True, progress=False
    )
    body = {"images": [base64.b64encode(png_bytes(p)).decode() for p in photos], "top_k": 8}
    cosines = {}
    for precision in ("fp32", "int8"):
        with (
            live(bundle=bundle, onnx_precision=precision, state_dir=tmp_path / precision) as server,
            server.client() as http,
        ):
            assert server.services.encoder.precision == precision
            resp = http.post("/v1/classify", json=body)
            assert resp.status_code == 200, resp.text
            cosines[precision] = np.array(
                [
                    [p["cosine"] for p in sorted(r["predictions"], key=lambda p: p["class_id"])]
                    for r in resp.json()["results"]
                ]
            )
    diff = float(np.abs(cosines["fp32"] - cosines["int8"]).max())
    assert 0 < diff < 0.05, diff  # a different graph, close to the fp32 one
    from fastapi.testclient import TestClient

    from service import create_app

    fp32_only = make_settings(onnx_precision="int8", state_dir=tmp_path / "none")  # shared bundle: fp32 only
    with pytest.raises(StartupError, match="no such ONNX graph"), TestClient(create_app(fp32_only)):
        pass
