"""Classify over real HTTP: parity with an independent open_clip + numpy computation, open vocabulary."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file

import models  # noqa: F401  (torchvision shim before open_clip)
from tests.service.conftest import assert_same_answer, png_bytes

TOP_K = 5


def _open_clip_reference(
    bundle_dir: Path, tiny_config: Path, photos: list[Any]
) -> tuple[np.ndarray, np.ndarray, float]:
    """Image embeddings [P, D] via open_clip's own model and eval transform; class vectors [N, D]; scale."""
    import json

    import open_clip  # after `models` (imported above), whose shim fixes torchvision first

    open_clip.add_model_config(str(tiny_config))
    model, _, transform = open_clip.create_model_and_transforms(tiny_config.stem)
    model.load_state_dict(load_file(bundle_dir / "backbones" / "clip.safetensors"))
    model.eval()
    with torch.no_grad():
        pixels = torch.stack([transform(p) for p in photos])
        emb = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1).numpy().astype(np.float64)
    vectors = load_file(bundle_dir / "class_vectors.safetensors")["default"].numpy().astype(np.float64)
    scale = json.loads((bundle_dir / "manifest.json").read_text())["logit_scale"]
    return emb, vectors, float(scale)


def metric(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                total += sample.value
    return total


def test_classify_matches_independent_numpy(
    shared_server: Any, tiny_bundle_dir: Path, tiny_config: Path, photos: list[Any]
) -> None:
    emb, vectors, scale = _open_clip_reference(tiny_bundle_dir, tiny_config, photos)
    cos = emb @ vectors.T  # [P, N]
    logits = scale * cos
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    with shared_server.client() as http:
        files = [("files", (f"p{i}.png", png_bytes(p), "image/png")) for i, p in enumerate(photos)]
        multipart = http.post("/v1/classify", files=files, data={"top_k": str(TOP_K)})
        body = {"images": [base64.b64encode(png_bytes(p)).decode() for p in photos], "top_k": TOP_K}
        as_json = http.post("/v1/classify", json=body)
    worst = 0.0
    for resp in (multipart, as_json):
        assert resp.status_code == 200, resp.text
        out = resp.json()
        assert out["label_set"] == "default" and out["version"] >= 1
        assert len(out["results"]) == len(photos)
        for p, result in enumerate(out["results"]):
            want = np.argsort(-probs[p], kind="stable")[:TOP_K]
            got = [pred["class_id"] for pred in result["predictions"]]
            assert got == want.tolist()
            for pred in result["predictions"]:
                worst = max(
                    worst,
                    abs(pred["score"] - probs[p, pred["class_id"]]),
                    abs(pred["cosine"] - cos[p, pred["class_id"]]),
                )
            assert result["label"] == result["predictions"][0]["label"]
    assert worst <= 1e-4, f"max |service - reference| = {worst:.2e}"
    print(f"classify parity: max abs diff {worst:.2e} over {len(photos)} photos")


def test_existing_name_gets_stored_vector_back(shared_server: Any, tiny_bundle_dir: Path) -> None:
    stored = load_file(tiny_bundle_dir / "class_vectors.safetensors")["default"].numpy()
    with shared_server.client() as http:
        names = [c["name"] for c in http.get("/v1/label-sets/default/classes").json()["classes"]]
        resp = http.post("/v1/label-sets", json={"name": "again", "names": names})
        assert resp.status_code == 201, resp.text
        again = shared_server.services.registry.get("again")
    diff = float(np.abs(again.vectors - stored).max())
    assert diff <= 1e-5, diff
    print(f"runtime re-encoding of bundle names: max abs diff {diff:.2e}")


def test_text_encoder_only_runs_for_request_labels(shared_server: Any, photos: list[Any]) -> None:
    image = base64.b64encode(png_bytes(photos[1])).decode()
    with shared_server.client() as http:

        def calls() -> float:  # names encoded (anonymous text work runs in chunks: calls != requests)
            return metric(http.get("/metrics").text, "promptdistill_text_encoder_names_total")

        start = calls()
        for _ in range(3):
            assert http.post("/v1/classify", json={"images": [image]}).status_code == 200
        assert calls() == start, "the label-set query path ran the text encoder"
        hf = {"inputs": image, "parameters": {"candidate_labels": ["a cat", "a rocket", "tea"]}}
        first = http.post("/v1/classify", json=hf)
        assert first.status_code == 200, first.text
        assert calls() == start + 3
        second = http.post("/v1/classify", json=hf)
        assert calls() == start + 3, "candidate labels were not served from the LRU cache"
        assert_same_answer(second.json(), first.json())
        preds = first.json()  # asked in the Hugging Face shape: a flat list of {label, score}, best first
        assert [p["score"] for p in preds] == sorted((p["score"] for p in preds), reverse=True)
        assert sorted(p["label"] for p in preds) == ["a cat", "a rocket", "tea"]
        assert abs(sum(p["score"] for p in preds) - 1.0) < 1e-6
        templated = http.post(
            "/v1/classify",
            json={"images": [image], "candidate_labels": ["a cat"], "hypothesis_template": "a photo of {}."},
        )
        assert templated.status_code == 200 and calls() == start + 4
        text = http.get("/metrics").text
        assert metric(text, "promptdistill_batch_size_count") >= 1
        assert metric(text, "promptdistill_label_set_version", {"label_set": "default"}) >= 1


def test_unknown_threshold(shared_server: Any, photos: list[Any]) -> None:
    image = base64.b64encode(png_bytes(photos[0])).decode()
    with shared_server.client() as http:
        base = http.post("/v1/classify", json={"images": [image], "top_k": 2}).json()["results"][0]
        top_cos = base["predictions"][0]["cosine"]
        above = http.post("/v1/classify", json={"images": [image], "unknown_threshold": top_cos + 0.01}).json()
        below = http.post("/v1/classify", json={"images": [image], "unknown_threshold": top_cos - 0.01}).json()
    assert above["results"][0]["label"] == "unknown" and above["results"][0]["unknown"] is True
    assert above["results"][0]["predictions"][0]["label"] == base["label"]  # the ranking is still reported
    assert below["results"][0]["label"] == base["label"] and below["results"][0]["unknown"] is False


@pytest.mark.parametrize("path", ["/livez", "/readyz", "/openapi.json", "/docs"])
def test_health_and_docs(shared_server: Any, path: str) -> None:
    with shared_server.client() as http:
        resp = http.get(path)
    assert resp.status_code == 200
    if path == "/openapi.json":
        spec = resp.json()
        assert "ClassifyRequest" in spec["components"]["schemas"]
        assert "multipart/form-data" in spec["paths"]["/v1/classify"]["post"]["requestBody"]["content"]
