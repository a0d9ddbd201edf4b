"""unknown='calibrated' over real HTTP: the threshold equals an independent numpy quantile of the
bundle's calibration sample against the set's current vectors, follows the set's versions, and
every inconsistent request is a 422 problem."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from models.bundle import load_bundle
from service.calibration import MIN_ROWS
from service.settings import Settings
from tests.conftest import CLASS_NAMES, TINY_CONFIG
from tests.service.conftest import LiveServer, png_bytes

pytestmark = pytest.mark.slow  # builds a calibrated bundle and starts a server (about a minute)
N_HELD_OUT = 48


def _held_out(photos: list[Image.Image], n: int) -> list[Image.Image]:
    """Deterministic crops of the sample photos: enough distinct in-domain images for a sample."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        p = photos[i % len(photos)]
        w, h = p.size
        s = int(min(w, h) * rng.uniform(0.4, 0.9))
        x, y = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
        out.append(p.crop((x, y, x + s, y + s)))
    return out


@pytest.fixture(scope="module")
def held_out(photos: list[Image.Image]) -> list[Image.Image]:
    return _held_out(photos, N_HELD_OUT)


@pytest.fixture(scope="module")
def calibrated_bundle(tmp_path_factory: pytest.TempPathFactory, held_out: list[Image.Image]) -> Path:
    from models.zeroshot import build_zeroshot_bundle, named_templates

    folder = tmp_path_factory.mktemp("held-out")
    for i, im in enumerate(held_out):
        im.save(folder / f"{i:03d}.png")
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("calibrated") / "b"
    build_zeroshot_bundle(
        str(TINY_CONFIG), None, CLASS_NAMES, named_templates("simple"), out, progress=False, calibration_images=folder
    )
    return out


@pytest.fixture(scope="module")
def server(calibrated_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    settings = Settings(bundle=calibrated_bundle, state_dir=tmp_path_factory.mktemp("state"), threads=1)
    with LiveServer(settings) as live:
        yield live


def _uri(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def _reference_threshold(bundle_dir: Path, vectors: np.ndarray, acceptance: float) -> tuple[float, int]:
    """numpy, independently: each calibration image weighs the softmax mass (bundle's logit scale) of the
    set's classes among the set + the vocabulary classes it lacks; the weighted (1 - acceptance) quantile
    (inverted CDF) of the top-1 cosines. Also the total weight, rounded."""
    b = load_bundle(bundle_dir)
    assert b.calibration is not None
    sample = b.calibration.numpy().astype(np.float64)
    sample /= np.linalg.norm(sample, axis=1, keepdims=True)
    vocab = b.class_vectors["default"].numpy().astype(np.float64)
    lacks = (vocab @ vectors.T).max(1) < 1 - 1e-5
    logits = b.manifest.logit_scale * sample @ np.vstack([vectors, vocab[lacks]]).T
    p = np.exp(logits - logits.max(1, keepdims=True))
    w = p[:, : len(vectors)].sum(1) / p.sum(1)
    best = (sample @ vectors.T).max(1)
    return float(np.quantile(best, 1 - acceptance, method="inverted_cdf", weights=w)), round(float(w.sum()))


def _dominant(bundle_dir: Path) -> str:
    """The class that claims the most calibration images (a tiny random CLIP puts most in one)."""
    b = load_bundle(bundle_dir)
    assert b.calibration is not None
    best = (b.calibration.numpy() @ b.class_vectors["default"].numpy().T).argmax(1)
    return CLASS_NAMES[int(np.bincount(best, minlength=len(CLASS_NAMES)).argmax())]


def _set_vectors(server: LiveServer, name: str) -> np.ndarray:
    snap = server.services.registry.get(name)
    return np.asarray(snap.vectors, dtype=np.float64)


def test_threshold_matches_numpy_and_marks_exactly_the_images_below(
    server: LiveServer, calibrated_bundle: Path, photos: list[Image.Image]
) -> None:
    with server.client() as http:
        r = http.post("/v1/classify", json={"images": [_uri(p) for p in photos], "unknown": "calibrated"})
    assert r.status_code == 200, r.text
    body = r.json()
    point = body["operating_point"]
    want, rows = _reference_threshold(calibrated_bundle, _set_vectors(server, "default"), 0.95)
    assert point["threshold"] == pytest.approx(want, abs=1e-5)
    assert point["acceptance"] == 0.95 and point["score"] == "cosine" and point["policy"] == "calibrated"
    assert point["version"] == body["version"] and point["calibration_images"] == rows == N_HELD_OUT
    for res in body["results"]:
        below = res["predictions"][0]["cosine"] < point["threshold"]
        assert res["unknown"] is below and (res["label"] == "unknown") is below


def test_the_held_out_images_themselves_are_accepted_at_the_rate(server: LiveServer, held_out: list) -> None:  # type: ignore[type-arg]
    results = []
    with server.client() as http:
        for i in range(0, len(held_out), 16):
            chunk = [_uri(p) for p in held_out[i : i + 16]]
            r = http.post("/v1/classify", json={"images": chunk, "unknown": "calibrated"})
            assert r.status_code == 200, r.text
            results += r.json()["results"]
    accepted = np.mean([not res["unknown"] for res in results])
    # the sample is these images' float16 embeddings: at least 95 % of them, give or take one at the edge
    assert accepted >= 0.95 - 1.5 / N_HELD_OUT


def test_acceptance_moves_the_threshold_and_multipart_says_the_same(
    server: LiveServer, calibrated_bundle: Path, photos: list[Image.Image]
) -> None:
    want, _ = _reference_threshold(calibrated_bundle, _set_vectors(server, "default"), 0.5)
    with server.client() as http:
        j = http.post("/v1/classify", json={"images": [_uri(photos[0])], "unknown": "calibrated", "acceptance": 0.5})
        files = [("files", ("p.png", png_bytes(photos[0]), "image/png"))]
        f = http.post("/v1/classify", files=files, data={"unknown": "calibrated", "acceptance": "0.5"})
    assert j.status_code == f.status_code == 200, (j.text, f.text)
    assert j.json()["operating_point"]["threshold"] == pytest.approx(want, abs=1e-5)
    assert f.json()["operating_point"] == j.json()["operating_point"]


def test_each_version_of_a_growing_set_gets_its_own_threshold(
    server: LiveServer, calibrated_bundle: Path, photos: list[Image.Image]
) -> None:
    dominant = _dominant(calibrated_bundle)
    others = [n for n in CLASS_NAMES if n != dominant]
    ask = {"images": [_uri(photos[0])], "label_set": "grow", "unknown": "calibrated"}
    with server.client() as http:
        assert http.post("/v1/label-sets", json={"name": "grow", "names": others}).status_code == 201
        first = http.post("/v1/classify", json=ask)
        want1, rows1 = _reference_threshold(calibrated_bundle, _set_vectors(server, "grow"), 0.95)
        assert http.post("/v1/label-sets/grow/classes", json={"names": [dominant]}).status_code == 201
        second = http.post("/v1/classify", json=ask)
    if rows1 < MIN_ROWS:  # too few calibration images are of the first version's classes: refused, not guessed
        assert first.status_code == 422 and first.json()["code"] == "no_calibration_sample"
        assert f"only about {rows1} of the {N_HELD_OUT}" in first.json()["detail"]
    else:
        assert first.status_code == 200 and first.json()["operating_point"]["threshold"] == pytest.approx(
            want1, abs=1e-5
        )
    assert second.status_code == 200, second.text
    point = second.json()["operating_point"]
    want, rows2 = _reference_threshold(calibrated_bundle, _set_vectors(server, "grow"), 0.95)
    assert point["version"] == second.json()["version"] and point["calibration_images"] == rows2 == N_HELD_OUT
    assert point["threshold"] == pytest.approx(want, abs=1e-5)


def test_candidate_labels_are_calibrated_too(server: LiveServer, calibrated_bundle: Path, photos: list) -> None:  # type: ignore[type-arg]
    labels = [_dominant(calibrated_bundle), *[n for n in CLASS_NAMES if n != _dominant(calibrated_bundle)][:2]]
    with server.client() as http:
        r = http.post(
            "/v1/classify", json={"images": [_uri(photos[0])], "candidate_labels": labels, "unknown": "calibrated"}
        )
    assert r.status_code == 200, r.text
    rows = [CLASS_NAMES.index(n) for n in labels]
    vectors = load_bundle(calibrated_bundle).class_vectors["default"].numpy()[rows].astype(np.float64)
    want, _ = _reference_threshold(calibrated_bundle, vectors, 0.95)
    assert r.json()["operating_point"]["version"] is None
    assert r.json()["operating_point"]["threshold"] == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize(
    ("extra", "code"),
    [
        ({"unknown": "calibrated", "acceptance": 0}, "validation_error"),
        ({"unknown": "calibrated", "acceptance": 1.5}, "validation_error"),
        ({"unknown": "calibrated", "acceptance": "0.9"}, "validation_error"),
        ({"unknown": "sometimes"}, "validation_error"),
        ({"acceptance": 0.9}, "invalid_input"),
        ({"unknown": "calibrated", "unknown_threshold": 0.2}, "invalid_input"),
    ],
)
def test_inconsistent_requests_are_422_problems(
    server: LiveServer, photos: list, extra: dict[str, Any], code: str
) -> None:  # type: ignore[type-arg]
    with server.client() as http:
        r = http.post("/v1/classify", json={"images": [_uri(photos[0])], **extra})
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == code


def test_a_bundle_without_a_sample_says_so(shared_server: Any, photos: list) -> None:  # type: ignore[type-arg]
    with shared_server.client() as http:
        j = http.post("/v1/classify", json={"images": [_uri(photos[0])], "unknown": "calibrated"})
        files = [("files", ("p.png", png_bytes(photos[0]), "image/png"))]
        f = http.post("/v1/classify", files=files, data={"unknown": "calibrated"})
        raw = http.post("/v1/classify", json={"images": [_uri(photos[0])], "unknown_threshold": 0.1})
    for r in (j, f):
        assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
        assert r.json()["code"] == "no_calibration_sample" and "--calibration-images" in r.json()["detail"]
    assert raw.status_code == 200 and raw.json()["operating_point"] is None  # the raw threshold stays


def test_report_lists_the_sets_confusable_pairs(server: LiveServer, calibrated_bundle: Path) -> None:
    from service.index import adhoc_rank
    from service.quality import confusable_pairs

    with server.client() as http:
        r = http.get("/v1/label-sets/default/report", params={"limit": 50})
        missing = http.get("/v1/label-sets/no-such-set/report")
        bad = http.get("/v1/label-sets/default/report", params={"limit": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["calibrated"] is True and body["label_set"] == "default"
    b = load_bundle(calibrated_bundle)
    vectors = b.class_vectors["default"].numpy()
    ids = np.arange(len(vectors))
    scale = b.manifest.logit_scale
    assert b.calibration is not None
    want = confusable_pairs(
        ids, CLASS_NAMES, vectors, lambda q, k: adhoc_rank(q, vectors, scale, k), b.calibration.numpy(), scale, 50
    )
    assert [(p["a"], p["b"]) for p in body["pairs"]] == [(p.a, p.b) for p in want]
    for got, ref in zip(body["pairs"], want, strict=True):
        assert got["tie_rate"] == pytest.approx(ref.tie_rate) and got["support"] == ref.support
    assert missing.status_code == 404 and missing.headers["content-type"] == "application/problem+json"
    assert bad.status_code == 422


def _brute_tie(sample: np.ndarray, union: np.ndarray, a: int, b: int, scale: float) -> tuple[float, int]:
    cos = sample @ union.T
    top = cos.argmax(1)
    either = (top == a) | (top == b)
    ties = either & (np.abs(cos[:, a] - cos[:, b]) < np.log(2) / scale)
    return float(ties.sum() / max(either.sum(), 1)), int(either.sum())


def test_adding_a_class_reports_its_nearest_classes_with_tie_rates(server: LiveServer, calibrated_bundle: Path) -> None:
    with server.client() as http:
        assert http.post("/v1/label-sets", json={"name": "q", "names": CLASS_NAMES[:6]}).status_code == 201
        r = http.post("/v1/label-sets/q/classes", json={"names": ["temple"]})
    assert r.status_code == 201, r.text
    (quality,) = r.json()["quality"]
    snap = server.services.registry.get("q")
    b = load_bundle(calibrated_bundle)
    assert b.calibration is not None
    sample, scale = b.calibration.numpy().astype(np.float64), b.manifest.logit_scale
    vectors = np.asarray(snap.vectors, dtype=np.float64)  # rows: the 6 classes, then "temple"
    new = snap.names.index("temple")
    cos = np.delete(vectors @ vectors[new], new)
    others = [n for n in snap.names if n != "temple"]
    assert quality["name"] == "temple"
    assert [n["name"] for n in quality["nearest"]] == [others[i] for i in np.argsort(-cos)[:3]]
    for n in quality["nearest"]:
        j = snap.names.index(n["name"])
        assert n["cosine"] == pytest.approx(float(vectors[j] @ vectors[new]), abs=1e-5)
        rate, support = _brute_tie(sample, vectors, j, new, scale)
        assert n["support"] == support and (n["tie_rate"] is None) == (support == 0)
        if support:
            assert n["tie_rate"] == pytest.approx(rate, abs=1e-9)


def test_a_duplicate_under_another_spelling_is_flagged_and_refused_on_request(server: LiveServer) -> None:
    with server.client() as http:
        assert http.post("/v1/label-sets", json={"name": "dup", "names": CLASS_NAMES[:4]}).status_code == 201
        before = http.get("/v1/label-sets/dup/classes").json()
        refused = http.post("/v1/label-sets/dup/classes", json={"names": ["CAT", "rocket"], "if_similar": "error"})
        after = http.get("/v1/label-sets/dup/classes").json()
        bad = http.post("/v1/label-sets/dup/classes", json={"names": ["rocket"], "if_similar": "maybe"})
        warned = http.post("/v1/label-sets/dup/classes", json={"names": ["CAT"]})
        new_set = http.post("/v1/label-sets", json={"name": "dup2", "names": ["dog", "Dog"], "if_similar": "error"})
        missing = http.get("/v1/label-sets/dup2/classes")
    assert refused.status_code == 409 and refused.headers["content-type"] == "application/problem+json"
    problem = refused.json()
    assert problem["code"] == "similar_classes" and "'CAT' ~ 'cat'" in problem["detail"]
    assert {"name": "CAT", "similar_to": "cat"}.items() <= problem["pairs"][0].items()
    assert after == before  # nothing stored, not even the unflagged "rocket"
    assert bad.status_code == 422 and bad.json()["code"] == "validation_error"
    assert warned.status_code == 201
    (q,) = warned.json()["quality"]
    top = q["nearest"][0]
    assert q["flagged"] and top["name"] == "cat" and top["flagged"] and top["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert new_set.status_code == 409 and new_set.json()["code"] == "similar_classes"
    assert missing.status_code == 404  # the set was not created
