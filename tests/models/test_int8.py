"""Dynamic int8 export: the quantised graph is stored, checksummed, parity-reported and refused when bad."""

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
from tests.conftest import CLASS_NAMES


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_config: Path) -> Path:
    from models.zeroshot import build_zeroshot_bundle, named_templates

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("int8") / "bundle"
    templates = named_templates("simple")
    build_zeroshot_bundle(str(tiny_config), None, CLASS_NAMES, templates, out, int8=True, progress=False)
    return out


def test_int8_graph_is_recorded_with_parity_report(int8_bundle: Path) -> None:
    bundle = load_bundle(int8_bundle)  # verifies every checksum, the int8 graph's included
    fp32, int8 = bundle.manifest.image_encoder.onnx
    assert (fp32.quantization, int8.quantization) == ("none", "dynamic-int8")
    assert int8.file == INT8_NAME and int8.data_file is None and INT8_NAME in bundle.manifest.files
    p = int8.parity
    assert p["n_images"] == 12  # six photos and their mirror images
    assert p["n_classes"] == len(CLASS_NAMES)
    assert 0.99 <= p["cosine_min"] <= p["cosine_mean"] <= 1.0 + 1e-6
    assert 0.0 <= p["top1_agreement"] <= 1.0
    assert 1 <= p["top1_classes"] <= len(CLASS_NAMES)
    # the manifest on disk carries the same report (what `bundle inspect` and the service read)
    on_disk = json.loads((int8_bundle / "manifest.json").read_text())["image_encoder"]["onnx"][1]
    assert on_disk["parity"] == p


def test_int8_weights_are_smaller_and_agree_with_torch(int8_bundle: Path, photos: list[Image.Image]) -> None:
    import onnxruntime as ort

    from models.towers import build_image_tower

    bundle = load_bundle(int8_bundle)
    fp32_bytes = sum((int8_bundle / f).stat().st_size for f in ("image_encoder.onnx", "image_encoder.onnx.data"))
    assert (int8_bundle / INT8_NAME).stat().st_size < 0.6 * fp32_bytes
    cfg = bundle.manifest.image_encoder.preprocess.to_config()
    pixels = preprocess_batch(photos, cfg)  # [6, 3, 64, 64]
    session = ort.InferenceSession(str(int8_bundle / INT8_NAME), providers=["CPUExecutionProvider"])
    got = session.run(["embedding"], {"pixels": pixels})[0]  # [6, 64]
    with torch.no_grad():
        want = build_image_tower(bundle)(torch.from_numpy(pixels)).numpy()
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)
    assert float((got * want).sum(1).min()) > 0.99
    assert float(np.abs(got - want).max()) > 0.0  # it really is a different (quantised) graph


def test_bad_quantisation_is_refused_and_nothing_written(
    int8_bundle: Path, tmp_path: Path, photos: list[Image.Image]
) -> None:
    bundle = load_bundle(int8_bundle)
    for name in ("image_encoder.onnx", "image_encoder.onnx.data"):
        shutil.copyfile(int8_bundle / name, tmp_path / name)
    pixels = torch.from_numpy(preprocess_batch(photos, bundle.manifest.image_encoder.preprocess.to_config()))
    out = tmp_path / "q.onnx"
    with pytest.raises(OnnxParityError, match="min cosine"):
        quantize_image_tower(tmp_path / "image_encoder.onnx", out, pixels, min_cosine=1.01)
    assert not out.exists()
    spec = quantize_image_tower(tmp_path / "image_encoder.onnx", out, pixels)  # default threshold passes
    assert out.is_file() and "top1_agreement" not in spec.parity  # no class vectors given


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


def test_cli_int8_flag(tmp_path: Path, tiny_config: Path) -> None:
    from promptdistill.cli import main

    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\nrocket\n")
    out = tmp_path / "b"
    args = ["bundle", "zeroshot", "--model", str(tiny_config), "--classes", str(classes), "--templates", "simple"]
    assert main([*args, "--out", str(out), "--int8"]) == 0
    specs = load_bundle(out).manifest.image_encoder.onnx
    assert [s.quantization for s in specs] == ["none", "dynamic-int8"]
