"""The service's precision gate: a reduced-precision tower serves only above the bundle's floor.

Floors are set relative to the parity this machine measures (the figure itself depends on the
CPU's kernels): the gate's report must equal an independent computation, a floor below it serves
the reduced tower, a floor above it serves fp32 with one loud log line, and /readyz says which.
"""

from __future__ import annotations

import base64
import copy
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from models.bundle import ParityFloor, load_bundle, save_bundle
from models.precision import measure, probe_pixels, set_floor
from models.preprocess import preprocess_batch
from models.towers import build_image_tower
from service import create_app
from service.errors import StartupError
from tests.service.conftest import png_bytes

REFUSE_ALL = 2.0  # above any cosine
SERVE_ALL = -1.0  # below any cosine (NaN still fails)


def _with_floor(src: Path, dst: Path, which: str, cosine_min: float) -> Path:
    bundle = load_bundle(src)
    set_floor(bundle, which, ParityFloor(cosine_min=cosine_min))
    return save_bundle(bundle, dst)


def _ready(client: TestClient) -> dict[str, Any]:
    resp = client.get("/readyz")
    assert resp.status_code == 200, resp.text
    return dict(resp.json()["checks"])


def _refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "PRECISION GATE REFUSED" in r.getMessage()]


def test_fp16_serves_above_its_floor_and_answers_from_the_fp16_tower(
    make_settings: Any, tiny_bundle_dir: Path, tmp_path: Path, photos: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    path = _with_floor(tiny_bundle_dir, tmp_path / "b", "fp16", SERVE_ALL)
    bundle = load_bundle(path)
    tower = build_image_tower(bundle)
    half = copy.deepcopy(tower).half()
    pixels, _ = probe_pixels(bundle)
    with torch.inference_mode():
        ref = tower(torch.from_numpy(pixels)).numpy()
        got = half(torch.from_numpy(pixels).half()).float().numpy()
    want = measure(ref, got, {k: v.float().numpy() for k, v in bundle.class_vectors.items()})

    settings = make_settings(bundle=path, precision="fp16")  # backend auto: fp16 is torch's
    with caplog.at_level(logging.INFO), TestClient(create_app(settings)) as client:
        encoder = client.app.state.services.encoder  # type: ignore[attr-defined]
        assert (encoder.backend, encoder.precision) == ("torch", "fp16")
        gate = encoder.gate
        assert gate.parity is not None and gate.parity.n_images == want.n_images
        assert gate.parity.cosine_min == pytest.approx(want.cosine_min, abs=1e-6)
        assert gate.parity.top1_agreement == pytest.approx(want.top1_agreement)
        checks = _ready(client)
        assert checks["precision"] == gate.summary() and checks["precision"].startswith("fp16 (cosine_min")
        assert f"{want.cosine_min:.6f}" in checks["precision"]
        # the answers are the fp16 tower's: cosines of the same photo through it, computed here
        photo = photos[0]
        resp = client.post("/v1/classify", json={"images": [base64.b64encode(png_bytes(photo)).decode()], "top_k": 8})
        assert resp.status_code == 200, resp.text
    vectors = bundle.class_vectors["default"].float().numpy()
    x = torch.from_numpy(preprocess_batch([photo], bundle.manifest.image_encoder.preprocess.to_config()))
    with torch.inference_mode():
        direct = half(x.half()).float().numpy()[0] @ vectors.T  # [N]
    served = {p["class_id"]: p["cosine"] for p in resp.json()["results"][0]["predictions"]}
    np.testing.assert_allclose([served[i] for i in range(len(vectors))], direct, atol=1e-4)
    assert not _refusals(caplog)


def test_fp16_below_its_floor_serves_fp32_with_one_loud_line(
    make_settings: Any, tiny_bundle_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _with_floor(tiny_bundle_dir, tmp_path / "b", "fp16", REFUSE_ALL)
    settings = make_settings(bundle=path, backend="torch", precision="fp16")
    with caplog.at_level(logging.INFO), TestClient(create_app(settings)) as client:
        encoder = client.app.state.services.encoder  # type: ignore[attr-defined]
        assert encoder.precision == "fp32" and encoder.gate.wanted == "fp16"
        assert {p.dtype for p in encoder.tower.parameters()} == {torch.float32}
        checks = _ready(client)
        assert checks["precision"].startswith("fp32 (fp16 refused: cosine_min")
        assert f"floor {REFUSE_ALL:g}" in checks["precision"]
    lines = _refusals(caplog)
    assert len(lines) == 1 and "SERVING FP32 INSTEAD" in lines[0], lines
    assert [r.levelno for r in caplog.records if "PRECISION GATE REFUSED" in r.getMessage()] == [logging.ERROR]


def test_int8_is_gated_on_this_machine(
    make_settings: Any, int8_bundle_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import onnxruntime as ort

    bundle = load_bundle(int8_bundle_dir)  # exported with a floor that accepts any int8 graph
    pixels, _ = probe_pixels(bundle)
    runs = []
    for spec in bundle.manifest.image_encoder.onnx:  # fp32, then int8
        session = ort.InferenceSession(str(int8_bundle_dir / spec.file), providers=["CPUExecutionProvider"])
        runs.append(session.run(["embedding"], {"pixels": pixels})[0])
    want = measure(runs[0], runs[1], {k: v.float().numpy() for k, v in bundle.class_vectors.items()})

    with TestClient(create_app(make_settings(bundle=int8_bundle_dir, precision="int8"))) as client:
        encoder = client.app.state.services.encoder  # type: ignore[attr-defined]
        assert (encoder.backend, encoder.precision) == ("onnx", "int8")
        assert encoder.gate.parity.cosine_min == pytest.approx(want.cosine_min, abs=1e-6)
        assert encoder.gate.parity.top1_agreement == pytest.approx(want.top1_agreement)
        assert _ready(client)["precision"].startswith("int8 (cosine_min")

    path = _with_floor(int8_bundle_dir, tmp_path / "b", "int8", REFUSE_ALL)
    settings = make_settings(bundle=path, onnx_precision="int8", state_dir=tmp_path / "s2")  # the older setting
    with caplog.at_level(logging.INFO), TestClient(create_app(settings)) as client:
        encoder = client.app.state.services.encoder  # type: ignore[attr-defined]
        assert encoder.precision == "fp32"
        assert _ready(client)["precision"].startswith("fp32 (int8 refused: cosine_min")
    assert len(_refusals(caplog)) == 1


def test_a_precision_the_backend_cannot_run_is_a_startup_error(make_settings: Any) -> None:
    for backend, wanted in (("onnx", "fp16"), ("torch", "int8")):
        with (
            pytest.raises(StartupError, match=f"precision '{wanted}' is not offered by the {backend} backend"),
            TestClient(create_app(make_settings(backend=backend, precision=wanted))),
        ):
            pass


def test_unreadable_probe_images_are_a_startup_error(make_settings: Any, tiny_bundle_dir: Path, tmp_path: Path) -> None:
    from models.precision import add_probes

    bundle = load_bundle(tiny_bundle_dir)
    wrong = np.zeros((2, 3, 8, 8), dtype=np.float32)  # not the bundle's input size
    path = save_bundle(bundle, tmp_path / "b", exports=lambda stage: add_probes(bundle, stage, wrong))
    with (
        pytest.raises(StartupError, match="probe images cannot be read.*probe pixels have shape"),
        TestClient(create_app(make_settings(bundle=path, backend="torch", precision="fp16"))),
    ):
        pass
    with TestClient(create_app(make_settings(bundle=path, state_dir=tmp_path / "s2"))) as client:  # fp32: no gate
        assert _ready(client)["precision"].startswith("fp32 (reference precision")
