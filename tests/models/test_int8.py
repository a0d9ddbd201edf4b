"""Dynamic int8 export: the quantised graph is stored, checksummed, parity-reported and refused when bad.

How close int8 comes to fp32 depends on the CPU's int8 kernels, so no test here asserts that figure:
they check that the report is what this machine measures, and that a floor above the measured
cosine refuses the graph (nothing written) while one below accepts it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.bundle import load_bundle
from models.onnx_export import INT8_NAME, OnnxParityError, int8_parity, quantize_image_tower
from models.preprocess import preprocess_batch
from models.samples import sample_photos
from tests.conftest import ACCEPT_ANY_INT8, CLASS_NAMES


def _run(path: Path, pixels: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["embedding"], {"pixels": pixels})[0])


def _parity_pixels(bundle_dir: Path) -> np.ndarray:
    """The exporter's check images: the sample photos and their mirror images [12, 3, H, W]."""
    cfg = load_bundle(bundle_dir).manifest.image_encoder.preprocess.to_config()
    pixels = preprocess_batch(sample_photos(), cfg)
    return np.concatenate([pixels, pixels[..., ::-1]]).astype(np.float32)


def test_int8_graph_is_recorded_with_the_parity_this_machine_measures(int8_bundle_dir: Path) -> None:
    bundle = load_bundle(int8_bundle_dir)  # verifies every checksum, the int8 graph's included
    fp32, int8 = bundle.manifest.image_encoder.onnx
    assert (fp32.quantization, int8.quantization) == ("none", "dynamic-int8")
    assert int8.file == INT8_NAME and int8.data_file is None and INT8_NAME in bundle.manifest.files
    p = int8.parity
    assert p["n_images"] == 12  # six photos and their mirror images
    assert p["n_classes"] == len(CLASS_NAMES)
    assert -1.0 <= p["cosine_min"] <= p["cosine_mean"] <= 1.0 + 1e-6
    assert 0.0 <= p["top1_agreement"] <= 1.0 and 1 <= p["top1_classes"] <= len(CLASS_NAMES)
    # the stored figures are the ones both graphs give here, on the same check images
    pixels = _parity_pixels(int8_bundle_dir)
    vectors = bundle.class_vectors["default"].float().numpy()
    want = int8_parity(_run(int8_bundle_dir / fp32.file, pixels), _run(int8_bundle_dir / INT8_NAME, pixels), vectors)
    assert set(want) == set(p)
    for key, value in want.items():
        assert p[key] == pytest.approx(value, abs=1e-5), key
    # the manifest on disk carries the same report (what `bundle inspect` and the service read)
    on_disk = json.loads((int8_bundle_dir / "manifest.json").read_text())["image_encoder"]["onnx"][1]
    assert on_disk["parity"] == p


def test_int8_graph_is_smaller_and_really_quantised(int8_bundle_dir: Path, photos: list[Image.Image]) -> None:
    fp32_bytes = sum((int8_bundle_dir / f).stat().st_size for f in ("image_encoder.onnx", "image_encoder.onnx.data"))
    assert (int8_bundle_dir / INT8_NAME).stat().st_size < 0.6 * fp32_bytes
    cfg = load_bundle(int8_bundle_dir).manifest.image_encoder.preprocess.to_config()
    pixels = preprocess_batch(photos, cfg)  # [6, 3, 64, 64]
    got = _run(int8_bundle_dir / INT8_NAME, pixels)  # [6, 64]
    want = _run(int8_bundle_dir / "image_encoder.onnx", pixels)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)  # the tower's normalisation survives
    assert float(np.abs(got - want).max()) > 0.0  # it really is a different (quantised) graph


def test_a_floor_above_the_measured_cosine_refuses_and_writes_nothing(int8_bundle_dir: Path, tmp_path: Path) -> None:
    for name in ("image_encoder.onnx", "image_encoder.onnx.data"):
        shutil.copyfile(int8_bundle_dir / name, tmp_path / name)
    pixels = torch.from_numpy(_parity_pixels(int8_bundle_dir))
    fp32 = tmp_path / "image_encoder.onnx"
    measured = quantize_image_tower(fp32, tmp_path / "probe.onnx", pixels, min_cosine=ACCEPT_ANY_INT8)
    cosine = measured.parity["cosine_min"]
    out = tmp_path / "q.onnx"
    with pytest.raises(OnnxParityError, match="min cosine"):
        quantize_image_tower(fp32, out, pixels, min_cosine=cosine + 1e-3)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["image_encoder.onnx", "image_encoder.onnx.data", "probe.onnx"]
    ), "a refused graph left files behind"
    spec = quantize_image_tower(fp32, out, pixels, min_cosine=cosine - 1e-3)
    assert out.is_file() and spec.parity["cosine_min"] == pytest.approx(cosine, abs=1e-5)
    assert "top1_agreement" not in spec.parity  # no class vectors given


def test_parity_figures() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 8)).astype(np.float32)
    classes = np.eye(8, dtype=np.float32)
    same = int8_parity(a, a.copy(), classes)
    assert same["cosine_min"] == pytest.approx(1.0) and same["top1_agreement"] == 1.0
    b = a.copy()
    b[0] = -b[0]  # one image flips: cosine -1 and (almost surely) another arg-max class
    flipped = int8_parity(a, b, classes)
    assert flipped["cosine_min"] == pytest.approx(-1.0)
    assert flipped["top1_agreement"] == 0.75
    assert flipped["cosine_mean"] == pytest.approx(0.5)
    # margins and shifts are in cosine units: eye(8) class vectors make scores the raw coordinates
    top2 = np.sort(a, axis=1)[:, -2:]
    assert same["top1_margin_median"] == pytest.approx(float(np.median(top2[:, 1] - top2[:, 0])))
    assert same["score_shift_median"] == 0.0 and flipped["score_shift_median"] == 0.0  # 3 of 4 rows unchanged


@pytest.mark.slow
def test_cli_int8_flag_and_floor(tmp_path: Path, tiny_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from promptdistill.cli import main

    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\nrocket\n")
    args = ["bundle", "zeroshot", "--model", str(tiny_config), "--classes", str(classes), "--templates", "simple"]
    out = tmp_path / "b"
    assert main([*args, "--out", str(out), "--int8", "--int8-min-cosine", str(ACCEPT_ANY_INT8)]) == 0
    specs = load_bundle(out).manifest.image_encoder.onnx
    assert [s.quantization for s in specs] == ["none", "dynamic-int8"]
    refused = tmp_path / "refused"  # a cosine is at most 1: this floor always refuses
    assert main([*args, "--out", str(refused), "--int8", "--int8-min-cosine", "1.01"]) == 2
    assert "min cosine" in capsys.readouterr().err
    assert not (refused / "manifest.json").exists(), "a refused export must not look like a finished bundle"
