"""ONNX Runtime and torch image encoders give the same answers through the whole service."""

from __future__ import annotations

import base64
from pathlib import Path
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
    live: Any, make_settings: Any, int8_bundle_dir: Path, tmp_path: Path, photos: list[Any]
) -> None:
    """The service answers with the graph asked for: its cosines are that graph's, computed here directly."""
    import numpy as np
    import onnxruntime as ort

    from models.bundle import load_bundle
    from models.preprocess import preprocess_batch
    from service.errors import StartupError

    bundle = load_bundle(int8_bundle_dir)
    pixels = preprocess_batch(photos, bundle.manifest.image_encoder.preprocess.to_config())
    vectors = bundle.class_vectors["default"].float().numpy()  # [N, D]
    body = {"images": [base64.b64encode(png_bytes(p)).decode() for p in photos], "top_k": len(vectors)}
    served = {}
    for precision, spec in zip(("fp32", "int8"), bundle.manifest.image_encoder.onnx, strict=True):
        with (
            live(bundle=int8_bundle_dir, onnx_precision=precision, state_dir=tmp_path / precision) as server,
            server.client() as http,
        ):
            assert server.services.encoder.precision == precision
            resp = http.post("/v1/classify", json=body)
            assert resp.status_code == 200, resp.text
            served[precision] = np.array(
                [
                    [p["cosine"] for p in sorted(r["predictions"], key=lambda p: p["class_id"])]
                    for r in resp.json()["results"]
                ]
            )  # [P, N]
        session = ort.InferenceSession(str(int8_bundle_dir / spec.file), providers=["CPUExecutionProvider"])
        direct = session.run(["embedding"], {"pixels": pixels})[0] @ vectors.T  # [P, N]
        np.testing.assert_allclose(served[precision], direct, atol=1e-4, err_msg=precision)
    assert float(np.abs(served["fp32"] - served["int8"]).max()) > 0, "int8 answered exactly like fp32"
    from fastapi.testclient import TestClient

    from service import create_app

    fp32_only = make_settings(onnx_precision="int8", state_dir=tmp_path / "none")  # shared bundle: fp32 only
    with pytest.raises(StartupError, match="no such ONNX graph"), TestClient(create_app(fp32_only)):
        pass
